"""What every benchmark builds: the paper's ranks, feature spaces and mixed routes, one
training step of the frozen base, FLix and peft LoRA, and adapters that look trained.

Each case is a zero-argument callable doing one step; `loss` is the benchmark's own
(model -> scalar loss), so a small random Llama and Gemma 3 270M share these builders.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch

from flix.optim import SparseAdamW
from flix.pipeline.methods import kind_ranks

ALPHA = 16.0
LR = 1e-4
FLIX_RANKS = kind_ranks("joint")  # conf/method/flix.yaml
RANK = sum(FLIX_RANKS.values())  # FLix's active rank, and the LoRA baselines'
DROPOUT = 0.7  # the FLix training cases' feature dropout

Loss = Callable[[torch.nn.Module], torch.Tensor]


def features_of_size(num_features: int, tasks: int) -> dict[str, list[str]]:
    """D features: `tasks` tasks, the rest languages."""
    return {"task": [f"t{i}" for i in range(tasks)], "lang": [f"l{i}" for i in range(num_features - tasks)]}


def mixed_routes(features: dict[str, list[str]], batch: int, count: int, gen: torch.Generator, random_tasks: bool = False) -> list[list[dict]]:
    """`count` batches of routes: each example a random language, and task i mod T
    (a random task with `random_tasks`)."""
    tasks, langs = features["task"], features["lang"]
    if random_tasks:
        task_ids = torch.randint(len(tasks), (count, batch), generator=gen).tolist()
    else:
        task_ids = [[i % len(tasks) for i in range(batch)]] * count
    lang_ids = torch.randint(len(langs), (count, batch), generator=gen).tolist()
    return [[{"task": tasks[i], "lang": langs[j]} for i, j in zip(ti, li)] for ti, li in zip(task_ids, lang_ids)]


def frozen_step(model: torch.nn.Module, loss: Loss) -> Callable[[], None]:
    """Forward + backward of the frozen model, to its input embeddings as through any adapter."""
    model.get_input_embeddings().register_forward_hook(lambda module, inputs, out: out.requires_grad_(True))
    model.train()
    return lambda: loss(model).backward()


def flix_step(model, loss: Loss, routes: list[list[dict]], token_examples: list | None = None) -> Callable[[], None]:
    """One SparseAdamW step of a FLix model per call, each routed as the next batch of
    `routes` (packed rows: with the next of `token_examples`, each position's example)."""
    optimizer = SparseAdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    it = itertools.count()

    def step():
        i = next(it)
        with model.route(routes[i % len(routes)], token_examples=token_examples[i % len(routes)] if token_examples else None):
            value = loss(model)
        value.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def lora_step(model, loss: Loss) -> Callable[[], None]:
    """One torch AdamW step of a peft LoRA model per call."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)

    def step():
        loss(model).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def lora(base: torch.nn.Module, targets: list[str], names: list[str] | None = None):
    """peft LoRA at the baselines' rank on `targets`: one adapter as peft initialises it
    (B = 0), or with `names` one per name, initialised non-zero (one per combination)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=targets, init_lora_weights=names is None)
    if names is None:
        return get_peft_model(base, config)
    model = get_peft_model(base, config, adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, config)
    return model


def look_trained(model):
    """Give a FLix model's banks random B (B = 0 would add nothing), row 0 (the padding row) kept zero."""
    with torch.no_grad():
        for layer in model.flix_layers().values():
            layer.flix_B.normal_(std=0.02)[0].zero_()
    return model

"""The cases `flix bench adapters` times on a small Llama-style model: the model, mixed
batches of feature combinations, one training step per method and batched inference
(FLix routing, peft `adapter_names`, the base alone)."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch

from flix.pipeline.methods import kind_ranks

LR = 1e-4
ALPHA = 16.0
FLIX_RANKS = kind_ranks("joint")  # conf/method/flix.yaml
RANK = sum(FLIX_RANKS.values())  # FLix's active rank, and the LoRA baselines'
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def model_config(args) -> dict:
    heads = max(1, args.hidden // 64)
    return dict(
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        intermediate_size=4 * args.hidden,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        vocab_size=args.vocab,
        max_position_embeddings=max(args.seq, 128),
    )


def base_model(args):
    """A frozen float32 Llama-style causal LM, the same weights for every case."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        model = LlamaForCausalLM(LlamaConfig(**model_config(args), attn_implementation="sdpa"))
    return model.float().requires_grad_(False).eval()


def feature_space(num_features: int) -> dict[str, list[str]]:
    """D features: min(32, D // 2) tasks, the rest languages."""
    tasks = min(32, num_features // 2)
    return {"task": [f"t{i}" for i in range(tasks)], "lang": [f"l{i}" for i in range(num_features - tasks)]}


def mixed_batches(features: dict[str, list[str]], batch: int, count: int, gen: torch.Generator) -> list[list[dict]]:
    """`count` batches of examples with random (task, language) pairs."""
    tasks, langs = features["task"], features["lang"]
    task_ids = torch.randint(len(tasks), (count, batch), generator=gen).tolist()
    lang_ids = torch.randint(len(langs), (count, batch), generator=gen).tolist()
    return [[{"task": tasks[i], "lang": langs[j]} for i, j in zip(ti, li)] for ti, li in zip(task_ids, lang_ids)]


# --- the cases: each returns a zero-argument callable doing one step ----------------


def none_step(args, ids) -> Callable[[], None]:
    model = base_model(args).train()
    embed = model.get_input_embeddings()

    def step():
        with torch.no_grad():
            x = embed(ids)
        x.requires_grad_(True)
        model(inputs_embeds=x, labels=ids).loss.backward()

    return step


def flix_step(args, ids, config, batches) -> Callable[[], None]:
    from flix.model import get_flix_model
    from flix.optim import SparseAdamW

    model = get_flix_model(base_model(args), config).train()
    opt = SparseAdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    it = itertools.count()

    def step():
        features = batches[next(it) % len(batches)]
        with model.route(features):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()

    return step


def peft_step(args, ids) -> Callable[[], None]:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(base_model(args), LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()

    return step


def _infer(model, ids, mode: str, new_tokens: int, **kwargs):
    """One inference call: a forward over the whole batch, or greedy generation of
    `new_tokens` tokens per sequence (prefill + decode: the serving workload)."""
    with torch.no_grad():
        if mode == "forward":
            return model(input_ids=ids, **kwargs)
        return model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            **kwargs,
        )


def flix_inference(args, ids, combos, mode: str) -> Callable[[], None]:
    from flix.model import get_flix_model
    from flix.pipeline.methods import method_config

    features = {"task": sorted({c["task"] for c in combos}), "lang": sorted({c["lang"] for c in combos})}
    config = method_config("flix", features, "joint", alpha=ALPHA, target_modules=TARGETS)
    model = get_flix_model(base_model(args), config).eval()
    with torch.no_grad():  # trained-looking adapters
        for layer in model.flix_layers().values():
            layer.flix_B.normal_(std=0.02)[0].zero_()

    def step():
        with model.route(combos):
            _infer(model, ids, mode, args.new_tokens)

    return step


def peft_inference(args, ids, combos, mode: str) -> Callable[[], None]:
    from peft import LoraConfig, get_peft_model

    names = [f"combo{i}" for i in range(len(combos))]
    lora = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS, init_lora_weights=False)
    model = get_peft_model(base_model(args), lora, adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, lora)
    model.eval()
    adapter_names = [names[i % len(names)] for i in range(ids.shape[0])]
    return lambda: _infer(model, ids, mode, args.new_tokens, adapter_names=adapter_names)


def base_inference(args, ids, mode: str) -> Callable[[], None]:
    model = base_model(args).eval()
    return lambda: _infer(model, ids, mode, args.new_tokens)


# --- timing and the report ----------------------------------------------------------

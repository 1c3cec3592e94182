"""The cases `benchmarks.adapters` times on a small Llama-style model: the model, its
feature spaces, one training step per method and batched inference (FLix routing, peft
`adapter_names`, the base alone); the training steps are `benchmarks.cases`'."""

from __future__ import annotations

from collections.abc import Callable

import torch

from benchmarks import cases
from flix.model import get_flix_model
from flix.pipeline.methods import method_config

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


def adapter_features(num_features: int) -> dict[str, list[str]]:
    """D features: min(32, D // 2) tasks, the rest languages."""
    return cases.features_of_size(num_features, min(32, num_features // 2))


def mixed_batches(features: dict[str, list[str]], batch: int, count: int, gen: torch.Generator) -> list[list[dict]]:
    """`count` batches of examples with random (task, language) pairs."""
    return cases.mixed_routes(features, batch, count, gen, random_tasks=True)


def lm_loss(ids: torch.Tensor) -> cases.Loss:
    """The causal LM loss on every token of `ids`."""
    return lambda model: model(input_ids=ids, labels=ids).loss


# --- the cases: each returns a zero-argument callable doing one step ----------------


def none_step(args, ids) -> Callable[[], None]:
    return cases.frozen_step(base_model(args), lm_loss(ids))


def flix_step(args, ids, config, batches) -> Callable[[], None]:
    return cases.flix_step(get_flix_model(base_model(args), config).train(), lm_loss(ids), batches)


def peft_step(args, ids) -> Callable[[], None]:
    return cases.lora_step(cases.lora(base_model(args), TARGETS).train(), lm_loss(ids))


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
    features = {"task": sorted({c["task"] for c in combos}), "lang": sorted({c["lang"] for c in combos})}
    config = method_config("flix", features, "joint", alpha=cases.ALPHA, target_modules=TARGETS)
    model = cases.look_trained(get_flix_model(base_model(args), config).eval())

    def step():
        with model.route(combos):
            _infer(model, ids, mode, args.new_tokens)

    return step


def peft_inference(args, ids, combos, mode: str) -> Callable[[], None]:
    model = cases.lora(base_model(args), TARGETS, [f"combo{i}" for i in range(len(combos))]).eval()
    adapter_names = [f"combo{i % len(combos)}" for i in range(ids.shape[0])]
    return lambda: _infer(model, ids, mode, args.new_tokens, adapter_names=adapter_names)


def base_inference(args, ids, mode: str) -> Callable[[], None]:
    model = base_model(args).eval()
    return lambda: _infer(model, ids, mode, args.new_tokens)

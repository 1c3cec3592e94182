"""The cases `benchmarks.model` times: model loading, a scale's real micro-batches (packed
where its runs pack) and routes, one training step of the base / FLix (`benchmarks.cases`'
steps with the training loss) and of peft LoRA with the model's own loss on padded rows of
the same examples, generation, a matmul for the practical peak and the one-micro-batch
memory probe (run in a fresh process)."""

from __future__ import annotations

import copy
import itertools
import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks import cases, options
from benchmarks.cases import ALPHA, DROPOUT
from flix import kernels
from flix.attention import use_segment_attention
from flix.fused import use_fused_ops
from flix.loss import IGNORE
from flix.model import get_flix_model
from flix.pipeline.batching import TextLimits, loss_sum, packing_holds, position_ids, step_batches, training_batch
from flix.pipeline.memory import peak_memory_gib
from flix.pipeline.methods import method_config
from flix.targets import default_target_modules, find_target_modules

REPO = Path(__file__).resolve().parents[1]
TASKS = options.GEMMA_TASKS


def load(args):
    from omegaconf import OmegaConf

    from flix.base_models import load_model
    from flix.pipeline.run_config import compose

    model_cfg = compose([f"model={args.model}"]).model
    return load_model(OmegaConf.to_container(model_cfg, resolve=True))


def device_of(args) -> torch.device:
    if args.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(args.device)


def shared_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A structural copy whose parameters and buffers are the original's tensors, so
    every case can wrap its own modules without another copy of the weights."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def gemma_features(num_features: int) -> dict[str, list[str]]:
    """D features: 4 tasks, the rest languages."""
    return cases.features_of_size(num_features, TASKS)


def bank_bytes(model: torch.nn.Module, num_features: int) -> int:
    """Bytes of FLix banks with D features (SparseAdamW keeps moments only for the
    rows that batches touch, a few hundred here)."""
    rows = method_config("flix", gemma_features(num_features), "joint").space.num_rows
    widths = sum(sum(model.get_submodule(n).weight.shape) for n in find_target_modules(model, None))
    return rows * widths * 4


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024


# --- the cases ------------------------------------------------------------------------------


@dataclass
class MicroBatch:
    """One round's micro-batch. `trained`: the tensors `Trainer.train_step` computes on
    (packed rows where the scale packs: position ids restarting per example and
    `token_examples`, no attention mask; else padded rows with one); `padded`: the same
    examples as left-padded rows with an attention mask (`trained` itself when that is
    what the run trains on), for peft's step: the same real tokens and targets."""

    trained: dict
    padded: dict

    @property
    def examples(self) -> int:
        return len(self.padded["input_ids"])


def on_device(batch: dict, device) -> dict:
    """A batch's tensors on `device` as the trainer moves them (token_examples stays where routing reads it)."""
    return {k: v if k == "token_examples" else v.to(device) for k, v in batch.items() if k != "num_targets"}


def real_micro_batches(args, base, tokenizer, count: int, device) -> list[MicroBatch]:
    """The first `count` micro-batches that a `--scale` run of `--mixture` (and
    `--override`s) trains on, as `Trainer.train_step` builds them (its sampler and seed,
    `flix.pipeline.batching.step_batches` with the scale's micro-batch size, token budget
    and packing where `base` packs exactly), on `device`. Causal models (the cases' losses are)."""
    from omegaconf import OmegaConf

    from flix.data.reader import resolve_root
    from flix.data.sampling import MixtureSampler
    from flix.pipeline.run_config import compose, load_mixture_for
    from flix.pipeline.trainer import read_split

    overrides = [f"scale={args.scale}", f"mixture={args.mixture}", f"model={args.model}", *args.override]
    cfg = compose(overrides + ([f"data.root={args.data_root}"] if args.data_root else []))
    mixture, root = load_mixture_for(cfg), resolve_root(OmegaConf.select(cfg, "data.root"))
    mixture.check(root)
    s, t = cfg.scale, cfg.train
    # as Trainer builds it
    sampler = MixtureSampler(
        read_split(root, mixture.train_datasets, "train"), s.batch_size, seed=cfg.seed, strategy=t.sampling, cap=t.cap, temperature=t.temperature
    )
    limits = TextLimits(s.max_prompt_tokens, s.max_target_tokens, s.max_context_chars)
    packed = bool(s.packing) and packing_holds(base, seq2seq=False)  # as Trainer decides
    batches: list[MicroBatch] = []
    step = 0
    while len(batches) < count:
        examples = sampler.batch(step)
        for part, batch in step_batches(examples, tokenizer, limits, False, s.micro_batch_size, s.tokens_per_micro_batch, packed=packed):
            trained = on_device(batch, device)
            padded = (
                trained if "attention_mask" in batch else on_device(training_batch([examples[i] for i in part], tokenizer, limits, False), device)
            )
            batches.append(MicroBatch(trained, padded))
        step += 1
    return batches[:count]


def full_length_batch(rows: int, seq: int, target: int, tokenizer, device) -> dict:
    """`rows` examples of `seq` tokens, the last `target` labelled: a scale's worst case (the memory probe)."""
    ids = torch.randint(10, min(tokenizer.vocab_size, 50_000), (rows, seq), generator=torch.Generator().manual_seed(0))
    labels = torch.full_like(ids, IGNORE)
    labels[:, -target:] = ids[:, -target:]
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": labels.to(device)}


def cycling(batches: list[dict]) -> Callable[[], dict]:
    """The next of `batches` at each call: every case of a round (each called once) gets the same one."""
    it = itertools.count()
    return lambda: batches[next(it) % len(batches)]


def training_loss(batches: list[dict], autocast) -> cases.Loss:
    """The training loss (`flix.pipeline.batching.loss_sum`: the output layer at target
    positions only) of the next batch, under `autocast`."""
    batch = cycling(batches)

    def loss(model):
        with autocast():
            return loss_sum(model, batch(), seq2seq=False)

    return loss


def own_loss(batches: list[dict], autocast) -> cases.Loss:
    """The loss a user's step would take: the model's own `labels=` loss (full-vocabulary
    logits at every position, kept for backward)."""
    batch = cycling(batches)

    def loss(model):
        b = batch()
        with autocast():
            return model(**b, position_ids=position_ids(b["attention_mask"])).loss

    return loss


def routes_for(features: dict[str, list[str]], batches: list[MicroBatch], gen: torch.Generator) -> list[list[dict]]:
    """One route per example of each micro-batch: task i mod 4 and a random language."""
    return [cases.mixed_routes(features, b.examples, 1, gen)[0] for b in batches]


def base_step(model, batches: list[MicroBatch], autocast) -> Callable[[], None]:
    compute_as_runs(model, batches)
    return cases.frozen_step(model, training_loss([b.trained for b in batches], autocast))


def flix_step(base, config, batches: list[MicroBatch], routes, autocast, device) -> Callable[[], None]:
    """A FLix step on the micro-batches the run trains on, packed rows routed per token."""
    model = get_flix_model(shared_copy(base), config).to(device).train()
    compute_as_runs(model, batches)
    tokens = [b.trained.get("token_examples") for b in batches]
    return cases.flix_step(model, training_loss([b.trained for b in batches], autocast), routes, tokens)


def compute_as_runs(model, batches: list[MicroBatch]) -> None:
    """Packed rows get each example's attention on its own (flix.attention), and the frozen
    RMSNorms and MLP activations the kernels (flix.fused, with kernels on), as Trainer gives them."""
    if "token_examples" in batches[0].trained:
        use_segment_attention(model)
    if kernels.wanted():
        use_fused_ops(model)


def peft_step(base, batches: list[MicroBatch], autocast, device) -> Callable[[], None]:
    """peft LoRA on the same projections with the model's own loss, on padded rows (with
    an attention mask) of the same examples: the step a user would write."""
    model = cases.lora(shared_copy(base), default_target_modules(base)).to(device).train()
    return cases.lora_step(model, own_loss([b.padded for b in batches], autocast))


def generation_cases(args, base, tokenizer, device, autocast) -> dict[str, Callable[[], None]]:
    gen = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(10, min(tokenizer.vocab_size, 50_000), (args.gen_batch, args.gen_seq), generator=gen).to(device)
    langs = -(-args.gen_batch // TASKS)
    combos = [{"task": f"t{i % TASKS}", "lang": f"l{i // TASKS}"} for i in range(args.gen_batch)]
    kwargs = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=tokenizer.pad_token_id,
    )

    def generate(model, **extra):
        def call():
            with torch.no_grad(), autocast():
                model.generate(**kwargs, **extra)

        return call

    features = {"task": [f"t{i}" for i in range(TASKS)], "lang": [f"l{i}" for i in range(langs)]}
    flix = cases.look_trained(get_flix_model(shared_copy(base), method_config("flix", features, "joint", alpha=ALPHA)).to(device).eval())

    def flix_generate():
        with flix.route(combos):
            generate(flix)()

    names = [f"combo{i}" for i in range(args.gen_batch)]
    peft = cases.lora(shared_copy(base), default_target_modules(base), names).to(device).eval()
    return {"base": generate(shared_copy(base).eval()), "peft_adapter_names": generate(peft, adapter_names=names), "flix": flix_generate}


# --- the memory probe (a fresh process, so that its peak is one micro-batch's) ----------------


def probe_memory(args, batch: int, prompt: int, target: int) -> dict:
    """Peak memory of one FLix micro-batch (forward + backward) at full length."""
    import time

    device = device_of(args)
    base, tokenizer = load(args)
    base.to(device)
    full = full_length_batch(batch, prompt + target + 1, target + 1, tokenizer, device)
    batches = [MicroBatch(full, full)]
    config = method_config("flix", gemma_features(64), "joint", alpha=ALPHA, feature_dropout=DROPOUT)
    routes = routes_for(gemma_features(64), batches, torch.Generator().manual_seed(args.seed))
    step = flix_step(base, config, batches, routes, autocast_for(device, bf16_enabled(args, device)), device)
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    return {"micro_batch": batch, "tokens": prompt + target + 1, "peak_gib": peak_memory_gib(device), "seconds": seconds, "device": device.type}


def measure_micro_batch_memory(args) -> dict | None:
    from flix.pipeline.run_config import compose

    if args.memory_scale == "none":
        return None
    s = compose([f"scale={args.memory_scale}"]).scale
    sizes = [str(s.micro_batch_size), str(s.max_prompt_tokens), str(s.max_target_tokens)]
    flags = ["--model", args.model, "--device", args.device, "--threads", str(args.threads), "--bf16", args.bf16]
    cmd = [sys.executable, "-m", "benchmarks.model", "--probe-memory", *sizes, *flags]
    print(
        f"benchmarks: measuring one {args.memory_scale} micro-batch ({s.micro_batch_size} x {s.max_prompt_tokens + s.max_target_tokens + 1} tokens) in a fresh process",
        file=sys.stderr,
        flush=True,
    )
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO)  # cwd: where `benchmarks` imports from
    return {"scale": args.memory_scale, **json.loads(out.stdout.strip().splitlines()[-1])}


def bf16_enabled(args, device: torch.device) -> bool:
    """--bf16 as `train.bf16` reads it: auto is on for CUDA only."""
    from flix.pipeline.trainer import use_bf16

    return use_bf16({"true": True, "false": False}.get(args.bf16, args.bf16), device)


def autocast_for(device: torch.device, enabled: bool):
    """A fresh bf16 autocast context per call (or a disabled one), as `flix.pipeline.trainer` uses."""
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)

"""`flix bench run`: how long one training run will take on this machine, before running it.

    flix bench run scale=mini mixture=study_a     # any `python -m flix.train` overrides

Builds the run as `python -m flix.train` does, times a few optimizer steps on the scale's
real data (the trainer's own step: its sampler, length-sorted micro-batches and loss), the
target NLL of the whole validation and test sets (one pooled pass each, as runs score them)
and, per task, one generation batch (validation split; after an untimed warm-up), and
extrapolates to the scale's budget:

    total = start-up + steps x step + validations x validation pass + test pass

A validation pass is target NLL alone unless `train.select_by=metric` (then generation
too); the test is target NLL on `scale.test_nll_examples` (or `test_examples`) and greedy
outputs on `scale.test_examples`. Each step is also timed with its micro-batches in the
sampler's order, for the padding that length sorting saves, and put against a square
matmul timed between the steps (`matmul_case`): useful GFLOP/s counts only what the step
cannot avoid (`useful_flops`). The untrained adapter is timed; it tends to stop
generating later than a trained one, so the generation figures lean long. Nothing is
written to a run directory.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from flix.pipeline.flops import matmul_case, matmul_name, matmul_seconds, useful_flops

if TYPE_CHECKING:
    from omegaconf import DictConfig

MATMUL_REPEATS = 3  # square matmuls timed after each step: the peak is their median


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="flix bench run",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for python -m flix.train (scale=mini mixture=study_a ...)")
    parser.add_argument("--steps", type=int, default=2, help="timed optimizer steps; the figure is their median (default 2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps first (default 1)")
    parser.add_argument("--out", type=Path, help="also write the figures to this JSON file (atomically)")
    args = parser.parse_intermixed_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from flix.pipeline.run_config import compose

    try:
        cfg = compose(args.overrides)
    except (HydraException, OmegaConfBaseException) as err:  # they name the key and list the choices
        parser.error(str(err))
    if cfg.method.per_dataset:
        parser.error(f"method={cfg.method.name} trains one compute-matched adapter per dataset, one after another: time method=compute_matched")
    report = estimate(cfg, args.steps, args.warmup)
    report["command"] = " ".join(["flix bench run", *args.overrides, f"--steps {args.steps}", f"--warmup {args.warmup}"])
    print(format_report(report))
    if args.out:
        from flix.io import atomic_write_json

        atomic_write_json(args.out, report)
        print(f"flix bench run: wrote {args.out}", file=sys.stderr)
    return 0


def batches_per_task(data: dict, batch_size: int) -> dict[str, int]:
    counts: dict[str, int] = {}
    for (task, _), examples in data.items():
        counts[task] = counts.get(task, 0) + math.ceil(len(examples) / batch_size)
    return counts


def step_micro_batches(
    sampler, step: int, micro_batch_size: int, tokenizer, limits, seq2seq: bool, tokens: int | None = None, packed: bool = False
) -> list[dict]:
    """The tensors `Trainer.train_step(step)` computes on: length-sorted micro-batches of
    its sampler's batch (one process), by `tokens` when set, packed with `packed`."""
    from flix.pipeline.batching import step_batches

    return [b for _, b in step_batches(sampler.batch(step), tokenizer, limits, seq2seq, micro_batch_size, tokens, packed)]


def estimate(cfg: DictConfig, steps: int, warmup: int) -> dict:
    import torch  # here, not at the top: `flix bench run --help` stays quick
    from tqdm.auto import tqdm

    from flix.data.sampling import eval_sample
    from flix.pipeline.evaluate import evaluate, predict
    from flix.pipeline.memory import peak_memory_gib
    from flix.pipeline.run_config import load_mixture_for
    from flix.pipeline.trainer import Trainer, is_validation_step, read_split
    from flix.pipeline.versions import device_name, versions
    from flix.record import git_commit

    torch.set_num_threads(cfg.train.threads or torch.get_num_threads())
    s = cfg.scale
    started = time.perf_counter()
    mixture = load_mixture_for(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer.from_config(cfg, mixture, Path(tmp))
    startup = time.perf_counter() - started
    cuda = trainer.device.type == "cuda"

    def timed(fn, *args) -> float:
        begin = time.perf_counter()
        fn(*args)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - begin

    # Each step twice, interleaved: micro-batches of length-sorted examples (what runs do)
    # and in the sampler's order (before), for the padding they save; a run that packs or
    # takes a token budget a third time, as padded rows of micro_batch_size (before that),
    # in alternating order; a few square matmuls after each, the peak its useful arithmetic is put against.
    matmul, matmul_flops = matmul_case(trainer.device, trainer.bf16)
    variants = ["sorted", "unsorted"] + (["padded"] if trainer.packing or s.tokens_per_micro_batch else [])
    times: dict[str, list[float]] = {v: [] for v in variants}
    padding, tokens_per_s = {v: [] for v in variants}, {v: [] for v in variants}
    useful, matmul_s = [], []
    packing, budget = trainer.packing, s.tokens_per_micro_batch
    for i in tqdm(range(warmup + steps), desc=f"bench: train steps ({', '.join(variants)})", unit="step"):
        for variant in variants if i % 2 == 0 else variants[::-1]:
            trainer.sort_micro_batches = variant != "unsorted"
            trainer.packing, s.tokens_per_micro_batch = (False, None) if variant == "padded" else (packing, budget)
            seconds = timed(trainer.train_step, i)
            times[variant].append(seconds)
            if i >= warmup:
                padding[variant].append(trainer.last_padding)
                tokens_per_s[variant].append(trainer.last_tokens / seconds)
        if i >= warmup:
            batches = step_micro_batches(trainer.sampler, i, s.micro_batch_size, trainer.tokenizer, trainer.limits, trainer.seq2seq)
            useful.append(sum(useful_flops(trainer.model, b, trainer.seq2seq) for b in batches))
            matmul_s += matmul_seconds(matmul, trainer.device, MATMUL_REPEATS)
    trainer.sort_micro_batches, trainer.packing, s.tokens_per_micro_batch = True, packing, budget
    step_times = times["sorted"]
    step_s = statistics.median(step_times[warmup:])
    useful_rate = statistics.median(f / t for f, t in zip(useful, step_times[warmup:]))
    peak = matmul_flops / statistics.median(matmul_s)

    def generate(examples):
        with trainer.autocast():
            predict(trainer.model, trainer.tokenizer, examples, trainer.limits, len(examples), trainer.seq2seq, trainer.device)

    def nll(datasets):  # as validation and test score it: every dataset in one pooled pass
        with trainer.autocast():
            evaluate(
                trainer.model,
                trainer.tokenizer,
                datasets,
                trainer.limits,
                s.eval_batch_size,
                trainer.seq2seq,
                trainer.device,
                generate={},
                packed=trainer.packing,
            )

    first = {}  # each task's first validation dataset: one batch of each kind per task
    for (task, _), examples in trainer.validation.items():
        first.setdefault(task, examples[: s.eval_batch_size])
    generate(next(iter(first.values()))[:2])  # warm-up: first-call costs are not per batch
    nll({key: examples[:2] for key, examples in list(trainer.validation.items())[:1]})
    batch_s = {task: timed(generate, examples) for task, examples in tqdm(first.items(), desc="bench: generation", unit="task")}

    # as Trainer.validate and Trainer.test evaluate: NLL on every example (timed whole), generation where the run generates
    generates = cfg.train.select_by == "metric"
    test = read_split(trainer.root, mixture.eval_datasets, "test", s.test_nll_examples or s.test_examples)
    prompted = {key: eval_sample(examples, s.test_examples, key[0], "test", key[1]) for key, examples in test.items()}
    print("bench: target NLL of the validation and test sets", file=sys.stderr, flush=True)
    nll_s = {"validation": timed(nll, trainer.validation), "test": timed(nll, test)}
    validation_batches = batches_per_task(trainer.validation, s.eval_batch_size)
    test_generation_batches = batches_per_task(prompted, s.eval_batch_size)
    validations = sum(is_validation_step(step, s) for step in range(1, s.steps + 1))
    validation_pass = nll_s["validation"] + (sum(n * batch_s[task] for task, n in validation_batches.items()) if generates else 0.0)
    test_pass = nll_s["test"] + sum(n * batch_s[task] for task, n in test_generation_batches.items())
    expected = {
        "startup_s": startup,
        "train_s": s.steps * step_s,
        "validation_pass_s": validation_pass,
        "validation_s": validations * validation_pass,
        "test_s": test_pass,
    }
    expected["total_s"] = expected["startup_s"] + expected["train_s"] + expected["validation_s"] + expected["test_s"]
    return {
        "scale": s.name,
        "mixture": mixture.name,
        "method": cfg.method.name,
        "model": cfg.model.name,
        "device": device_name(trainer.device),
        "threads": torch.get_num_threads(),
        "bf16": trainer.bf16,
        "measured": {
            "startup_s": startup,
            "step_s": step_s,
            "step_times_s": step_times,
            "warmup_steps": warmup,
            "useful_gflop_per_step": [f / 1e9 for f in useful],
            "useful_gflop_per_s": useful_rate / 1e9,
            "matmul_gflop_per_s": peak / 1e9,
            "matmul": f"{matmul_name(trainer.device, trainer.bf16)}, median of {len(matmul_s)} between the steps",
            "nll_pass_s": nll_s,
            "generation_batch_s": batch_s,
            "generation_batch_examples": {task: len(examples) for task, examples in first.items()},
            "peak_memory_gib": peak_memory_gib(trainer.device),
            "padding_fraction": {v: statistics.mean(padding[v]) for v in variants},
            "tokens_per_s": {v: statistics.median(tokens_per_s[v]) for v in variants},
            # per step: the run's micro-batches' time over padded rows' (null: the run pads)
            "step_vs_padded": statistics.median(a / b for a, b in zip(times["sorted"][warmup:], times["padded"][warmup:]))
            if "padded" in times
            else None,
            "packing": trainer.packing,
        },
        "budget": {
            "steps": s.steps,
            "batch_size": s.batch_size,
            "micro_batch_size": s.micro_batch_size,
            "tokens_per_micro_batch": s.tokens_per_micro_batch,
            "validations": validations,
            "select_by": cfg.train.select_by,
            "validation_batches": validation_batches,
            "test_generation_batches": test_generation_batches,
        },
        "expected": expected,
        "versions": versions(),
        "commit": git_commit(),
    }


def duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.2f} s"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def packed_line(m: dict) -> str:
    how = "packed" if m["packing"] else "by the token budget"
    real, padded = 1.0 - m["padding_fraction"]["sorted"], 1.0 - m["padding_fraction"]["padded"]
    return (
        f"  micro-batches {how}: {1 / real:.2f}x computed per real position (padded rows of micro_batch_size: {1 / padded:.2f}x); "
        f"step time {m['step_vs_padded']:.2f}x the padded rows' (median per-step ratio, interleaved)"
    )


def format_report(r: dict) -> str:
    m, b, e = r["measured"], r["budget"], r["expected"]
    memory = "resident memory" if r["device"].startswith("cpu") else "GPU memory"
    generation = ", ".join(f"{task} {duration(t)}" for task, t in m["generation_batch_s"].items())
    examples = ", ".join(f"{task} {n}" for task, n in m["generation_batch_examples"].items())
    real = 1.0 - m["padding_fraction"]["sorted"]
    validation = "target NLL" + (" and generation" if b["select_by"] == "metric" else " alone")
    return "\n".join(
        [
            f"flix bench run: {r['scale']} / {r['mixture']} / {r['method']} / {r['model']} on {r['device']}, "
            f"{r['threads']} threads, bf16 {'on' if r['bf16'] else 'off'}",
            f"  measured  start-up {duration(m['startup_s'])}; step of {b['batch_size']} examples {duration(m['step_s'])} "
            f"(median of {len(m['step_times_s']) - m['warmup_steps']}); target NLL of the validation set {duration(m['nll_pass_s']['validation'])}, "
            f"of the test set {duration(m['nll_pass_s']['test'])}; one batch of generation: {generation} "
            f"(examples: {examples}); peak {memory} {m['peak_memory_gib']:.1f} GiB",
            f"  arithmetic useful {m['useful_gflop_per_s']:.1f} GFLOP/s ({statistics.mean(m['useful_gflop_per_step']):.3g} GFLOP a step: "
            f"real tokens and targets, forward and input gradient), {m['useful_gflop_per_s'] / m['matmul_gflop_per_s']:.0%} of "
            f"{m['matmul_gflop_per_s']:.1f} GFLOP/s, a matmul timed here ({m['matmul']})",
            f"  padding   real positions are {real:.1%} of those computed ({1 / real:.2f}x computed per real) in length-sorted "
            f"micro-batches (what runs use), {1.0 - m['padding_fraction']['unsorted']:.1%} in the sampler's order; real tokens per second "
            f"{m['tokens_per_s']['unsorted']:.0f} -> {m['tokens_per_s']['sorted']:.0f}",
            *([] if m.get("step_vs_padded") is None else [packed_line(m)]),
            f"  expected  train {b['steps']} x {duration(m['step_s'])} = {duration(e['train_s'])}; "
            f"validation ({validation}) {b['validations']} x {duration(e['validation_pass_s'])} = {duration(e['validation_s'])}; "
            f"test (target NLL and generation) {duration(e['test_s'])}",
            f"  expected time per run: {duration(e['total_s'])}",
        ]
    )

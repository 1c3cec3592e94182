"""`flix bench run`: how long one training run will take on this machine, before running it.

    flix bench run scale=mini mixture=study_a     # any `python -m flix.train` overrides

Builds the run as `python -m flix.train` does, times a few optimizer steps and one
generation batch per task (validation split, after an untimed warm-up), and extrapolates
to the scale's budget (each step is also timed with its micro-batches in the sampler's
order, for the padding fraction and tokens per second that length sorting saves):

    total = start-up + steps x step + validations x validation pass + test pass

The untrained adapter is timed; it tends to stop generating later than a trained one, so
the evaluation figures lean long. Nothing is written to a run directory.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from omegaconf import DictConfig


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


def estimate(cfg: DictConfig, steps: int, warmup: int) -> dict:
    import torch  # here, not at the top: `flix bench run --help` stays quick
    from tqdm.auto import tqdm

    from flix.pipeline.evaluate import predict
    from flix.pipeline.memory import peak_memory_gib
    from flix.pipeline.run_config import load_mixture_for
    from flix.pipeline.trainer import Trainer, is_validation_step, read_split
    from flix.pipeline.versions import versions
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
    # and in the sampler's order (before), for the padding they save.
    step_times, padding, tokens_per_s = [], {True: [], False: []}, {True: [], False: []}
    for i in tqdm(range(warmup + steps), desc="bench: train steps (sorted, unsorted)", unit="step"):
        for sort in (True, False):
            trainer.sort_micro_batches = sort
            seconds = timed(trainer.train_step, i)
            if sort:
                step_times.append(seconds)
            if i >= warmup:
                padding[sort].append(trainer.last_padding)
                tokens_per_s[sort].append(trainer.last_tokens / seconds)
    trainer.sort_micro_batches = True
    step_s = statistics.median(step_times[warmup:])

    def generate(examples):
        with trainer.autocast():
            predict(trainer.model, trainer.tokenizer, examples, trainer.limits, len(examples), trainer.seq2seq, trainer.device)

    first = {}  # each task's first validation dataset
    for (task, _), examples in trainer.validation.items():
        first.setdefault(task, examples[: s.eval_batch_size])
    generate(next(iter(first.values()))[:2])  # warm-up: first-call costs are not per batch
    batch_s = {task: timed(generate, examples) for task, examples in tqdm(first.items(), desc="bench: generation", unit="task")}

    test = read_split(trainer.root, mixture.eval_datasets, "test", s.test_examples)
    validation_batches = batches_per_task(trainer.validation, s.eval_batch_size)
    test_batches = batches_per_task(test, s.eval_batch_size)
    validations = sum(is_validation_step(step, s) for step in range(1, s.steps + 1))
    validation_pass = sum(n * batch_s[task] for task, n in validation_batches.items())
    test_pass = sum(n * batch_s[task] for task, n in test_batches.items())
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
        "device": torch.cuda.get_device_name(trainer.device) if cuda else f"cpu ({os.cpu_count()} cores)",
        "threads": torch.get_num_threads(),
        "bf16": trainer.bf16,
        "measured": {
            "startup_s": startup,
            "step_s": step_s,
            "step_times_s": step_times,
            "warmup_steps": warmup,
            "generation_batch_s": batch_s,
            "generation_batch_examples": {task: len(examples) for task, examples in first.items()},
            "peak_memory_gib": peak_memory_gib(trainer.device),
            "padding_fraction": {"sorted": statistics.mean(padding[True]), "unsorted": statistics.mean(padding[False])},
            "tokens_per_s": {"sorted": statistics.median(tokens_per_s[True]), "unsorted": statistics.median(tokens_per_s[False])},
        },
        "budget": {
            "steps": s.steps,
            "batch_size": s.batch_size,
            "micro_batch_size": s.micro_batch_size,
            "validations": validations,
            "validation_batches": validation_batches,
            "test_batches": test_batches,
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


def format_report(r: dict) -> str:
    m, b, e = r["measured"], r["budget"], r["expected"]
    memory = "resident memory" if r["device"].startswith("cpu") else "GPU memory"
    generation = ", ".join(f"{task} {duration(t)} ({m['generation_batch_examples'][task]} examples)" for task, t in m["generation_batch_s"].items())
    return "\n".join(
        [
            f"flix bench run: {r['scale']} / {r['mixture']} / {r['method']} / {r['model']} on {r['device']}, "
            f"{r['threads']} threads, bf16 {'on' if r['bf16'] else 'off'}",
            f"  measured  start-up {duration(m['startup_s'])}; step of {b['batch_size']} examples {duration(m['step_s'])} "
            f"(median of {len(m['step_times_s']) - m['warmup_steps']}); one generation batch: {generation}; "
            f"peak {memory} {m['peak_memory_gib']:.1f} GiB",
            f"  padding   {m['padding_fraction']['unsorted']:.1%} of a step's input positions in the sampler's order, "
            f"{m['padding_fraction']['sorted']:.1%} in length-sorted micro-batches (what runs use); real tokens per second "
            f"{m['tokens_per_s']['unsorted']:.0f} -> {m['tokens_per_s']['sorted']:.0f}",
            f"  expected  train {b['steps']} x {duration(m['step_s'])} = {duration(e['train_s'])}; "
            f"validation {b['validations']} x {duration(e['validation_pass_s'])} = {duration(e['validation_s'])}; "
            f"test {duration(e['test_s'])}",
            f"  expected time per run: {duration(e['total_s'])}",
        ]
    )

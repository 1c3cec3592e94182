"""The work of `python -m benchmarks.adapters` (its options and docs are in benchmarks/adapters.py,
which parses them before anything here loads torch)."""

from __future__ import annotations

import gc
import math
import os
import platform
import sys
import warnings
from collections.abc import Callable

import torch

from benchmarks.adapter_cases import (
    TARGETS,
    adapter_features,
    base_inference,
    flix_inference,
    flix_step,
    mixed_batches,
    model_config,
    none_step,
    peft_inference,
    peft_step,
)
from benchmarks.cases import ALPHA, DROPOUT, FLIX_RANKS, RANK
from benchmarks.timing import stats, time_interleaved
from flix import kernels
from flix.io import atomic_write_json
from flix.pipeline.methods import method_config
from flix.pipeline.versions import versions

WITHIN = 1.10  # "within 10%"
SPEEDUP = 2.0
INFERENCE_MODES = ("forward", "generate")


def run(args, sizes: list[int]) -> int:
    with warnings.catch_warnings():  # peft touches a deprecated transformers property
        warnings.simplefilter("ignore", FutureWarning)
        return bench_adapters(args, sizes)


def bench_adapters(args, sizes: list[int]) -> int:
    torch.set_num_threads(args.threads)
    kernels.use(True)  # the compiled CPU kernels, as scale=cpu runs use them (the snapshots were measured so)
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(3, args.vocab, (args.batch, args.seq), generator=gen)
    rounds = args.warmup + args.repeats

    # training: one step per call
    train: dict[tuple[str, int], Callable[[], None]] = {}
    train[("none", 0)] = none_step(args, ids)
    smallest = adapter_features(sizes[0])
    cm = method_config("compute_matched", smallest, "joint", alpha=ALPHA, target_modules=TARGETS)
    train[("compute_matched", 1)] = flix_step(args, ids, cm, mixed_batches(smallest, args.batch, rounds, gen))
    for d in sizes:
        print(f"benchmarks: building flix D={d}", file=sys.stderr, flush=True)
        features = adapter_features(d)
        config = method_config("flix", features, "joint", alpha=ALPHA, feature_dropout=DROPOUT, target_modules=TARGETS)
        train[("flix", d)] = flix_step(args, ids, config, mixed_batches(features, args.batch, rounds, gen))
    train[("peft_lora", 1)] = peft_step(args, ids)
    named = {f"{m} D={d}" if m == "flix" else m: fn for (m, d), fn in train.items()}
    ms = time_interleaved(named, args.warmup, args.repeats)
    rows = [{"method": m, "num_features": d, **stats("ms_per_step", ms[name])} for (m, d), name in zip(train, named)]
    del train, named
    gc.collect()

    # inference: every example of the batch a different feature combination
    tasks = max(1, math.isqrt(args.batch))
    combos = [{"task": f"t{i % tasks}", "lang": f"l{i // tasks}"} for i in range(args.batch)]
    inference = []
    for mode in INFERENCE_MODES:
        infer = {
            "flix_mixed_inference": flix_inference(args, ids, combos, mode),
            "peft_adapter_names": peft_inference(args, ids, combos, mode),
            "none": base_inference(args, ids, mode),
        }
        ms = time_interleaved(infer, args.warmup, args.repeats)
        combos_of = {"flix_mixed_inference": args.batch, "peft_adapter_names": args.batch, "none": 0}
        inference += [{"method": m, "mode": mode, "num_combinations": c, **stats("ms_per_batch", ms[m])} for m, c in combos_of.items()]
        del infer
        gc.collect()

    targets = check_targets(rows, inference, sizes)
    report = {"rows": rows, "inference": inference, "targets": targets, "config": run_config(args, sizes)}
    atomic_write_json(args.out, report)
    print(format_table(rows, inference))
    print()
    for t in targets.values():
        print(f"{'PASS' if t['pass'] else 'MISS'}  {t['description']}: {t['ratio']:.3f} (needs {t['needs']})")
        if "note" in t:
            print(f"      {t['note']}")
    print(f"\nwrote {args.out}")
    return 0


def check_targets(rows: list[dict], inference: list[dict], sizes: list[int]) -> dict:
    step = {(r["method"], r["num_features"]): r["ms_per_step"] for r in rows}
    batch = {(r["method"], r["mode"]): r["ms_per_batch"] for r in inference}
    lo, hi = sizes[0], sizes[-1]
    checks = {
        "flix_vs_compute_matched": (f"FLix (D={lo}) / compute_matched step time", step[("flix", lo)] / step[("compute_matched", 1)], "<=", WITHIN),
        "flix_many_vs_few_features": (f"FLix (D={hi}) / FLix (D={lo}) step time", step[("flix", hi)] / step[("flix", lo)], "<=", WITHIN),
    }
    for mode in INFERENCE_MODES:
        checks[f"mixed_inference_speedup_{mode}"] = (
            f"peft adapter_names / FLix mixed-batch inference time ({mode})",
            batch[("peft_adapter_names", mode)] / batch[("flix_mixed_inference", mode)],
            ">=",
            SPEEDUP,
        )
    targets = {
        key: {"description": desc, "ratio": ratio, "needs": f"{op} {bound:g}", "pass": ratio <= bound if op == "<=" else ratio >= bound}
        for key, (desc, ratio, op, bound) in checks.items()
    }
    # Both inference paths run the same base model, so no adapter implementation can be
    # faster than peft by more than peft / base.
    for mode in INFERENCE_MODES:
        peft_ms, flix_ms, base_ms = (batch[(m, mode)] for m in ("peft_adapter_names", "flix_mixed_inference", "none"))
        target = targets[f"mixed_inference_speedup_{mode}"]
        target["ceiling"] = peft_ms / base_ms
        target["note"] = (
            f"ceiling peft / base model alone = {peft_ms / base_ms:.3f}; adapter overhead over the base: "
            f"FLix {flix_ms - base_ms:.1f} ms, peft {peft_ms - base_ms:.1f} ms"
        )
    return targets


def run_config(args, sizes: list[int]) -> dict:
    return {
        "batch": args.batch,
        "seq": args.seq,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "threads": args.threads,
        "features": sizes,
        "new_tokens": args.new_tokens,
        "inference_modes": list(INFERENCE_MODES),
        "model": {"family": "llama", **model_config(args)},
        "dtype": "float32",
        "rank": RANK,
        "flix_ranks": FLIX_RANKS,
        "feature_dropout": DROPOUT,
        "target_modules": TARGETS,
        "timing": "median of interleaved rounds, time.perf_counter",
        "versions": versions(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
    }


def format_table(rows: list[dict], inference: list[dict]) -> str:
    lines = [f"{'training step':<22} {'features':>8} {'ms/step':>10} {'min':>8}"]
    lines += [f"{r['method']:<22} {r['num_features']:>8} {r['ms_per_step']:>10.1f} {r['ms_min']:>8.1f}" for r in rows]
    lines += ["", f"{'inference':<22} {'mode':>8} {'combos':>8} {'ms/batch':>10} {'min':>8}"]
    lines += [f"{r['method']:<22} {r['mode']:>8} {r['num_combinations']:>8} {r['ms_per_batch']:>10.1f} {r['ms_min']:>8.1f}" for r in inference]
    return "\n".join(lines)

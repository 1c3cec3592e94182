"""The work of `python -m benchmarks.model` (its options and docs are in benchmarks/model.py,
which parses them before anything here loads torch)."""

from __future__ import annotations

import gc
import json
import statistics
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.attribute import attributed_ratio, own_time
from benchmarks.cases import ALPHA, DROPOUT
from benchmarks.model_cases import (
    autocast_for,
    available_bytes,
    bank_bytes,
    base_step,
    bf16_enabled,
    count_flops,
    device_of,
    flix_step,
    gemma_features,
    generation_cases,
    load,
    matmul_case,
    measure_micro_batch_memory,
    mixed_features,
    peft_step,
    probe_memory,
    shared_copy,
    train_batch,
)
from benchmarks.model_report import check_targets, format_report, rescore, run_config
from benchmarks.timing import stats, time_interleaved
from flix import kernels
from flix.io import atomic_write_json
from flix.pipeline.memory import peak_memory_gib
from flix.pipeline.methods import method_config


def run(args, sizes: list[int]) -> int:
    if args.rescore:
        return rescore(args.rescore, args.out)
    torch.set_num_threads(args.threads)
    kernels.use(True)  # the compiled CPU kernels, as scale=cpu runs use them (the snapshots were measured so)
    with warnings.catch_warnings():  # peft touches a deprecated transformers property
        warnings.simplefilter("ignore", FutureWarning)
        if args.probe_memory:
            print(json.dumps(probe_memory(args, *args.probe_memory)))
            return 0
        return bench_model(args, sizes)


def bench_model(args, sizes: list[int]) -> int:
    device = device_of(args)
    bf16 = bf16_enabled(args, device)
    autocast = autocast_for(device, bf16)
    base, tokenizer = load(args)
    base.to(device)
    batch = train_batch(args, tokenizer, device)
    rounds = args.warmup + args.repeats + 1
    gen = torch.Generator().manual_seed(args.seed)

    train: dict[str, Callable[[], None]] = {"base": base_step(shared_copy(base), batch, autocast)}
    cm = method_config("compute_matched", gemma_features(sizes[0]), "joint", alpha=ALPHA)
    train["compute_matched"] = flix_step(base, cm, batch, [[{}] * args.batch], autocast, device)
    train["peft_lora"] = peft_step(base, batch, autocast, device)
    skipped = {}
    for d in sizes:
        need, have = bank_bytes(base, d), available_bytes(device)
        if need > 0.7 * have:
            skipped[d] = f"its banks need {need / 2**30:.1f} GiB, {have / 2**30:.1f} GiB available"
            print(f"benchmarks: skipping flix D={d}: {skipped[d]}", file=sys.stderr, flush=True)
            continue
        print(f"benchmarks: building flix D={d}", file=sys.stderr, flush=True)
        config = method_config("flix", gemma_features(d), "joint", alpha=ALPHA, feature_dropout=DROPOUT)
        train[f"flix D={d}"] = flix_step(base, config, batch, mixed_features(gemma_features(d), args.batch, rounds, gen), autocast, device)
    matmul, matmul_flops = matmul_case(device, bf16)
    train["matmul"] = matmul
    flops = {name: count_flops(train[name]) for name in ("base", "compute_matched", f"flix D={sizes[0]}") if name in train}
    ms = time_interleaved(train, args.warmup, args.repeats, device)
    peak_flops = matmul_flops / (stats("ms", ms["matmul"])["ms"] / 1e3)
    rows = []
    for name, times in ms.items():
        if name == "matmul":
            continue
        row = {"case": name, **stats("ms_per_step", times)}
        if name in flops:
            row["gflop"] = flops[name] / 1e9
            row["tflop_per_s"] = flops[name] / (row["ms_per_step"] / 1e3) / 1e12
            row["fraction_of_peak"] = flops[name] / (row["ms_per_step"] / 1e3) / peak_flops
        if (name == "compute_matched" or name.startswith("flix D=")) and args.attribute and device.type == "cpu":
            measured = own_time(train[name], args.attribute)  # after the timed rounds: the profiler slows steps
            row["own_ms"] = statistics.median(own for _, own in measured)
            row["attributed_vs_base"] = attributed_ratio(measured)
        rows.append(row)
    del train
    gc.collect()

    cases = generation_cases(args, base, tokenizer, device, autocast)
    ms = time_interleaved(cases, args.warmup, args.repeats, device)
    generation = [{"case": name, **stats("ms_per_batch", times)} for name, times in ms.items()]
    del cases
    gc.collect()

    memory = measure_micro_batch_memory(args)
    report = {
        "training": rows,
        "generation": generation,
        "skipped": {f"flix D={d}": why for d, why in skipped.items()},
        "matmul_peak_tflop_per_s": peak_flops / 1e12,
        "micro_batch_memory": memory,
        "peak_memory_gib": peak_memory_gib(device),
        "config": run_config(args, sizes, device, bf16),
    }
    report["targets"] = check_targets(report, sizes, skipped)
    out = args.out or Path(f"reports/bench/model-{device.type}.json")
    atomic_write_json(out, report)
    print(format_report(report))
    print(f"\nwrote {out}")
    return 0

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
    MicroBatch,
    autocast_for,
    available_bytes,
    bank_bytes,
    base_step,
    bf16_enabled,
    device_of,
    flix_step,
    gemma_features,
    generation_cases,
    load,
    measure_micro_batch_memory,
    peft_step,
    probe_memory,
    real_micro_batches,
    routes_for,
    shared_copy,
)
from benchmarks.model_report import check_targets, format_report, rescore, run_config
from benchmarks.timing import stats, time_interleaved
from flix import kernels
from flix.io import atomic_write_json
from flix.loss import IGNORE
from flix.pipeline.batching import padding_fraction, real_positions
from flix.pipeline.flops import matmul_case, useful_flops
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
    batches = real_micro_batches(args, base, tokenizer, args.warmup + args.repeats, device)  # round r takes batches[r], every case
    timed = batches[args.warmup :]
    useful = [useful_flops(base, b.trained, seq2seq=False) for b in timed]
    gen = torch.Generator().manual_seed(args.seed)

    train: dict[str, Callable[[], None]] = {"base": base_step(shared_copy(base), batches, autocast)}
    cm = method_config("compute_matched", gemma_features(sizes[0]), "joint", alpha=ALPHA)
    train["compute_matched"] = flix_step(base, cm, batches, [[{}] * b.examples for b in batches], autocast, device)
    train["peft_lora"] = peft_step(base, batches, autocast, device)
    skipped = {}
    for d in sizes:
        need, have = bank_bytes(base, d), available_bytes(device)
        if need > 0.7 * have:
            skipped[d] = f"its banks need {need / 2**30:.1f} GiB, {have / 2**30:.1f} GiB available"
            print(f"benchmarks: skipping flix D={d}: {skipped[d]}", file=sys.stderr, flush=True)
            continue
        print(f"benchmarks: building flix D={d}", file=sys.stderr, flush=True)
        config = method_config("flix", gemma_features(d), "joint", alpha=ALPHA, feature_dropout=DROPOUT)
        train[f"flix D={d}"] = flix_step(base, config, batches, routes_for(gemma_features(d), batches, gen), autocast, device)
    matmul, matmul_flops = matmul_case(device, bf16)
    train["matmul"] = matmul
    ms = time_interleaved(train, args.warmup, args.repeats, device, reference="matmul")
    matmul_row = {"gflop": matmul_flops / 1e9, **stats("ms", ms["matmul"])}
    rows = []
    for name in train:
        if name == "matmul":
            continue
        times, beside = ms[name], ms[f"matmul@{name}"]
        row = {"case": name, **stats("ms_per_step", times), "matmul_ms_all": [round(t, 3) for t in beside]}
        # useful GFLOP/s: per round, the batch's useful arithmetic over its time (median); of matmul: pooled over rounds,
        # the time that arithmetic takes at the rate of the matmuls timed just before and after it, over the time taken
        rates = [flops / t * 1e3 for flops, t in zip(useful, times)]
        row["useful_gflop_per_s"] = statistics.median(rates) / 1e9
        row["of_matmul"] = sum(flops / matmul_flops * m for flops, m in zip(useful, beside)) / sum(times)
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
        "matmul": matmul_row,
        "batches": batch_summary(args, timed, useful),
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


def batch_summary(args, batches: list[MicroBatch], useful: list[int]) -> dict:
    """What the timed rounds computed on: the run's real micro-batches (packed where it
    packs), how much of them is real, each one's useful arithmetic (round by round), and
    the positions of peft's padded rows of the same examples."""
    trained = [b.trained for b in batches]
    return {
        "scale": args.scale,
        "mixture": args.mixture,
        "overrides": list(args.override),
        "packed": all("token_examples" in b for b in trained),
        "rows": [len(b["input_ids"]) for b in trained],
        "examples": [b.examples for b in batches],
        "positions": sum(b["input_ids"].numel() for b in trained),
        "real_positions": sum(real_positions(b) for b in trained),
        "real_share": 1.0 - padding_fraction(trained),
        "real_targets": sum(int((b["labels"] != IGNORE).sum()) for b in trained),
        "padded_positions": sum(b.padded["input_ids"].numel() for b in batches),
        "useful_gflop": [f / 1e9 for f in useful],
    }

"""`python -m benchmarks.model`: FLix on a real pretrained model against the frozen base and LoRA.

Training rows time one optimizer step on a mixed batch (--batch examples of --seq
tokens, the loss on the last --target tokens through the training loss
`flix.pipeline.batching.loss_sum`, example i routed to task i mod 4 and a random language, so
a batch has at least 4 feature combinations):

    base              the frozen model alone: forward + backward to its input embeddings
    compute_matched   one always-on rank-6 adapter, SparseAdamW
    peft_lora         peft LoRA rank 6 on the same projections, torch AdamW
    flix D=...        task rank 4 + language rank 2, feature dropout 0.7, D features

Generation rows time greedy decoding of --new-tokens tokens for --gen-batch prompts of
--gen-seq tokens, each prompt its own feature combination: `base` (no adapters),
`peft_adapter_names` (one peft LoRA per combination) and `flix` (routing).

All cases share one copy of the base weights and run in interleaved rounds (each in a
shuffled order); each row is a median. A large matmul timed in the same rounds gives the
machine's practical peak, against which the steps' achieved FLOP/s (counted by torch's
FlopCounterMode) are put. Then a few profiled steps of each FLix-layer case split its
time into the adapters' own work and the frozen rest (`benchmarks.attribute`, CPU only).
A fresh process measures the peak memory of one micro-batch at a scale's worst-case
sizes (--memory-scale). On CUDA the cases run under bf16 autocast (adapters and
optimizer state stay float32), as training does; `--bf16 true` runs that path on the
CPU too.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks import options
from benchmarks.attribute import attributed_ratio, own_time
from benchmarks.cases import ALPHA, DROPOUT
from benchmarks.model_cases import (
    TASKS,
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


def main(argv: list[str] | None = None) -> int:
    parser = options.parser(
        "python -m benchmarks.model",
        __doc__,
        out=None,
        out_help="JSON report, written atomically (default reports/bench/model-<device>.json)",
        repeats=5,
        warmup=1,
        features="8,64,512,4096",
    )
    positive = options.at_least(1)
    parser.add_argument("--model", default="gemma3_270m", help="a conf/model option (default gemma3_270m)")
    parser.add_argument("--batch", type=positive, default=8, help="training examples per step (default 8)")
    parser.add_argument("--seq", type=positive, default=120, help="tokens per training example (default 120)")
    parser.add_argument("--target", type=positive, default=24, help="loss positions at the end of each example (default 24)")
    parser.add_argument("--gen-batch", type=positive, default=16, help="prompts per generation batch, one combination each (default 16)")
    parser.add_argument("--gen-seq", type=positive, default=64, help="tokens per prompt (default 64)")
    parser.add_argument("--new-tokens", type=positive, default=16, help="greedy tokens per prompt (default 16)")
    parser.add_argument("--memory-scale", default="mini", help="scale whose micro-batch peak memory is measured; 'none' skips it")
    parser.add_argument("--device", default="auto", help="auto (cuda if present) | cpu | cuda")
    parser.add_argument(
        "--attribute",
        type=options.at_least(0),
        default=3,
        metavar="N",
        help="profiled steps per adapter case that split its time into the adapters' own work and the frozen rest (CPU; default 3, 0 skips)",
    )
    parser.add_argument(
        "--bf16",
        choices=("auto", "true", "false"),
        default="auto",
        help="bf16 autocast for every case: auto (on CUDA only, as training does) | true | false",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--rescore",
        type=Path,
        metavar="JSON",
        help="print a saved report with its targets checked by this code (and write it to --out, if given); runs nothing",
    )
    parser.add_argument("--probe-memory", nargs=3, type=int, metavar=("BATCH", "PROMPT", "TARGET"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rescore:
        return rescore(args.rescore, args.out)
    if args.target >= args.seq:
        parser.error("--target must be smaller than --seq")
    sizes = options.feature_counts(parser, args.features, 2 * TASKS, f"{TASKS} tasks and at least as many languages")
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


if __name__ == "__main__":
    sys.exit(main())

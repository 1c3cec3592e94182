"""`flix bench model`: FLix on a real pretrained model against the frozen base and LoRA.

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
time into the adapters' own work and the frozen rest (`flix.bench.attribute`, CPU only).
A fresh process measures the peak memory of one micro-batch at a scale's worst-case
sizes (--memory-scale). On CUDA the cases run under bf16 autocast (adapters and
optimizer state stay float32), as training does; `--bf16 true` runs that path on the
CPU too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from flix.bench.model_cases import (
    ALPHA,
    DROPOUT,
    RANK,
    TASKS,
    autocast_for,
    available_bytes,
    bank_bytes,
    base_step,
    bf16_enabled,
    count_flops,
    device_of,
    feature_space,
    flix_step,
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
from flix.bench.timing import feature_counts, peak_memory_gib
from flix.pipeline.methods import kind_ranks

FLIX_RANKS = kind_ranks("joint")  # conf/method/flix.yaml
TARGETS = {  # name: (description, op, bound)
    "flix_vs_base": ("FLix (D={lo}) step / frozen base step", "<=", 1.10),
    "flix_vs_base_attributed": ("FLix (D={lo}) step / its frozen part, attributed within the step", "<=", 1.10),
    "flix_vs_compute_matched": ("FLix (D={lo}) step / compute_matched step", "<=", 1.05),
    "flix_vs_compute_matched_attributed": ("FLix (D={lo}) step / compute_matched step, attributed within the steps", "<=", 1.05),
    "flix_many_vs_few_features": ("FLix (D={hi}) step / FLix (D={lo}) step", "<=", 1.05),
    "flix_many_vs_few_features_attributed": ("FLix (D={hi}) step / FLix (D={lo}) step, attributed within the steps", "<=", 1.05),
    "generate_speedup_vs_peft": ("peft adapter_names generate / FLix generate", ">=", 3.0),
    "generate_vs_base": ("FLix generate / base generate", "<=", 1.15),
    "micro_batch_memory": ("peak resident GiB of one {scale} micro-batch step", "<=", 5.0),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flix bench model", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gemma3_270m", help="a conf/model option (default gemma3_270m)")
    parser.add_argument("--out", type=Path, help="JSON report, written atomically (default reports/bench/model-<device>.json)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds; each row is the median (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    parser.add_argument("--batch", type=int, default=8, help="training examples per step (default 8)")
    parser.add_argument("--seq", type=int, default=120, help="tokens per training example (default 120)")
    parser.add_argument("--target", type=int, default=24, help="loss positions at the end of each example (default 24)")
    parser.add_argument("--features", default="8,64,512,4096", help="FLix feature counts D, comma-separated")
    parser.add_argument("--gen-batch", type=int, default=16, help="prompts per generation batch, one combination each (default 16)")
    parser.add_argument("--gen-seq", type=int, default=64, help="tokens per prompt (default 64)")
    parser.add_argument("--new-tokens", type=int, default=16, help="greedy tokens per prompt (default 16)")
    parser.add_argument("--memory-scale", default="mini", help="scale whose micro-batch peak memory is measured; 'none' skips it")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--device", default="auto", help="auto (cuda if present) | cpu | cuda")
    parser.add_argument(
        "--attribute",
        type=int,
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
    if (
        min(args.attribute, args.warmup) < 0
        or min(args.repeats, args.batch, args.seq, args.target, args.gen_batch, args.gen_seq, args.new_tokens, args.threads) < 1
    ):
        parser.error(
            "--repeats, --batch, --seq, --target, --gen-batch, --gen-seq, --new-tokens and --threads must be >= 1, --warmup and --attribute >= 0"
        )
    if args.target >= args.seq:
        parser.error("--target must be smaller than --seq")
    sizes = feature_counts(parser, args.features, 2 * TASKS, f"{TASKS} tasks and at least as many languages")
    torch.set_num_threads(args.threads)
    with warnings.catch_warnings():  # peft touches a deprecated transformers property
        warnings.simplefilter("ignore", FutureWarning)
        if args.probe_memory:
            print(json.dumps(probe_memory(args, *args.probe_memory)))
            return 0
        return bench_model(args, sizes)


# --- the model and its weight-sharing copies ---------------------------------------


# --- the benchmark ----------------------------------------------------------------------------


def bench_model(args, sizes: list[int]) -> int:
    import gc
    import statistics

    from flix.bench.attribute import attributed_ratio, own_time
    from flix.bench.timing import stats, time_interleaved
    from flix.io import atomic_write_json
    from flix.pipeline.methods import method_config

    device = device_of(args)
    bf16 = bf16_enabled(args, device)
    autocast = autocast_for(device, bf16)
    base, tokenizer = load(args)
    base.to(device)
    batch = train_batch(args, tokenizer, device)
    rounds = args.warmup + args.repeats + 1
    gen = torch.Generator().manual_seed(args.seed)

    train: dict[str, Callable[[], None]] = {"base": base_step(shared_copy(base), batch, autocast)}
    cm = method_config("compute_matched", feature_space(sizes[0]), "joint", alpha=ALPHA)
    train["compute_matched"] = flix_step(base, cm, batch, [[{}] * args.batch], autocast, device)
    train["peft_lora"] = peft_step(base, batch, autocast, device)
    skipped = {}
    for d in sizes:
        need, have = bank_bytes(base, d), available_bytes(device)
        if need > 0.7 * have:
            skipped[d] = f"its banks need {need / 2**30:.1f} GiB, {have / 2**30:.1f} GiB available"
            print(f"flix bench: skipping flix D={d}: {skipped[d]}", file=sys.stderr, flush=True)
            continue
        print(f"flix bench: building flix D={d}", file=sys.stderr, flush=True)
        config = method_config("flix", feature_space(d), "joint", alpha=ALPHA, feature_dropout=DROPOUT)
        train[f"flix D={d}"] = flix_step(base, config, batch, mixed_features(feature_space(d), args.batch, rounds, gen), autocast, device)
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


def rescore(path: Path, out: Path | None = None) -> int:
    """Print a saved report, its targets checked again (e.g. after the checks changed),
    and write it to `out` when given."""
    try:
        report = json.loads(path.read_text())
        sizes = sorted(int(case["case"].split("=")[1]) for case in report["training"] if case["case"].startswith("flix D="))
        report["targets"] = check_targets(report, sizes, {int(k.split("=")[1]): v for k, v in report.get("skipped", {}).items()})
    except (OSError, ValueError, KeyError, IndexError) as error:
        print(f"flix bench model: error: {path} is not a saved report of this benchmark ({type(error).__name__}: {error})", file=sys.stderr)
        return 2
    if out:
        from flix.io import atomic_write_json

        atomic_write_json(out, report)
    print(format_report(report))
    return 0


def check_targets(report: dict, sizes: list[int], skipped: dict) -> dict:
    """Each target's value with a 95% interval over rounds (timings: per-round paired
    ratios) and a verdict: PASS / MISS when the interval is clear of the bound, NOISE
    when it holds it. `pass` is the point value against the bound."""
    from flix.bench.timing import paired_ratio, verdict

    step = {r["case"]: r["ms_all"] for r in report["training"]}
    gen = {r["case"]: r["ms_all"] for r in report["generation"]}
    lo = sizes[0]
    hi = max(d for d in sizes if d not in skipped)
    pairs = {
        "flix_vs_base": (step[f"flix D={lo}"], step["base"]),
        "flix_vs_compute_matched": (step[f"flix D={lo}"], step["compute_matched"]),
        "flix_many_vs_few_features": (step[f"flix D={hi}"], step[f"flix D={lo}"]),
        "generate_speedup_vs_peft": (gen["peft_adapter_names"], gen["flix"]),
        "generate_vs_base": (gen["flix"], gen["base"]),
    }
    values = {key: paired_ratio(*pair) for key, pair in pairs.items()}
    attributed = {r["case"]: r["attributed_vs_base"] for r in report["training"] if "attributed_vs_base" in r}
    if f"flix D={lo}" in attributed:
        values["flix_vs_base_attributed"] = tuple(attributed[f"flix D={lo}"])
        if "compute_matched" in attributed:
            values["flix_vs_compute_matched_attributed"] = attributed_quotient(attributed[f"flix D={lo}"], attributed["compute_matched"])
        if hi != lo and f"flix D={hi}" in attributed:
            values["flix_many_vs_few_features_attributed"] = attributed_quotient(attributed[f"flix D={hi}"], attributed[f"flix D={lo}"])
    memory = report["micro_batch_memory"]
    if memory:
        values["micro_batch_memory"] = (memory["peak_gib"],) * 3  # one measurement
    targets = {}
    for key in (key for key in TARGETS if key in values):
        (value, low, high), (description, op, bound) = values[key], TARGETS[key]
        scale = memory["scale"] if memory else ""
        targets[key] = {
            "description": description.format(lo=lo, hi=hi, scale=scale),
            "value": value,
            "interval": [low, high],
            "needs": f"{op} {bound:g}",
            "pass": value <= bound if op == "<=" else value >= bound,
            "verdict": verdict(low, high, op, bound),
        }
    if skipped:
        targets["flix_many_vs_few_features"]["note"] = "not run: " + "; ".join(f"D={d}: {why}" for d, why in skipped.items())
    return targets


def attributed_quotient(num: list[float], den: list[float]) -> tuple[float, float, float]:
    """One attributed ratio over another (value, low, high each; D = 4096 over D = 8, FLix
    over compute-matched LoRA): both cases share the frozen model and batch, so (step /
    frozen part) over (step / frozen part) estimates their step ratio without the frozen
    part's step-to-step noise. The interval runs from extreme to extreme of the two, wider
    than a 95% one."""
    return num[0] / den[0], num[1] / den[2], num[2] / den[1]


def run_config(args, sizes: list[int], device: torch.device, bf16: bool) -> dict:
    from flix.pipeline.versions import versions
    from flix.record import git_commit

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {
        "model": args.model,
        "batch": args.batch,
        "seq": args.seq,
        "target": args.target,
        "features": sizes,
        "gen_batch": args.gen_batch,
        "gen_seq": args.gen_seq,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "threads": args.threads,
        "device": device.type,
        "device_name": name,
        "cpu_count": os.cpu_count(),
        "autocast": "bf16" if bf16 else "off (float32)",
        "rank": RANK,
        "flix_ranks": FLIX_RANKS,
        "feature_dropout": DROPOUT,
        "timing": "median of interleaved rounds",
        "versions": versions(),
        "commit": git_commit(),
    }


def format_report(report: dict) -> str:
    c = report["config"]
    lines = [
        f"flix bench model: {c['model']} on {c['device']} ({c['device_name']}, {c['threads']} threads), autocast {c['autocast']}",
        f"training step: {c['batch']} examples x {c['seq']} tokens, loss on the last {c['target']}",
        f"{'case':<18} {'ms/step':>10} {'min':>10} {'GFLOP':>8} {'TFLOP/s':>8} {'of peak':>8} {'own ms':>8} {'/ own frozen part [95%]':>24}",
    ]
    for r in report["training"]:
        flops = f"{r['gflop']:>8.0f} {r['tflop_per_s']:>8.3f} {r['fraction_of_peak']:>8.0%}" if "gflop" in r else f"{'':>26}"
        own = ""
        if "own_ms" in r:
            value, low, high = r["attributed_vs_base"]
            own = f" {r['own_ms']:>8.0f} {f'{value:.3f} [{low:.3f}, {high:.3f}]':>24}"
        lines.append(f"{r['case']:<18} {r['ms_per_step']:>10.1f} {r['ms_min']:>10.1f} {flops}{own}".rstrip())
    for case, why in report["skipped"].items():
        lines.append(f"{case:<18} skipped: {why}")
    lines.append(f"matmul peak: {report['matmul_peak_tflop_per_s']:.3f} TFLOP/s")
    if any("own_ms" in r for r in report["training"]):
        lines.append("own ms: the adapters' own work in a profiled step (flix.bench.attribute); / own frozen part: step / (step - own)")
    lines += [
        "",
        f"generation: {c['gen_batch']} prompts x {c['gen_seq']} tokens, {c['new_tokens']} greedy tokens, one combination each",
        f"{'case':<18} {'ms/batch':>10} {'min':>10}",
    ]
    lines += [f"{r['case']:<18} {r['ms_per_batch']:>10.1f} {r['ms_min']:>10.1f}" for r in report["generation"]]
    memory = report["micro_batch_memory"]
    if memory:
        lines.append(
            f"\none {memory['scale']} micro-batch ({memory['micro_batch']} x {memory['tokens']} tokens, fresh process): "
            f"peak {memory['peak_gib']:.2f} GiB, {memory['seconds']:.1f} s"
        )
    lines.append(f"peak memory of this benchmark: {report['peak_memory_gib']:.2f} GiB\n")
    for t in report["targets"].values():
        low, high = t["interval"]
        spread = f" [{low:.3f}, {high:.3f}]" if high > low else ""
        lines.append(f"{t['verdict']:<5} {t['description']}: {t['value']:.3f}{spread} (needs {t['needs']})")
        if "note" in t:
            lines.append(f"      {t['note']}")
    lines.append(
        "(timings: median over rounds of the per-round ratio [95% interval]; attributed: over the profiled steps, "
        "extreme to extreme for a quotient of two; NOISE: the interval holds the bound)"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

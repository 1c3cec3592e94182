"""`benchmarks.model`'s report: its targets checked with intervals and verdicts, the
configuration it records, the printout, and `--rescore` (a saved report checked again)."""

from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path

import torch

from benchmarks.cases import DROPOUT, FLIX_RANKS, RANK
from benchmarks.timing import paired_ratio, pooled_ratio, verdict
from flix.io import atomic_write_json
from flix.pipeline.flops import matmul_name
from flix.pipeline.versions import cpu_name, versions
from flix.record import git_commit

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
    # issue 37's: the step users will see, on the micro-batches their runs see
    "useful_vs_matmul": ("FLix (D={lo}) steps' useful arithmetic / the matmul's rate, over all rounds' micro-batches", ">=", 0.70),
    "computed_vs_real": ("computed / real input positions of the timed {batches} micro-batches", "<=", 1.05),
    "speedup_vs_peft": ("peft LoRA step with the model's own loss / FLix (D={lo}) step", ">=", 3.5),
}


def rescore(path: Path, out: Path | None = None) -> int:
    """Print a saved report, its targets checked again (e.g. after the checks changed),
    and write it to `out` when given."""
    try:
        report = json.loads(path.read_text())
        if "batches" not in report:
            print(f"benchmarks.model: error: {path} was written before this benchmark timed real micro-batches: run it again", file=sys.stderr)
            return 2
        sizes = sorted(int(case["case"].split("=")[1]) for case in report["training"] if case["case"].startswith("flix D="))
        report["targets"] = check_targets(report, sizes, {int(k.split("=")[1]): v for k, v in report.get("skipped", {}).items()})
    except (OSError, ValueError, KeyError, IndexError) as error:
        print(f"benchmarks.model: error: {path} is not a saved report of this benchmark ({type(error).__name__}: {error})", file=sys.stderr)
        return 2
    if out:
        atomic_write_json(out, report)
    print(format_report(report))
    return 0


def check_targets(report: dict, sizes: list[int], skipped: dict) -> dict:
    """Each target's value with a 95% interval over rounds and a verdict: PASS / MISS when
    the interval is clear of the bound, NOISE when it holds it. `pass` is the point value
    against the bound. Training steps: each round times the next real micro-batch (1 to 7 s
    here), so their ratios are pooled over rounds (total time over total time, as a step
    pools its micro-batches and a run its steps); generation repeats one batch, so its
    ratios are medians of per-round ratios."""
    step = {r["case"]: r["ms_all"] for r in report["training"]}
    gen = {r["case"]: r["ms_all"] for r in report["generation"]}
    lo = sizes[0]
    hi = max(d for d in sizes if d not in skipped)
    pooled = {
        "flix_vs_base": (step[f"flix D={lo}"], step["base"]),
        "flix_vs_compute_matched": (step[f"flix D={lo}"], step["compute_matched"]),
        "flix_many_vs_few_features": (step[f"flix D={hi}"], step[f"flix D={lo}"]),
        "speedup_vs_peft": (step["peft_lora"], step[f"flix D={lo}"]),
    }
    if hi == lo and not skipped:  # one D asked for (--features 8): nothing to compare it with
        del pooled["flix_many_vs_few_features"]
    values = {key: pooled_ratio(*pair) for key, pair in pooled.items()}
    values["generate_speedup_vs_peft"] = paired_ratio(gen["peft_adapter_names"], gen["flix"])
    values["generate_vs_base"] = paired_ratio(gen["flix"], gen["base"])
    batches, matmul = report["batches"], report["matmul"]
    # useful rate / matmul rate: the ms each micro-batch's useful arithmetic takes at the rate of the
    # matmuls timed just before and after it (a report from before that: the round's), over its ms;
    # pooled over rounds, as a step pools its micro-batches
    beside = next(r for r in report["training"] if r["case"] == f"flix D={lo}").get("matmul_ms_all", matmul["ms_all"])
    values["useful_vs_matmul"] = pooled_ratio([g * m / matmul["gflop"] for g, m in zip(batches["useful_gflop"], beside)], step[f"flix D={lo}"])
    values["computed_vs_real"] = (batches["positions"] / batches["real_positions"],) * 3  # counted, not timed
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
            "description": description.format(lo=lo, hi=hi, scale=scale, batches=batches["scale"]),
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
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return {
        "model": args.model,
        "scale": args.scale,
        "mixture": args.mixture,
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
        "matmul": matmul_name(device, bf16),
        "rank": RANK,
        "flix_ranks": FLIX_RANKS,
        "feature_dropout": DROPOUT,
        "timing": "median of interleaved rounds",
        "versions": versions(),
        "commit": git_commit(),
    }


def format_report(report: dict) -> str:
    c, b, matmul = report["config"], report["batches"], report["matmul"]
    lo = c["features"][0]
    step = {r["case"]: r["ms_per_step"] for r in report["training"]}
    lines = [
        f"flix bench model: {c['model']} on {c['device']} ({c['device_name']}, {c['threads']} threads), autocast {c['autocast']}",
        f"training step: one real {b['scale']} / {b['mixture']} micro-batch a round ({len(b['rows'])} timed, {sum(b['rows'])} "
        f"{'packed ' if b.get('packed') else ''}rows{', ' + ' '.join(b['overrides']) if b.get('overrides') else ''}): "
        f"{b['real_positions']} real of {b['positions']} positions computed ({b['real_share']:.1%} real), {b['real_targets']} real targets; "
        f"useful arithmetic {statistics.mean(b['useful_gflop']):.3g} GFLOP a micro-batch",
        f"{'case':<18} {'ms/step':>10} {'min':>10} {'useful GFLOP/s':>15} {'of matmul':>10} {'own ms':>8} {'/ own frozen part [95%]':>24}",
    ]
    for r in report["training"]:
        own = ""
        if "own_ms" in r:
            value, low, high = r["attributed_vs_base"]
            own = f" {r['own_ms']:>8.0f} {f'{value:.3f} [{low:.3f}, {high:.3f}]':>24}"
        lines.append(
            f"{r['case']:<18} {r['ms_per_step']:>10.1f} {r['ms_min']:>10.1f} {r['useful_gflop_per_s']:>15.1f} {r['of_matmul']:>10.0%}{own}".rstrip()
        )
    for case, why in report["skipped"].items():
        lines.append(f"{case:<18} skipped: {why}")
    matmul_rate = matmul["gflop"] / (matmul["ms"] / 1e3)
    when = (
        "just before and after each case" if any("matmul_ms_all" in r for r in report["training"]) else "once a round (a report from before b03afd5)"
    )
    lines.append(f"matmul ({c['matmul']}, timed {when}): {matmul_rate:.1f} GFLOP/s")
    lines.append(f"FLix (D={lo}) / peft LoRA with the model's own loss, ms per step: {step[f'flix D={lo}'] / step['peft_lora']:.3f}")
    if "padded_positions" in b:
        lines.append(
            f"peft LoRA: the same examples as left-padded rows with an attention mask, {b['padded_positions']} positions "
            f"({b['real_positions'] / b['padded_positions']:.1%} real)"
        )
    lines.append("useful: real tokens x 4 x the blocks' linear weights + real targets x 4 x d_model x vocab (forward + input-gradient backward)")
    if any("own_ms" in r for r in report["training"]):
        lines.append("own ms: the adapters' own work in a profiled step (benchmarks.attribute); / own frozen part: step / (step - own)")
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
        "(training steps: total over total time across rounds, a different micro-batch each; generation: median of "
        "per-round ratios; [95% bootstrap interval over rounds]; attributed: over the profiled steps, "
        "extreme to extreme for a quotient of two; NOISE: the interval holds the bound)"
    )
    return "\n".join(lines)

"""The work of `python -m benchmarks.loss` (options and what it measures: benchmarks/loss.py)."""

from __future__ import annotations

import functools
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.timing import paired_ratio, time_interleaved
from flix.loss import linear_cross_entropy
from flix.pipeline.flops import matmul_case, matmul_name
from flix.pipeline.memory import peak_rss_gib

CASES = ("flix.loss", "full logits")


@functools.cache
def _head(vocab: int, width: int) -> torch.nn.Linear:
    """One frozen output layer shared by every case (Gemma 3's is 671 MB in float32)."""
    gen = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(width, vocab, bias=False).requires_grad_(False)
    head.weight.normal_(0, 0.03, generator=gen)
    return head


def _case(name: str, rows: int, vocab: int, width: int):
    """A callable running `name`'s forward and backward on `rows` labelled rows."""
    head = _head(vocab, width)
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(rows, width, generator=gen)
    targets = torch.randint(vocab, (rows,), generator=gen)

    def run():
        h = hidden.clone().requires_grad_()
        loss = linear_cross_entropy(h, head, targets) if name == CASES[0] else F.cross_entropy(head(h), targets, reduction="none")
        loss.sum().backward()

    return run


def _probe(name: str, rows: int, vocab: int, width: int) -> None:
    """In a child process: print the MiB by which one call raises this process's peak."""
    run = _case(name, rows, vocab, width)
    before = peak_rss_gib()
    run()
    print(round((peak_rss_gib() - before) * 1024, 1))


def _held_mib(name: str, rows: int, vocab: int, width: int, threads: int) -> float:
    code = f"import torch; torch.set_num_threads({threads}); from benchmarks.loss_run import _probe; _probe({name!r}, {rows}, {vocab}, {width})"
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1]).stdout)


def run(args, row_counts: list[int]) -> int:
    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    square, square_flops = matmul_case(cpu, bf16=False)
    cases = {"matmul": square}
    for rows in row_counts:
        for name in CASES:
            cases[f"{name} @{rows}"] = _case(name, rows, args.vocab, args.width)
    times = time_interleaved(cases, args.warmup, args.repeats)
    matmul_rate = square_flops / (statistics.median(times["matmul"]) / 1e3) / 1e9

    print(f"output layer {args.vocab} x {args.width}, forward + input gradient; matmul ({matmul_name(cpu, False)}) {matmul_rate:.1f} GFLOP/s")
    print(f"{'rows':>5} {'case':<12} {'ms':>8} {'GFLOP/s':>8} {'of matmul':>9} {'held MiB':>9}")
    report = {"matmul_gflops": matmul_rate, "vocab": args.vocab, "width": args.width, "rows": []}
    for rows in row_counts:
        useful = 4 * rows * args.vocab * args.width  # the logits' product and the input gradient's, 2 FLOPs per weight each
        for name in CASES:
            ms = statistics.median(times[f"{name} @{rows}"])
            rate = useful / (ms / 1e3) / 1e9
            held = _held_mib(name, rows, args.vocab, args.width, args.threads)
            print(f"{rows:>5} {name:<12} {ms:>8.1f} {rate:>8.1f} {rate / matmul_rate:>8.0%} {held:>9.1f}")
            report["rows"].append({"rows": rows, "case": name, "ms": ms, "ms_all": times[f"{name} @{rows}"], "gflops": rate, "held_mib": held})
        ratio = paired_ratio(times[f"{CASES[0]} @{rows}"], times[f"{CASES[1]} @{rows}"])
        print(f"{rows:>5} flix.loss / full logits {ratio[0]:.3f} [{ratio[1]:.3f}, {ratio[2]:.3f}] (median per round, 95% interval)")
        report["rows"][-2]["vs_full_logits"] = list(ratio)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0

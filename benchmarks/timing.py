"""Timing and statistics shared by the benchmarks.

The machines we run on are noisy, so cases are timed in interleaved rounds: a slower
or busier moment falls on every case alike, and each figure is a median over rounds.
"""

from __future__ import annotations

import random
import statistics
import sys
import time
from collections.abc import Callable

import torch


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so a host clock measures it (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    cases: dict[str, Callable[[], object]],
    warmup: int,
    repeats: int,
    device: torch.device = torch.device("cpu"),
    reference: str | None = None,
    reference_calls: int = 3,
) -> dict[str, list[float]]:
    """ms of each call of each case, timed in rounds that run every case once, in an
    order shuffled per round (seeded) so that no case always follows the same one; the
    first `warmup` rounds (optimizer state allocation, allocator and cache warm-up) are
    not kept.

    With `reference` (one of `cases`, e.g. the square matmul a rate is put against), that
    case is not one of the shuffled calls: it runs `reference_calls` times before the
    round's first case and after each case, and `times[f"{reference}@{name}"]` holds, per
    round, the median of the calls just before and just after `name`; `times[reference]`
    the round's median of all its calls. On a host whose speed moves within seconds, the
    reference next to a case measures the speed that case ran at (a single matmul somewhere
    in a round of 20-40 s read anywhere from 96 to 167 ms)."""
    shuffled = [name for name in cases if name != reference]
    times: dict[str, list[float]] = {name: [] for name in cases}
    if reference is not None:
        times.update({f"{reference}@{name}": [] for name in shuffled})
    rng = random.Random(0)

    def timed(fn) -> float:
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        return (time.perf_counter() - start) * 1e3

    for r in range(warmup + repeats):
        keep = r >= warmup
        around = [timed(cases[reference]) for _ in range(reference_calls)] if reference is not None else []
        everything = list(around)
        for name in rng.sample(shuffled, len(shuffled)):
            ms = timed(cases[name])
            if keep:
                times[name].append(ms)
            if reference is not None:
                after = [timed(cases[reference]) for _ in range(reference_calls)]
                if keep:
                    times[f"{reference}@{name}"].append(statistics.median(around + after))
                around = after
                everything += after
        if reference is not None and keep:
            times[reference].append(statistics.median(everything))
        kind = "warm-up" if r < warmup else "timed"
        print(f"benchmarks: {kind} round {r + 1}/{warmup + repeats} ({len(cases)} cases)", file=sys.stderr, flush=True)
    return times


def stats(key: str, times: list[float]) -> dict:
    """The median under `key`, with the minimum and every time for the JSON report."""
    return {key: statistics.median(times), "ms_min": min(times), "ms_all": [round(t, 3) for t in times]}


def paired_ratio(num: list[float], den: list[float], n: int = 4000, seed: int = 0) -> tuple[float, float, float]:
    """(median, low, high): the median over rounds of num/den timed in the same round, and
    a 95% bootstrap interval over rounds. Interleaving puts a busy moment on both cases of
    a round, so the per-round ratio cancels most of the machine's drift."""
    import numpy as np

    ratios = np.asarray(num, dtype=float) / np.asarray(den, dtype=float)
    draws = np.random.default_rng(seed).integers(0, len(ratios), (n, len(ratios)))
    medians = np.median(ratios[draws], axis=1)
    return float(np.median(ratios)), float(np.percentile(medians, 2.5)), float(np.percentile(medians, 97.5))


def pooled_ratio(num: list[float], den: list[float], n: int = 4000, seed: int = 0) -> tuple[float, float, float]:
    """(value, low, high): sum(num) / sum(den) over rounds, and a 95% bootstrap interval
    over rounds. For a rate over rounds of different sizes (a step's micro-batches run from
    1 to 7 s): a round's share follows its work, where a median of per-round ratios would
    weigh a 1 s micro-batch like a 7 s one."""
    import numpy as np

    num_a, den_a = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    draws = np.random.default_rng(seed).integers(0, len(num_a), (n, len(num_a)))
    pooled = num_a[draws].sum(axis=1) / den_a[draws].sum(axis=1)
    return float(num_a.sum() / den_a.sum()), float(np.percentile(pooled, 2.5)), float(np.percentile(pooled, 97.5))


def verdict(low: float, high: float, op: str, bound: float) -> str:
    """PASS or MISS when the whole interval is on one side of the bound; NOISE when it
    holds the bound (more rounds, or a quieter machine, decide it)."""
    meets_low, meets_high = (low <= bound, high <= bound) if op == "<=" else (low >= bound, high >= bound)
    if meets_low and meets_high:
        return "PASS"
    return "MISS" if not (meets_low or meets_high) else "NOISE"

"""Timing and memory helpers shared by the benchmarks.

The machines we run on are noisy, so cases are timed in interleaved rounds: a slower
or busier moment falls on every case alike, and each figure is a median over rounds.
"""

from __future__ import annotations

import resource
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
    cases: dict[str, Callable[[], object]], warmup: int, repeats: int, device: torch.device = torch.device("cpu")
) -> dict[str, list[float]]:
    """ms of each call of each case, timed in round-robin rounds; the first `warmup`
    rounds (optimizer state allocation, allocator and cache warm-up) are not kept."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for r in range(warmup + repeats):
        for name, fn in cases.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            if r >= warmup:
                times[name].append((time.perf_counter() - start) * 1e3)
        kind = "warm-up" if r < warmup else "timed"
        print(f"flix bench: {kind} round {r + 1}/{warmup + repeats} ({len(cases)} cases)", file=sys.stderr, flush=True)
    return times


def stats(key: str, times: list[float]) -> dict:
    """The median under `key`, with the minimum and every time for the JSON report."""
    return {key: statistics.median(times), "ms_min": min(times), "ms_all": [round(t, 3) for t in times]}


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far.

    Linux's VmHWM belongs to this process's own address space; ru_maxrss does not always:
    a child started by vfork/posix_spawn (as `subprocess` does) inherits its parent's peak.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux, bytes on macOS

"""Peak memory of this process: what `flix bench run` reports, and the benchmarks too."""

from __future__ import annotations

import resource

import torch


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


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory so far: allocated device memory on CUDA, resident memory on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return peak_rss_gib()

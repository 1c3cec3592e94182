"""What produced a number: the versions of Python and the packages that decide results,
and the device. Recorded in every results.json and benchmark snapshot, shown on every
report page (which warns when one table mixes them)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path

PACKAGES = ("torch", "transformers", "peft", "hydra-core", "wandb", "flix")


def cpu_name(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model, where the system says it (Linux), and its architecture: two hosts'
    runs differ in speed and in float32 rounding (other GEMM kernels), and a record should
    say which ran it."""
    arch = platform.processor() or platform.machine()
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:  # not Linux, or not readable: the architecture alone
        return arch
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "")
    return f"{model}, {arch}" if model else arch


def device_name(device=None) -> str:
    """ "NVIDIA H100 80GB HBM3", or "cpu (<model>, x86_64, 2 cores)" (flix.report.runs.cores reads the cores)."""
    import torch

    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        return torch.cuda.get_device_name(device if device is not None else torch.cuda.current_device())
    return f"cpu ({cpu_name()}, {os.cpu_count()} cores)"


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found | {"device": device_name()}

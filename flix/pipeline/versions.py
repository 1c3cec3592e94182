"""What produced a number: the versions of Python and the packages that decide results,
and the device. Recorded in every results.json and benchmark snapshot, shown on every
report page (which warns when one table mixes them)."""

from __future__ import annotations

import importlib.metadata
import os
import platform

PACKAGES = ("torch", "transformers", "peft", "hydra-core", "wandb", "flix")


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.cuda.current_device())
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found | {"device": device_name()}

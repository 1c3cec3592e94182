"""Every command line answers --help without loading the heavy libraries (torch,
transformers, pandas): they load when work starts. (The time it takes is a benchmark's
figure, `python -m benchmarks.startup`, not a test's.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.startup import COMMANDS  # every command line, the benchmarks' too

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "pandas")


def imported(args: list[str]) -> set[str]:
    """Top-level packages a command imported (python -X importtime writes one line per module)."""
    done = subprocess.run([sys.executable, "-X", "importtime", *args], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return {line.rsplit("|", 1)[1].strip().split(".")[0] for line in done.stderr.splitlines() if line.startswith("import time:") and "|" in line}


@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: " ".join(a[1:]))
def test_help_loads_no_heavy_library(args):
    heavy = sorted(set(HEAVY) & imported(args))
    assert not heavy, f"python {' '.join(args)} imports {heavy}: import them inside the function that works"

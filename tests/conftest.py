"""Shared fixtures: real data from FLIX_DATA_ROOT, the shared fixtures folder."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

# oneDNN picks AMX for bf16 matmuls where the CPU advertises it, and dies with SIGILL on
# VMs that advertise AMX without granting it (the CI machine is one). AVX-512 still runs
# bf16 here; the variable is read when torch first multiplies, so it is set before that.
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The mini XTREME-UP copy (FLIX_DATA_ROOT, else ../shared/data/xtreme_up_mini)."""
    root = Path(os.environ.get("FLIX_DATA_ROOT", SHARED / "data" / "xtreme_up_mini"))
    if not (root / "counts.json").exists():
        pytest.fail(f"no XTREME-UP mini data at {root}: set FLIX_DATA_ROOT")
    return root


@pytest.fixture(scope="session")
def metric_pairs_dir() -> Path:
    path = SHARED / "fixtures" / "metric_pairs"
    if not path.is_dir():
        pytest.fail(f"missing {path}: the shared fixtures sit beside the repository")
    return path


# Small enough that a run on the tiny model takes seconds.
FAST = [
    "logger=none",
    "scale.steps=4",
    "scale.eval_every=2",
    "scale.checkpoint_every=2",
    "scale.eval_examples=3",
    "scale.test_examples=3",
    "scale.batch_size=4",
    "scale.micro_batch_size=2",
    "train.threads=1",
]


@pytest.fixture
def compose(data_root):
    """Compose the real conf/train.yaml with overrides, as `python -m flix.train` does."""
    from flix.config import compose as compose_train

    def make(*overrides: str, fast: bool = True):
        return compose_train([f"data.root={data_root}", *(FAST if fast else []), *overrides])

    return make


@pytest.fixture
def gemma() -> None:
    """Skips unless Gemma 3 270M can load offline: cached, or its GGUF package installed
    (`make setup` installs it; the first test converts it once, ~1.5 min). FLIX_TEST_GEMMA=0 opts out."""
    from flix.models import GGUF_MODULE, gemma_cache_path

    if os.environ.get("FLIX_TEST_GEMMA") == "0":
        pytest.skip("FLIX_TEST_GEMMA=0")
    if not gemma_cache_path().is_dir() and importlib.util.find_spec(GGUF_MODULE) is None:
        pytest.skip(f"no Gemma 3 270M at {gemma_cache_path()} and no {GGUF_MODULE} package: pip install -e '.[gemma]'")

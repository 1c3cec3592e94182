"""Shared fixtures: real data from FLIX_DATA_ROOT, the shared fixtures folder."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

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

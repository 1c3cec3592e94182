"""Shared fixtures: real XTREME-UP data (FLIX_DATA_ROOT, else the sample in tests/data/),
the shared fixtures folder; `@pytest.mark.needs_mini` skips a test without the real mini copy."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

# oneDNN picks AMX for bf16 matmuls where the CPU advertises it, and dies with SIGILL on
# VMs that advertise AMX without granting it (the CI machine is one). AVX-512 still runs
# bf16 here; the variable is read when torch first multiplies, so it is set before that.
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SAMPLE = REPO / "tests" / "data" / "xtreme_up_sample"  # python tests/data/make_sample.py remakes it
NEEDS_MINI = "needs the real XTREME-UP mini copy: set FLIX_DATA_ROOT to it (CI: ../shared/data/xtreme_up_mini)"


def data_root_path() -> Path:
    """FLIX_DATA_ROOT when set (CI: the real mini copy), else the sample in tests/data/."""
    return Path(os.environ.get("FLIX_DATA_ROOT") or SAMPLE).resolve()


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", f"needs_mini: {NEEDS_MINI}; skipped on the sample in tests/data/")


def pytest_runtest_setup(item) -> None:
    if item.get_closest_marker("needs_mini") and data_root_path() == SAMPLE.resolve():
        pytest.skip(NEEDS_MINI)


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = data_root_path()
    if not (root / "counts.json").exists():
        pytest.fail(f"no XTREME-UP data at {root} (FLIX_DATA_ROOT): point it at an XTREME-UP-layout copy with counts.json, or unset it")
    return root


@pytest.fixture(scope="session")
def metric_pairs_dir() -> Path:
    """XTREME-UP's published baseline outputs, beside the repository (not redistributed here)."""
    path = SHARED / "fixtures" / "metric_pairs"
    if not path.is_dir():
        pytest.skip(f"needs {path} (XTREME-UP's published baseline outputs) beside the repository")
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


def train_cmd(run_dir: Path, data_root: Path, *overrides: str) -> list[str]:
    """`python -m flix.train` on the two-task mixture into run_dir: FAST, then overrides (the last value of a key wins)."""
    return [sys.executable, "-m", "flix.train", *FAST, "mixture=multitask_sw", f"data.root={data_root}", f"hydra.run.dir={run_dir}", *overrides]


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory, data_root) -> Path:
    """One real smoke run (FLix on the two-task mixture, the tiny model), trained once per
    session: its run folder. Tests that change it work on a copy."""
    import subprocess

    run_dir = tmp_path_factory.mktemp("smoke_run") / "multitask_sw" / "flix"
    out = subprocess.run(train_cmd(run_dir, data_root), capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and (run_dir / "results.json").is_file(), out.stderr[-2000:]
    return run_dir


@pytest.fixture
def compose(data_root):
    """Compose the real conf/train.yaml with overrides, as `python -m flix.train` does."""
    from flix.pipeline.run_config import compose as compose_train

    def make(*overrides: str, fast: bool = True):
        return compose_train([f"data.root={data_root}", *(FAST if fast else []), *overrides])

    return make


@pytest.fixture
def gemma() -> None:
    """Skips unless Gemma 3 270M can load offline: cached, or its GGUF package installed
    (`make setup` installs it; the first test converts it once, ~1.5 min). FLIX_TEST_GEMMA=0 opts out."""
    from flix.base_models.gemma import GGUF_MODULE, gemma_cache_path

    if os.environ.get("FLIX_TEST_GEMMA") == "0":
        pytest.skip("FLIX_TEST_GEMMA=0")
    if not gemma_cache_path().is_dir() and importlib.util.find_spec(GGUF_MODULE) is None:
        pytest.skip(f"no Gemma 3 270M at {gemma_cache_path()} and no {GGUF_MODULE} package: pip install -e '.[gemma]'")


@pytest.fixture(autouse=True, scope="module")
def kernels_off_after_each_module():
    """The compiled kernels are a process-wide switch (flix.kernels.use): a test module or
    benchmark that turns them on must not decide which ops the next module takes."""
    yield
    if "flix.kernels" in sys.modules:
        sys.modules["flix.kernels"].use(False)

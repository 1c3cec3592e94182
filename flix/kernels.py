"""Compiled CPU kernels (`flix/csrc/kernels.cpp`), float32: the adapters' rank-r
arithmetic of `flix.layer` and the sparse AdamW row update of `flix.optim`.

At rank ~6 torch's batched matmuls run far below a CPU's FMA rate; on Gemma 3 270M they
were most of what FLix added to a training step, and the optimizer's ~20 small ops per
bank much of the rest (reports/bench/README.md). The kernels are built on first use with
`torch.utils.cpp_extension` (a C++ compiler and ninja) for this machine's CPU
(`-march=native`) and cached under `TORCH_EXTENSIONS_DIR` (default
~/.cache/torch_extensions). Where they cannot be built, flix uses torch's ops, which give
the same results to float rounding, and says why once. `FLIX_CPU_KERNELS=0` turns them off.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import platform
import shutil
import sys
import warnings
from pathlib import Path

import torch

from flix.io import atomic_write_text
from flix.lock import run_lock

SOURCE = Path(__file__).parent / "csrc" / "kernels.cpp"
WIDTH = 16  # layer widths must be multiples of the kernels' vector width
MAX_RANK = 16
BUILD_WAIT_S = 600  # how long to wait for another process's build before using torch's ops
log = logging.getLogger(__name__)
_off = False  # set by disabled()


def lowrank_usable(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether `lowrank_forward`/`lowrank_backward` compute this layer's rank-r part:
    float32 on CPU, widths multiples of 16, rank 1 to 16, and kernels that built."""
    return (
        x.device.type == "cpu"
        and x.dtype == a.dtype == b.dtype == torch.float32
        and a.shape[0] > 0
        and 1 <= a.shape[1] <= MAX_RANK
        and x.shape[1] % WIDTH == 0
        and b.shape[2] % WIDTH == 0
        and _ready()
    )


def rows_usable(p: torch.Tensor, values: torch.Tensor) -> bool:
    """Whether `sparse_adamw_` updates this bank: a contiguous float32 CPU matrix, and
    kernels that built."""
    return p.device.type == "cpu" and p.dtype == values.dtype == torch.float32 and p.dim() == 2 and p.is_contiguous() and _ready()


def _ready() -> bool:
    """Not switched off by disabled(), and built (the build is tried once, on CPU work only)."""
    return not _off and kernel() is not None


@contextlib.contextmanager
def disabled():
    """torch's ops instead of the kernels inside this block: FLOP counters see them, and
    comparisons run both."""
    global _off
    before, _off = _off, True
    try:
        yield
    finally:
        _off = before


@functools.cache
def kernel():
    """The compiled module, or None where the kernels are off or cannot be built."""
    if os.environ.get("FLIX_CPU_KERNELS", "1") == "0":
        return None
    folder = None
    try:
        folder = _folder()
        return _build(folder)
    except Exception as err:  # no compiler, no ninja, a compile error, a build that hangs: fall back, and say so once
        remedy = f"Deleting {folder} rebuilds them from scratch; " if folder else ""
        warnings.warn(
            f"flix: the CPU kernels could not be built ({type(err).__name__}: {str(err).strip()[:500]}); "
            f"using torch's ops (same results, slower). {remedy}FLIX_CPU_KERNELS=0 skips the attempt.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


def _folder() -> Path:
    """The build folder: torch's for this Python and torch; the name carries this CPU's flags,
    as -march=native builds for this CPU, so a cache shared between machines never loads a
    build made for another CPU (torch rebuilds on source changes)."""
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(f"flix_cpu_kernels_{hashlib.sha1(_cpu_signature().encode()).hexdigest()[:10]}", False))


def _build(folder: Path):
    from torch.utils.cpp_extension import load

    venv_bin = Path(sys.executable).parent
    if shutil.which("ninja") is None and (venv_bin / "ninja").exists():  # the ninja wheel, venv not activated
        os.environ["PATH"] = f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}"
    name = folder.name
    library, stamp = folder / f"{name}.so", folder / "flix-stamp"
    # An OS lock, released when its holder dies: a killed build never blocks later runs, and a
    # live one is waited for at most BUILD_WAIT_S (then torch's ops).
    with run_lock(folder, wait=True, timeout=BUILD_WAIT_S):
        # torch's own marker, left behind by a killed build, would make load() wait forever;
        # under our lock nobody else is building
        (folder / "lock").unlink(missing_ok=True)
        if library.exists() and not (stamp.exists() and stamp.read_text() == _fingerprint(library)):
            # truncated or half-written (loading it can crash the process): relink it, as the
            # build tool sees it as up to date
            log.warning("flix: the CPU kernel library %s is damaged or unfinished; rebuilding it", library)
            library.unlink()
        log.info("flix: building the CPU kernels %s (once per machine, about two minutes)", name)
        module = load(
            name=name,
            sources=[str(SOURCE)],
            # -fopenmp: at::parallel_for is OpenMP inside torch's headers; without it the kernels run on one thread
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            build_directory=str(folder),
            verbose=False,
        )
        atomic_write_text(stamp, _fingerprint(library))
    return module


def _fingerprint(library: Path) -> str:
    return hashlib.sha256(library.read_bytes()).hexdigest()


def _cpu_signature() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    return f"{platform.machine()} {flags} torch {torch.__version__}"

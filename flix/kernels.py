"""Compiled CPU kernels (`flix/csrc/cpu_kernels.cpp`), float32: the adapters' rank-r
arithmetic of `flix.layer` and the sparse AdamW row update of `flix.optim`, each behind one
function here that picks the kernel or torch's ops for itself, and the frozen model's RMSNorm
and gated activation of `flix.fused` (whose callers check `norm_usable` / `gated_usable`).

At rank ~6 torch's batched matmuls run far below a CPU's FMA rate; on Gemma 3 270M they
were most of what FLix added to a training step, and the optimizer's ~20 small ops per
bank much of the rest (reports/bench/README.md). Opt-in: `use(True)` (runs: `scale.cpu_kernels`,
on in scale=cpu only), so by default every run and test takes the torch ops a GPU run takes;
FLIX_CPU_KERNELS=1 or 0 overrides both. On first use the kernels are built with
`torch.utils.cpp_extension` (a C++ compiler and ninja) for this machine's CPU
(`-march=native`) into a folder named by the source's hash, the CPU and torch (under
TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions), from a copy of the source in the
flix cache: every checkout and venv with the same source reuses one build. Where they cannot be built, flix uses torch's ops (the same
results to float rounding) and says why once.
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

from flix.io import atomic_write_text, cache_dir
from flix.lock import run_lock

SOURCE = Path(__file__).parent / "csrc" / "cpu_kernels.cpp"
WIDTH = 16  # layer widths must be multiples of the kernels' vector width
MAX_RANK = 16
BUILD_WAIT_S = 600  # how long to wait for another process's build before using torch's ops
log = logging.getLogger(__name__)
_wanted = False  # set by use()
_off = False  # set by disabled()


def use(enabled: bool) -> None:
    """Turn the compiled kernels on or off for this process (FLIX_CPU_KERNELS=1|0 overrides)."""
    global _wanted
    _wanted = bool(enabled)


def wanted() -> bool:
    env = os.environ.get("FLIX_CPU_KERNELS")
    return env == "1" if env in ("0", "1") else _wanted


def lowrank_forward(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float, bounds=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(update, h) with h = x a_e^T and update = scaling * h b_e for each example e.
    x is (g * tokens, d_in), a (g, r, d_in), b (g, r, d_out), h (g * tokens, r); or, with
    `bounds` ((g + 1,) int64 offsets on CPU: packed rows), example e's positions are
    x[bounds[e]:bounds[e + 1]]."""
    if _lowrank_usable(x, a, b):
        return kernel().lowrank_forward(x, a, b, scaling, bounds)
    if bounds is not None:  # torch's ops, one example at a time (a reference: layers use the kernel or a mask)
        parts = [lowrank_forward(x[s:e], a[i : i + 1], b[i : i + 1], scaling) for i, (s, e) in enumerate(_runs(bounds))]
        return torch.cat([u for u, _ in parts]), torch.cat([h for _, h in parts])
    g = a.shape[0]
    # h is computed as (g, r, tokens): with the rank outermost the rank-6 products ran
    # 3-8% faster per layer on CPU (reports/bench/README.md).
    h = torch.bmm(a, x.view(g, -1, x.shape[1]).transpose(1, 2)).transpose(1, 2)
    update = torch.bmm(h * scaling, b).view(-1, b.shape[2])
    return update, h.reshape(-1, a.shape[1])


def lowrank_backward(grad, x, a, b, h, scaling: float, need_x: bool, bounds=None):
    """(grad_x less the frozen weight's part, or None; grad_a; grad_b) of lowrank_forward."""
    if _lowrank_usable(x, a, b):
        return kernel().lowrank_backward(grad, x, a, b, h, scaling, need_x, bounds)
    if bounds is not None:
        parts = [lowrank_backward(grad[s:e], x[s:e], a[i : i + 1], b[i : i + 1], h[s:e], scaling, need_x) for i, (s, e) in enumerate(_runs(bounds))]
        grad_x = torch.cat([p[0] for p in parts]) if need_x else None
        return grad_x, torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts])
    g = a.shape[0]
    grad3 = grad.view(g, -1, grad.shape[1])
    h = h.view(g, -1, h.shape[1])
    grad_h = torch.bmm(b, grad3.transpose(1, 2)).mul_(scaling).transpose(1, 2)  # (g, tokens, r), as h
    grad_x = torch.bmm(grad_h, a).view(-1, x.shape[1]) if need_x else None
    grad_a = torch.bmm(grad_h.transpose(1, 2), x.view(g, -1, x.shape[1]))  # (g, r, d_in)
    grad_b = torch.bmm(h.transpose(1, 2), grad3).mul_(scaling)  # (g, r, d_out)
    return grad_x, grad_a, grad_b


def sparse_adamw_(p, m, v, rows, slots, values, step_size, bias2_sqrt, eps, decay, beta1, beta2) -> None:
    """AdamW on the bank rows `rows` of p (moments at `slots` of m and v), in place:
    O(touched rows)."""
    if _rows_usable(p, values):  # one fused pass
        kernel().sparse_adamw_(p, m, v, rows, slots, values, step_size, bias2_sqrt, eps, decay, beta1, beta2)
        return
    w, m_rows, v_rows = p.index_select(0, rows), m.index_select(0, slots), v.index_select(0, slots)
    adamw_update(w, values, m_rows, v_rows, beta1, beta2, step_size, bias2_sqrt, eps, decay)
    p.index_copy_(0, rows, w)
    m.index_copy_(0, slots, m_rows)
    v.index_copy_(0, slots, v_rows)


def adamw_update(w, grad, m, v, beta1, beta2, step_size, bias2_sqrt, eps, decay) -> None:
    """In place on w, m, v: torch AdamW's update, decoupled weight decay first."""
    w.mul_(decay)
    m.mul_(beta1).add_(grad, alpha=1 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    w.addcdiv_(m, (v.sqrt() / bias2_sqrt).add_(eps), value=-step_size)


def _runs(bounds: torch.Tensor) -> list[tuple[int, int]]:
    offsets = bounds.tolist()
    return list(zip(offsets[:-1], offsets[1:]))


def usable(x: torch.Tensor, bank: torch.Tensor, rank: int, d_out: int) -> bool:
    """Whether the rank-r kernels take input x (n, d_in) against a bank of this dtype:
    float32 on CPU, widths multiples of 16, rank 1 to 16, and kernels on and built."""
    return (
        x.device.type == "cpu"
        and x.dtype == bank.dtype == torch.float32
        and 1 <= rank <= MAX_RANK
        and x.shape[1] % WIDTH == 0
        and d_out % WIDTH == 0
        and _ready()
    )


def norm_usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the RMSNorm kernels take x (..., d) with this frozen weight: float32 on CPU,
    d a multiple of 16, and kernels on and built."""
    return (
        x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and not weight.requires_grad
        and x.shape[-1] == weight.shape[0]
        and x.shape[-1] % WIDTH == 0
        and _ready()
    )


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, rstd) for rows x (n, d): y = (x * rstd) * (offset + weight), rstd = 1 / sqrt(mean(x^2) + eps). Callers check norm_usable."""
    return kernel().rms_norm_forward(x, weight, eps, offset)


def rms_norm_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, offset: float) -> torch.Tensor:
    """rms_norm_forward's input gradient (the weight frozen)."""
    return kernel().rms_norm_backward(grad, x, weight, rstd, offset)


def gated_usable(gate: torch.Tensor, up: torch.Tensor) -> bool:
    """Whether the gated-activation kernels take gate and up: contiguous float32 CPU tensors
    of one shape, a multiple of 16 elements, and kernels on and built."""
    return (
        gate.device.type == "cpu"
        and gate.dtype == up.dtype == torch.float32
        and gate.shape == up.shape
        and gate.is_contiguous()
        and up.is_contiguous()
        and gate.numel() % WIDTH == 0
        and _ready()
    )


def gated_forward(gate: torch.Tensor, up: torch.Tensor, gelu: bool) -> torch.Tensor:
    """act(gate) * up, act the tanh GELU (gelu) or SiLU. Callers check gated_usable."""
    return kernel().gated_forward(gate, up, gelu)


def gated_backward(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, gelu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad of gate, grad of up) of gated_forward."""
    return tuple(kernel().gated_backward(grad, gate, up, gelu))


def _lowrank_usable(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape[0] > 0 and a.dtype == b.dtype and usable(x, a, a.shape[1], b.shape[2])


def _rows_usable(p: torch.Tensor, values: torch.Tensor) -> bool:
    """A contiguous float32 CPU matrix, and kernels on and built."""
    return p.device.type == "cpu" and p.dtype == values.dtype == torch.float32 and p.dim() == 2 and p.is_contiguous() and _ready()


def _ready() -> bool:
    """Wanted, not switched off by disabled(), and built (the build is tried once, on CPU work only)."""
    return wanted() and not _off and kernel() is not None


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
    """The compiled module (built on first call), or None where FLIX_CPU_KERNELS=0 or it
    cannot be built."""
    if os.environ.get("FLIX_CPU_KERNELS") == "0":
        return None
    folder = None
    try:
        folder = _folder()
        return _build(folder)
    except Exception as err:  # no compiler, no ninja, a compile error, a build that hangs: fall back, and say so once
        remedy = f"Deleting {folder} rebuilds them from scratch; " if folder else ""
        warnings.warn(
            f"flix: the CPU kernels could not be built ({type(err).__name__}: {str(err).strip()[:500]}); "
            f"using torch's ops (same results, slower). {remedy}FLIX_CPU_KERNELS=0 (or scale.cpu_kernels=false) skips the attempt.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


def _folder() -> Path:
    """The build folder, in torch's extensions cache, named by the source's hash, this CPU's
    flags (-march=native builds for this CPU, so a cache shared between machines never loads
    a build made for another CPU) and torch's version: every checkout reuses one build."""
    from torch.utils.cpp_extension import _get_build_directory

    key = hashlib.sha1(SOURCE.read_bytes() + _cpu_signature().encode()).hexdigest()[:10]
    return Path(_get_build_directory(f"flix_cpu_kernels_{key}", False))


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
        source = _source_copy()
        if not library.exists():
            print(f"[flix] building the CPU kernels in {folder} (once per machine and source, about a minute)", file=sys.stderr, flush=True)
        module = load(
            name=name,
            sources=[str(source)],
            # -fopenmp: at::parallel_for is OpenMP inside torch's headers; without it the kernels run on one thread
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            build_directory=str(folder),
            verbose=False,
        )
        atomic_write_text(stamp, _fingerprint(library))
    return module


def _source_copy() -> Path:
    """The source, copied to a path named by its hash: every checkout compiles the same file
    path, so the build tool sees one build (a checkout's own path would rebuild it)."""
    text = SOURCE.read_text()
    copy = cache_dir() / "kernels" / f"cpu_kernels-{hashlib.sha1(text.encode()).hexdigest()[:12]}.cpp"
    if not copy.exists():
        copy.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(copy, text)
    return copy


def _fingerprint(library: Path) -> str:
    return hashlib.sha256(library.read_bytes()).hexdigest()


def _cpu_signature() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    return f"{platform.machine()} {flags} torch {torch.__version__}"

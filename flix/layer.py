"""The FLix layer: a frozen Linear/Conv1D plus per-feature low-rank banks, and the one
autograd node that computes it. Over a bitsandbytes 4-bit or 8-bit Linear (a quantized
base, `flix.base_models.quantize`) the base's own forward computes x W0 + bias and the
node only the low-rank update; banks are float32 there whatever the base stores.

For input x of example e with bank rows R_e (its active features' rows, from the router):
y = x W0 (+ bias) + scaling * (x A[R_e]^T) B[R_e]. Row 0 of each bank is zero padding
(dropped or unknown features point at it); `flix.features` explains the row layout.
"""

from __future__ import annotations

import math
import sys

import torch
from torch import nn

from flix import kernels
from flix.features import PAD
from flix.routing import PackedRows


def _in_out(base: nn.Module) -> tuple[int, int]:
    if isinstance(base, nn.Linear):  # bitsandbytes' Linear4bit and Linear8bitLt too
        return base.in_features, base.out_features
    if is_conv1d(base):  # GPT-2 style: weight is (in, out)
        return base.weight.shape[0], base.weight.shape[1]
    raise TypeError(f"FLix adapts nn.Linear and transformers Conv1D, not {type(base).__name__}")


def is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_quantized(module: nn.Module) -> bool:
    """A bitsandbytes Linear4bit or Linear8bitLt. No module is one unless bitsandbytes
    was imported, so this never imports it."""
    bnb_nn = getattr(sys.modules.get("bitsandbytes"), "nn", None)
    return bnb_nn is not None and isinstance(module, (bnb_nn.Linear4bit, bnb_nn.Linear8bitLt))


def is_adaptable(module: nn.Module) -> bool:
    """What FLix can wrap: nn.Linear (bitsandbytes' quantized ones included) and Conv1D."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


class FLixLayer(nn.Module):
    """A frozen Linear/Conv1D (or bitsandbytes 4/8-bit Linear) plus per-feature low-rank banks."""

    def __init__(self, base_layer: nn.Module, router, scaling: float, sparse_grad: bool):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = _in_out(base_layer)
        self.router = router
        self.scaling = scaling
        self.sparse_grad = sparse_grad
        self.quantized = is_quantized(base_layer)
        rows = router.space.num_rows
        w = base_layer.weight
        dtype = torch.float32 if self.quantized else w.dtype  # packed uint8/int8 storage is no dtype for banks
        self.flix_A = nn.Parameter(torch.empty(rows, self.in_features, dtype=dtype, device=w.device))
        self.flix_B = nn.Parameter(torch.zeros(rows, self.out_features, dtype=dtype, device=w.device))
        self.reset_parameters()

    @property
    def weight(self) -> torch.Tensor:  # models read e.g. `self.wo.weight.dtype`
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def reset_parameters(self) -> None:
        # A like LoRA (Kaiming uniform over fan_in = d_in), B zero: training starts at W0.
        nn.init.kaiming_uniform_(self.flix_A, a=math.sqrt(5))
        nn.init.zeros_(self.flix_B)
        with torch.no_grad():
            self.flix_A[PAD].zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.router.rows_for(x.shape[0], x.device, x.numel() // self.in_features)  # (g, r): g = batch, or 1 when uniform
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        weight, bias = self._frozen()
        flat = x.reshape(-1, self.in_features).to(dtype).contiguous()
        if isinstance(rows, PackedRows) and not kernels.usable(flat, self.flix_A, rows.example_rows.shape[1], self.out_features):
            # packed rows, torch's ops: the union of the batch's rows, masked per position
            args = (flat, weight, bias, self.flix_A, self.flix_B, rows.used, rows.mask.to(dtype), self.scaling)
            out = _FLixPacked.apply(*args, self.sparse_grad) if torch.is_grad_enabled() else _packed_forward(*args)[0]
        else:
            bounds = None
            if isinstance(rows, PackedRows):  # packed rows, CPU kernels: each run of one example's positions, its rows
                rows, bounds = rows.example_rows, rows.bounds
            args = (flat, weight, bias, self.flix_A, self.flix_B, rows, self.scaling)
            if torch.is_grad_enabled():
                out = _FLixLinear.apply(*args, self.sparse_grad, bounds)
            else:  # generation and evaluation: the same arithmetic without an autograd node's overhead
                out = _flix_forward(*args, bounds)[0]
        out = out.view(*x.shape[:-1], self.out_features)
        if self.quantized:  # bitsandbytes' dequantizing matmul (and its autograd) as it is
            base = self.base_layer(x)
            out = base + out.to(base.dtype)
        return out

    def _frozen(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The frozen (d_in, d_out) weight and bias the node multiplies by; none over a quantized base."""
        if self.quantized:
            return None, None
        weight = self.base_layer.weight
        return (weight.t() if isinstance(self.base_layer, nn.Linear) else weight), self.base_layer.bias

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rows={self.flix_A.shape[0]}, scaling={self.scaling:g}"


class _FLixLinear(torch.autograd.Function):
    """y = x W (+ bias) + scaling * (x A_e^T) B_e for each example e's bank rows, as
    one autograd node.

    Written out by hand because the adapter's arithmetic is tiny (rank 6 against widths
    of hundreds) and general ops serve it badly: here the frozen matmuls accumulate onto
    the update and onto the adapter's input gradient (no extra pass over either), the
    rank-r part runs in a compiled kernel on CPU in float32 (`flix.kernels`), and the
    bank gradients come out as one sparse tensor over the rows the batch used
    (dense with sparse=False). The frozen weight gets no gradient; with weight None
    (a quantized base, whose layer computes its own part) the node is the update alone.
    x is (g * tokens, d_in) with g = rows.shape[0] examples (or 1 when all share rows),
    or, with `bounds` (packed rows, CPU kernels), the runs of positions bounds[e]:bounds[e + 1].
    """

    @staticmethod
    def forward(ctx, x, weight, bias, bank_a, bank_b, rows, scaling, sparse, bounds=None):
        out, a, b, h = _flix_forward(x, weight, bias, bank_a, bank_b, rows, scaling, bounds)
        ctx.save_for_backward(x, weight, a, b, h, rows)
        ctx.scaling, ctx.sparse, ctx.banks, ctx.bounds = scaling, sparse, (bank_a, bank_b), bounds
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, a, b, h, rows = ctx.saved_tensors
        bank_a, bank_b = ctx.banks
        need_x = ctx.needs_input_grad[0]
        with torch.autocast(x.device.type, enabled=False):
            grad = grad.to(x.dtype).contiguous()
            grad_x, grad_a, grad_b = kernels.lowrank_backward(grad, x, a, b, h, ctx.scaling, need_x, ctx.bounds)
            if need_x and weight is not None:
                torch.addmm(grad_x, grad, weight.to(x.dtype).t(), out=grad_x)  # as in forward
            grad_bias = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        grad_a, grad_b = _bank_grad(bank_a, rows, grad_a, ctx.sparse), _bank_grad(bank_b, rows, grad_b, ctx.sparse)
        return (grad_x, None, grad_bias, grad_a, grad_b, None, None, None, None)


def _flix_forward(x, weight, bias, bank_a, bank_b, rows, scaling, bounds=None):
    """The layer's output, and the per-example bank rows a, b and the rank-r activations h
    that backward needs."""
    with torch.autocast(x.device.type, enabled=False):  # dtypes are chosen by the caller
        a = _gather(bank_a, rows).to(x.dtype)  # (g, r, d_in)
        b = _gather(bank_b, rows).to(x.dtype)  # (g, r, d_out)
        update, h = kernels.lowrank_forward(x, a, b, scaling, bounds)
        # The update is written first and the frozen matmul accumulates onto it (beta=1
        # inside the GEMM, which is compute-bound) instead of a read-modify-write pass
        # over the output afterwards. In place via out=, which FLOP counters see (addmm_
        # they do not).
        out = update if weight is None else torch.addmm(update, x, weight.to(x.dtype), out=update)
        if bias is not None:
            out.add_(bias.to(x.dtype))
    return out, a, b, h


class _FLixPacked(torch.autograd.Function):
    """_FLixLinear for packed rows, whose tokens belong to examples with different bank
    rows: h = x A_U^T over the union U of the batch's rows, zeroed where a token's
    example does not use a row (`mask`, (tokens, U)), then scaling * h B_U. The same sum
    over each example's rows as _FLixLinear, as three plain matmuls over all tokens (no
    loop over examples); U is a few times the active rank, small beside the frozen matmul."""

    @staticmethod
    def forward(ctx, x, weight, bias, bank_a, bank_b, used, mask, scaling, sparse):
        out, a, b, h = _packed_forward(x, weight, bias, bank_a, bank_b, used, mask, scaling)
        ctx.save_for_backward(x, weight, a, b, h, used, mask)
        ctx.scaling, ctx.sparse, ctx.banks = scaling, sparse, (bank_a, bank_b)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, a, b, h, used, mask = ctx.saved_tensors
        bank_a, bank_b = ctx.banks
        with torch.autocast(x.device.type, enabled=False):
            grad = grad.to(x.dtype).contiguous()
            grad_h = torch.mm(grad, b.t()).mul_(mask).mul_(ctx.scaling)  # (tokens, U); h is masked already
            grad_x = None
            if ctx.needs_input_grad[0]:
                grad_x = torch.mm(grad_h, a)
                if weight is not None:
                    torch.addmm(grad_x, grad, weight.to(x.dtype).t(), out=grad_x)
            grad_a, grad_b = torch.mm(grad_h.t(), x), torch.mm(h.t(), grad).mul_(ctx.scaling)
            grad_bias = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return (
            grad_x,
            None,
            grad_bias,
            _bank_grad(bank_a, used, grad_a, ctx.sparse),
            _bank_grad(bank_b, used, grad_b, ctx.sparse),
            None,
            None,
            None,
            None,
        )


def _packed_forward(x, weight, bias, bank_a, bank_b, used, mask, scaling):
    """_flix_forward for packed rows: (out, A_U, B_U, masked h)."""
    with torch.autocast(x.device.type, enabled=False):
        a = bank_a.index_select(0, used).to(x.dtype)  # (U, d_in)
        b = bank_b.index_select(0, used).to(x.dtype)  # (U, d_out)
        h = torch.mm(x, a.t()).mul_(mask)
        update = torch.mm(h, b).mul_(scaling)
        out = update if weight is None else torch.addmm(update, x, weight.to(x.dtype), out=update)
        if bias is not None:
            out.add_(bias.to(x.dtype))
    return out, a, b, h


def _gather(bank: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """bank[rows] as (g, r, d); index_select is several times faster than advanced indexing."""
    return bank.index_select(0, rows.reshape(-1)).view(*rows.shape, bank.shape[1])


def _bank_grad(bank: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor, sparse: bool) -> torch.Tensor:
    """Per-example row gradients (g, r, d) as the bank's gradient; the padding row gets none."""
    rows, grad = rows.reshape(-1), grad.reshape(-1, grad.shape[-1]).to(bank.dtype)
    used = rows != PAD
    rows, grad = rows[used], grad[used]
    if sparse:
        return torch.sparse_coo_tensor(rows.unsqueeze(0), grad, bank.shape, check_invariants=False)
    return torch.zeros_like(bank).index_add_(0, rows, grad)

"""The frozen model's RMSNorms and gated MLP activations in one compiled pass each way on CPU
(`flix.kernels`).

A Hugging Face RMSNorm is about ten small ops forward and as many backward, and a gated MLP's
act(gate) * up three more, each a pass over the activations; Gemma 3 has six norms a layer
(four around the blocks, the queries' and keys') and one gated MLP. In a cpu NER training step
they cost as much as the attention. A switched module runs the kernel where it applies
(float32 on CPU, kernels on, a norm's weight frozen as FLix leaves it) and its own arithmetic
everywhere else. A module is switched only after a probe showed its own forward computes
what the kernel does:

- an RMSNorm: Gemma's (x * rstd) * (1 + w) or Llama's (x * rstd) * w;
- a gated MLP: down_proj(act_fn(gate_proj(x)) * up_proj(x)), act_fn the tanh GELU or SiLU.

Anything else is left as it is.

    use_fused_ops(model)  # a Hugging Face model, or a FLixModel / peft model around one
"""

from __future__ import annotations

import copy
import functools

import torch
from torch import nn
from torch.nn import functional as F

from flix import kernels

OFFSETS = (1.0, 0.0)  # Gemma's norm weights are around zero, Llama's around one
ACTIVATIONS = {"gelu": lambda x: F.gelu(x, approximate="tanh"), "silu": F.silu}


class _RMSNorm(torch.autograd.Function):
    """The norm kernel's forward and input gradient; the weight is frozen (no gradient)."""

    @staticmethod
    def forward(ctx, x, weight, eps, offset):
        y, rstd = kernels.rms_norm_forward(x, weight, eps, offset)
        ctx.save_for_backward(x, weight, rstd)
        ctx.offset = offset
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        return kernels.rms_norm_backward(grad.contiguous(), x, weight, rstd, ctx.offset), None, None, None


class _Gated(torch.autograd.Function):
    """act(gate) * up on the kernel; keeps gate and up for backward (not act(gate) as well)."""

    @staticmethod
    def forward(ctx, gate, up, gelu):
        ctx.save_for_backward(gate, up)
        ctx.gelu = gelu
        return kernels.gated_forward(gate, up, gelu)

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        return *kernels.gated_backward(grad.contiguous(), gate, up, ctx.gelu), None


def _norm_forward(self, x: torch.Tensor) -> torch.Tensor:
    if not kernels.norm_usable(x, self.weight):
        return type(self).forward(self, x)
    eps, offset = self._flix_fused
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    if torch.is_grad_enabled() and x.requires_grad:
        y = _RMSNorm.apply(rows, self.weight, eps, offset)
    else:
        y = kernels.rms_norm_forward(rows, self.weight, eps, offset)[0]
    return y.view(x.shape)


def _mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    gate, up = self.gate_proj(x), self.up_proj(x)
    gelu = self._flix_fused == "gelu"
    if not kernels.gated_usable(gate, up):
        hidden = self.act_fn(gate) * up  # what the probe found the module's own forward computes
    elif torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        hidden = _Gated.apply(gate, up, gelu)
    else:
        hidden = kernels.gated_forward(gate, up, gelu)
    return self.down_proj(hidden)


def use_fused_ops(model: nn.Module) -> int:
    """Switch every RMSNorm and gated MLP under `model` whose forward the probe matches to
    the kernel path; returns how many are switched. Idempotent; state dicts, devices and
    dtypes are unchanged."""
    switched = 0
    for module in model.modules():
        if getattr(module, "_flix_fused", None) is not None:
            switched += 1
            continue
        for probe, forward in ((_norm_convention, _norm_forward), (_mlp_activation, _mlp_forward)):
            found = probe(module)
            if found is not None:
                module._flix_fused = found
                # a partial of a module-level function, not a bound method: it pickles (torch.save of a whole model)
                module.forward = functools.partial(forward, module)
                switched += 1
                break
    return switched


def _norm_convention(module: nn.Module) -> tuple[float, float] | None:
    """(eps, offset) where `module` is an RMSNorm whose own forward computes
    (x * rstd) * (offset + weight) on a probe; None otherwise."""
    weight = getattr(module, "weight", None)
    eps = getattr(module, "eps", getattr(module, "variance_epsilon", None))
    if not type(module).__name__.endswith("RMSNorm") or not isinstance(weight, torch.Tensor) or weight.dim() != 1 or weight.is_meta or eps is None:
        return None
    with torch.no_grad():
        probe = torch.randn(3, weight.shape[0], generator=torch.Generator().manual_seed(0)).to(weight)
        try:
            own, x = module(probe).float(), probe.float()
        except Exception:  # e.g. a sharded (DTensor) weight that a plain probe cannot meet: leave it
            return None
        normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + float(eps))
        for offset in OFFSETS:
            if torch.allclose(own, normed * (offset + weight.float()), rtol=1e-5, atol=1e-6):
                return float(eps), offset
    return None


class _Map(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def _mlp_activation(module: nn.Module) -> str | None:
    """ "gelu" or "silu" where `module`'s own forward computes down_proj(act(gate_proj(x)) *
    up_proj(x)) with that activation: run with three distinct stand-in projections on a
    probe (a forward that adds a residual, swaps gate and up or activates elsewhere fails);
    None otherwise."""
    if not all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        return None
    stand_in = copy.copy(module)  # shallow: the module's own forward over stand-in projections
    gate, up, down = _Map(lambda x: 2 * x), _Map(lambda x: x + 1), _Map(lambda x: x - 0.5)
    stand_in._modules = {**module._modules, "gate_proj": gate, "up_proj": up, "down_proj": down}
    x = torch.linspace(-6, 6, 96).view(3, 32)
    with torch.no_grad():
        try:
            own = type(module).forward(stand_in, x)
        except Exception:  # a forward that needs more than x: not the pattern
            return None
        for name, act in ACTIVATIONS.items():
            if own.shape == x.shape and torch.allclose(own, down(act(gate(x)) * up(x)), rtol=1e-5, atol=1e-6):
                return name
    return None

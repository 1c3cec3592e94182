"""AdamW for FLix banks, whose gradients are sparse over rows.

A bank holds every feature's rows but a batch touches only its features' rows, so
the update (and its cost) covers only those rows: the parameters and moments of
features absent from the batch stay untouched, as the paper asks, and a step costs
the same with 8 or 4096 features. Moments exist only for rows that have had a
gradient, so the optimizer's memory follows the features trained, not the bank.
Bias correction uses the global step, like TensorFlow's LazyAdam. With dense
gradients this is exactly torch's AdamW.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from flix import kernels


class SparseAdamW(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"invalid SparseAdamW settings lr={lr} betas={betas} eps={eps} weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    if p.grad.is_sparse:
                        _init_row_state(state, p)
                    else:
                        state["exp_avg"] = torch.zeros_like(p)
                        state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                step_size = group["lr"] / (1 - beta1 ** state["step"])
                bias2_sqrt = math.sqrt(1 - beta2 ** state["step"])
                decay = 1 - group["lr"] * group["weight_decay"]
                if p.grad.is_sparse:
                    grad = p.grad.coalesce()
                    rows, values = grad.indices()[0], grad.values()
                    slots = _slots_for(state, rows)
                    m, v = state["exp_avg"], state["exp_avg_sq"]
                    kernels.sparse_adamw_(p, m, v, rows, slots, values, step_size, bias2_sqrt, group["eps"], decay, beta1, beta2)
                else:
                    kernels.adamw_update(p, p.grad, state["exp_avg"], state["exp_avg_sq"], beta1, beta2, step_size, bias2_sqrt, group["eps"], decay)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        for state in self.state.values():  # torch casts every saved tensor to the parameter's dtype
            if "slot" in state:
                state["slot"] = state["slot"].long()


def _init_row_state(state: dict, p: torch.Tensor) -> None:
    """Moments only for rows that ever had a gradient: `slot` maps a bank row to its
    row in `exp_avg`/`exp_avg_sq` (-1: none yet), so a bank of 4096 features whose
    batches touch a few hundred costs the optimizer a few hundred rows, not 2 x the bank."""
    state["slot"] = torch.full((p.shape[0],), -1, dtype=torch.long, device=p.device)
    state["exp_avg"] = p.new_zeros((0, *p.shape[1:]))
    state["exp_avg_sq"] = p.new_zeros((0, *p.shape[1:]))


def _slots_for(state: dict, rows: torch.Tensor) -> torch.Tensor:
    """Moment slots of `rows`, giving new rows zeroed slots (capacity doubles, so
    growing costs amortised O(1) per row)."""
    slot = state["slot"]
    new = rows[slot[rows] < 0]
    if len(new):
        used = int((slot >= 0).sum())
        slot[new] = torch.arange(used, used + len(new), device=slot.device)
        capacity = len(state["exp_avg"])
        if used + len(new) > capacity:
            grow = max(used + len(new), 2 * capacity) - capacity
            for key in ("exp_avg", "exp_avg_sq"):
                moments = state[key]
                state[key] = torch.cat([moments, moments.new_zeros((grow, *moments.shape[1:]))])
    return slot[rows]


def clip_grad_norm_(params: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm; works for sparse and dense gradients alike."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    norms = [(g.coalesce().values() if g.is_sparse else g).float().norm() for g in grads]
    total = torch.linalg.vector_norm(torch.stack(norms))
    factor = max_norm / (total + 1e-6)
    if factor < 1:
        for g in grads:
            g.mul_(factor)  # a scalar multiply is the same for sparse and dense
    return total


def lr_lambda(warmup: int, total: int):
    """Linear warm-up, then linear decay to 10% of the peak."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.1, 1.0 - 0.9 * (step - warmup) / max(1, total - warmup))

    return factor

"""AdamW for FLix banks, whose gradients are sparse over rows.

A bank holds every feature's rows but a batch touches only its features' rows, so
the update (and its cost) covers only those rows: the parameters and moments of
features absent from the batch stay untouched, as the paper asks, and a step costs
the same with 8 or 4096 features. Bias correction uses the global step, like
TensorFlow's LazyAdam. With dense gradients this is exactly torch's AdamW.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch


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
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                step_size = group["lr"] / (1 - beta1 ** state["step"])
                bias2_sqrt = math.sqrt(1 - beta2 ** state["step"])
                decay = 1 - group["lr"] * group["weight_decay"]
                if p.grad.is_sparse:
                    grad = p.grad.coalesce()
                    rows, values = grad.indices()[0], grad.values()
                    # gather the touched rows, update them, scatter them back: O(touched rows)
                    full = (p, state["exp_avg"], state["exp_avg_sq"])
                    w, m, v = (t.index_select(0, rows) for t in full)
                    _adamw_update(w, values, m, v, beta1, beta2, step_size, bias2_sqrt, group["eps"], decay)
                    for t, part in zip(full, (w, m, v)):
                        t.index_copy_(0, rows, part)
                else:
                    _adamw_update(p, p.grad, state["exp_avg"], state["exp_avg_sq"], beta1, beta2, step_size, bias2_sqrt, group["eps"], decay)
        return loss


def _adamw_update(w, grad, m, v, beta1, beta2, step_size, bias2_sqrt, eps, decay):
    """In place on w, m, v: torch AdamW's update, decoupled weight decay first."""
    w.mul_(decay)
    m.mul_(beta1).add_(grad, alpha=1 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    w.addcdiv_(m, (v.sqrt() / bias2_sqrt).add_(eps), value=-step_size)


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

"""Sharded training (`train.parallel=fsdp`): the frozen base and the FLix banks split
across processes with PyTorch FSDP2 (`fully_shard`), each process keeping 1/N of every
weight, gradient and optimizer moment.

Units: every FLix layer (its frozen weight and its banks, one dtype), then every block
that holds FLix layers (norms and the rest), then the base model as the root. Inside a
unit FSDP2 shards each parameter on its own along dim 0 (bank rows), so frozen and
trainable parameters may share a unit.

Updates equal one process on the whole batch: gradients are summed, not averaged
(the loss is already divided by the global target count), and each process runs
SparseAdamW on its own rows. FSDP2 reduce-scatters dense gradients only (a sparse
gradient cannot be flattened into its buffer), so the banks backpropagate dense under
fsdp and each process turns its gradient shard back into a sparse one over the rows
that got a gradient: the optimizer then touches exactly the rows it would in one
process (lazy moments, no decay of unused rows). Checkpoints hold full banks and
a full, world-size-free optimizer state (`full_optimizer_state`), so a run resumes
on any number of processes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from flix.features import PAD
from flix.layer import FLixLayer


def shard(model) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """Shard `model` (a FLixModel) in place; returns (sharded bank, its local rows) pairs."""
    from torch.distributed.fsdp import fully_shard

    base = model.base_model
    layers = [m for m in base.modules() if isinstance(m, FLixLayer)]
    if any(getattr(layer, "quantized", False) for layer in layers):
        raise ValueError("train.parallel=fsdp shards floating-point weights, not a quantized base: use model.quantize=none or train.parallel=ddp")
    for layer in layers:
        if layer.flix_A.shape[0] < dist.get_world_size():
            raise ValueError(f"train.parallel=fsdp: banks of {layer.flix_A.shape[0]} rows cannot be split over {dist.get_world_size()} processes")
        layer.sparse_grad = False  # FSDP2 reduce-scatters dense gradients only (see the module docstring)
        fully_shard(layer)
    for module in base.modules():
        if isinstance(module, nn.ModuleList):
            for block in module:
                if any(isinstance(m, FLixLayer) for m in block.modules()):
                    fully_shard(block)
    fully_shard(base)
    for unit in base.modules():
        if hasattr(unit, "set_gradient_divide_factor"):  # an FSDP unit: sum gradients, as DDP here does
            unit.set_gradient_divide_factor(1.0)
            unit.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM)
    base._get_fsdp_state()._lazy_init()  # FSDP2 may re-pad shards into new storage here: take the views after it
    with torch.no_grad():
        return [(getattr(layer, name), getattr(layer, name).to_local().detach()) for layer in layers for name in ("flix_A", "flix_B")]


def is_sharded(param: torch.Tensor) -> bool:
    return hasattr(param, "full_tensor")


def local_rows(param: torch.Tensor) -> tuple[int, int]:
    """[start, stop) of the bank rows this process holds (FSDP2 splits dim 0 like torch.chunk)."""
    rows, world, rank = param.shape[0], dist.get_world_size(), dist.get_rank()
    chunk = -(-rows // world)
    return min(rank * chunk, rows), min((rank + 1) * chunk, rows)


def sparse_local_grads(banks: list[tuple[nn.Parameter, torch.Tensor]], used: torch.Tensor) -> None:
    """Each bank's summed gradient shard as a sparse gradient of its local rows, over the
    rows any process's examples used this step (`used`: this process's bank row ids, flat,
    PAD included): what one process's sparse gradient holds after DDP's sum, zero rows
    too (at step 1 every A row's gradient is exactly zero, B being zero, and one process
    still gives it its moments)."""
    if not banks:
        return
    mask = torch.zeros(banks[0][0].shape[0], dtype=torch.uint8)
    mask[used.cpu()] = 1
    mask[PAD] = 0
    dist.all_reduce(mask, op=dist.ReduceOp.MAX)
    for param, local in banks:
        start, stop = local_rows(param)
        rows = mask[start:stop].nonzero().flatten().to(local.device)
        grad = torch.zeros_like(local) if param.grad is None else param.grad.to_local()
        local.grad = torch.sparse_coo_tensor(rows.unsqueeze(0), grad[rows], local.shape, is_coalesced=True, check_invariants=False)
        param.grad = None


def clip_grad_norm_(locals_: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """flix.optim.clip_grad_norm_ over every process's gradient shards (the global norm)."""
    squares = torch.zeros(1, dtype=torch.float64)
    for t in locals_:
        squares += t.grad.coalesce().values().double().pow(2).sum().cpu()
    dist.all_reduce(squares)
    total = squares.sqrt().float()[0]
    factor = max_norm / (total + 1e-6)
    if factor < 1:
        for t in locals_:
            t.grad.mul_(factor)
    return total


def _gather_rows(param: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """Full (rows, ...) tensor from every process's (local rows, ...) part."""
    chunk = -(-param.shape[0] // dist.get_world_size())
    padded = local.new_zeros((chunk, *local.shape[1:]))
    padded[: len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, padded)
    return torch.cat(parts)[: param.shape[0]]


def full_optimizer_state(optimizer, banks: list[tuple[nn.Parameter, torch.Tensor]]) -> dict:
    """SparseAdamW's state as one process training the full banks would hold it (moment
    slots in row order); every process must call it."""
    sd = optimizer.state_dict()
    for index, (param, local) in enumerate(banks):
        state = sd["state"].get(index)
        if state is None:
            continue
        slot = state["slot"]
        seen = slot >= 0
        dense = {}
        for key in ("exp_avg", "exp_avg_sq"):
            part = local.new_zeros(local.shape)
            part[seen] = state[key][slot[seen]]
            dense[key] = _gather_rows(param, part)
        seen_all = _gather_rows(param, seen.to(torch.uint8)).bool()
        full_slot = torch.full((param.shape[0],), -1, dtype=torch.long)
        full_slot[seen_all] = torch.arange(int(seen_all.sum()))
        sd["state"][index] = {"step": state["step"], "slot": full_slot, **{k: v[seen_all.to(v.device)] for k, v in dense.items()}}
    return sd


def load_optimizer_state(optimizer, banks: list[tuple[nn.Parameter, torch.Tensor]], full: dict) -> None:
    """The inverse of full_optimizer_state: this process's rows of a full state."""
    sd = {"state": {}, "param_groups": full["param_groups"]}
    for index, state in full["state"].items():
        param, local = banks[index]
        start, stop = local_rows(param)
        slot = state["slot"].long()[start:stop]
        seen = slot >= 0
        local_slot = torch.full_like(slot, -1)
        local_slot[seen] = torch.arange(int(seen.sum()))
        picked = slot[seen]
        sd["state"][index] = {"step": state["step"], "slot": local_slot, **{k: state[k][picked] for k in ("exp_avg", "exp_avg_sq")}}
    optimizer.load_state_dict(sd)

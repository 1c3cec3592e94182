"""Data parallelism under torchrun / accelerate launch: each process trains on its shard
of the global batch; gradients are summed across processes before every step, so the
update equals one process training on the whole batch."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def setup() -> tuple[int, int]:
    """(rank, world_size); starts the process group when launched with several processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def sum_scalar(value: float, op: str = "sum") -> float:
    """`value` summed (or, op="max", the largest) over the processes."""
    if not active():
        return value
    # NCCL reduces only CUDA tensors; gloo takes CPU ones.
    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return float(t.item())


def sum_gradients(params: list[torch.Tensor]) -> None:
    """All-reduce gradients. Sparse bank gradients travel dense and come back sparse
    over the rows any process touched, so the optimizer still updates only those rows."""
    if not active():
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        sparse = p.grad.is_sparse
        grad = p.grad.to_dense() if sparse else p.grad
        dist.all_reduce(grad)
        if sparse:
            rows = grad.abs().sum(dim=1).nonzero().flatten()
            grad = torch.sparse_coo_tensor(rows.unsqueeze(0), grad[rows], grad.shape, is_coalesced=True, check_invariants=False)
        p.grad = grad


def barrier() -> None:
    if active():
        dist.barrier()


# What gloo and NCCL say when another process of the run ended while this one waited on it.
PEER_GONE = ("closed by peer", "reset by peer", "Broken pipe", "NCCL communicator was aborted")


def peer_failed(err: BaseException) -> bool:
    """Whether `err` is this process losing another process of a multi-process run (which
    ended first, and says why itself), not a failure of its own."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    return isinstance(err, dist.DistError) or (isinstance(err, RuntimeError) and any(s in str(err) for s in PEER_GONE))

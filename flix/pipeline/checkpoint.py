"""Resumable training state: adapter, optimizer, schedule, every RNG and the trainer's
own counters, in one state.pt written atomically and loaded with weights_only=True
(tensors and plain containers only, so a crafted file cannot run code).

Sharded (train.parallel=fsdp, `banks` given): every process calls both functions; the
file holds the full banks and a full optimizer state, written once by process 0, and
each process takes its own rows back when it loads (on any number of processes)."""

from __future__ import annotations

import io
import os
import pickle
import random
from pathlib import Path

import numpy as np
import torch

from flix.io import atomic_dir
from flix.pipeline import sharding

STATE = "state.pt"


def rng_state() -> dict:
    """Every RNG's state as tensors and plain lists."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": [version, list(internal), gauss_next],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def save_checkpoint(path: Path, model, optimizer, scheduler, state: dict, banks: list | None = None) -> None:
    """`state`: the trainer's counters and history (plain values); `banks`: the sharded
    banks and their local rows (flix.pipeline.sharding.shard), None unsharded."""
    adapter = model.adapter_state_dict()  # sharded: gathered by every process
    optimizer_state = optimizer.state_dict() if banks is None else sharding.full_optimizer_state(optimizer, banks)
    if banks is not None and torch.distributed.get_rank() != 0:
        torch.distributed.barrier()  # process 0 writes
        return
    buffer = io.BytesIO()  # serialised first: a full disk then fails as an OSError naming the path
    torch.save(
        {
            "adapter": adapter,
            "optimizer": optimizer_state,
            "scheduler": scheduler.state_dict(),
            "rng": rng_state(),
            **state,
        },
        buffer,
    )
    with atomic_dir(path) as tmp, open(tmp / STATE, "wb") as f:
        f.write(buffer.getbuffer())
        f.flush()
        os.fsync(f.fileno())
    if banks is not None:
        torch.distributed.barrier()


def load_checkpoint(path: Path, model, optimizer, scheduler, banks: list | None = None) -> dict:
    """Restore model, optimizer, schedule and RNGs from path/state.pt; returns the whole
    checkpoint (the trainer takes its counters from it)."""
    file = path / STATE
    try:
        ckpt = torch.load(file, map_location="cpu", weights_only=True)  # copy_ and the optimizer place tensors
    except pickle.UnpicklingError as err:
        raise RuntimeError(
            f"{file}: refused to load: it holds more than tensors and plain values (a checkpoint from an older "
            f"flix, or a tampered file); nothing from it was run. Delete {path} to restart the run from step 0. ({err})"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:  # truncated or corrupted on disk
        raise RuntimeError(f"{file}: unreadable checkpoint ({type(err).__name__}: {err}). Delete {path} to restart the run from step 0.") from None
    model.load_adapter_state_dict(ckpt["adapter"], source=str(file))
    if banks is None:
        optimizer.load_state_dict(ckpt["optimizer"])
    else:
        sharding.load_optimizer_state(optimizer, banks, ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    set_rng_state(ckpt["rng"])
    return ckpt

"""Resumable training state: adapter, optimizer, schedule, every RNG and the trainer's
own counters, in one state.pt written atomically and loaded with weights_only=True
(tensors and plain containers only, so a crafted file cannot run code)."""

from __future__ import annotations

import io
import os
import pickle
import random
from pathlib import Path

import numpy as np
import torch

from flix.io import atomic_dir

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


def save_checkpoint(path: Path, model, optimizer, scheduler, state: dict) -> None:
    """`state`: the trainer's counters and history (plain values)."""
    buffer = io.BytesIO()  # serialised first: a full disk then fails as an OSError naming the path
    torch.save(
        {
            "adapter": model.adapter_state_dict(),
            "optimizer": optimizer.state_dict(),
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


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
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
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    set_rng_state(ckpt["rng"])
    return ckpt

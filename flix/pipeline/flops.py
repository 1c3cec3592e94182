"""The arithmetic a training step cannot avoid, and this device's matmul rate to put it
against: what `flix bench run` and `benchmarks.model` print as useful GFLOP/s."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn


def linear_weights(module: nn.Module, skip: nn.Module | None = None) -> int:
    """Weights of the linear layers under `module` (in x out each, so quantized ones count
    what they compute), less `skip` (the output layer)."""
    from flix.layer import is_adaptable, is_conv1d

    return sum(m.weight.numel() if is_conv1d(m) else m.in_features * m.out_features for m in module.modules() if is_adaptable(m) and m is not skip)


def useful_flops(model: nn.Module, batch: dict, seq2seq: bool) -> int:
    """The arithmetic a training step on `batch` cannot avoid: each real token through the
    blocks' linear layers and each real target through the output layer, forward and the
    input-gradient backward of the frozen weights (2 + 2 FLOPs per weight). Padding,
    attention scores and the adapters are not counted; seq2seq models count the encoder's
    weights per real prompt token and the decoder's per real target. `model`: the frozen
    model, or a FLix model of it (a peft model's LoRA layers would count as blocks)."""
    from flix.loss import IGNORE
    from flix.pipeline.batching import real_positions

    head = model.get_output_embeddings()
    targets = int((batch["labels"] != IGNORE).sum())
    blocks = linear_weights(model, skip=head)
    if seq2seq:  # the encoder sees the prompt's real tokens, the decoder the targets
        encoder = linear_weights(model.get_encoder())
        return 4 * (encoder * real_positions(batch) + (blocks - encoder) * targets + head.weight.numel() * targets)
    return 4 * (blocks * real_positions(batch) + head.weight.numel() * targets)


def matmul_name(device, bf16: bool) -> str:
    """What `matmul_case` multiplies: 2048 square float32 on a CPU (sgemm), 8192 on CUDA, bf16 when training computes in it."""
    return f"{8192 if device.type == 'cuda' else 2048} square, {'bf16' if bf16 else 'float32'}"


def matmul_case(device, bf16: bool) -> tuple[Callable[[], object], int]:
    """A square matmul (`matmul_name`) and its FLOPs: this device's practical peak."""
    import torch

    n = int(matmul_name(device, bf16).split()[0])
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=gen).to(device, torch.bfloat16 if bf16 else torch.float32) for _ in range(2))
    return (lambda: torch.mm(a, b)), 2 * n**3


def matmul_seconds(case: Callable[[], object], device, repeats: int) -> list[float]:
    """`repeats` timings of `case`, each after the device is idle."""
    import torch

    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        begin = time.perf_counter()
        case()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - begin)
    return times

"""What the adapters add to a training step, measured inside the step itself.

On a noisy machine two steps timed one after the other differ by more than the few
percent that adapters cost, so `benchmarks.model` also profiles a few steps of each
adapter case and adds up the time of the adapters' own work in that same step: every
FLix layer's autograd node, forward and backward, less the frozen matmul inside it, and
the optimizer. A slow moment slows both parts of the step alike, so

    step / (step - own)

estimates the step against the frozen base's own with a narrow interval. It counts
the profiler's cost per op (mostly on the adapters' many small ops) and leaves out what
the adapters cost the frozen ops around them (caches); `benchmarks.layer` prints it
beside a wall-time ratio that is tight, to check it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from benchmarks.timing import paired_ratio

ADAPTER_NODES = ("_FLixLinear", "_FLixLinearBackward")  # flix.layer._FLixLinear, forward and backward
FROZEN_MATMULS = ("aten::addmm",)  # the frozen weight's product inside a FLix node (flix.layer._flix_forward, backward)
OPTIMIZER = "Optimizer."  # torch names optimizer events Optimizer.step#<class>.step, Optimizer.zero_grad#...


def own_time(step: Callable[[], None], repeats: int) -> list[tuple[float, float]]:
    """(ms of the step, ms of the adapters' own work in it) for each of `repeats` profiled steps."""
    from torch.profiler import ProfilerActivity, profile

    measured = []
    for _ in range(repeats):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            step()
            ms = (time.perf_counter() - start) * 1e3
        measured.append((ms, adapters_own_ms(prof.events())))
    return measured


def adapters_own_ms(events) -> float:
    """The adapters' own work among a profiled step's events: FLix nodes less the frozen
    matmuls inside them, and the optimizer's top-level events."""
    own_us = 0.0
    for event in events:
        if event.name in ADAPTER_NODES:
            frozen = sum(child.cpu_time_total for child in event.cpu_children if child.name in FROZEN_MATMULS)
            own_us += event.cpu_time_total - frozen
        elif event.name.startswith(OPTIMIZER) and event.cpu_parent is None:
            own_us += event.cpu_time_total
    return own_us / 1e3


def attributed_ratio(measured: list[tuple[float, float]]) -> tuple[float, float, float]:
    """step / (step - own) over the profiled steps: median and 95% interval."""
    return paired_ratio([step for step, _ in measured], [step - own for step, own in measured])

"""Test-only fault injection: regressions made on purpose, to prove that `peftbench compare`
catches them. Off unless one of these environment variables is set; the worker records in the
result (`test_injected`) whatever was injected, so such a result is never mistaken for a real one.

PEFTBENCH_TEST_EXTRA_MEMORY=0.2
    Registers a buffer of 0.2 x the adapted model's weight bytes on the model, filled so its
    pages are resident, alive through training: memory.accounted.weights grows by 20% through
    the real accounting (bench.trial.measure.weight_bytes), and the process RSS with it.
PEFTBENCH_TEST_SLOWDOWN=2
    Makes the work of every optimizer step take 2x as long: at the end of each step the loop
    sleeps for (2 - 1) x the time since the step's first forward (fetching the batch is not
    slowed, so a whole step takes a little under 2x). The calibration is not slowed, as a real
    regression in a method's layers would not slow it either.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from bench.trial.measure import weight_bytes
from methods.base import Adapted

EXTRA_MEMORY = "PEFTBENCH_TEST_EXTRA_MEMORY"
SLOWDOWN = "PEFTBENCH_TEST_SLOWDOWN"


def apply(adapted: Adapted) -> dict[str, Any]:
    """Inject what the environment asks for into a freshly adapted model; {} when nothing."""
    injected: dict[str, Any] = {}
    if fraction := float(os.environ.get(EXTRA_MEMORY) or 0):
        model = adapted.model
        size = int(fraction * sum(weight_bytes(model).values())) // 4
        # Not persistent: it must cost memory, not change what a method saves.
        model.register_buffer("_peftbench_test_extra", torch.ones(size, dtype=torch.float32), persistent=False)
        injected[EXTRA_MEMORY] = fraction
    if (factor := float(os.environ.get(SLOWDOWN) or 1)) != 1:
        _slow_down(adapted, factor)
        injected[SLOWDOWN] = factor
    return injected


def _slow_down(adapted: Adapted, factor: float) -> None:
    started: list[float] = []
    # The first forward of a step marks its start; on_step runs inside the loop's step timer.
    adapted.model.register_forward_pre_hook(lambda module, args: None if started else started.append(time.perf_counter()))
    inner = adapted.hooks.on_step

    def on_step(step: int, optimizer: torch.optim.Optimizer) -> None:
        if inner is not None:
            inner(step, optimizer)
        if started:
            time.sleep((factor - 1) * (time.perf_counter() - started.pop()))

    adapted.hooks.on_step = on_step

"""Runtime calibration and the machine class, so that step times can be compared across runs.

A step time says as much about the machine's load as about the code. So each trial also times a
fixed piece of work in its own process, once after every training step (outside the step's
timer): forward and backward to the inputs through a small frozen MLP, the same kind of work as
a frozen model's backward to its input embeddings, at a size that never changes. Each step time
divided by the calibration timed right after it cancels what the machine does to both (a busy
neighbour, a slower CPU of the same class) and keeps what the method does to the step: the
calibration does not touch the model, so a slower adapter layer slows the step alone.

Why between the steps and not once before training on the frozen model itself: on a shared
machine the load changes within seconds, and a calibration timed before training saw another
load than the steps did. Measured here on suites/ci.toml, seven reruns while other benchmarks
ran: the step medians over such a calibration spread by up to 146% between reruns, the raw step
medians by 77%, the medians of step / calibration timed after it (this module) by 29%. The
frozen model is also no longer at hand once the method has adapted it, and running it between
steps would add its activations to the peak memory of a method that saves fewer (top_k).

Baselines are kept per machine class; the calibration covers load, not a change of hardware.
"""

from __future__ import annotations

import os
import platform
import time

import torch

ROWS, WIDTH, DEPTH, REPEAT = 64, 256, 8, 4
"""About 5 ms on one core of this 2-core CPU, under 1 MiB of memory: small next to any step's
activations, so it never sets a trial's peak."""


def machine_class() -> str:
    """The key baselines are stored under, e.g. x86_64-2cpu-cpu. A different class is refused
    by `peftbench compare`: memory and time figures do not carry across machines."""
    try:
        cpus = len(os.sched_getaffinity(0))  # the CPUs this process may use (containers pin them)
    except AttributeError:
        cpus = os.cpu_count() or 0
    accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    return f"{platform.machine()}-{cpus}cpu-{accelerator}"


class Calibration:
    """Call it between training steps; `times` holds one entry per call, `spent` their sum."""

    def __init__(self, device: torch.device):
        generator = torch.Generator().manual_seed(0)
        self.device = device
        self.weights = [(torch.randn(WIDTH, WIDTH, generator=generator) / WIDTH**0.5).to(device) for _ in range(DEPTH)]
        self.inputs = torch.randn(ROWS, WIDTH, generator=generator).to(device)
        self.times: list[float] = []
        self.spent = 0.0
        self._work()  # untimed: the first call pays for allocation and lazy initialisation

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _work(self) -> None:
        with torch.enable_grad():
            for _ in range(REPEAT):
                x = self.inputs.detach().requires_grad_(True)
                h = x
                for w in self.weights:  # frozen weights: the gradient flows to the inputs only
                    h = torch.tanh(h @ w)
                h.sum().backward()

    def __call__(self) -> float:
        self._sync()
        start = time.perf_counter()
        self._work()
        self._sync()
        elapsed = time.perf_counter() - start
        self.times.append(elapsed)
        self.spent += elapsed
        return elapsed

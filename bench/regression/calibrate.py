"""Runtime calibration and the machine class, so that step times can be compared across runs.

A step time says as much about the machine's load as about the code. So each trial also times a
fixed piece of work in its own process, once after every training step (outside the step's
timer), and the regression check compares step time / the calibration timed right after it. The
calibration does not touch the trial's model, so a slower adapter layer slows the step alone.

What the calibration is made of decides what it cancels. It is the same kind of work as the
regression suite's steps (suites/ci.toml): forward and backward to the input embeddings through
one frozen Llama block and one frozen GPT-2 block of the CI models' width (64), on a 16 x 64-token
batch, through the same transformers modules. Such steps are bound as much by the per-operator
cost of PyTorch and Python as by arithmetic, and how those two compare differs between CPUs of one
machine class, with the thread count and with a neighbour's load. An earlier calibration of eight
256-wide matmuls and tanh (pure arithmetic) cancelled the load but not that balance: on a second
machine of this class, every CI trial's ratio came out 28-44% lower. How this one holds under
the conditions that can be made here (a busy neighbour, a cold page cache, two threads) is
measured by benchmarks/false_alarms.py; the table is in results/baselines/README.md.

Why between the steps and not once before training: on a shared machine the load changes within
seconds, and a calibration timed before training sees another load than the steps do.

Baselines are kept per machine class; the calibration covers load and the CPU's balance of
overhead and arithmetic, not a change of hardware class.
"""

from __future__ import annotations

import functools
import os
import platform
import time

import torch
from torch import nn

WIDTH, HEADS, BATCH, TOKENS = 64, 4, 16, 64
"""The CI models' width and heads (bench/models/__init__.py llama-tiny, gpt2-tiny) and suites/ci.toml's
batch: about 10 ms on one core of this 2-core CPU, a few MiB of memory, so never a trial's peak."""


def _blocks() -> list[nn.Module]:
    from transformers import GPT2Config, GPT2Model, LlamaConfig, LlamaModel

    tiny = dict(num_hidden_layers=1, vocab_size=8, max_position_embeddings=TOKENS)
    llama = LlamaModel(LlamaConfig(hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_attention_heads=HEADS,
                                   num_key_value_heads=HEADS // 2, bos_token_id=0, eos_token_id=1, pad_token_id=None, **tiny))
    gpt2 = GPT2Model(GPT2Config(n_embd=WIDTH, n_head=HEADS, bos_token_id=0, eos_token_id=1, **tiny))
    return [m.eval().requires_grad_(False) for m in (llama, gpt2)]


@functools.cache
def machine_class() -> str:
    """The key baselines are stored under, e.g. x86_64-2cpu-cpu. A different class is refused
    by `peftbench compare`: memory and time figures do not carry across machines. Read once per
    process: a parallel sweep's trial reads it before its lane pins it to a share of the CPUs
    (env.cpu_affinity records the share), so the class stays the machine's and the forecast's
    calibration and the matmul peak cache are found under it."""
    try:
        cpus = len(os.sched_getaffinity(0))  # the CPUs this process may use (containers pin them)
    except AttributeError:
        cpus = os.cpu_count() or 0
    accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    return f"{platform.machine()}-{cpus}cpu-{accelerator}"


@functools.cache
def blocks() -> tuple[nn.Module, ...]:
    """The calibration's frozen blocks, built once per process (seeded: the same weights in every
    process). The fork server builds them before it forks any trial (bench/run/forkserver_warm.py),
    so a trial does not pay for building two transformers models."""
    with torch.random.fork_rng(devices=[]):  # the caller's seed must not see this init
        torch.manual_seed(0)
        return tuple(_blocks())


class Calibration:
    """Call it between training steps; `times` holds one entry per call, `spent` their sum."""

    def __init__(self, device: torch.device):
        self.blocks = [m.to(device) for m in blocks()]
        with torch.random.fork_rng(devices=[]):  # the trial's seed must not see this init
            torch.manual_seed(0)
            self.inputs = torch.randn(BATCH, TOKENS, WIDTH).to(device)
        self.device = device
        self.times: list[float] = []
        self.spent = 0.0
        self._work()  # untimed: the first call pays for allocation and lazy initialisation

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _work(self) -> None:
        with torch.enable_grad():
            for block in self.blocks:  # frozen weights: the gradient flows to the inputs only
                x = self.inputs.detach().requires_grad_(True)
                block(inputs_embeds=x).last_hidden_state.sum().backward()

    def __call__(self) -> float:
        self._sync()
        start = time.perf_counter()
        self._work()
        self._sync()
        elapsed = time.perf_counter() - start
        self.times.append(elapsed)
        self.spent += elapsed
        return elapsed

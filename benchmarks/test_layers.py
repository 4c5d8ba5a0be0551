"""Micro-benchmarks of the method layers: one training step (forward, backward, gradients
cleared) of a single layer, the way each method trains it, beside the plain nn.Linear.

    frozen  nn.Linear, weights frozen, backward to the inputs only: the floor under any adapter
    full    nn.Linear with weight and bias gradients: full fine-tuning, and top_k's trained blocks
    lora    methods.lora.LoRALinear around the frozen nn.Linear, r = 8 and 64

and inference: the plain layer against an unmerged and a merged LoRA layer.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from methods.lora import LoRALinear

FEATURES = 512
TOKENS = (8, 64)  # batch x sequence


def linear(trainable: bool) -> nn.Linear:
    torch.manual_seed(0)
    layer = nn.Linear(FEATURES, FEATURES)
    layer.requires_grad_(trainable)
    return layer


def lora(r: int) -> LoRALinear:
    layer = LoRALinear(linear(trainable=False), r=r, scaling=16 / r)
    nn.init.normal_(layer.lora_B)  # a trained adapter: B is zero only at the start
    return layer


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(*TOKENS, FEATURES, generator=torch.Generator().manual_seed(1))


def train_step(layer: nn.Module, x: torch.Tensor):
    x = x.detach().requires_grad_(True)  # as inside a model: gradients flow on to earlier layers

    def step() -> None:
        layer(x).sum().backward()
        x.grad = None
        layer.zero_grad(set_to_none=True)

    return step


@pytest.mark.benchmark(group="train step")
@pytest.mark.parametrize("name", ["frozen", "full", "lora_r8", "lora_r64"])
def test_train_step(benchmark, x, name):
    layer = {"frozen": lambda: linear(False), "full": lambda: linear(True),
             "lora_r8": lambda: lora(8), "lora_r64": lambda: lora(64)}[name]()
    benchmark(train_step(layer, x))


@pytest.mark.benchmark(group="inference")
@pytest.mark.parametrize("name", ["linear", "lora_r8", "lora_r8_merged"])
def test_forward(benchmark, x, name):
    layer = linear(False) if name == "linear" else lora(8)
    if name == "lora_r8_merged":
        layer.merge()
    with torch.no_grad():
        expected = layer(x)
        benchmark(layer, x)
    assert expected.shape == x.shape

"""VeRA: Vector-based Random Matrix Adaptation (Kopiczko et al. 2024, arXiv 2310.11454).

One pair of frozen random matrices, A (r x in_max) and B (out_max x r), serves every targeted
layer; a layer with in inputs and out outputs uses A[:, :in] and B[:out] (peft's slicing, so that
layers of different shapes can share the pair). Each layer trains two vectors only:

    h = W x + Λ_b B Λ_d A x,    d (r) initialised to d_init, b (out) to zero

so the model is exactly unchanged at init, and the trainable count is r * L + sum of out over
the L targets, whatever in is: r can be far larger than LoRA's (the paper uses 256 to 1024).

A and B are drawn with Kaiming uniform init (bound sqrt(6 / fan_in)) from a torch.Generator
seeded with `seed`, A first: the same draws as peft's VeRA with projection_prng_key = seed
(tested), so the two start from identical matrices. They are also saved with the adapter (as
peft's save_projection = True does), so a reload does not depend on the generator.

The layer is methods.tied_lora's ScaledLoRALinear (u = d, v = b, scaling 1, A and B frozen):
VeRA is the frozen-matrix end of the Tied-LoRA family with one pair for all targets. In training
it runs as one autograd node (methods.tied_lora.ScaledLowRankLinear): the same h as above, added
into W x in place, keeping for backward A x and B Λ_d A x (what d's and b's gradients need, as
autograd over the expression keeps), tested equal to the plain expression within float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from methods.base import Adapted, ConfigError, MethodConfig, Targets
from methods.layers import resolve_targets
from methods.lora import features, lora_layers
from methods.tied_lora import ScaledLoRALinear, adapted_from, adapter_dtype, tensor, wrap_all


@dataclass(frozen=True, kw_only=True)
class VeRAConfig(MethodConfig):
    r: int = 256
    """Rank of the shared random matrices A and B (only r values per layer train, so it can be large)."""
    d_init: float = 0.1
    """Initial value of every entry of the vectors d (the paper's Table 6c favours small values)."""
    dropout: float = 0.0
    """Dropout on the input of the VeRA branch only."""
    seed: int = 0
    """Seed of the generator that draws A and B (peft's projection_prng_key)."""
    targets: Targets = "qv"
    """Which linear layers get a VeRA branch (see methods.layers.resolve_targets)."""

    def validate(self) -> None:
        if self.r < 1:
            raise ConfigError("r", f"must be >= 1, got {self.r}")
        if self.d_init == 0:
            # With b = 0 as well, both vectors would get zero gradients forever.
            raise ConfigError("d_init", "must be non-zero (b starts at zero, so d = 0 would never train)")
        if not 0 <= self.dropout < 1:
            raise ConfigError("dropout", f"must be in [0, 1), got {self.dropout}")


class VeRA:
    name = "vera"
    version = "1"
    init_atol: ClassVar[float] = 0.0
    Config = VeRAConfig
    battery_configs: ClassVar[list[dict[str, Any]]] = [
        {"r": 16, "targets": "qv"},
        {"r": 8, "targets": "all-linear", "d_init": 1.0, "seed": 3},
    ]
    # Only r + out values per layer train, from a zero b: the paper's learning rates are large too.
    battery_lr: ClassVar[float] = 5e-2

    def apply(self, model: nn.Module, cfg: VeRAConfig) -> Adapted:
        if lora_layers(model):
            raise ConfigError("model", "already has LoRA layers; apply VeRA to a fresh base model")
        targets = resolve_targets(model, cfg.targets)
        shapes = [features(layer) for _, layer in targets]
        first = targets[0][1]
        gen = torch.Generator().manual_seed(cfg.seed)
        # Drawn on the CPU so that a seed gives the same matrices on every device.
        a = nn.init.kaiming_uniform_(torch.empty(cfg.r, max(i for i, _ in shapes)), generator=gen)
        b = nn.init.kaiming_uniform_(torch.empty(max(o for _, o in shapes), cfg.r), generator=gen)
        options = {"dtype": adapter_dtype(first), "device": first.weight.device}
        a, b = tensor(a.to(**options), False), tensor(b.to(**options), False)

        def build(name: str, layer: nn.Module) -> ScaledLoRALinear:
            d = torch.full((cfg.r,), float(cfg.d_init), **options)
            lambda_b = torch.zeros(features(layer)[1], **options)
            return ScaledLoRALinear(layer, a, b, tensor(d, True), tensor(lambda_b, True), 1.0, cfg.dropout)

        layers = wrap_all(model, targets, build)
        return adapted_from(model, layers, self.name, cfg, ("r", "targets"))

    def expected_trainable(self, model: nn.Module, cfg: VeRAConfig) -> int:
        """r * L + sum(out) over the L targets: one d (r) and one b (out) per layer."""
        return sum(cfg.r + features(layer)[1] for _, layer in resolve_targets(model, cfg.targets))

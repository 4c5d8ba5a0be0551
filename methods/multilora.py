"""MultiLoRA: Democratizing LoRA for Better Multi-Task Learning (Wang et al. 2023, arXiv 2311.11501).

n LoRA modules run in parallel on each targeted frozen layer, each with a learnable scaling
factor: h = W0 x + sum_i s_i B_i A_i x. The paper's point is that the summed update spreads over
more directions (a flatter singular-value spectrum) than one LoRA's, which suits multi-task data.
Initialisation as in the paper: every A_i and B_i Kaiming-uniform (B is not zero, unlike LoRA),
and the scaling factors s_i start at zero, so the model is exactly unchanged at init.

What was checked (no code from the authors could be found; the paper's full text could not be
read here, only its abstract and secondary summaries of it): the abstract's "scales LoRA modules
horizontally and change[s] parameter initialization of adaptation matrices" (arXiv 2311.11501v1),
and summaries' "learnable per-module scaling" and "Kaiming-uniform" initialization. Unverified:
that the scaling factors start at zero, that B's Kaiming-uniform bound is computed per module
(1 / sqrt(r)), and the defaults n = 3 and r = 8 (ours, not the paper's stated ones).

The n modules are stored stacked along the rank dimension, A = [A_1; ...; A_n] (n r x in) and
B = [B_1 | ... | B_n] (out x n r), because sum_i s_i B_i A_i = [s_1 B_1 | ... | s_n B_n] A: the
forward stays two thin matmuls, as for LoRA, and LoRA's merge applies unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from methods.base import Adapted, ConfigError, freeze, load_trainable, merging, MethodConfig, Targets
from methods.layers import modules_of, replace_module, resolve_targets
from methods.lora import LoRALinear, check_rank, features


@dataclass(frozen=True, kw_only=True)
class MultiLoRAConfig(MethodConfig):
    n: int = 3
    """Number of parallel LoRA modules per targeted layer."""
    r: int = 8
    """Rank of each module."""
    dropout: float = 0.0
    """Dropout on the input of the low-rank branches."""
    targets: Targets = "qv"
    """Which linear layers get the modules (see methods.layers.resolve_targets)."""

    def validate(self) -> None:
        if self.n < 1:
            raise ConfigError("n", f"must be >= 1, got {self.n}")
        if self.r < 1:
            raise ConfigError("r", f"must be >= 1, got {self.r}")
        if not 0 <= self.dropout < 1:
            raise ConfigError("dropout", f"must be in [0, 1), got {self.dropout}")


class MultiLoRALinear(LoRALinear):
    """n rank-r LoRA modules stacked into one rank-n r LoRA, with one learnable scale per module."""

    def __init__(self, base_layer: nn.Module, n: int, r: int, dropout: float = 0.0):
        super().__init__(base_layer, n * r, scaling=1.0, dropout=dropout)
        self.n, self.r = n, r
        # Kaiming-uniform (a = sqrt 5) of each (out x r) B_i: bound 1 / sqrt(r). A's rows already
        # match per-module init (fan-in = in features either way).
        bound = 1 / math.sqrt(r)
        nn.init.uniform_(self.lora_B, -bound, bound)
        self.lora_scale = nn.Parameter(torch.zeros(n, dtype=self.lora_A.dtype, device=self.lora_A.device))

    def scaled_b(self) -> Tensor:
        """[s_1 B_1 | ... | s_n B_n]."""
        return self.lora_B * self.lora_scale.repeat_interleave(self.r)

    def forward(self, x: Tensor) -> Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        branch = F.linear(F.linear(self.dropout(x.to(self.lora_A.dtype)), self.lora_A), self.scaled_b())
        return result + branch.to(result.dtype)

    def delta_weight(self) -> Tensor:
        delta = self.scaled_b() @ self.lora_A
        return delta.T if self.fan_in_fan_out else delta

    def module_delta(self, i: int) -> Tensor:
        """s_i B_i A_i as (out, in): the update of the i-th module."""
        rows = slice(i * self.r, (i + 1) * self.r)
        return self.lora_scale[i] * self.lora_B[:, rows] @ self.lora_A[rows]

    def extra_repr(self) -> str:
        return f"n={self.n}, r={self.r}, merged={self.merged}"


def multilora_layers(model: nn.Module) -> dict[str, MultiLoRALinear]:
    return modules_of(model, MultiLoRALinear)


class MultiLoRA:
    name = "multilora"
    version = "1"
    init_atol: ClassVar[float] = 0.0
    Config = MultiLoRAConfig
    battery_configs: ClassVar[list[dict[str, Any]]] = [
        {"n": 3, "r": 2, "targets": "qv"},
        {"n": 2, "r": 1, "targets": "all-linear"},
    ]

    def apply(self, model: nn.Module, cfg: MultiLoRAConfig) -> Adapted:
        if multilora_layers(model):
            raise ConfigError("model", "already has MultiLoRA layers; apply MultiLoRA to a fresh base model")
        targets = resolve_targets(model, cfg.targets)
        check_rank(targets, cfg.r)
        check_rank(targets, cfg.n * cfg.r, key="n")  # the n modules stack into one rank-n r branch
        freeze(model)
        for name, layer in targets:
            replace_module(model, name, MultiLoRALinear(layer, cfg.n, cfg.r, cfg.dropout))
        layers = multilora_layers(model)
        trainable = [p for layer in layers.values() for p in (layer.lora_A, layer.lora_B, layer.lora_scale)]

        return Adapted(
            model=model,
            trainable=trainable,
            **merging(model, layers.values()),
            load_fn=lambda directory: load_trainable(model, trainable, directory, list(layers.values())),
        )

    def expected_trainable(self, model: nn.Module, cfg: MultiLoRAConfig) -> int:
        """n r (in + out) + n per target: n modules of rank r and one scaling factor each."""
        return sum(cfg.n * cfg.r * sum(features(layer)) + cfg.n for _, layer in resolve_targets(model, cfg.targets))

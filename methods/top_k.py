"""Freeze the lower layers and train the top k blocks and the head.

The conventional transfer-learning baseline the article opens with (see also Lee et al. 2023,
"Surgical Fine-Tuning Improves Adaptation to Distribution Shifts", arXiv 2210.11466, for why
the top is not always the right place). k = 0 trains the head only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from methods.base import Adapted, ConfigError, MethodConfig, freeze, require_float
from methods.layers import blocks, head_parameters


@dataclass(frozen=True, kw_only=True)
class TopKConfig(MethodConfig):
    k: int = 1
    """Number of top blocks to train besides the head (0 = head only)."""

    def validate(self) -> None:
        if self.k < 0:
            raise ConfigError("k", f"must be >= 0, got {self.k}")


class TopK:
    name = "top_k"
    version = "1"
    init_atol: ClassVar[float] = 0.0
    Config = TopKConfig
    battery_configs: ClassVar[list[dict[str, Any]]] = [{"k": 1}, {"k": 0}]

    def apply(self, model: nn.Module, cfg: TopKConfig) -> Adapted:
        layers = blocks(model)
        if cfg.k > len(layers):
            raise ConfigError("k", f"{cfg.k} exceeds the model's {len(layers)} blocks")
        chosen: dict[int, nn.Parameter] = {id(p): p for p in head_parameters(model)}
        for block in list(layers)[len(layers) - cfg.k :]:
            chosen.update({id(p): p for p in block.parameters()})
        names = {id(p): n for n, p in model.named_parameters()}
        require_float([(names.get(i, "?"), p) for i, p in chosen.items()], f"{self.name} (k={cfg.k})")
        freeze(model)
        for p in chosen.values():
            p.requires_grad_(True)
        return Adapted(model=model, trainable=list(chosen.values()))

    def expected_trainable(self, model: nn.Module, cfg: TopKConfig) -> int:
        """Head (with final norm and pooler) plus the top k blocks, shared tensors counted once."""
        layers = list(blocks(model))
        tensors = [*head_parameters(model), *(p for block in layers[len(layers) - cfg.k :] for p in block.parameters())]
        return sum(p.numel() for p in {id(p): p for p in tensors}.values())

"""Full fine-tuning: every parameter of the model is trained (the baseline every PEFT paper beats on cost)."""

from __future__ import annotations

from typing import ClassVar

from dataclasses import dataclass

from torch import nn

from methods.base import Adapted, MethodConfig, require_float


@dataclass(frozen=True, kw_only=True)
class FullConfig(MethodConfig):
    """Full fine-tuning has no settings."""


class Full:
    name = "full"
    version = "1"
    init_atol: ClassVar[float] = 0.0
    Config = FullConfig

    def apply(self, model: nn.Module, cfg: FullConfig) -> Adapted:
        require_float(list(model.named_parameters()), self.name)
        for p in model.parameters():
            p.requires_grad_(True)
        # Tied weights appear once in parameters(), so the count is the stored count.
        return Adapted(model=model, trainable=list(model.parameters()))

    def expected_trainable(self, model: nn.Module, cfg: FullConfig) -> int:
        """Every stored parameter, tied ones once."""
        return sum(p.numel() for p in {id(p): p for _, p in model.named_parameters(remove_duplicate=False)}.values())

"""The frozen base model: no parameter trained; the zero-shot baseline that every method must beat."""

from __future__ import annotations

from typing import ClassVar

from dataclasses import dataclass

from torch import nn

from methods.base import Adapted, MethodConfig, freeze


@dataclass(frozen=True, kw_only=True)
class FrozenConfig(MethodConfig):
    """The frozen baseline has no settings."""


class Frozen:
    name = "frozen"
    version = "1"
    init_atol: ClassVar[float] = 0.0
    Config = FrozenConfig

    def apply(self, model: nn.Module, cfg: FrozenConfig) -> Adapted:
        freeze(model)
        return Adapted(model=model, trainable=[])

    def expected_trainable(self, model: nn.Module, cfg: FrozenConfig) -> int:
        return 0

"""Bottleneck adapters: Parameter-Efficient Transfer Learning for NLP (Houlsby et al. 2019, arXiv 1902.00751).

A small module h + W_up f(W_down h + b_down) + b_up (d -> m -> d, with m << d) is inserted on the
output of a block's sublayer, before that sublayer's residual add: here, on the output of the
projection that closes the sublayer, so the block's own skip connection stays untouched.

Placement "houlsby" puts one after the attention output projection and one after the feed-forward
output projection of every block; "pfeiffer" only after the feed-forward one (Pfeiffer et al. 2020,
"AdapterFusion: Non-Destructive Task Composition for Transfer Learning", arXiv 2005.00247).
Houlsby et al. also train the layer norms of every block (an option here, on by default).

Init ("near_identity", the paper's): both projections drawn from a zero-mean Gaussian with std
1e-2 truncated at two standard deviations, biases zero, so each adapter is near the identity.
"zero_up" also zeroes W_up, which makes the model exactly unchanged at init.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from methods.base import Adapted, ConfigError, MethodConfig, freeze, load_trainable
from methods.layers import block_norms, modules_of, replace_module, sublayer_outputs
from methods.lora import features

PLACEMENTS = {"houlsby": ("attention", "ffn"), "pfeiffer": ("ffn",)}
ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}
INITS = ("near_identity", "zero_up")


@dataclass(frozen=True, kw_only=True)
class BottleneckConfig(MethodConfig):
    size: int = 64
    """Bottleneck width m (Houlsby et al. sweep 8, 64 and 256)."""
    placement: str = "houlsby"
    """"houlsby": after the attention and the feed-forward sublayers; "pfeiffer": after the feed-forward only."""
    activation: str = "gelu"
    """Non-linearity between the projections: gelu, relu, silu or tanh."""
    init: str = "near_identity"
    """"near_identity": both projections ~ truncated N(0, init_std^2) (the paper); "zero_up": W_up = 0, an exact identity."""
    init_std: float = 1e-2
    """Standard deviation of the truncated Gaussian init (truncated at two of them)."""
    train_norms: bool = True
    """Also train the blocks' layer norms, as Houlsby et al. do."""

    def validate(self) -> None:
        if self.size < 1:
            raise ConfigError("size", f"must be >= 1, got {self.size}")
        for key, value, known in [
            ("placement", self.placement, PLACEMENTS),
            ("activation", self.activation, ACTIVATIONS),
            ("init", self.init, INITS),
        ]:
            if value not in known:
                raise ConfigError(key, f"unknown {key} {value!r}; known: {', '.join(known)}")
        if not self.init_std > 0:
            raise ConfigError("init_std", f"must be > 0, got {self.init_std}")


class BottleneckAdapter(nn.Module):
    """A frozen output projection followed by a residual bottleneck: y + up(f(down(y)))."""

    def __init__(self, base_layer: nn.Module, size: int, activation: str, init: str, init_std: float):
        super().__init__()
        self.base_layer = base_layer
        d = features(base_layer)[1]
        weight = base_layer.weight
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        self.adapter_down = nn.Linear(d, size, dtype=dtype, device=weight.device)
        self.adapter_up = nn.Linear(size, d, dtype=dtype, device=weight.device)
        self.act = ACTIVATIONS[activation]()
        for layer in (self.adapter_down, self.adapter_up):
            nn.init.trunc_normal_(layer.weight, std=init_std, a=-2 * init_std, b=2 * init_std)
            nn.init.zeros_(layer.bias)
        if init == "zero_up":
            nn.init.zeros_(self.adapter_up.weight)

    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)
        h = y.to(self.adapter_down.weight.dtype)
        return (h + self.adapter_up(self.act(self.adapter_down(h)))).to(y.dtype)


def adapter_layers(model: nn.Module) -> dict[str, BottleneckAdapter]:
    return modules_of(model, BottleneckAdapter)


class Bottleneck:
    """One registry name with a `placement` field rather than two names: Houlsby and Pfeiffer
    adapters are the same module with the same parameter formula, and where it goes is a
    hyperparameter to sweep like LoRA's targets, not a different method."""

    name = "bottleneck_adapter"
    version = "1"
    # The paper's near-identity init moves the logits of the tiny test models (|logits| <= 0.57) by
    # at most 2e-4 for the battery configs (7e-4 with m = 256); "zero_up" is exact.
    init_atol: ClassVar[float] = 1e-3
    Config = BottleneckConfig
    battery_configs: ClassVar[list[dict[str, Any]]] = [
        {"size": 8, "placement": "houlsby"},
        {"size": 4, "placement": "pfeiffer", "train_norms": False, "activation": "relu"},
    ]

    def apply(self, model: nn.Module, cfg: BottleneckConfig) -> Adapted:
        if adapter_layers(model):
            raise ConfigError("model", "already has bottleneck adapters; apply to a fresh base model")
        targets = [t for sublayer in PLACEMENTS[cfg.placement] for t in sublayer_outputs(model, sublayer)]
        freeze(model)
        for name, layer in targets:
            replace_module(model, name, BottleneckAdapter(layer, cfg.size, cfg.activation, cfg.init, cfg.init_std))
        trainable = [p for layer in adapter_layers(model).values() for m in (layer.adapter_down, layer.adapter_up) for p in m.parameters()]
        if cfg.train_norms:
            trainable += [p for norm in block_norms(model) for p in norm.parameters()]
        for p in trainable:
            p.requires_grad_(True)
        return Adapted(model=model, trainable=trainable, load_fn=lambda directory: load_trainable(model, trainable, directory))

    def expected_trainable(self, model: nn.Module, cfg: BottleneckConfig) -> int:
        """Per adapter 2 d m + d + m (two projections with biases, d the projection's output width),
        one adapter per block and sublayer of the placement; plus the blocks' norm parameters."""
        count = 0
        for sublayer in PLACEMENTS[cfg.placement]:
            for _, layer in sublayer_outputs(model, sublayer):
                d = features(layer)[1]
                count += 2 * d * cfg.size + d + cfg.size
        if cfg.train_norms:
            count += sum(p.numel() for norm in block_norms(model) for p in norm.parameters())
        return count

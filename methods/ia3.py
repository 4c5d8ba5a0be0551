"""IA3: Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning
(Liu et al. 2022, arXiv 2205.05638).

(IA)^3 rescales activations with learned vectors: l_k and l_v multiply the attention keys and
values (the outputs of the key and value projections), l_ff multiplies the feed-forward
intermediate activation (the input of the feed-forward output projection: down_proj, mlp.c_proj,
BERT's output.dense). All start at one, so the model is exactly unchanged at init, and each folds
into its frozen weight (rows for k and v, columns for ff), so the adapted model merges.

A fused q|k|v projection (GPT-2's c_attn, GPT-NeoX's and Falcon's query_key_value, with grouped or
multi-query key/value heads) is split by the model's head counts (methods.arch): l_k and l_v scale
only its k and v rows, as the paper defines them (peft's IA3 on c_attn scales all of it, q included).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from methods.base import Adapted, ConfigError, freeze, load_trainable, merging, MethodConfig
from methods.arch import layout
from methods.layers import Conv1D, modules_of, replace_module, sublayer_outputs
from methods.lora import features

VECTORS = ("k", "v", "ff")


@dataclass(frozen=True, kw_only=True)
class IA3Config(MethodConfig):
    vectors: list[str] | None = None
    """Which learned vectors to use, among "k", "v" and "ff"; None = all three, as in the paper."""

    @property
    def chosen(self) -> tuple[str, ...]:
        return tuple(VECTORS) if self.vectors is None else tuple(self.vectors)

    def validate(self) -> None:
        if self.vectors is not None:
            if not self.vectors:
                raise ConfigError("vectors", "empty; choose among k, v, ff (or leave it unset for all three)")
            for v in self.vectors:
                if v not in VECTORS:
                    raise ConfigError("vectors", f"unknown vector {v!r}; known: {', '.join(VECTORS)}")
            if len(set(self.vectors)) != len(self.vectors):
                raise ConfigError("vectors", f"listed twice: {self.vectors}")


class IA3Linear(nn.Module):
    """A frozen linear layer whose output (k, v) or input (ff) is rescaled elementwise by a learned vector.

    For an output scaling, `rows` (None: all) are the output features scaled: a fused q|k|v
    projection keeps its q rows unscaled.
    """

    def __init__(self, base_layer: nn.Module, on_input: bool, rows: Tensor | None = None):
        super().__init__()
        self.base_layer = base_layer
        self.on_input = on_input
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        n_in, n_out = features(base_layer)
        weight = base_layer.weight
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        # Not in the state dict: the rows follow from the model and the config.
        self.register_buffer("rows", None if rows is None else rows.to(weight.device), persistent=False)
        width = n_in if on_input else n_out if rows is None else len(rows)
        self.ia3_l = nn.Parameter(torch.ones(width, dtype=dtype, device=weight.device))
        self.merged = False

    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    def scale(self) -> Tensor:
        """The full-width scaling vector (ones over an unscaled leading part)."""
        if self.rows is None:
            return self.ia3_l
        return self.ia3_l.new_ones(features(self.base_layer)[1]).index_put((self.rows,), self.ia3_l)

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.base_layer(x)
        if self.on_input:
            return self.base_layer((x.to(self.ia3_l.dtype) * self.ia3_l).to(x.dtype))
        y = self.base_layer(x)
        return (y.to(self.ia3_l.dtype) * self.scale()).to(y.dtype)

    @torch.no_grad()
    def _fold(self, factor: Tensor) -> None:
        layer = self.base_layer
        if not layer.weight.is_floating_point():
            raise NotImplementedError(f"cannot merge into a quantized base weight ({type(layer).__name__})")
        # Output scaling acts on the out dim (dim 0 of a Linear weight, dim 1 of a Conv1D one); input scaling on the other.
        out_dim = 1 if self.fan_in_fan_out else 0
        dim = 1 - out_dim if self.on_input else out_dim
        shape = [1, 1]
        shape[dim] = -1
        layer.weight.mul_(factor.view(shape).to(layer.weight.dtype))
        if not self.on_input and getattr(layer, "bias", None) is not None:
            layer.bias.mul_(factor.to(layer.bias.dtype))

    def merge(self) -> None:
        if not self.merged:
            self._fold(self.scale())
            self.merged = True

    def unmerge(self) -> None:
        """Divides by the vector: exact up to rounding unless an entry is near zero."""
        if self.merged:
            self._fold(1.0 / self.scale())
            self.merged = False


def ia3_layers(model: nn.Module) -> dict[str, IA3Linear]:
    return modules_of(model, IA3Linear)


def ia3_targets(model: nn.Module, cfg: IA3Config) -> list[tuple[str, nn.Module, bool, Tensor | None]]:
    """(name, layer, on_input, rows) for every layer that gets a vector; raises before any change.
    Key and value projections come from the model's layout: separate ones whole, a fused q|k|v
    projection by the rows of its k and v heads."""
    chosen = cfg.chosen
    targets: list[tuple[str, nn.Module, bool, Tensor | None]] = []
    kv = [v for v in ("k", "v") if v in chosen]
    if kv:
        for block in layout(model).blocks:
            attn = block.attention
            if attn.qkv is not None:
                targets.append((attn.qkv, model.get_submodule(attn.qkv), False, attn.rows(*kv)))
            else:
                targets += [(getattr(attn, part), model.get_submodule(getattr(attn, part)), False, None) for part in kv]
    if "ff" in chosen:
        targets += [(name, layer, True, None) for name, layer in sublayer_outputs(model, "ffn")]
    return targets


class IA3:
    name = "ia3"
    version = "1"
    init_atol: ClassVar[float] = 0.0
    Config = IA3Config
    battery_configs: ClassVar[list[dict[str, Any]]] = [{}, {"vectors": ["ff"]}]
    # The vectors are scale factors sitting at 1: a tenth of a unit per step is a gentle change.
    battery_lr: ClassVar[float] = 3e-1

    def apply(self, model: nn.Module, cfg: IA3Config) -> Adapted:
        if ia3_layers(model):
            raise ConfigError("model", "already has IA3 layers; apply IA3 to a fresh base model")
        targets = ia3_targets(model, cfg)
        freeze(model)
        for name, layer, on_input, rows in targets:
            replace_module(model, name, IA3Linear(layer, on_input, rows))
        layers = ia3_layers(model)

        trainable = [layer.ia3_l for layer in layers.values()]
        return Adapted(
            model=model,
            trainable=trainable,
            **merging(model, layers.values()),
            load_fn=lambda directory: load_trainable(model, trainable, directory, list(layers.values())),
        )

    def expected_trainable(self, model: nn.Module, cfg: IA3Config) -> int:
        """Per block kv_heads * head_dim for each of k and v (separate or fused), plus in_features of
        each feed-forward output projection."""
        total = 0
        for block in layout(model).blocks:
            heads = block.attention.heads
            total += sum(heads.kv_heads * heads.head_dim for v in ("k", "v") if v in cfg.chosen)
        if "ff" in cfg.chosen:
            total += sum(features(layer)[0] for _, layer in sublayer_outputs(model, "ffn"))
        return total

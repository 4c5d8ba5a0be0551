"""QA-LoRA: Quantization-Aware Low-Rank Adaptation of Large Language Models (Xu et al. 2023, arXiv 2309.14717).

Each target weight is quantized group-wise (groups of g consecutive input features per output
row) with an asymmetric min-max INT-k quantizer, w ~= alpha_ij * q + beta_ij (k in 2, 3, 4, 8).
The adapter sees group-pooled inputs: A is r x (in / g) and

    h = deq(W) x + scaling * B A pool(x),   pool(x)_j = mean of x over input group j.

Because B A pool(x) is constant across the inputs of a group, it equals a weight update that is
constant within each (row, group); merging adds scaling * (B A)_ij / g to the offset beta_ij and
leaves codes and scales untouched, so the merged model is still INT-k with the same scales and
computes exactly what the unmerged one does (up to float rounding).

Pooling: mean, as in the authors' repository (yuhuixu1993/qa-lora, commit 91604c7:
peft_utils.py pools with nn.AvgPool1d(group_size) and applies dropout after pooling,
lora_dropout(qa_pool(x)), as we do; merge.py divides the update by group_size). peft's
`use_qalora` differs on both counts (peft 0.21.2, tuners/lora/variants.py
QALoraLinearVariant.forward): it applies dropout to x before pooling and multiplies the group
mean by in / g (the number of groups, not the group size), so its update is in / g times ours.
Some forks multiply the mean by group_size (sum pooling), selectable with pool = "sum" (then
the offset absorbs scaling * (B A)_ij, without / g).

Init: B = 0 and A Kaiming-uniform (LoRA's and peft's) by default; a_init = "xavier" is the
authors' Xavier-uniform A (peft_utils.py `reset_lora_parameters`). An option rather than the
default so that committed QA-LoRA results keep their meaning.

`merge_then_quantize` / `merge_then_quantize_error` implement the workflow QA-LoRA replaces:
merge a plain LoRA (methods.lora, A of full width r x in) into the full-precision weights,
then quantize the sum with the same INT-k group quantizer (new scales and offsets): that loses
accuracy, QA-LoRA's merge (`qalora_merge_error`) does not. Applied to a QA-LoRA model, the
post-hoc route loses nothing either: a group-constant update only shifts each group's min and
max, and min-max quantization is shift-invariant; QA-LoRA's pooling is what buys that.

Deviations: beta is stored as a float32 offset (the paper's formulation; GPTQ kernels keep an
integer zero point, into which the update cannot be folded exactly); scales and offsets are
float32 and not packed further. The quantized base is recomputed from the base model on load.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from methods.base import Adapted, ConfigError, Targets
from methods.lora import LowRankConfig
from methods.layers import Conv1D
from methods.lora import check_rank, lora_layers
from methods.quantizers import (
    BITS,
    QuantizedLinear,
    QuantLoRALinear,
    float_targets,
    init_A,
    make_adapted,
    quant_lora_layers,
    quantize,
    weight_of,
    wrap,
)


@dataclass(frozen=True, kw_only=True)
class QALoRAConfig(LowRankConfig):
    targets: Targets = "all-linear"
    """Which linear layers are quantized and adapted."""
    bits: int = 4
    """INT-k bits per weight: 2, 3, 4 (the paper's) or 8."""
    group_size: int = 32
    """Input features per quantization group and per pooled adapter input (must divide in)."""
    pool: str = "mean"
    """"mean" (the authors' code) or "sum" pooling of each group of inputs."""
    a_init: str = "kaiming"
    """A's init: "kaiming" (Kaiming-uniform, LoRA's and peft's) or "xavier" (Xavier-uniform, the authors')."""

    def validate(self) -> None:
        super().validate()
        if self.bits not in BITS:
            raise ConfigError("bits", f"must be one of {BITS}, got {self.bits}")
        if self.group_size < 1:
            raise ConfigError("group_size", f"must be >= 1, got {self.group_size}")
        if self.pool not in ("mean", "sum"):
            raise ConfigError("pool", f"must be 'mean' or 'sum', got {self.pool!r}")
        if self.a_init not in ("kaiming", "xavier"):
            raise ConfigError("a_init", f"must be 'kaiming' or 'xavier', got {self.a_init!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


def _in_features(layer: nn.Module) -> int:
    return layer.weight.shape[0] if isinstance(layer, Conv1D) else layer.weight.shape[1]


def _out_features(layer: nn.Module) -> int:
    return layer.weight.shape[1] if isinstance(layer, Conv1D) else layer.weight.shape[0]


class QALoRA:
    name = "qalora"
    version = "1"
    Config = QALoRAConfig
    battery_configs: ClassVar[list[dict[str, Any]]] = [
        {"r": 4, "group_size": 16, "targets": "qv"},
        {"r": 2, "bits": 2, "group_size": 32, "targets": "all-linear", "pool": "sum"},
    ]

    def _targets(self, model: nn.Module, cfg: QALoRAConfig) -> list[tuple[str, nn.Module]]:
        chosen = float_targets(model, cfg.targets)
        for name, layer in chosen:
            if _in_features(layer) % cfg.group_size:
                raise ConfigError("group_size", f"{cfg.group_size} does not divide the {_in_features(layer)} inputs of {name}")
        check_rank(chosen, cfg.r)
        return chosen

    def apply(self, model: nn.Module, cfg: QALoRAConfig) -> Adapted:
        chosen = self._targets(model, cfg)

        def build(name: str, layer: nn.Module) -> QuantLoRALinear:
            w = weight_of(layer)
            bias = getattr(layer, "bias", None)
            base = QuantizedLinear(quantize(w, "int", cfg.bits, cfg.group_size), None if bias is None else bias.detach())
            return QuantLoRALinear(
                base,
                init_A(cfg.a_init, cfg.r, w.shape[1] // cfg.group_size),
                torch.zeros(w.shape[0], cfg.r),
                cfg.scaling,
                cfg.dropout,
                pool_size=cfg.group_size,
                pool=cfg.pool,
                fan_in_fan_out=isinstance(layer, Conv1D),
            )

        return make_adapted(model, self.name, cfg, wrap(model, chosen, build))

    def expected_trainable(self, model: nn.Module, cfg: QALoRAConfig) -> int:
        """r * (in / g + out) per target."""
        return sum(cfg.r * (_in_features(m) // cfg.group_size + _out_features(m)) for _, m in self._targets(model, cfg))


# ---------------------------------------------------------------- the workflow QA-LoRA replaces


def _adapter_layers(model: nn.Module) -> dict[str, nn.Module]:
    layers: dict[str, nn.Module] = {**lora_layers(model), **quant_lora_layers(model)}
    if not layers:
        raise ValueError("the model has no LoRA or QA-LoRA layers")
    if any(layer.merged for layer in layers.values()):
        raise ValueError("unmerge the model first")
    return layers


def _base_and_update(layer: nn.Module) -> tuple[Tensor, Tensor, Tensor | None]:
    """The unmerged layer as (base weight, update), both float32 (out, in), and its bias."""
    with torch.no_grad():
        if isinstance(layer, QuantLoRALinear):
            return layer.base_layer.dequantized_weight(), layer.delta_weight(), layer.base_layer.bias
        weight, delta = layer.base_layer.weight.detach().float(), layer.delta_weight().detach().float()
        if layer.fan_in_fan_out:
            weight, delta = weight.T, delta.T
        return weight, delta, layer.base_layer.bias


def _pooled(errors: dict[str, list[tuple[float, float]]]) -> dict[str, float]:
    return {k: (sum(e * e for e, _ in v) / sum(n * n for _, n in v)) ** 0.5 for k, v in errors.items()}


def merge_then_quantize_error(model: nn.Module, bits: int | None = None, group_size: int | None = None) -> dict[str, Any]:
    """The post-hoc route QA-LoRA replaces: merge each adapter into full-precision weights,
    W' = W + scaling * B A, then quantize W' with the INT-k group quantizer (`bits`, `group_size`;
    by default a QA-LoRA layer's own). Works on plain LoRA models (methods.lora, float base) and
    on our quantized-base adapters (W = deq(Q)).

    Returns relative Frobenius errors ||deq(quant(W')) - W'|| / ||W'|| pooled over layers
    ("merge_then_quantize"), the same for the base alone ("base_only": ||deq(quant(W)) - W|| /
    ||W||, what quantizing without an adapter costs), and per layer under "layers".

    A QA-LoRA update is constant within each quantization group, so re-quantizing W' reproduces
    it (min-max is shift-invariant per group): the loss comes from updates that vary inside a
    group, which a plain LoRA's full-width A produces.
    """
    errors: dict[str, list[tuple[float, float]]] = {"merge_then_quantize": [], "base_only": []}
    per_layer: dict[str, dict[str, float]] = {}
    for name, layer in _adapter_layers(model).items():
        base = layer.base_layer
        k = bits if bits is not None else getattr(base, "bits", None)
        g = group_size if group_size is not None else getattr(base, "blocksize", None)
        if k is None or g is None:
            raise ValueError(f"{name} is a plain LoRA layer: pass bits and group_size")
        weight, delta, _ = _base_and_update(layer)
        merged = weight + delta
        pairs = {
            "merge_then_quantize": (float((quantize(merged, "int", k, g).dequantize() - merged).norm()), float(merged.norm())),
            "base_only": (float((quantize(weight, "int", k, g).dequantize() - weight).norm()), float(weight.norm())),
        }
        per_layer[name] = {key: e / (n or 1.0) for key, (e, n) in pairs.items()}
        for key, pair in pairs.items():
            errors[key].append(pair)
    return {**_pooled(errors), "layers": per_layer}


def qalora_merge_error(model: nn.Module) -> dict[str, Any]:
    """QA-LoRA's own merge: ||merged - (deq(W) + update)|| / ||deq(W) + update||, pooled over
    the QA-LoRA layers of an unmerged model (computed without merging it), and per layer."""
    errors: list[tuple[float, float]] = []
    per_layer: dict[str, float] = {}
    for name, layer in _adapter_layers(model).items():
        if not isinstance(layer, QuantLoRALinear) or not layer.merges_exactly():
            raise ValueError(f"{name} is not a QA-LoRA layer")
        weight, delta, _ = _base_and_update(layer)
        q = layer.base_layer.quantized()
        with torch.no_grad():
            q.offset = q.offset + layer.offset_delta()
            merged = q.dequantize()
        target = weight + delta
        errors.append((float((merged - target).norm()), float(target.norm())))
        per_layer[name] = errors[-1][0] / (errors[-1][1] or 1.0)
    return {**_pooled({"qalora_merge": errors}), "layers": per_layer}


def merge_then_quantize(model: nn.Module, bits: int | None = None, group_size: int | None = None) -> nn.Module:
    """A copy of an adapted model with each adapter layer replaced by a QuantizedLinear holding
    quantize(W + scaling * B A) (INT-k, `group_size`), for comparing outputs with the original."""
    names = list(_adapter_layers(model))
    clone = copy.deepcopy(model)
    for name in names:
        layer = clone.get_submodule(name)
        k = bits if bits is not None else getattr(layer.base_layer, "bits", None)
        g = group_size if group_size is not None else getattr(layer.base_layer, "blocksize", None)
        if k is None or g is None:
            raise ValueError(f"{name} is a plain LoRA layer: pass bits and group_size")
        weight, delta, bias = _base_and_update(layer)
        new = QuantizedLinear(quantize(weight + delta, "int", k, g), None if bias is None else bias.detach())
        parent, _, child = name.rpartition(".")
        setattr(clone.get_submodule(parent), child, new)
    return clone

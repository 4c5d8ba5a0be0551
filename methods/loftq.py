"""LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large Language Models (Li et al. 2023, arXiv 2310.08659).

QLoRA quantizes W and starts LoRA from B = 0, so training begins from the quantized model,
not from W. LoftQ instead chooses the quantized base Q and the LoRA init together so that
Q + scaling * B A ~= W. Starting from A = B = 0 it alternates, T times:

    Q    = quantize(W - scaling * B A)
    B, A = rank-r truncated SVD of W - deq(Q), the singular values split as sqrt into both
           factors (B = U sqrt(S), A = sqrt(S) V^T), divided by sqrt(scaling) each so that
           scaling * B A is the truncated residual whatever alpha / r is.

The base stays quantized: NF4 (blocksize 64) by default, stored packed by our own
QuantizedLinear (codes identical to bitsandbytes' quantize_4bit; see methods/quantizers.py for
why not bnb's Linear4bit on CPU); "int" selects the uniform min-max quantizer, and bits 2, 3, 8
the NF-k / INT-k variants (the paper tests 2- and 4-bit NF and uniform quantization).

Deviations: peft (whose CPU path is missing: it hard-codes CUDA) keeps the scaling out of the
init, which is only exact when alpha = r; we divide it out. Merging gives a float weight
deq(Q) + scaling * B A (as merging QLoRA does), not a quantized one. Each iteration's error is
recorded on the layer (`loftq_errors`). The alternation is not guaranteed to descend (absmax
rounding is not the minimiser of the quantization step): on the tiny test models the error
falls for 2-4 steps and then wobbles up by ~1%, so we keep the best iterate, which makes the
kept error non-increasing in T (peft and the paper return the last one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor, nn

from methods.base import Adapted, ConfigError, Targets
from methods.lora import LowRankConfig
from methods.layers import Conv1D
from methods.quantizers import (
    BITS,
    KINDS,
    Quantized,
    QuantizedLinear,
    QuantLoRALinear,
    float_targets,
    make_adapted,
    quantize,
    rank_check,
    weight_of,
    wrap,
)


@dataclass(frozen=True, kw_only=True)
class LoftQConfig(LowRankConfig):
    targets: Targets = "all-linear"
    """Which linear layers are quantized and adapted (LoftQ quantizes every adapted layer)."""
    bits: int = 4
    """Bits per quantized weight: 4 (NF4), or 2, 3, 8."""
    quant_type: str = "nf4"
    """"nf4" (QLoRA's NormalFloat, needs bits = 4), "nf" (NF-k for any bits) or "int" (uniform min-max)."""
    blocksize: int = 64
    """Weights per quantization block (one absmax, or scale and offset for int)."""
    iters: int = 1
    """Alternating steps T (peft's default 1; the paper's ablations use up to 5)."""

    def validate(self) -> None:
        super().validate()
        if self.bits not in BITS:
            raise ConfigError("bits", f"must be one of {BITS}, got {self.bits}")
        if self.quant_type not in ("nf4", *KINDS):
            raise ConfigError("quant_type", f"must be 'nf4', 'nf' or 'int', got {self.quant_type!r}")
        if self.quant_type == "nf4" and self.bits != 4:
            raise ConfigError("quant_type", f"'nf4' is 4-bit; use 'nf' or 'int' for bits = {self.bits}")
        if self.blocksize < 2:
            raise ConfigError("blocksize", f"must be >= 2, got {self.blocksize}")
        if self.iters < 1:
            raise ConfigError("iters", f"must be >= 1, got {self.iters}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    @property
    def kind(self) -> str:
        return "nf" if self.quant_type == "nf4" else self.quant_type


@dataclass
class Decomposition:
    """W ~= deq(q) + scaling * B A, and the error ||W - that||_F after each iteration."""

    q: Quantized
    A: Tensor
    B: Tensor
    errors: list[float]

    @property
    def error(self) -> float:
        """The error of the kept (best) iterate."""
        return min(self.errors)


def low_rank_residual(residual: Tensor, r: int, scaling: float) -> tuple[Tensor, Tensor, float]:
    """B (out x r), A (r x in) with scaling * B A the best rank-r approximation of `residual`,
    and the Frobenius norm of what is left (the tail singular values)."""
    if residual.is_meta:  # suite validation applies methods to a weightless skeleton: shapes only
        return residual.new_empty(residual.shape[0], r), residual.new_empty(r, residual.shape[1]), float("nan")
    u, s, vh = torch.linalg.svd(residual, full_matrices=False)
    root = (s[:r] / scaling).sqrt()
    tail = float(s[r:].square().sum().sqrt())
    return u[:, :r] * root, root.unsqueeze(1) * vh[:r], tail


def decompose(weight: Tensor, r: int, scaling: float, iters: int, quantizer: Callable[[Tensor], Quantized]) -> Decomposition:
    """LoftQ's alternating minimisation (the paper's Algorithm 1), keeping the best iterate."""
    w = weight.detach().float()
    a = torch.zeros(r, w.shape[1], device=w.device)
    b = torch.zeros(w.shape[0], r, device=w.device)
    errors: list[float] = []
    best: tuple[Quantized, Tensor, Tensor] | None = None
    for _ in range(iters):
        q = quantizer(w - scaling * (b @ a))
        b, a, err = low_rank_residual(w - q.dequantize(), r, scaling)
        if best is None or err < min(errors):
            best = (q, a, b)
        errors.append(err)
    assert best is not None
    return Decomposition(*best, errors)


def adapted_layer(layer: nn.Module, d: Decomposition, scaling: float, dropout: float) -> QuantLoRALinear:
    bias = getattr(layer, "bias", None)
    new = QuantLoRALinear(
        QuantizedLinear(d.q, None if bias is None else bias.detach()),
        d.A,
        d.B,
        scaling,
        dropout,
        fan_in_fan_out=isinstance(layer, Conv1D),
    )
    new.loftq_errors = list(d.errors)
    return new


class LoftQ:
    name = "loftq"
    version = "1"
    Config = LoftQConfig
    battery_configs: ClassVar[list[dict[str, Any]]] = [
        {"r": 4, "targets": "qv"},
        {"r": 2, "targets": "all-linear", "quant_type": "int", "bits": 2, "blocksize": 32, "iters": 2},
    ]

    def apply(self, model: nn.Module, cfg: LoftQConfig) -> Adapted:
        chosen = float_targets(model, cfg.targets)
        rank_check(chosen, cfg.r)

        def build(name: str, layer: nn.Module) -> QuantLoRALinear:
            d = decompose(weight_of(layer), cfg.r, cfg.scaling, cfg.iters, lambda w: quantize(w, cfg.kind, cfg.bits, cfg.blocksize))
            return adapted_layer(layer, d, cfg.scaling, cfg.dropout)

        layers = wrap(model, chosen, build)
        return make_adapted(model, self.name, cfg, layers)

    def expected_trainable(self, model: nn.Module, cfg: LoftQConfig) -> int:
        """r * (in + out) per target."""
        return sum(cfg.r * sum(layer.weight.shape) for _, layer in float_targets(model, cfg.targets))


def plain_quantization_error(weight: Tensor, cfg: LoftQConfig) -> float:
    """||W - deq(quantize(W))||_F: QLoRA's starting error, which LoftQ's init should beat."""
    w = weight.detach().float()
    return float((w - quantize(w, cfg.kind, cfg.bits, cfg.blocksize).dequantize()).norm())


__all__ = ["LoftQ", "LoftQConfig", "Decomposition", "decompose", "low_rank_residual", "plain_quantization_error"]

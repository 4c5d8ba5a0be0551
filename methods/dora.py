"""DoRA: Weight-Decomposed Low-Rank Adaptation (Liu et al. 2024, arXiv 2402.09353).

Each target weight is split into a magnitude and a direction, and LoRA adapts the direction:

    W' = m * (W + s B A) / ||W + s B A||_c

with m (one scalar per output feature) initialised to ||W||_c and trained together with A and B
(B = 0 at init, so W' = W exactly). ||.||_c is the paper's column-wise norm: its W is in x out,
so each column belongs to one output feature; on our (out x in) layout that is the norm of each
row, over the inputs (for GPT-2's Conv1D, stored in x out, the paper's columns literally).

Gradient: as the paper's section 4.3 recommends, ||W + s B A||_c is treated as a constant in
backward (computed under no_grad): it still follows B A in the forward pass, but no gradient
flows through it. peft 0.21's `use_dora=True` does the same (it detaches the norm), and
computes the layer as W x + (m / n - 1) W x + (m / n) s B A x, which we follow, so outputs and
gradients agree with peft's to float rounding (tested at 1e-5). Dropout, as in peft, applies to
the input of the whole update (both the rescaled W x term and the low-rank term).

Cost (issue #21, against peft's every-forward recomputation): the norm is taken without
materialising W + s B A. Row by row, ||W + s B A||^2 = ||W||^2 + 2 s <B, W A^T> + s^2 <B, B (A A^T)>:
||W||^2 is a constant of the frozen weight, cached (recomputed after unmerge, which rewrites W), and
the rest needs one (r x out) product A W^T, which reads W once, instead of B A, W + s B A and the
norm, three (out x in) passes. And the layer is computed as m / n * (W x + s B A x) (+ bias), equal
in exact arithmetic to peft's form: W x + s B A x runs in the fused LoRA node
(methods.lora.LowRankLinear), so autograd keeps one (tokens x out) tensor per layer, for m's
gradient, where peft's form keeps two (W x and B A x), and runs two full-size elementwise passes
fewer. With dropout, peft's form is kept as is (its W x term reads the undropped input).

Merge writes m / n * (W + s B A) into the base weight (n from the unmerged weights) and keeps n,
so that unmerge can divide it out again. The adapter is saved in peft's format (use_dora, with a
`lora_magnitude_vector` per layer), which `peft.PeftModel.from_pretrained` loads.

Deviation: DoRA needs the base weight in floating point to take its norm; on a quantized base
(bitsandbytes nf4/int8) it raises a ConfigError rather than dequantizing on every forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from methods.base import Adapted, require_float_weights
from methods.layers import resolve_targets
from methods.lora import features, LoRA, LoRAConfig, LoRALinear, LowRankLinear


@dataclass(frozen=True, kw_only=True)
class DoRAConfig(LoRAConfig):
    """LoRA's settings; DoRA adds a trainable magnitude per output feature of every target."""

    @property
    def use_dora(self) -> bool:
        return True


class DoRALinear(LoRALinear):
    """A frozen Linear / Conv1D whose weight is re-decomposed as m * direction, the direction LoRA-adapted."""

    def __init__(self, base_layer: nn.Module, r: int, scaling: float, dropout: float = 0.0):
        super().__init__(base_layer, r, scaling, dropout)
        self.register_buffer("base_sq_norm", None, persistent=False)
        norm = self.cache_base_norm()
        # ||W|| itself (B = 0): the norm the forward computes from the cache is then exactly m, as
        # sqrt(fl(v * v)) = v in binary floating point, so the layer is exactly the base at init.
        self.lora_magnitude = nn.Parameter(norm)
        self.merged_norm: Tensor | None = None

    def oriented_weight(self) -> Tensor:
        """The base weight as (out x in), whatever the layer stores."""
        weight = self.base_layer.weight
        return weight.T if self.fan_in_fan_out else weight

    @torch.no_grad()
    def cache_base_norm(self) -> Tensor:
        """Cache ||W||^2 per output feature (W is frozen: only merge and unmerge write it); returns ||W||."""
        norm = torch.linalg.vector_norm(self.oriented_weight().to(self.lora_A.dtype), dim=1)
        self.base_sq_norm = norm * norm
        return norm

    @torch.no_grad()
    def weight_norm(self) -> Tensor:
        """||W + s B A|| for each output feature, outside the autograd graph (paper, section 4.3),
        from the cached ||W||^2 without materialising W + s B A (module docstring)."""
        a, b, s = self.lora_A, self.lora_B, self.scaling
        projected = F.linear(a, self.oriented_weight().to(a.dtype))  # A W^T, (r x out)
        square = self.base_sq_norm + (2 * s) * (b * projected.T).sum(1) + (s * s) * ((b @ (a @ a.T)) * b).sum(1)
        return square.clamp_min(0).sqrt()

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.base_layer(x)
        scale = self.lora_magnitude / self.weight_norm()
        if isinstance(self.dropout, nn.Dropout) and self.training:
            return self.forward_dropped(x, scale)
        bias = self.base_layer.bias
        if self.fused(x):
            weight, a, b = self.base_layer.weight, self.lora_A, self.lora_B
            combined = LowRankLinear.apply(x, None, weight, None, a, b, self.scaling, self.fan_in_fan_out)
            dtype = x.dtype
        else:
            result = self.base_layer(x)
            dtype = result.dtype
            base = result if bias is None else result - bias
            low_rank = F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B * self.scaling)
            combined = base.to(low_rank.dtype) + low_rank
        out = combined * scale if bias is None else torch.addcmul(bias.to(combined.dtype), combined, scale)
        return out.to(dtype)

    def forward_dropped(self, x: Tensor, scale: Tensor) -> Tensor:
        """peft's form, W x + (m / n - 1) W x' + (m / n) s B A x', x' the dropped input."""
        result = self.base_layer(x)
        dropped = self.dropout(x.to(self.lora_A.dtype))
        base = F.linear(dropped, self.oriented_weight().to(dropped.dtype))
        low_rank = F.linear(F.linear(dropped, self.lora_A), self.lora_B * self.scaling)
        return result + ((scale - 1) * base + scale * low_rank).to(result.dtype)

    def adapter_tensors(self) -> dict[str, nn.Parameter]:
        return {**super().adapter_tensors(), "lora_magnitude_vector": self.lora_magnitude}

    def _write(self, oriented: Tensor) -> None:
        weight = self.base_layer.weight
        weight.copy_((oriented.T if self.fan_in_fan_out else oriented).to(weight.dtype))

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        norm = self.weight_norm()
        delta = (self.lora_B @ self.lora_A) * self.scaling
        self._write((self.lora_magnitude / norm)[:, None] * (self.oriented_weight().to(delta.dtype) + delta))
        # The norm belongs to the unmerged weight: the merged one cannot give it back.
        self.merged_norm = norm
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        delta = (self.lora_B @ self.lora_A) * self.scaling
        factor = (self.lora_magnitude / self.merged_norm)[:, None]
        self._write(self.oriented_weight().to(delta.dtype) / factor - delta)
        self.cache_base_norm()  # W is back up to rounding: the cache follows it
        self.merged_norm = None
        self.merged = False


class DoRA(LoRA):
    name = "dora"
    version = "1"
    Config = DoRAConfig

    def wrap(self, layer: nn.Module, cfg: DoRAConfig) -> LoRALinear:
        return DoRALinear(layer, cfg.r, cfg.scaling, cfg.dropout)

    def apply(self, model: nn.Module, cfg: DoRAConfig) -> Adapted:
        require_float_weights(resolve_targets(model, cfg.targets), "DoRA needs its norm in float")
        return super().apply(model, cfg)

    def expected_trainable(self, model: nn.Module, cfg: DoRAConfig) -> int:
        """r * (in + out) + out per target: LoRA's A and B plus one magnitude per output feature."""
        return sum(cfg.r * (fin + fout) + fout for fin, fout in (features(layer) for _, layer in resolve_targets(model, cfg.targets)))

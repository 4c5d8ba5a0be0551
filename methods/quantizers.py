"""Shared machinery of the quantization-aware LoRA methods (LoftQ, QA-LoRA, LQ-LoRA).

Two blockwise quantizers of a weight laid out (out, in), blocks running along the input
dimension of each row (the flattened weight cut into runs of `blocksize`, as bitsandbytes
does; when `blocksize` divides `in`, a block is exactly one (row, group) pair):

- "nf": NormalFloat-k (Dettmers et al. 2023, QLoRA, arXiv 2305.14314), absmax per block and a
  codebook of normal quantiles with an exact zero. k = 4 is QLoRA's NF4: the codebook and the
  codes equal bitsandbytes' `quantize_4bit(..., quant_type="nf4")` (checked in the tests).
  k = 2, 3, 8 use the same construction.
- "int": asymmetric min-max INT-k (the quantizer of QA-LoRA, arXiv 2309.14717):
  w ~= alpha * q + beta with alpha = (max - min) / (2^k - 1), beta = min, q in [0, 2^k - 1].
  beta is stored as a float offset (the paper's formulation), which is what lets QA-LoRA fold
  its adapter into the offsets exactly.

Why not bitsandbytes' Linear4bit for the base: on CPU, bitsandbytes 0.50.2's native
`dequantize_4bit` returns wrong values when the last dimension is not a multiple of the block
size (our tiny test models have width 32; 88% of the entries differ, while the codes
`quantize_4bit` writes are right), and Linear4bit's forward uses that kernel. Our own packed
storage avoids that and the AVX512-BF16 repacking trap (DESIGN section 6), and serves 2/3/8
bits too.

Storage, as bench.trial.measure counts it: codes packed k bits each into a uint8 `PackedWeight`
parameter (frozen; its `quant_state.shape` is the logical (out, in) shape, so parameter
counts count weights, not bytes), per-block scales (and int offsets) as float32 buffers:
k + 32 / blocksize bits per weight for "nf", k + 64 / blocksize for "int".

Double quantization (`ScaleQuant`, "nf" only; LQ-LoRA's configurations, QLoRA's double
quantization is one of them): the per-block absmaxes are themselves stored as unsigned
b_s-bit codes above their minimum, with one absmax of those (in bf16, fp16 or fp32) per
`blocksize` of them, as HanGuo97/lq-lora's models/quantization_utils.py `blockwise_absmax`
(commit c2424b3) does; the weights are then rounded against the dequantized absmaxes.
Stored: k + b_s / B0 + dtype_bits / (B0 B1) bits per weight (the one float32 minimum per
matrix is not counted, as in the authors' `estimate_storage_from_config`).

QuantLoRALinear is the adapted layer all three methods share: a QuantizedLinear base plus a
trainable low-rank branch whose input may be group-pooled (QA-LoRA). Save/load writes only
the adapter; the quantized base is recomputed deterministically from the base model by
`apply`, and `load` checks that the saved per-layer quantization matches it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from methods.base import (
    Adapted,
    AdapterFileError,
    ConfigError,
    copy_checked,
    freeze,
    load_safetensors,
    merging,
    MethodConfig,
    read_json,
    save_safetensors,
    write_json,
)
from methods.layers import Conv1D, modules_of, replace_module, resolve_targets

KINDS = ("nf", "int")
BITS = (2, 3, 4, 8)
SCALE_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter.safetensors"


# ---------------------------------------------------------------- codebooks and bit packing


def nf_codebook(bits: int) -> Tensor:
    """The NF-k levels (see `_nf_codebook`); a copy, safe to modify."""
    return _nf_codebook(bits).clone()


@cache
def _byte_codes(bits: int) -> Tensor:
    """(256, 8 // bits): the codes each possible byte holds, in `pack`'s order."""
    # Cached tables are built on the CPU explicitly: a first call inside a `with torch.device("meta")`
    # block (a suite's weightless skeleton) would otherwise cache meta tensors for every later call.
    shifts = torch.arange(0, 8, bits, device="cpu")
    return (torch.arange(256, device="cpu").unsqueeze(1) >> shifts) & (2**bits - 1)


@cache
def _byte_values(kind: str, bits: int) -> Tensor:
    """(256, 8 // bits) float32: codebook levels (nf) or integer codes (int) per byte."""
    codes = _byte_codes(bits)
    return _nf_codebook(bits)[codes] if kind == "nf" else codes.float()


@cache
def _nf_codebook(bits: int) -> Tensor:
    """NormalFloat-k levels in [-1, 1], ascending, with an exact 0.

    QLoRA's construction: 2^(k-1) positive and 2^(k-1) - 1 negative quantiles of N(0, 1) at
    evenly spaced probabilities from `offset` to 1/2, each side normalised to a maximum of 1;
    offset is the mean of 1 - 1/(2(2^k - 1)) and 1 - 1/(2 * 2^k) (0.9677 for k = 4).
    """
    n = 2**bits
    offset = ((1 - 1 / (2 * (n - 1))) + (1 - 1 / (2 * n))) / 2
    cpu = {"dtype": torch.float64, "device": "cpu"}  # see _byte_codes: never cache a meta tensor
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, n // 2 + 1, **cpu)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, n // 2, **cpu)[:-1])
    levels = torch.cat([pos / pos.max(), torch.zeros(1, **cpu), neg / neg.abs().max()])
    return levels.sort().values.float()


def pack(codes: Tensor, bits: int) -> Tensor:
    """Pack integer codes in [0, 2^bits) into uint8, `bits` bytes per 8 codes (LSB first)."""
    flat = codes.reshape(-1).to(torch.int64)
    if bits == 8:
        return flat.to(torch.uint8)
    groups = F.pad(flat, (0, (-flat.numel()) % 8)).view(-1, 8)
    words = (groups << (torch.arange(8, device=flat.device) * bits)).sum(1)  # at most 8 * 4 = 32 bits: no overflow
    return ((words.unsqueeze(1) >> (torch.arange(bits, device=flat.device) * 8)) & 0xFF).to(torch.uint8).reshape(-1)


def unpack(packed: Tensor, bits: int, count: int) -> Tensor:
    """Inverse of `pack`: the first `count` codes as int64."""
    if bits == 8:
        return packed[:count].to(torch.int64)
    if 8 % bits == 0:  # whole codes per byte: shift the bytes directly (the common 2- and 4-bit case)
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        return ((packed.unsqueeze(1) >> shifts) & (2**bits - 1)).reshape(-1)[:count].to(torch.int64)
    chunks = packed.to(torch.int64).view(-1, bits)
    words = (chunks << (torch.arange(bits, device=packed.device) * 8)).sum(1)
    codes = (words.unsqueeze(1) >> (torch.arange(8, device=packed.device) * bits)) & (2**bits - 1)
    return codes.reshape(-1)[:count]


# ---------------------------------------------------------------- the quantized tensor


@dataclass(frozen=True)
class ScaleQuant:
    """How the per-block absmaxes are themselves quantized (double quantization)."""

    bits: int
    """Bits per stored absmax (an unsigned code above the matrix's smallest absmax)."""
    dtype: str
    """dtype of the second-level absmax, one per `blocksize` first-level blocks: bf16, fp16 or fp32."""
    blocksize: int
    """First-level blocks per second-level block."""

    def overhead(self, blocksize: int) -> float:
        """Bits per weight the scales cost when the weight blocks hold `blocksize` weights."""
        return self.bits / blocksize + torch.finfo(SCALE_DTYPES[self.dtype]).bits / (blocksize * self.blocksize)


@dataclass
class QuantizedScales:
    """Absmaxes stored as codes: absmax ~= floor + code * amax[group] / (2^bits - 1)."""

    spec: ScaleQuant
    count: int
    packed: Tensor
    amax: Tensor
    """One per group of `spec.blocksize` absmaxes, in `spec.dtype`."""
    floor: Tensor
    """The smallest absmax of the matrix (float32, a 0-d tensor)."""

    def dequantize(self) -> Tensor:
        codes = unpack(self.packed, self.spec.bits, self.amax.numel() * self.spec.blocksize)
        return _scale_values(codes.view(-1, self.spec.blocksize), self.amax, self.floor, self.spec.bits)[: self.count]


def _scale_values(codes: Tensor, amax: Tensor, floor: Tensor, bits: int) -> Tensor:
    """The one formula both quantize_scales and dequantize use, so the two agree bit for bit."""
    step = amax.float() / (2**bits - 1)
    return (codes.float() * step.unsqueeze(1)).reshape(-1) + floor


def quantize_scales(absmax: Tensor, spec: ScaleQuant) -> QuantizedScales:
    """Round the absmaxes to `spec.bits`-bit unsigned codes above their minimum, with the
    group maxima rounded to `spec.dtype` first (the authors' order)."""
    floor = absmax.min()
    # Padding groups with the floor gives code 0 there and leaves the real groups' maxima alone.
    shifted = F.pad(absmax - floor, (0, (-absmax.numel()) % spec.blocksize)).view(-1, spec.blocksize)
    amax = shifted.amax(1).to(SCALE_DTYPES[spec.dtype])
    top = 2**spec.bits - 1
    safe = torch.where(amax.float() > 0, amax.float(), torch.ones_like(amax, dtype=torch.float32))
    codes = torch.round(shifted * (top / safe).unsqueeze(1)).clamp_(0, top)
    return QuantizedScales(spec, absmax.numel(), pack(codes, spec.bits), amax, floor)


@dataclass
class Quantized:
    """A blockwise-quantized (out, in) weight: packed codes, per-block scale (and offset)."""

    kind: str
    bits: int
    blocksize: int
    shape: tuple[int, int]
    packed: Tensor
    scale: Tensor
    """float32 per block; with `scales` set, their dequantized values (what is stored is `scales`)."""
    offset: Tensor | None = None
    scales: QuantizedScales | None = None

    def codes(self) -> Tensor:
        n = self.scale.numel() * self.blocksize
        return unpack(self.packed, self.bits, n).view(-1, self.blocksize)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize(self.kind, self.bits, self.blocksize, self.shape, self.packed, self.scale, self.offset, dtype)

    def bits_per_weight(self) -> float:
        return bits_per_weight(self.kind, self.bits, self.blocksize, None if self.scales is None else self.scales.spec)


def bits_per_weight(kind: str, bits: int, blocksize: int, scale_quant: ScaleQuant | None = None) -> float:
    """Stored bits per weight: the code plus float32 scale (and offset, for int) per block, or
    the double-quantized scales' share."""
    if scale_quant is not None:
        return bits + scale_quant.overhead(blocksize)
    return bits + (32 if kind == "nf" else 64) / blocksize


def _blocks(weight: Tensor, blocksize: int) -> Tensor:
    flat = weight.detach().float().reshape(-1)
    return F.pad(flat, (0, (-flat.numel()) % blocksize)).view(-1, blocksize)


def nf_round(
    weight: Tensor, bits: int, blocksize: int, scale_quant: ScaleQuant | None = None
) -> tuple[Tensor, Tensor, QuantizedScales | None, Tensor]:
    """NF-k round to nearest without packing: (codes (blocks, blocksize), float32 scale per
    block, the stored scales if double-quantized, dequantized weight). `quantize` packs the
    codes; a loop that only needs the values (LQ-LoRA's decomposition) uses this directly."""
    blocks = _blocks(weight, blocksize)
    scale = blocks.abs().amax(1)
    scales = None
    if scale_quant is not None:
        scales = quantize_scales(scale, scale_quant)
        scale = scales.dequantize()
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    book = _nf_codebook(bits).to(blocks.device)
    codes = torch.bucketize(blocks / safe.unsqueeze(1), (book[1:] + book[:-1]) / 2)
    values = (book[codes] * scale.unsqueeze(1)).reshape(-1)[: weight.numel()].view(weight.shape)
    return codes, scale, scales, values


def quantize(weight: Tensor, kind: str, bits: int, blocksize: int, scale_quant: ScaleQuant | None = None) -> Quantized:
    """Round-to-nearest blockwise quantization of a 2-D weight (out, in); `scale_quant`
    double-quantizes the absmaxes ("nf" only)."""
    if kind not in KINDS:
        raise ValueError(f"unknown quantizer kind {kind!r}; known: {KINDS}")
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    if scale_quant is not None and kind != "nf":
        raise ValueError("double quantization of the scales is defined for 'nf' only")
    blocks = _blocks(weight, blocksize)
    levels = 2**bits
    if kind == "nf":
        codes, scale, scales, _ = nf_round(weight, bits, blocksize, scale_quant)
        return Quantized(kind, bits, blocksize, tuple(weight.shape), pack(codes, bits), scale, scales=scales)
    low, high = blocks.amin(1), blocks.amax(1)
    alpha = (high - low) / (levels - 1)
    alpha = torch.where(alpha > 0, alpha, torch.ones_like(alpha))
    codes = torch.round((blocks - low.unsqueeze(1)) / alpha.unsqueeze(1)).clamp_(0, levels - 1)
    return Quantized(kind, bits, blocksize, tuple(weight.shape), pack(codes, bits), alpha, low)


def dequantize(
    kind: str,
    bits: int,
    blocksize: int,
    shape: tuple[int, int],
    packed: Tensor,
    scale: Tensor,
    offset: Tensor | None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    count = scale.numel() * blocksize
    if 8 % bits == 0 and bits < 8:  # one table lookup per byte gives 8 // bits values at once
        levels = _byte_values(kind, bits).to(scale.device)[packed.to(torch.int64)].reshape(-1)[:count]
    elif kind == "nf":
        levels = _nf_codebook(bits).to(scale.device)[unpack(packed, bits, count)]
    else:
        levels = unpack(packed, bits, count).float()
    levels = levels.view(-1, blocksize)
    if kind == "nf":
        values = levels * scale.unsqueeze(1)
    else:
        values = levels * scale.unsqueeze(1) + offset.unsqueeze(1)
    return values.reshape(-1)[: shape[0] * shape[1]].view(shape).to(dtype)


# ---------------------------------------------------------------- modules


@dataclass(frozen=True)
class LogicalShape:
    """What bench.trial.measure reads from `param.quant_state.shape`: the weight count, not bytes."""

    shape: tuple[int, ...]


class PackedWeight(nn.Parameter):
    """Frozen uint8 storage of k-bit codes; `quant_state.shape` is the logical (out, in) shape."""

    def __new__(cls, data: Tensor, shape: tuple[int, ...]) -> PackedWeight:
        self = super().__new__(cls, data, requires_grad=False)
        self.quant_state = LogicalShape(tuple(shape))
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> PackedWeight:
        if id(self) not in memo:
            memo[id(self)] = PackedWeight(self.data.clone(), self.quant_state.shape)
        return memo[id(self)]

    def __reduce_ex__(self, proto: int) -> Any:
        return (PackedWeight, (self.data, self.quant_state.shape))


class _DequantMatmul(torch.autograd.Function):
    """x @ deq(W)^T that saves nothing for backward: the frozen weight is dequantized again to
    compute the input gradient (as bitsandbytes' 4-bit matmul does), so a step's saved tensors
    do not include a float copy of every quantized weight."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, layer: QuantizedLinear) -> Tensor:
        ctx.layer = layer
        return F.linear(x, layer.dequantized_weight(x.dtype))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        return grad @ ctx.layer.dequantized_weight(grad.dtype), None


class QuantizedLinear(nn.Module):
    """A frozen linear layer whose weight is stored quantized and dequantized on every forward
    and again in backward (as QLoRA does); bias, if any, stays in its original dtype. Weight layout is (out, in), also
    for a GPT-2 Conv1D it replaces (whose forward x @ W + b is the same map)."""

    def __init__(self, q: Quantized, bias: Tensor | None):
        super().__init__()
        self.kind, self.bits, self.blocksize = q.kind, q.bits, q.blocksize
        self.out_features, self.in_features = q.shape
        self.qweight = PackedWeight(q.packed, q.shape)
        self.scale_quant = None if q.scales is None else q.scales.spec
        if q.scales is None:
            self.register_buffer("scale", q.scale)
        else:  # only what is stored: the float32 scales are rebuilt from these on each use
            self.scale_count = q.scales.count
            self.register_buffer("scale_codes", q.scales.packed)
            self.register_buffer("scale_amax", q.scales.amax)
            self.register_buffer("scale_floor", q.scales.floor)
        self.register_buffer("offset", q.offset)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def quantized(self) -> Quantized:
        shape = (self.out_features, self.in_features)
        if self.scale_quant is None:
            return Quantized(self.kind, self.bits, self.blocksize, shape, self.qweight.data, self.scale, self.offset)
        scales = QuantizedScales(self.scale_quant, self.scale_count, self.scale_codes, self.scale_amax, self.scale_floor)
        return Quantized(self.kind, self.bits, self.blocksize, shape, self.qweight.data, scales.dequantize(), self.offset, scales)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return self.quantized().dequantize(dtype)

    def forward(self, x: Tensor) -> Tensor:
        out = _DequantMatmul.apply(x, self)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def describe(self) -> dict[str, Any]:
        out = {"kind": self.kind, "bits": self.bits, "blocksize": self.blocksize, "shape": [self.out_features, self.in_features]}
        if self.scale_quant is not None:
            out["scale_quant"] = dataclasses.asdict(self.scale_quant)
        return out

    def bits_per_weight(self) -> float:
        return bits_per_weight(self.kind, self.bits, self.blocksize, self.scale_quant)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.kind}{self.bits}, blocksize={self.blocksize}"


class QuantLoRALinear(nn.Module):
    """A QuantizedLinear base plus scaling * B A pool(x).

    pool_size = 1 is plain LoRA (LoftQ, LQ-LoRA); pool_size = g averages (or sums) each run of
    g input features first (QA-LoRA), so A is r x (in / g). `merge` folds the update into the
    int offsets when the pooling groups coincide with the quantization groups (exact, stays
    quantized); otherwise it holds a float weight deq(Q) + scaling * B A (as merging QLoRA does).
    """

    def __init__(
        self,
        base_layer: QuantizedLinear,
        lora_A: Tensor,
        lora_B: Tensor,
        scaling: float,
        dropout: float = 0.0,
        pool_size: int = 1,
        pool: str = "mean",
        fan_in_fan_out: bool = False,
    ):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        # Factors may be built on the CPU (init, SVD); they live where the quantized base lives.
        device = base_layer.qweight.device
        self.lora_A = nn.Parameter(lora_A.detach().float().to(device).clone())
        self.lora_B = nn.Parameter(lora_B.detach().float().to(device).clone())
        self.scaling = scaling
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.pool_size = pool_size
        self.pool = pool
        self.fan_in_fan_out = fan_in_fan_out
        self.merged = False
        self._merged_weight: Tensor | None = None

    @property
    def weight(self) -> Tensor:
        """The dequantized base weight in the replaced layer's layout (for code that inspects
        `layer.weight`; it is computed on each access)."""
        w = self.base_layer.dequantized_weight()
        return w.T if self.fan_in_fan_out else w

    def pooled(self, x: Tensor) -> Tensor:
        if self.pool_size == 1:
            return x
        groups = x.unflatten(-1, (self.in_features // self.pool_size, self.pool_size))
        return groups.mean(-1) if self.pool == "mean" else groups.sum(-1)

    def forward(self, x: Tensor) -> Tensor:
        if self._merged_weight is not None:
            bias = None if self.base_layer.bias is None else self.base_layer.bias.to(x.dtype)
            return F.linear(x, self._merged_weight.to(x.dtype), bias)
        result = self.base_layer(x)
        if self.merged:
            return result
        branch = F.linear(F.linear(self.dropout(self.pooled(x.to(self.lora_A.dtype))), self.lora_A), self.lora_B)
        return (result + branch * self.scaling).to(result.dtype)

    def pooled_delta(self) -> Tensor:
        """scaling * B A: (out, in / pool_size)."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def delta_weight(self) -> Tensor:
        """The update as a full (out, in) weight: B A pool(x) == (B A expanded) x."""
        delta = self.pooled_delta()
        if self.pool_size > 1:
            delta = delta.repeat_interleave(self.pool_size, dim=1)
            if self.pool == "mean":
                delta = delta / self.pool_size
        return delta

    def merges_exactly(self) -> bool:
        base = self.base_layer
        return self.pool_size > 1 and base.kind == "int" and base.blocksize == self.pool_size

    def offset_delta(self) -> Tensor:
        """What merging adds to each (row, group) offset: (scaling * B A)_ij, / g if mean-pooled."""
        delta = self.pooled_delta()
        return (delta / self.pool_size if self.pool == "mean" else delta).reshape(-1)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        if self.merges_exactly():
            self.base_layer.offset.add_(self.offset_delta().to(self.base_layer.offset.dtype))
        else:
            self._merged_weight = self.base_layer.dequantized_weight() + self.delta_weight()
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        if self._merged_weight is not None:
            self._merged_weight = None
        else:
            self.base_layer.offset.sub_(self.offset_delta().to(self.base_layer.offset.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.lora_A.shape[0]}, scaling={self.scaling:g}, pool={self.pool_size}, merged={self.merged}"


def quant_lora_layers(model: nn.Module) -> dict[str, QuantLoRALinear]:
    return modules_of(model, QuantLoRALinear)


# ---------------------------------------------------------------- apply helpers


def float_targets(model: nn.Module, targets: Any) -> list[tuple[str, nn.Module]]:
    """Targets, refusing layers that are already quantized (these methods quantize the base
    themselves: run them on a full-precision base, [model] quant = none)."""
    if quant_lora_layers(model):
        raise ConfigError("model", "already has quantized LoRA layers; apply to a fresh base model")
    chosen = resolve_targets(model, targets)
    for name, layer in chosen:
        if not layer.weight.is_floating_point() or type(layer).__module__.startswith("bitsandbytes"):
            raise ConfigError(
                "targets",
                f"{name} is already quantized ({type(layer).__name__}, {layer.weight.dtype}); this method quantizes "
                "the base itself: use a full-precision base model",
            )
    return chosen


def weight_of(layer: nn.Module) -> Tensor:
    """A target's weight as float32 (out, in)."""
    w = layer.weight.detach().float()
    return w.T.contiguous() if isinstance(layer, Conv1D) else w


def rank_check(chosen: list[tuple[str, nn.Module]], r: int) -> None:
    for name, layer in chosen:
        if r > min(layer.weight.shape):
            raise ConfigError("r", f"{r} exceeds min(in, out) = {min(layer.weight.shape)} of {name}")


def init_A(kind: str, r: int, fan_in: int) -> Tensor:
    """A fresh r x fan_in LoRA A: "kaiming" (Kaiming-uniform, a = sqrt(5), as nn.Linear and peft) or "xavier" (Xavier-uniform)."""
    a = torch.empty(r, fan_in)
    if kind == "xavier":
        nn.init.xavier_uniform_(a)
    else:
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    return a


def adapter_state(layers: dict[str, QuantLoRALinear]) -> dict[str, Tensor]:
    state: dict[str, Tensor] = {}
    for name, layer in layers.items():
        state[f"{name}.lora_A"] = layer.lora_A.detach()
        state[f"{name}.lora_B"] = layer.lora_B.detach()
    return state


def make_adapted(model: nn.Module, method: str, cfg: MethodConfig, layers: dict[str, QuantLoRALinear]) -> Adapted:
    """The Adapted for a model whose targets are QuantLoRALinear: merge, unmerge, save, load."""
    trainable = [p for layer in layers.values() for p in (layer.lora_A, layer.lora_B)]

    def plan() -> dict[str, Any]:
        return {name: layer.base_layer.describe() for name, layer in layers.items()}

    def save(directory: Path) -> None:
        meta = {
            "method": method,
            "config": cfg.to_dict(),
            "layers": plan(),
            "note": "adapter only; the quantized base is recomputed from the base model by apply()",
        }
        write_json(directory / CONFIG_FILE, meta)
        save_safetensors(adapter_state(layers), directory / WEIGHTS_FILE, metadata={"format": "pt", "method": method})

    def load(directory: Path) -> None:
        directory = Path(directory)
        path = directory / CONFIG_FILE
        saved = read_json(path)
        if saved.get("method") != method:
            raise AdapterFileError(f"{path}: method is {saved.get('method')!r}, expected {method!r}")
        # Everything but dropout shapes the base or the adapter.
        want = {k: v for k, v in json.loads(json.dumps(cfg.to_dict())).items() if k != "dropout"}
        got = saved.get("config")
        if not isinstance(got, dict) or {k: v for k, v in got.items() if k != "dropout"} != want:
            raise AdapterFileError(f"{path}: saved with config {got!r}, the model was adapted with {cfg.to_dict()!r}")
        if saved.get("layers") != plan():
            raise AdapterFileError(f"{path}: the saved per-layer quantization does not match this model's (another base model?)")
        wpath = directory / WEIGHTS_FILE
        state = load_safetensors(wpath)
        params = {f"{n}.lora_{w}": getattr(layer, f"lora_{w}") for n, layer in layers.items() for w in "AB"}
        copy_checked(params, state, wpath, layers.values())

    return Adapted(
        model=model,
        trainable=trainable,
        **merging(model, layers.values()),
        state_fn=lambda: adapter_state(layers),
        save_fn=save,
        load_fn=load,
    )


def wrap(
    model: nn.Module,
    chosen: list[tuple[str, nn.Module]],
    build: Callable[[str, nn.Module], QuantLoRALinear],
) -> dict[str, QuantLoRALinear]:
    """Freeze the model and replace each chosen layer by build(name, layer)."""
    freeze(model)
    for name, layer in chosen:
        replace_module(model, name, build(name, layer))
    return quant_lora_layers(model)


def clone_model(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)

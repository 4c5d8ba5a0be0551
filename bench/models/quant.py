"""Quantizing the frozen base model with bitsandbytes: the suite's [model] quant axis.

QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", arXiv 2305.14314)
is LoRA on a base whose linear layers hold 4-bit NF4 weights, optionally with double
quantization (the per-block absmax constants quantized again to 8 bits), computing in bf16.
LLM.int8() (Dettmers et al. 2022, arXiv 2208.07339) is the 8-bit variant.

There is one code path for every model: build or load it in float, move it to its device, then
replace each nn.Linear (and GPT-2 Conv1D) except the output head by a bitsandbytes layer that
holds the quantized weight. Embeddings, norms and the head stay in the model's dtype, as in
QLoRA and in transformers' `load_in_4bit`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from methods.layers import Conv1D, linear_modules, role

QUANTS = ("none", "nf4", "fp4", "int8")
FOUR_BIT = ("nf4", "fp4")
BLOCKSIZE = 64
"""Weights per absmax constant: bitsandbytes' and QLoRA's default."""
INT8_THRESHOLD = 6.0
"""LLM.int8() outlier threshold: activation columns above it are multiplied in 16 bits (the
paper's and transformers' default)."""


class QuantError(ValueError):
    """A layer this bitsandbytes build cannot quantize correctly on this device."""


@dataclass(frozen=True)
class QuantInfo:
    """What quantization did to a model, for the trial result."""

    quant: str
    double_quant: bool
    compute_dtype: str | None
    blocksize: int | None
    layers: int
    """Linear layers replaced by quantized ones."""
    params: int
    """Weights those layers hold (counted as weights, not as packed bytes)."""
    skipped: list[str]
    """Linear layers left in float: the output head."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def quantizable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every linear layer except the output head (and the head of a classifier)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [(n, m) for n, m in linear_modules(model) if m is not head and role(n) != "head"]


def quantize(model: nn.Module, quant: str, double_quant: bool = False, compute_dtype: torch.dtype | None = None) -> QuantInfo:
    """Replace the model's linear layers (not the head) by bitsandbytes layers, in place, on the
    device the model is on. `compute_dtype` is the dtype 4-bit layers compute in (None: the
    dtype of their input)."""
    if quant not in QUANTS:
        raise ValueError(f"unknown quant {quant!r} (known: {', '.join(QUANTS)})")
    # Names, not modules: holding every float layer until the end would keep the whole float
    # model alive beside the quantized one (13.5 GB extra at 7B); each is freed once replaced.
    names = [n for n, _ in quantizable(model)] if quant != "none" else []
    skipped = sorted({n for n, _ in linear_modules(model)} - set(names))
    params = 0
    for name in names:
        try:
            new = _quantized_layer(model.get_submodule(name), quant, double_quant, compute_dtype)
        except QuantError as exc:
            raise QuantError(f"{exc} (layer {name})") from None
        params += new.in_features * new.out_features
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    return QuantInfo(
        quant=quant,
        double_quant=double_quant,
        compute_dtype=str(compute_dtype).removeprefix("torch.") if compute_dtype is not None and quant in FOUR_BIT else None,
        blocksize=BLOCKSIZE if quant in FOUR_BIT else None,
        layers=len(names),
        params=params,
        skipped=skipped if names else [],
    )


def _quantized_layer(layer: nn.Module, quant: str, double_quant: bool, compute_dtype: torch.dtype | None) -> nn.Linear:
    import bitsandbytes as bnb

    # Conv1D stores (in, out); bitsandbytes wants nn.Linear's (out, in).
    weight = layer.weight.detach().T if isinstance(layer, Conv1D) else layer.weight.detach()
    out_features, in_features = weight.shape
    device = weight.device
    has_bias = layer.bias is not None
    # Built on the meta device: a real float weight of the full size would be allocated only
    # to be thrown away (180 MB per MLP layer of a 7B model in fp32).
    if quant in FOUR_BIT:
        new = bnb.nn.Linear4bit(in_features, out_features, bias=has_bias, compute_dtype=compute_dtype,
                                compress_statistics=double_quant, quant_type=quant, device="meta")
        # Moving an unquantized Params4bit to a device quantizes it there (bitsandbytes' API).
        new.weight = _moved(bnb.nn.Params4bit(weight.contiguous(), requires_grad=False, blocksize=BLOCKSIZE,
                                              compress_statistics=double_quant, quant_type=quant, module=new), device)
        # DESIGN.md section 6: on CPUs with AVX512-BF16, the first eval-mode no-grad forward
        # repacks the weight for a fast inference kernel, and later training silently gets
        # wrong gradients. Never repack.
        new.support_avx512bf16_for_cpu = False
        if device.type == "cpu":
            _check_cpu_dequantize(new.weight, quant)
    else:
        new = bnb.nn.Linear8bitLt(in_features, out_features, bias=has_bias, has_fp16_weights=False,
                                  threshold=INT8_THRESHOLD, device="meta")
        # Int8Params quantizes only when moved from the CPU: a weight already on the GPU
        # would be moved as it is, unquantized.
        new.weight = _moved(bnb.nn.Int8Params(weight.contiguous() if device.type == "meta" else weight.cpu().contiguous(),
                                              requires_grad=False, has_fp16_weights=False), device)
    if has_bias:
        new.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
    new.train(layer.training)
    return new


def _moved(param: nn.Parameter, device: torch.device) -> nn.Parameter:
    """The bitsandbytes parameter quantized on `device`. A move to the meta device does not quantize
    (bitsandbytes' API), so there we quantize directly: bitsandbytes' fake kernels give the packed
    weight and its constants their real shapes and dtypes, which is what a memory forecast
    (bench/trial/forecast.py) of a quantized model needs."""
    if device.type == "meta":
        # bitsandbytes caches its 8-bit "dynamic" code (the double-quantization map) on the device
        # of its first use: made on meta, every later real double-quantized layer in the process
        # fails with "Cannot copy out of meta tensor". Make it on the CPU first; it is moved per call.
        from bitsandbytes import functional as bnb_functional

        bnb_functional.name2qmap.setdefault("dynamic", bnb_functional.create_dynamic_map())
        return param._quantize(device)
    return param.to(device)


def _check_cpu_dequantize(weight: nn.Parameter, quant: str) -> None:
    """bitsandbytes 0.50.2's CPU dequantize kernel returns wrong weights for some layer shapes
    (e.g. in_features 32 or 96; found here, not documented), while the stored codes are right:
    decode the codes by hand (codebook value x block absmax) and refuse the layer if the kernel
    disagrees, rather than train on silently wrong weights."""
    import bitsandbytes.functional as F

    state = weight.quant_state
    packed = weight.data.reshape(-1).long()
    codes = torch.stack([packed >> 4, packed & 15], 1).reshape(-1)  # first code in the high nibble
    absmax = state.absmax
    if state.nested:  # double quantization: the absmax constants are 8-bit codes themselves
        absmax = F.dequantize_blockwise(absmax, state.state2) + state.offset
    n = state.shape.numel()
    values = F.get_4bit_type(quant, device="cpu")[codes[:n]]
    blocks = torch.arange(n) // state.blocksize
    reference = (values * absmax.float()[blocks]).reshape(state.shape)
    got = F.dequantize_4bit(weight.data, state)
    # Compared after rounding to the weight's dtype: a bf16 weight is decoded to bf16. The kernel's
    # failures are gross (errors of 20-45% of the largest weight), rounding is not.
    err = (got.float() - reference.to(got.dtype).float()).abs().max().item()
    if err > 1e-2 * max(reference.abs().max().item(), 1e-12):
        raise QuantError(
            f"model.quant: bitsandbytes {_bnb_version()} cannot {quant}-quantize a linear layer of shape "
            f"(out={state.shape[0]}, in={state.shape[1]}) correctly on CPU: its dequantized weight is off by up to "
            f"{err:.3g} (its CPU kernel mis-handles this shape); use a model whose layer widths are multiples of "
            f"{state.blocksize}, another quant, or a CUDA device"
        )


def _bnb_version() -> str:
    import bitsandbytes

    return bitsandbytes.__version__


def no_repacking(model: nn.Module) -> int:
    """Switch off bitsandbytes' CPU repacking on every Linear4bit of a model quantized
    elsewhere (e.g. `from_pretrained(..., load_in_4bit=True)`); returns how many."""
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for m in layers:
        m.support_avx512bf16_for_cpu = False
    return len(layers)


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """The float weight a quantized layer computes with, (out, in); the weight itself for a float layer."""
    import bitsandbytes as bnb

    if isinstance(layer, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    if isinstance(layer, bnb.nn.Linear8bitLt):
        cb = layer.weight.data if layer.state.CB is None else layer.state.CB
        scb = layer.weight.SCB if getattr(layer.weight, "SCB", None) is not None else layer.state.SCB
        return cb.float() * scb.float().unsqueeze(1) / 127
    return layer.weight.detach()

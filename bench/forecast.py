"""Memory forecast: every component of a trial's accounted memory, and its peak, before it runs.

The forecast builds the trial's model on the meta device (structure, no weights), quantizes and
adapts it exactly as the worker does, and runs one forward and backward of the trial's first
micro-batch there, inside the same saved-tensor counter the real step uses
(bench.measure.saved_for_backward). Nothing is allocated and no arithmetic is done, so a 7B model
forecasts in about a second; what autograd saves is what this torch and this transformers save
for this architecture, attention implementation and method, not a fitted constant.

    weights      bench.measure.weight_bytes of the adapted meta model (4-bit storage, absmax and
                 double-quantization constants included: bitsandbytes' fake kernels give their shapes)
    grads        bench.measure.grad_bytes after the meta backward (tensors that really get a gradient)
    optimizer    the optimizer's state for those tensors (OPTIMIZER_STATE: AdamW 2 states + step, SGD's
                 momentum buffer, bitsandbytes' 8-bit blockwise states)
    activations  bench.measure.saved_for_backward over the meta forward of the first micro-batch
    peak         components plus what the process adds beyond them (PeakModel, per device)

Data-dependent branches in the forward (transformers skips building an attention mask when a
batch has no padding) read one scalar; on meta there is none, so the forecast answers it from the
trial's real first batch, which it builds the way bench.train does (same seed, same collate).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

VERSION = 1
"""Bump when a forecast of the same trial would change: stored beside every forecast."""

GB = 1e9


@dataclass(frozen=True)
class Batch:
    """The shape of a trial's first micro-batch: what the activations depend on."""

    tensors: dict[str, tuple[tuple[int, ...], str]]
    """Input name -> (shape, dtype), as the model's forward receives them."""
    padded: bool
    """Whether any row is padded (transformers then builds an explicit attention mask)."""

    @property
    def rows(self) -> int:
        return next(iter(self.tensors.values()))[0][0]

    @property
    def width(self) -> int:
        shape = next(iter(self.tensors.values()))[0]
        return shape[1] if len(shape) > 1 else 1

    def meta(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, (shape, dtype) in self.tensors.items():
            out[name] = torch.empty(shape, dtype=getattr(torch, dtype), device="meta")
        return out

    @classmethod
    def tokens(cls, rows: int, width: int, padded: bool = False) -> "Batch":
        """A causal-LM batch of `rows` x `width` tokens (labels = inputs), for forecasts without data."""
        shape = ((rows, width), "int64")
        return cls({"input_ids": shape, "attention_mask": shape, "labels": shape}, padded)

    @classmethod
    def of(cls, batch: dict[str, torch.Tensor]) -> "Batch":
        mask = batch.get("attention_mask")
        padded = bool(mask is not None and not bool(mask.bool().all()))
        return cls({k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in batch.items()}, padded)


@dataclass
class Forecast:
    """Forecast bytes of each accounted component and of the peak, for one trial on one device."""

    weights: int
    grads: int
    optimizer: int
    activations: int
    peak: int
    device: str
    """cpu (peak = process resident set) or cuda (peak = allocator's max_memory_allocated)."""
    batch: list[int]
    """Rows and width of the first micro-batch the activations were forecast for."""
    activations_from: str
    """meta-forward (what autograd saved on the meta model) or analytic (a per-layer model,
    when the meta forward cannot run; `note` says why)."""
    peak_parts: dict[str, int] = field(default_factory=dict)
    """What the peak adds beyond the accounted components, by name (PeakModel)."""
    note: str | None = None
    version: int = VERSION

    @property
    def accounted(self) -> int:
        return self.weights + self.grads + self.optimizer + self.activations

    def components(self) -> dict[str, int]:
        return {"weights": self.weights, "grads": self.grads, "optimizer": self.optimizer,
                "activations": self.activations, "peak": self.peak}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def over(self, budget_bytes: float) -> str | None:
        """Why this forecast breaks a memory budget (naming the component), or None if it fits."""
        if self.peak <= budget_bytes:
            return None
        parts = {**{k: v for k, v in self.components().items() if k != "peak"}, **self.peak_parts}
        biggest = max(parts, key=parts.get)
        return (f"forecast peak {self.peak / GB:.2f} GB exceeds memory_budget_gb = {budget_bytes / GB:g}; "
                f"largest component: {biggest} {parts[biggest] / GB:.2f} GB "
                f"(weights {self.weights / GB:.2f}, grads {self.grads / GB:.2f}, optimizer {self.optimizer / GB:.2f}, "
                f"activations {self.activations / GB:.2f} GB)")


# ---- optimizer state ------------------------------------------------------------------------


def _adamw_state(p: torch.Tensor, device: str) -> int:
    # exp_avg and exp_avg_sq are zeros_like(p); `step` is a 0-d float32 tensor per parameter.
    return 2 * p.numel() * p.element_size() + 4


def _sgd_state(momentum: float) -> Callable[[torch.Tensor, str], int]:
    # momentum_buffer is a clone of the first gradient; without momentum SGD keeps nothing.
    return lambda p, device: p.numel() * p.element_size() if momentum else 0


BNB_MIN_8BIT_SIZE = 4096
"""bitsandbytes keeps 32-bit state for tensors smaller than this (its min_8bit_size default)."""
BNB_BLOCK = 256
"""bitsandbytes' blockwise 8-bit optimizer: one float32 absmax per 256 values."""


def _adamw_8bit_state(p: torch.Tensor, device: str) -> int:
    if p.numel() < BNB_MIN_8BIT_SIZE:
        return 2 * p.numel() * 4  # state1, state2 in float32
    # state1, state2 as uint8 codes, each with its absmax per block. The two 256-entry quantization
    # maps are shared by all tensors: counted once, in optimizer_state().
    return 2 * (p.numel() + 4 * math.ceil(p.numel() / BNB_BLOCK))


BNB_QMAPS = 2 * 256 * 4
"""adamw-8bit's two shared 256-entry float32 quantization maps (signed and unsigned dynamic)."""

OPTIMIZER_STATE: dict[str, tuple[Callable[[dict[str, Any]], Callable[[torch.Tensor, str], int]], int]] = {
    "adamw": (lambda t: _adamw_state, 0),
    "sgd": (lambda t: _sgd_state(t["momentum"]), 0),
    "adamw-8bit": (lambda t: _adamw_8bit_state, BNB_QMAPS),
    # Paged optimizers hold the same state, in CUDA unified memory (off the allocator: see PeakModel).
    "paged-adamw": (lambda t: _adamw_state, 0),
    "paged-adamw-8bit": (lambda t: _adamw_8bit_state, BNB_QMAPS),
}
"""Optimizer name (bench.train.OPTIMIZERS) -> (per-tensor state bytes given [train], shared bytes)."""


def optimizer_state(params: list[torch.Tensor], t: dict[str, Any], device: str) -> int:
    """Bytes of optimizer state for the tensors that get a gradient, as bench.measure.optimizer_bytes counts it."""
    per_tensor, shared = OPTIMIZER_STATE[t["optimizer"]]
    state = per_tensor(t)
    sizes = [state(p, device) for p in params]
    return sum(sizes) + (shared if any(sizes) and any(p.numel() >= BNB_MIN_8BIT_SIZE for p in params) else 0)


# ---- the meta step --------------------------------------------------------------------------


class _Answers(TorchDispatchMode):
    """Answers the forward's reads of a scalar from a meta tensor (`mask.all()` in transformers'
    mask code) with what the real batch gives: True when no row is padded. Only boolean reads are
    answered; any other scalar read means the forward depends on values the forecast lacks."""

    def __init__(self, no_padding: bool):
        super().__init__()
        self.no_padding = no_padding
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and args[0].device.type == "meta":
            if args[0].dtype != torch.bool:
                raise NotImplementedError(f"the forward reads a {args[0].dtype} scalar from the data")
            self.reads += 1
            return self.no_padding
        return func(*args, **(kwargs or {}))


def _cpu_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """SDPA as it runs on the CPU. On meta, torch always picks the math kernel (which saves the
    attention probabilities); on the CPU it picks a fused one when it can. Ask the CPU's own
    selector about tensors of the same shapes and dtypes (stride-0 views of one row: no memory),
    then run that kernel's meta version, whose backward saves what the CPU kernel's does."""
    from torch.nn.attention import SDPBackend

    def probe(t):
        return None if t is None else torch.empty(t.shape[-1], dtype=t.dtype).expand(t.shape)

    choice = torch._fused_sdp_choice(probe(q), probe(k), probe(v), probe(attn_mask), dropout_p, is_causal,
                                     scale=scale, enable_gqa=enable_gqa)
    if choice == SDPBackend.FLASH_ATTENTION.value:
        # The CPU kernel takes grouped keys and values as they are, and a bool mask turned into an
        # additive one in the query's dtype: a new tensor in every layer, which backward keeps.
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale=scale,
                                                            enable_gqa=enable_gqa)


def _cuda_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """SDPA as it runs on a CUDA GPU (on paper: torch's selector order, flash then memory-efficient):
    flash attention for 16-bit inputs without a mask and head size <= 256; otherwise memory-efficient
    attention, which takes a bool mask as an additive bias in the query's dtype."""
    if enable_gqa:
        groups = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(groups, -3), v.repeat_interleave(groups, -3)
    if q.dtype in (torch.float16, torch.bfloat16) and attn_mask is None and q.shape[-1] <= 256 and q.shape[-1] % 8 == 0:
        return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, scale=scale)[0]
    bias = attn_mask
    if bias is not None and bias.dtype == torch.bool:
        bias = torch.zeros(bias.shape, dtype=q.dtype, device=q.device)
    if bias is not None:
        bias = bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    return torch.ops.aten._scaled_dot_product_efficient_attention(
        q, k, v, bias, True, dropout_p, is_causal and bias is None, scale=scale)[0]


ATTENTION: dict[str, Callable[..., torch.Tensor]] = {"cpu": _cpu_attention, "cuda": _cuda_attention}
"""Device -> the attention kernel it would run, on meta tensors."""


class _Attention(TorchFunctionMode):
    """Routes scaled_dot_product_attention on meta tensors to the kernel the forecast's device runs."""

    def __init__(self, device: str):
        super().__init__()
        self.kernel = ATTENTION[device]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.scaled_dot_product_attention and args[0].device.type == "meta":
            return self.kernel(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


def adapted_skeleton(spec: dict[str, Any], context: Any = None):
    """The trial's model on the meta device, quantized and adapted as bench.worker does it."""
    import methods
    from bench import models

    model = models.skeleton(spec["model"], dtype=spec["model"].get("dtype", "float32"))
    models.quantize_skeleton(model, spec["model"])  # bitsandbytes builds its lookup tables on the CPU: no device context here
    method = methods.get(spec["method"]["name"])
    extra = {"context": context} if getattr(method, "needs_context", False) else {}
    with torch.device("meta"):  # tensors a method creates without naming a device stay weightless too
        return method.apply(model, method.Config.from_dict(spec["method"]["config"]), **extra)


def meta_step(adapted, batch: Batch, device: str = "cpu") -> dict[str, Any]:
    """One forward and backward on the meta model: bytes saved for backward, the tensors that get a gradient."""
    from bench.measure import grad_bytes, saved_for_backward

    model = adapted.model
    model.train()
    answers = _Answers(no_padding=not batch.padded)
    with _Attention(device), answers, saved_for_backward(model) as saved:
        loss = model(**batch.meta()).loss
    loss.backward()
    with_grad = [p for p in adapted.trainable if p.grad is not None]
    return {"activations": saved["bytes"], "grads": grad_bytes(adapted.trainable), "with_grad": with_grad}


def first_batch(spec: dict[str, Any]) -> Batch:
    """The shape of the trial's first micro-batch, drawn exactly as bench.train draws it."""
    from bench import data, models, vision
    from bench.train import batches

    tokenizer = None if spec["data"]["task"] in vision.TASKS else models.load_tokenizer(spec["model"])
    prepared = data.prepare(spec["data"], tokenizer, seed=spec["train"]["seed"])
    return Batch.of(next(batches(prepared.train, spec["train"], prepared.collate, torch.device("cpu"))))


def context_for(spec: dict[str, Any]):
    """What a method that turns text into tokens gets (bench.worker builds the same)."""
    from bench import data, models
    from methods.base import MethodContext

    rows = data.examples(spec["data"]["task"], "train")
    return MethodContext(models.load_tokenizer(spec["model"]), tuple((e.prompt, e.answer) for e in rows), spec["train"]["seed"])


def forecast(spec: dict[str, Any], device: str = "cpu", batch: Batch | None = None, peak_model: "PeakModel | None" = None) -> Forecast:
    """Forecast a trial's accounted memory and peak on `device` (cpu or cuda) from its spec alone.
    `batch`: the first micro-batch's shape (default: drawn from the trial's data)."""
    import methods
    from bench.measure import weight_bytes

    method = methods.get(spec["method"]["name"])
    context = context_for(spec) if getattr(method, "needs_context", False) else None
    adapted = adapted_skeleton(spec, context)
    weights = sum(weight_bytes(adapted.model).values())
    if batch is None:
        batch = first_batch(spec)
    grads = optimizer = activations = 0
    source, note = "meta-forward", None
    if adapted.trainable:  # the frozen baseline never steps: bench.train returns before the first batch
        try:
            step = meta_step(adapted, batch, device)
            activations, grads = step["activations"], step["grads"]
            with_grad = step["with_grad"]
        except (NotImplementedError, RuntimeError) as exc:
            source, note = "analytic", f"meta forward failed ({type(exc).__name__}: {str(exc)[:200]}); per-layer model used"
            activations = analytic_activations(adapted.model, spec, batch)
            with_grad = list(adapted.trainable)
            grads = sum(p.numel() * p.element_size() for p in _unique_params(with_grad))
        optimizer = optimizer_state(_unique_params(with_grad), spec["train"], device)
    result = Forecast(weights=weights, grads=grads, optimizer=optimizer, activations=activations, peak=0, device=device,
                      batch=[batch.rows, batch.width], activations_from=source, note=note)
    (peak_model or PEAK_MODELS[device]).apply(result, spec)
    return result


def _unique_params(params: list[torch.Tensor]) -> list[torch.Tensor]:
    from bench.measure import _unique

    return list(_unique(params).values())


# ---- the peak -------------------------------------------------------------------------------


@dataclass(frozen=True)
class PeakModel:
    """What a device's peak measures beyond the accounted components (placeholder)."""

    device: str

    def apply(self, f: Forecast, spec: dict[str, Any]) -> None:
        f.peak = f.accounted


PEAK_MODELS: dict[str, PeakModel] = {"cpu": PeakModel("cpu"), "cuda": PeakModel("cuda")}


def analytic_activations(model: nn.Module, spec: dict[str, Any], batch: Batch) -> int:
    raise NotImplementedError

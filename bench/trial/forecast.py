"""Memory forecast: every component of a trial's accounted memory, and its peak, before it runs.

The forecast builds the trial's model on the meta device (structure, no weights), quantizes and
adapts it exactly as the worker does, and runs one forward and backward of the trial's first
micro-batch there, inside the same saved-tensor counter the real step uses
(bench.trial.measure.saved_for_backward). Nothing is allocated and no arithmetic is done, so a 7B model
forecasts in about a second; what autograd saves is what this torch and this transformers save
for this architecture, attention implementation and method, not a fitted constant.

    weights      bench.trial.measure.weight_bytes of the adapted meta model (4-bit storage, absmax and
                 double-quantization constants included: bitsandbytes' fake kernels give their shapes)
    grads        bench.trial.measure.grad_bytes after the meta backward (tensors that really get a gradient)
    optimizer    the optimizer's state for those tensors (OPTIMIZER_STATE: AdamW 2 states + step, SGD's
                 momentum buffer, bitsandbytes' 8-bit blockwise states)
    activations  bench.trial.measure.saved_for_backward over the meta forward of the first micro-batch
    peak         components plus what the process adds beyond them (PeakModel, per device)

Data-dependent branches in the forward (transformers skips building an attention mask when a
batch has no padding) read one scalar; on meta there is none, so the forecast answers it from the
trial's real first batch, which it builds the way bench.trial.train does (same seed, same collate).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from bench.paths import REPO
from bench.trial import memo

VERSION = 2
"""Bump when a forecast of the same trial would change: stored beside every forecast."""

GB = 1e9
SKIPPED = "skipped_memory"
"""The status of a trial skipped before it started because its forecast broke [run] memory_budget_gb."""


@dataclass(frozen=True)
class Batch:
    """The shape of a trial's first micro-batch: what the activations depend on."""

    tensors: dict[str, tuple[tuple[int, ...], str]]
    """Input name -> (shape, dtype), as the model's forward receives them."""
    padded: bool
    """Whether the model builds an explicit attention mask: a row is padded, or the rows are packed
    end to end (their position_ids restart at row boundaries)."""
    kept: int | None = None
    """Positions whose next token is labelled, the logits a causal LM's loss projects
    (bench.trial.loss.loss); None: every next token, rows x (width - 1)."""

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
        from bench.trial.flops import batch_shape

        mask = batch.get("attention_mask")
        # A packed batch (position_ids, no mask) makes the model build a mask at row boundaries.
        padded = bool(mask is not None and not bool(mask.bool().all())) or (mask is None and "position_ids" in batch)
        return cls({k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in batch.items()}, padded,
                   batch_shape(batch)[2])

    @property
    def kept_positions(self) -> int:
        return self.rows * (self.width - 1) if self.kept is None else self.kept


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
    peak_batch: list[int] | None = None
    """Rows and width of the widest micro-batch of the run, which the peak was forecast for."""
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
        """Why this forecast breaks a memory budget, naming the component that breaks it (the
        largest of the trial's own, or the process floor when that alone is over), or None if it fits."""
        if self.peak <= budget_bytes:
            return None
        floor = self.peak_parts.get("runtime", 0)
        own = {**{k: v for k, v in self.components().items() if k != "peak"},
               **{k: v for k, v in self.peak_parts.items() if k in ("loss_buffers", "load_freed")}}
        culprit = "runtime (the process before any model)" if floor >= budget_bytes else max(own, key=own.get)
        size = floor if culprit.startswith("runtime") else own[culprit]
        return (f"forecast peak {self.peak / GB:.3f} GB exceeds memory_budget_gb = {budget_bytes / GB:g}; "
                f"breaking component: {culprit} {size / GB:.3f} GB (weights {self.weights / GB:.3f}, grads "
                f"{self.grads / GB:.3f}, optimizer {self.optimizer / GB:.3f}, activations {self.activations / GB:.3f} GB)")


# ---- optimizer state ------------------------------------------------------------------------


def _adamw_state(t: dict[str, Any]) -> Callable[[torch.Tensor], list[int]]:
    # exp_avg and exp_avg_sq are zeros_like(p); `step` is a 0-d float32 tensor per parameter.
    return lambda p: [p.numel() * p.element_size()] * 2 + [4]


def _sgd_state(t: dict[str, Any]) -> Callable[[torch.Tensor], list[int]]:
    # momentum_buffer is a clone of the first gradient; without momentum SGD keeps nothing.
    return lambda p: [p.numel() * p.element_size()] if t["momentum"] else []


BNB_MIN_8BIT_SIZE = 4096
"""bitsandbytes keeps 32-bit state for tensors smaller than this (its min_8bit_size default)."""
BNB_BLOCK = 256
"""bitsandbytes' blockwise 8-bit optimizer: one float32 absmax per 256 values."""
BNB_QMAPS = [256 * 4, 256 * 4]
"""adamw-8bit's two 256-entry float32 quantization maps (signed and unsigned), shared by all tensors."""


def _adamw_8bit_state(t: dict[str, Any]) -> Callable[[torch.Tensor], list[int]]:
    def state(p: torch.Tensor) -> list[int]:
        if p.numel() < BNB_MIN_8BIT_SIZE:
            return [p.numel() * 4] * 2  # state1, state2 in float32
        # state1, state2 as uint8 codes, each with a float32 absmax per block.
        return [p.numel(), p.numel(), 4 * math.ceil(p.numel() / BNB_BLOCK), 4 * math.ceil(p.numel() / BNB_BLOCK)]

    return state


def _bnb_adamw_32bit_state(t: dict[str, Any]) -> Callable[[torch.Tensor], list[int]]:
    # bitsandbytes' 32-bit AdamW (what paged-adamw runs): two float32 states whatever the tensor's
    # dtype, and a step counter that is a Python int, not a tensor.
    return lambda p: [p.numel() * 4] * 2


OPTIMIZER_STATE: dict[str, tuple[Callable[[dict[str, Any]], Callable[[torch.Tensor], list[int]]], list[int]]] = {
    "adamw": (_adamw_state, []),
    "sgd": (_sgd_state, []),
    "adamw-8bit": (_adamw_8bit_state, BNB_QMAPS),
    # Paged optimizers hold the same state, in CUDA unified memory (outside the allocator: CudaPeak).
    "paged-adamw": (_bnb_adamw_32bit_state, []),
    "paged-adamw-8bit": (_adamw_8bit_state, BNB_QMAPS),
}
"""Optimizer name (bench.trial.train.OPTIMIZERS) -> (the state blocks of one tensor given [train], blocks shared by all)."""


def optimizer_blocks(params: list[torch.Tensor], t: dict[str, Any]) -> list[int]:
    """The optimizer state's blocks for the tensors that get a gradient, as bench.trial.measure.optimizer_bytes counts them."""
    per_tensor, shared = OPTIMIZER_STATE[t["optimizer"]]
    state = per_tensor(t)
    blocks = [b for p in params for b in state(p)]
    big = any(p.numel() >= BNB_MIN_8BIT_SIZE for p in params)
    return blocks + (shared if blocks and big else [])


# ---- the meta step --------------------------------------------------------------------------


class _Answers(TorchDispatchMode):
    """Answers the forward's reads of a scalar from a meta tensor (`mask.all()` in transformers'
    mask code) with what the real batch gives: True when no row is padded. Only boolean reads are
    answered; any other scalar read means the forward depends on values the forecast lacks. Likewise
    a selection by a boolean mask (the labelled positions bench.trial.loss.loss keeps) selects the
    real batch's `kept` count."""

    def __init__(self, no_padding: bool, kept: int):
        super().__init__()
        self.no_padding = no_padding
        self.kept = kept
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.index.Tensor and any(
                i is not None and i.dtype == torch.bool and i.device.type == "meta" for i in args[1]):
            # Autograd, above this mode, still saves the boolean mask itself, as on the real batch.
            count = [torch.empty(self.kept, dtype=torch.long, device="meta")]
            indices = [j for i in args[1] for j in (count * i.dim() if i is not None and i.dtype == torch.bool else [i])]
            return func(args[0], indices)
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
    """The trial's model on the meta device, quantized and adapted as bench.run.worker does it, and the
    bytes its real load frees in heap-sized blocks (load_freed)."""
    import methods
    from bench import models

    model = models.skeleton(spec["model"], dtype=spec["model"].get("dtype", "float32"))
    freed = load_freed(model, spec["model"])  # before quantization replaces the float layers
    models.quantize_skeleton(model, spec["model"])  # bitsandbytes builds its lookup tables on the CPU: no device context here
    method = methods.get(spec["method"]["name"])
    extra = {"context": context} if getattr(method, "needs_context", False) else {}
    with torch.device("meta"):  # tensors a method creates without naming a device stay weightless too
        return method.apply(model, method.Config.from_dict(spec["method"]["config"]), **extra), freed


def meta_step(adapted, batch: Batch, device: str = "cpu", logits: str = "labelled") -> dict[str, Any]:
    """One forward and backward on the meta model: bytes saved for backward, the tensors that get a gradient."""
    from bench.trial.measure import grad_bytes, saved_for_backward
    from bench.trial.loss import loss as train_loss

    model = adapted.model
    model.train()
    answers = _Answers(no_padding=not batch.padded, kept=batch.kept_positions)
    with _Attention(device), answers, saved_for_backward(model) as saved:
        loss = train_loss(model, batch.meta(), labelled_only=logits == "labelled")
    loss.backward()
    with_grad = [p for p in adapted.trainable if p.grad is not None]
    return {"activations": saved["bytes"], "sizes": saved["sizes"], "grads": grad_bytes(adapted.trainable), "with_grad": with_grad}


def first_batch(spec: dict[str, Any], packed: float | None = None) -> Batch:
    """The shape of the trial's first micro-batch, drawn exactly as bench.trial.train draws it: what
    memory.accounted.activations measures. `packed`: the model's bench.trial.loss.width_cost when
    rows are laid end to end, as bench.run.worker batches them when bench.trial.loss.packs says the
    model and method can; None: padded."""
    return _batches(_batch_key(spec, packed))[0]


def widest_batch(spec: dict[str, Any], packed: float | None = None) -> Batch:
    """The widest micro-batch of the whole run (padded batches are as wide as their longest row,
    packed ones as their rows together, so widths vary): the peak is reached on it, not necessarily
    on the first."""
    return _batches(_batch_key(spec, packed))[1]


def _batch_key(spec: dict[str, Any], packed: float | None) -> str:
    return json.dumps([spec["model"]["name"], spec["data"], spec["train"], packed], sort_keys=True)


@functools.lru_cache(maxsize=64)
def _batches(key: str) -> tuple[Batch, Batch]:
    from bench.tasks import data
    from bench.trial.train import batches, total_steps

    name, data_spec, t, packed = json.loads(key)
    tokenizer = _tokenizer(name) if data.get_task(data_spec["task"], data_spec).needs_tokenizer else None
    prepared = data.prepare(data_spec, tokenizer, seed=t["seed"])
    stream = batches(prepared.train, t, prepared.collate_for(packed), torch.device("cpu"))
    # One epoch at most: every epoch holds every row, so its widest batch is as wide as any later
    # one, and a suite asking for 10^18 steps is forecast in the time of one pass.
    per_epoch = total_steps(len(prepared.train), {**t, "max_steps": None, "epochs": 1})
    count = min(total_steps(len(prepared.train), t), per_epoch) * t["grad_accum"]
    shapes = [Batch.of(next(stream)) for _ in range(count)]
    return shapes[0], max(shapes, key=lambda b: (b.width, b.padded))


def clear_caches() -> None:
    """Drop the cached tokenizers and batch shapes (a trial process forecasts once, then measures)."""
    import gc

    _batches.cache_clear()
    _tokenizer.cache_clear()
    gc.collect()


@functools.lru_cache(maxsize=8)
def _tokenizer(name: str):
    from bench import models

    return models.load_tokenizer({"name": name})


def context_for(spec: dict[str, Any]):
    """What a method that turns text into tokens gets (bench.run.worker builds the same)."""
    from bench.tasks import data
    from methods.base import MethodContext

    rows = data.examples(spec["data"]["task"], "train", spec=spec["data"])
    return MethodContext(_tokenizer(spec["model"]["name"]), tuple((e.prompt, e.answer) for e in rows), spec["train"]["seed"])


def forecast(spec: dict[str, Any], device: str = "cpu", batch: Batch | None = None, runtime_bytes: int | None = None,
             calibration: CpuCalibration | None = None, logits: str = "labelled", cache: bool = False, packing: bool = True) -> Forecast:
    """Forecast a trial's accounted memory and peak on `device` (cpu or cuda) from its spec alone.
    `batch`: the first micro-batch's shape (default: drawn from the trial's data). On the CPU,
    `calibration` (default: this machine class's, cpu_calibration()) with its runtime replaced by
    `runtime_bytes` if given. `logits`: where the loss projects onto the vocabulary, "labelled" as
    training does now or "all" as trials recorded before bench.trial.loss.loss did (a result's
    train.logits). `packing`: rows laid end to end where bench.trial.loss.packs allows, as training
    batches them now; False: padded always, as trials ran before (a result's train.batches).
    `cache`: the components (all but the peak, which depends on this process's runtime and the
    calibration) are kept on disk (bench.trial.memo, memo_key), so trials that differ
    only in the learning rate forecast once; a batch given by the caller is never cached."""
    import methods
    from bench.trial.measure import weight_bytes

    if device not in PEAK_DEVICES:
        raise ValueError(f"device: forecasts exist for {', '.join(PEAK_DEVICES)}, not {device!r}")
    key = memo_key(spec, device, logits, packing) if cache and batch is None else None
    if key is not None and (stored := MEMO.get(key)) is not None:
        return _with_peak(Forecast(**stored["forecast"]), StepSizes(**stored["sizes"]), spec, device, runtime_bytes, calibration)
    method = methods.get(spec["method"]["name"])
    context = context_for(spec) if getattr(method, "needs_context", False) else None
    adapted, freed = adapted_skeleton(spec, context)
    sizes = StepSizes(load_freed=freed if device == "cpu" else 0)
    weights = sum(weight_bytes(adapted.model).values())
    peak_batch = None
    if batch is None:  # from the trial's data: the first micro-batch for the accounted step, the widest for the peak
        from bench.trial.loss import packing_cost

        packed = packing_cost(method, adapted.model) if packing else None
        batch, peak_batch = first_batch(spec, packed), widest_batch(spec, packed)
    grads = optimizer = activations = 0
    source, note = "meta-forward", None
    if adapted.trainable:  # the frozen baseline never steps: bench.trial.train returns before the first batch
        try:
            step = meta_step(adapted, batch, device, logits)
            activations, grads, with_grad = step["activations"], step["grads"], step["with_grad"]
            sizes.saved = step["sizes"]
        except (NotImplementedError, RuntimeError) as exc:
            source, note = "analytic", f"meta forward failed ({type(exc).__name__}: {str(exc)[:200]}); per-layer model used"
            sizes.saved = analytic_activations(adapted.model, spec, batch)
            activations, with_grad = sum(sizes.saved), _unique_params(adapted.trainable)
            grads = sum(p.numel() * p.element_size() for p in with_grad)
        with_grad = _unique_params(with_grad)
        if peak_batch is not None and source == "meta-forward" and (peak_batch.width, peak_batch.padded) != (batch.width, batch.padded):
            _clear_grads(adapted.trainable)
            sizes.saved = meta_step(adapted, peak_batch, device, logits)["sizes"]
        sizes.grads = [p.numel() * p.element_size() for p in with_grad]
        sizes.optimizer = optimizer_blocks(with_grad, spec["train"])
        optimizer = sum(sizes.optimizer)
        sizes.loss_buffer, sizes.half_logits = loss_buffer(adapted.model, peak_batch or batch, logits)
    result = Forecast(weights=weights, grads=grads, optimizer=optimizer, activations=activations, peak=0, device=device,
                      batch=[batch.rows, batch.width], peak_batch=[(peak_batch or batch).rows, (peak_batch or batch).width],
                      activations_from=source, note=note)
    if key is not None:
        MEMO.put(key, {"forecast": result.to_dict(), "sizes": asdict(sizes)})
    return _with_peak(result, sizes, spec, device, runtime_bytes, calibration)


def _with_peak(result: Forecast, sizes: StepSizes, spec: dict[str, Any], device: str, runtime_bytes: int | None,
               calibration: CpuCalibration | None) -> Forecast:
    """The forecast's peak, from its components and step sizes, on `device` (forecast())."""
    if device == "cuda":
        CudaPeak().apply(result, sizes, paged=spec["train"]["optimizer"].startswith("paged"))
    else:
        calibration = calibration or cpu_calibration()
        if runtime_bytes is not None:
            calibration = dataclasses.replace(calibration, runtime_bytes=runtime_bytes)
        CpuPeak(calibration).apply(result, sizes)
    return result


MEMO = memo.Memo("forecast")
MEMO_CODE = ("methods/*.py", "bench/models/*.py", "bench/tasks/*.py", "bench/trial/*.py")
"""The code a forecast's components depend on: the methods, model and data loading, batching and this module."""


def memo_key(spec: dict[str, Any], device: str, logits: str, packing: bool = True) -> list[Any]:
    """Everything a forecast's components depend on: the model, method, data and training sections
    (all but the learning rate, which changes neither the batches nor the optimizer's state), the
    device and logits, the CPU kernels torch picks from (attention's choice), package versions and the code."""
    return [VERSION, device, logits, packing, torch.backends.cpu.get_cpu_capability(), spec["model"], spec["method"], spec["data"],
            {k: v for k, v in spec["train"].items() if k != "lr"}, memo.versions("torch", "transformers", "bitsandbytes"),
            memo.code_digest(memo.sources(*MEMO_CODE))]


def cpu_calibration() -> CpuCalibration:
    """This machine class's committed calibration; without one, the measured runtime of a fresh
    trial process and no backward transient (the uncalibrated physical model)."""
    return load_calibration() or CpuCalibration(measured_runtime(), 0.0, 0, "uncalibrated: a fresh trial process's resident set")


PEAK_DEVICES = ("cpu", "cuda")


def _clear_grads(params: list[torch.Tensor]) -> None:
    for p in params:
        p.grad = None


def loss_buffer(model: nn.Module, batch: Batch, logits: str = "labelled") -> tuple[int, bool]:
    """One full-vocabulary float32 buffer of the loss (positions x vocabulary x 4 bytes: every
    position, or only the labelled ones where bench.trial.loss.loss keeps those), and whether the
    logits are 16-bit; (0, False) for a model without a language-model head (a classifier's logits
    are a few numbers a row)."""
    from bench.trial.loss import keeps_logits

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if weight is None or "labels" not in batch.tensors or len(batch.tensors["labels"][0]) < 2:
        return 0, False
    kept = logits == "labelled" and keeps_logits(model, batch.meta())
    positions = batch.kept_positions if kept else batch.rows * batch.width
    return positions * weight.shape[0] * 4, weight.element_size() == 2


def load_freed(skeleton: nn.Module, m: dict[str, Any]) -> int:
    """Bytes that loading the trial's model frees in heap-sized blocks (bench.models.load): the
    checkpoint's float32 tensors converted to another dtype leave one converted copy behind
    (load() clones every tensor out of the checkpoint), and quantization frees the float weights of
    every layer it replaces. Synthetic models are built in their dtype: nothing to free but the latter.
    `skeleton`: the unquantized meta model in the trial's dtype; `m`: the trial's [model]."""
    from bench.models.quant import quantizable

    freed = 0
    checkpoint = not m["name"].startswith("synthetic:")
    if checkpoint and m.get("dtype", "float32") != "float32":
        freed += sum(b for b in (t.numel() * t.element_size() for t in [*skeleton.parameters(), *skeleton.buffers()]) if b < MMAP_THRESHOLD)
    if m.get("quant", "none") != "none":
        freed += sum(b for b in (layer.weight.numel() * layer.weight.element_size() for _, layer in quantizable(skeleton))
                     if b < MMAP_THRESHOLD)
    return freed


def measured_runtime() -> int:
    """The resident set of a fresh trial process before it loads anything: a child of the runner's
    fork server (bench.run.forkserver.trial_context: torch, transformers, lm-eval, datasets imported), measured
    once per package set and cached. It lacks the tokenizer and data a trial then loads (tens of MB)."""
    import json

    from bench import models
    from bench.records import results

    versions = results.environment(None)["packages"]
    key = json.dumps(versions, sort_keys=True)
    path = models.cache_dir() / "forecast_runtime.json"
    cached = json.loads(path.read_text()) if path.exists() else {}
    if key not in cached:
        from bench.run import forkserver

        ctx = forkserver.trial_context()
        queue = ctx.Queue()
        proc = ctx.Process(target=_report_rss, args=(queue,))
        proc.start()
        cached[key] = queue.get(timeout=300)
        proc.join()
        path.write_text(json.dumps(cached))
    return cached[key]


def _report_rss(queue) -> None:
    from bench.trial.measure import _proc_status

    queue.put(_proc_status("VmRSS"))


def _unique_params(params: list[torch.Tensor]) -> list[torch.Tensor]:
    from bench.trial.measure import _unique

    return list(_unique(params).values())



# ---- the peak -------------------------------------------------------------------------------

MMAP_THRESHOLD = 32 * 2**20
"""glibc malloc serves a block above this from a fresh mapping, returned to the system when freed;
smaller blocks come from its heap, which keeps freed space (glibc's DEFAULT_MMAP_THRESHOLD_MAX on
64-bit). What loading frees in such blocks stays resident: load_freed."""

LOSS_BUFFERS = {"cpu": 3, "cuda": 2}
"""Full-vocabulary float32 buffers (rows x width x vocabulary x 4 bytes) alive beside the saved
activations when backward starts. Two are certain: the gradients of the log-probabilities and of
the logits (transformers computes the loss in float32 whatever the model's dtype). The H200 7B
peaks show exactly two; the CPU peaks show a third (the committed CPU results put the coefficient
between 3 and 4: a freed buffer of that size that the process has not yet given back)."""


@dataclass
class StepSizes:
    """Sizes of the blocks a training step holds, per storage, for a peak model."""

    saved: list[int] = field(default_factory=list)
    grads: list[int] = field(default_factory=list)
    optimizer: list[int] = field(default_factory=list)
    loss_buffer: int = 0
    """One full-vocabulary float32 buffer (0 for a model without a language-model head)."""
    half_logits: bool = False
    """The logits are 16-bit: the loss's float32 gradient is cast back, one half-size buffer more."""
    load_freed: int = 0
    """Bytes loading freed in heap-sized blocks (a converted or quantized copy): they stay resident."""


@dataclass(frozen=True)
class CpuCalibration:
    """What the measured CPU peaks of one machine class show beyond the components (results/baselines/
    <machine class>/forecast_cpu.json, written by `peftbench forecast --calibrate`)."""

    runtime_bytes: int
    """The trial process without any model: interpreter, torch, transformers, lm-eval, datasets,
    tokenizer and data (median of before_bytes - weights over frozen trials, which train nothing)."""
    backward_factor: float
    """Resident bytes beyond the components per byte saved for backward: the gradients backward
    creates for those activations while they are still alive, and the heap space their sizes
    fragment (median over the calibration trials of the residual / activations)."""
    trials: int = 0
    """How many trials the factor was taken from."""
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def calibration_path() -> Any:
    from bench.regression import calibrate

    return REPO / "results" / "baselines" / calibrate.machine_class() / "forecast_cpu.json"


def load_calibration() -> CpuCalibration | None:
    """This machine class's committed calibration, if any."""
    path = calibration_path()
    return CpuCalibration(**json.loads(path.read_text())) if path.exists() else None


@dataclass(frozen=True)
class CpuPeak:
    """The process's peak resident set (VmHWM) on the CPU:

        runtime + weights + load_freed + optimizer + activations + loss buffers + backward transient

    with the activations of the run's widest micro-batch (widest_batch), which need not be the first.
    At the step's worst moment (backward starts) the process holds its runtime, the model, what
    loading freed but kept (a bf16 copy converted from the float32 checkpoint; the float weights a
    4-bit base replaced), the optimizer state (from the previous step), everything saved for
    backward, the loss's full-vocabulary buffers (LOSS_BUFFERS) and the gradients backward makes
    for the activations before it frees them (backward_factor x activations, calibrated). Gradients
    of the weights are not yet there: the previous step set them to None."""

    calibration: CpuCalibration

    def apply(self, f: Forecast, sizes: StepSizes) -> None:
        c = self.calibration
        parts = {"runtime": c.runtime_bytes, "load_freed": sizes.load_freed}
        if f.grads or f.optimizer or f.activations:  # the frozen baseline never steps
            # The widest micro-batch saves the most (sizes.saved is its step's, f.activations the first's).
            parts["optimizer"] = f.optimizer
            parts["activations_at_peak"] = sum(sizes.saved)
            parts["loss_buffers"] = LOSS_BUFFERS["cpu"] * sizes.loss_buffer + (sizes.loss_buffer // 2 if sizes.half_logits else 0)
            parts["backward_transient"] = int(c.backward_factor * parts["activations_at_peak"])
        f.peak_parts = parts
        f.peak = f.weights + sum(parts.values())


CUDA_BLOCK = 512
"""The CUDA caching allocator rounds every block up to a multiple of 512 bytes."""


@dataclass(frozen=True)
class CudaPeak:
    """torch.cuda.max_memory_allocated over training (on paper: no GPU here):

        weights + optimizer + max(saved + loss buffers, gradients), each block rounded up to 512 bytes

    Paged optimizers (paged-adamw, paged-adamw-8bit) keep their state in CUDA unified memory, which
    the allocator does not see: their state is in `optimizer` but not in the peak."""

    def apply(self, f: Forecast, sizes: StepSizes, paged: bool = False) -> None:
        def rounded(xs: list[int]) -> int:
            return sum(-(-x // CUDA_BLOCK) * CUDA_BLOCK for x in xs)

        if not (f.grads or f.optimizer or f.activations):
            f.peak_parts, f.peak = {}, f.weights
            return
        state = 0 if paged else rounded(sizes.optimizer)
        loss = [sizes.loss_buffer] * LOSS_BUFFERS["cuda"] + ([sizes.loss_buffer // 2] if sizes.half_logits else [])
        worst = max(rounded(sizes.saved + loss), rounded(sizes.grads))
        f.peak_parts = {"optimizer_on_device": state, "step_worst": worst, "loss_buffers": rounded(loss),
                        "rounding": rounded(sizes.saved) - sum(sizes.saved)}
        f.peak = f.weights + state + worst


def analytic_activations(model: nn.Module, spec: dict[str, Any], batch: Batch) -> list[int]:
    """A per-layer model of what a transformer's training step saves for backward, for when the meta
    forward cannot run (a method or architecture whose forward reads data values): each linear layer
    keeps its input, each norm its input and one float32 statistic per token, each attention module
    its query, key, value and output and a float32 log-sum-exp per head and token, the embedding its
    token ids, and the loss its float32 log-probabilities. Coarser than the meta forward (it misses
    element-wise ops inside layers and method-specific tensors); the result says which one ran."""
    from methods.layers import linear_modules

    tokens = batch.rows * batch.width
    dtype_bytes = torch.tensor([], dtype=next(p for p in model.parameters() if p.is_floating_point()).dtype).element_size()
    blocks = [tokens * 8]  # token ids, saved by the embedding
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for _, layer in linear_modules(model):
        width = layer.in_features if hasattr(layer, "in_features") else layer.weight.shape[0]  # GPT-2's Conv1D is (in, out)
        blocks.append(tokens * width * dtype_bytes)
    for module in model.modules():
        kind = type(module).__name__
        if "Norm" in kind:
            width = next((p.numel() for p in module.parameters(recurse=False)), 0)
            blocks += [tokens * width * dtype_bytes, tokens * 4]
        elif kind.endswith("Attention"):
            heads = getattr(module, "num_heads", None) or getattr(getattr(module, "config", None), "num_attention_heads", 1)
            width = getattr(getattr(module, "config", None), "hidden_size", 0)
            blocks += [tokens * width * dtype_bytes] * 4 + [tokens * heads * 4]
    if head is not None:
        blocks.append(tokens * head.weight.shape[0] * 4)
    return blocks


# ---- forecast against measurement -----------------------------------------------------------

COMPONENTS = ("weights", "grads", "optimizer", "activations")


def runtime_of(results: list[dict[str, Any]]) -> tuple[int, str] | None:
    """The CPU trial process's floor as a results folder measured it: a frozen trial trains nothing,
    so its peak is the process with the model loaded; less its weights, the rest is the runtime
    (the median over such trials). None if the folder has none."""
    import statistics

    floors = [r["memory"]["before_bytes"] - r["memory"]["accounted"]["weights"] for r in results
              if r.get("status") == "success" and r["memory"].get("peak_source", "").startswith("rss")
              and r["memory"].get("accounted") and not any(r["memory"]["accounted"][k] for k in ("grads", "optimizer", "activations"))
              and r["memory"].get("before_bytes")]
    return (int(statistics.median(floors)), f"median of {len(floors)} frozen trial(s)") if floors else None


def compare(results: list[dict[str, Any]], calibration: CpuCalibration | None = None) -> list[dict[str, Any]]:
    """Forecast each result's spec (a stored forecast is ignored) and set it beside the measurement.
    On the CPU the runtime is the folder's own (its frozen trials, runtime_of) where it has one, else
    the calibration's. A spec the current code no longer accepts (a method's config changed since)
    gets a row that says so."""
    rows = []
    calibration = calibration or cpu_calibration()
    own = runtime_of(results)
    if own is not None:
        calibration = dataclasses.replace(calibration, runtime_bytes=own[0])
    for r in results:
        m = r.get("memory", {})
        if r.get("status") != "success" or not m.get("accounted"):
            continue
        row: dict[str, Any] = {"trial_id": r["trial_id"], "label": _label(r["spec"]), "measured": dict(m["accounted"]),
                               "measured_peak": m.get("peak_bytes"), "peak_source": m.get("peak_source")}
        try:
            cuda = m.get("peak_source", "").startswith("cuda")
            # A result recorded before the loss kept only labelled positions has no train.logits.
            f = forecast(r["spec"], device="cuda" if cuda else "cpu", calibration=calibration,
                         logits=r.get("train", {}).get("logits") or "all",
                         packing=r.get("train", {}).get("batches") == "packed")  # absent: padded, as before packing
        except Exception as exc:  # noqa: BLE001  (a row says why; the other trials still compare)
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            rows.append(row)
            continue
        row["forecast"] = f.to_dict()
        row["runtime_from"] = own[1] if own else calibration.source
        rows.append(row)
    return rows


def fit(folders: dict[str, list[dict[str, Any]]]) -> tuple[CpuCalibration, dict[str, list[dict[str, Any]]]]:
    """A CPU calibration from measured results (`peftbench forecast --calibrate`): the runtime from
    their frozen trials, the backward factor as the median, over trials that train, of what their
    peak holds beyond every other term, per byte saved for backward. Also returns the comparison rows
    (compare()) under the fitted calibration."""
    import statistics

    floors = [runtime_of(res) for res in folders.values()]
    overall = [x[0] for x in floors if x]
    if not overall:
        raise ValueError("calibration needs at least one successful frozen CPU trial (its peak is the process floor)")
    bare = CpuCalibration(int(statistics.median(overall)), 0.0)
    tables = {d: compare(results, bare) for d, results in folders.items()}
    trained = [row for rows in tables.values() for row in rows
               if row.get("forecast") and row["forecast"]["peak_parts"].get("activations_at_peak") and row["forecast"]["device"] == "cpu"]
    if not trained:
        raise ValueError("calibration needs CPU trials that train (with saved activations)")
    factor = statistics.median((row["measured_peak"] - row["forecast"]["peak"]) / row["forecast"]["peak_parts"]["activations_at_peak"]
                               for row in trained)
    for row in trained:  # the same forecast with the fitted transient: CpuPeak's term, added
        transient = int(factor * row["forecast"]["peak_parts"]["activations_at_peak"])
        row["forecast"]["peak_parts"]["backward_transient"] = transient
        row["forecast"]["peak"] += transient
    return CpuCalibration(bare.runtime_bytes, factor, len(trained), f"fit on {', '.join(folders)}"), tables


def _label(spec: dict[str, Any]) -> str:
    from bench.run.suite import Trial

    return f"{spec['model']['name'].removeprefix('synthetic:')} {Trial(suite='', spec=spec, run={}).label}"


def errors(row: dict[str, Any]) -> dict[str, float | None]:
    """Relative error of the forecast per component, of the accounted total and of the peak."""
    if "forecast" not in row:
        return {}
    f, m = row["forecast"], row["measured"]
    out: dict[str, float | None] = {k: (f[k] - m[k]) / m[k] if m[k] else None for k in COMPONENTS}
    total = sum(m[k] for k in COMPONENTS)
    out["accounted"] = (sum(f[k] for k in COMPONENTS) - total) / total
    out["peak"] = (f["peak"] - row["measured_peak"]) / row["measured_peak"] if row.get("measured_peak") else None
    return out


def table(rows: list[dict[str, Any]], name: str) -> str:
    """A plain-text table of forecast vs measured (MB = 1e6 bytes) with the share of trials within tolerance."""
    lines = [f"{name}: forecast vs measured (MB; error = forecast / measured - 1)",
             f"{'trial':16s} {'label':58s} {'accounted':>9s} {'fcast':>9s} {'err':>7s} {'act err':>7s} "
             f"{'peak':>7s} {'fcast':>7s} {'err':>7s}"]
    acc_ok = peak_ok = n = n_peak = 0
    for row in rows:
        if "error" in row:
            lines.append(f"{row['trial_id']:16s} {row['label'][:58]:58s} no forecast: {row['error']}")
            n += 1
            continue
        e = errors(row)
        total = sum(row["measured"][k] for k in COMPONENTS)
        ftotal = sum(row["forecast"][k] for k in COMPONENTS)
        n += 1
        acc_ok += abs(e["accounted"]) <= 0.02
        act = f"{e['activations'] * 100:+6.1f}%" if e["activations"] is not None else "      -"
        peak = "      -      -       -"
        if e["peak"] is not None:
            n_peak += 1
            peak_ok += abs(e["peak"]) <= 0.10
            peak = f"{row['measured_peak'] / 1e6:7.0f} {row['forecast']['peak'] / 1e6:7.0f} {e['peak'] * 100:+6.1f}%"
        lines.append(f"{row['trial_id']:16s} {row['label'][:58]:58s} {total / 1e6:9.1f} {ftotal / 1e6:9.1f} "
                     f"{e['accounted'] * 100:+6.2f}% {act} {peak}")
    lines.append(f"accounted within 2%: {acc_ok}/{n}; peak within 10%: {peak_ok}/{n_peak}")
    return "\n".join(lines)


def columns(f: Forecast) -> dict[str, float]:
    """A forecast as dry-run columns, GB."""
    return {"weights_gb": f.weights / GB, "grads_gb": f.grads / GB, "optim_gb": f.optimizer / GB,
            "act_gb": f.activations / GB, "peak_gb": f.peak / GB}

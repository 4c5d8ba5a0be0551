"""Utilization: a trial's training FLOPs, counted, over the machine's matmul peak, measured once.

Training FLOPs (`training_flops`). What is counted: every matrix multiplication a training step
runs, in the forward and in the backward, as 2 FLOPs per multiply-add:

    nn.Linear and anything that calls F.linear (LoRA's A and B, bitsandbytes' layers, methods that
    multiply by a parameter of their own), transformers' Conv1D (torch.addmm), torch.matmul / mm /
    bmm / baddbmm / the @ operator (eager attention, VeRA's shared matrices), convolutions
    (F.conv1d/2d/3d) and F.scaled_dot_product_attention (its two matmuls, Q K^T and P V);
    forward   2 m k n for an (m x k) @ (k x n) product;
    backward  2 m k n more for each operand that requires a gradient: the input's gradient when the
              input carries one (it does from the first trained parameter on: below a LoRA's first
              adapted layer autograd computes nothing, and the frozen W0 of the first block's
              projections passes no gradient back), the weight's gradient only where the weight
              trains (LoRA: A and B, never W0; full: all; frozen: no training, no FLOPs).
              Attention: dV if V needs one, dP if Q or K does, dQ, dK each if it needs one.

What is not counted: layer norms, softmax, activations, residual adds, elementwise adapters (IA3's
scaling), embedding lookups, the loss, einsum, the optimizer step and gradient clipping. For a
transformer these are a few per cent of the matmuls (the conventional 6 x params x tokens leaves
them out as well), so the fraction of peak they give is a slight underestimate of the arithmetic done.

How: which products run, their shapes and which operands need a gradient are read from one forward
of the trial's own adapted model (a TorchFunctionMode records each product; nothing is changed), run
on a few tiny batches (at most a few dozen tokens, outside the timed window); the backward follows
from the rules above. A forward's count is a polynomial in the batch's rows B and width T,
c0 + B (c1 + c2 T + c3 T^2) + c4 K (linear layers grow with the tokens, attention with T^2, a method's
per-batch work such as DoRA's weight norm is c0, and a causal LM's vocabulary head with the K positions
whose next token is labelled, the only ones bench.trial.loss.loss projects), so five tiny forwards
give the coefficients and a sixth checks them; each of the trial's micro-batches (padded as the model
ran it) is then summed. A batch without a token width (images) is c0 + c1 B. Padding positions are
counted: the machine computed them.

Peak (`peak_flops`): the best rate of square float32 matmuls of a few sizes at the trial's thread
count, measured once per machine class (bench.regression.calibrate.machine_class) in about a second and
cached in <cache>/machine/<class>.json keyed by device, dtype and threads.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from bench.trial import memo
from bench.trial.loss import _text_width, batch_shape, keeps_logits, loss  # noqa: F401  (batch_shape: part of this API)

F = nn.functional
VERSION = 2
"""Bump when a count of the same model would change: part of the cached counts' key."""


# ---------------------------------------------------------------- counting


@dataclass(frozen=True)
class Product:
    """One matrix product of a forward: its multiply-adds and which operands need a gradient."""

    name: str
    macs: int
    """Multiply-adds of the forward product (FLOPs are 2 x macs)."""
    backward_macs: int
    """Multiply-adds the backward runs for it: one product of the same size per operand that needs a gradient."""


Needs = Callable[[Any], bool]
"""Whether an operand needs a gradient in the backward (see _Recorder.needs)."""


def _matmul(name: str, needs: Needs, a: torch.Tensor, b: torch.Tensor) -> Product:
    """(..., m, k) @ (..., k, n), batch dims broadcast; a 1-D operand is a single row or column."""
    m = a.shape[-2] if a.dim() > 1 else 1
    k = a.shape[-1]
    n = b.shape[-1] if b.dim() > 1 else 1
    batch = math.prod(torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])) if a.dim() > 2 or b.dim() > 2 else 1
    macs = batch * m * k * n
    return Product(name, macs, macs * (int(needs(a)) + int(needs(b))))


def _linear(needs: Needs, args, kwargs) -> Product:
    x, w = args[0], args[1] if len(args) > 1 else kwargs["weight"]
    macs = x.numel() // x.shape[-1] * w.shape[0] * w.shape[1]
    return Product("linear", macs, macs * (int(needs(x)) + int(needs(w))))


def _addmm(needs: Needs, args, kwargs) -> Product:
    """addmm / baddbmm (and their in-place forms): the product of the second and third operands."""
    return _matmul("addmm", needs, args[1], args[2])


def _mm(needs: Needs, args, kwargs) -> Product:
    return _matmul("matmul", needs, args[0], args[1])


def _sdpa(needs: Needs, args, kwargs) -> Product:
    q, k, v = (args[i] if len(args) > i else kwargs[name] for i, name in enumerate(("query", "key", "value")))
    # Q K^T and P V over every query head (grouped key/value heads are repeated, not fewer products).
    scores = math.prod(q.shape[:-1]) * k.shape[-2]
    qk, pv = scores * q.shape[-1], scores * v.shape[-1]
    # Backward: dQ = dS K and dK = dS^T Q (each of Q K^T's size), dV = P^T dO and dP = dO V^T (P V's
    # size); dP is needed when Q or K needs a gradient.
    gq, gk, gv = needs(q), needs(k), needs(v)
    return Product("attention", qk + pv, qk * (int(gq) + int(gk)) + pv * (int(gq or gk) + int(gv)))


def _conv(needs: Needs, args, kwargs, out: torch.Tensor) -> Product:
    x, w = args[0], args[1] if len(args) > 1 else kwargs["weight"]
    # Each output element is one dot product over (in channels / groups) x kernel.
    macs = out.numel() * math.prod(w.shape[1:])
    return Product("conv", macs, macs * (int(needs(x)) + int(needs(w))))


T = torch.Tensor
PRODUCTS: dict[Callable, Callable[..., Product]] = {
    F.linear: _linear, F.scaled_dot_product_attention: _sdpa,
    **dict.fromkeys((torch.addmm, torch.baddbmm, T.addmm, T.addmm_, T.baddbmm, T.baddbmm_), _addmm),
    **dict.fromkeys((torch.mm, torch.bmm, torch.matmul, T.__matmul__, T.matmul, T.mm, T.bmm), _mm),
}
CONVS = (F.conv1d, F.conv2d, F.conv3d)


class _Recorder(TorchFunctionMode):
    """Records each matrix product the forward runs (PRODUCTS, CONVS) and changes nothing.

    Which operands need a gradient: where autograd is on, the tensor's requires_grad. Inside a custom
    autograd function's forward (methods/lora.py's fused LoRA node, bitsandbytes' 4-bit matmul) autograd
    is off and tensors derived there carry no requires_grad, yet the function's backward computes the
    same gradients the plain expression would: there an operand needs one when it derives from a tensor
    that does (a parameter that trains, an input that carries a gradient). Elsewhere with autograd off
    (a no_grad block such as DoRA's weight norm) nothing does.
    """

    def __init__(self) -> None:
        super().__init__()
        self.products: list[Product] = []
        self.in_function = 0
        self.carries: set[int] = set()
        self._alive: list[torch.Tensor] = []  # keeps ids in `carries` from being reused during the trace

    def needs(self, t: Any) -> bool:
        if not isinstance(t, torch.Tensor):
            return False
        if torch.is_grad_enabled():
            return t.requires_grad
        return self.in_function > 0 and (t.requires_grad or id(t) in self.carries)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)  # the mode is off inside: products nested in a product count once
        if func in PRODUCTS:
            self.products.append(PRODUCTS[func](self.needs, args, kwargs))
        elif func in CONVS:
            self.products.append(_conv(self.needs, args, kwargs, out))
        if self.in_function and not torch.is_grad_enabled() and any(self.needs(t) for t in tree_leaves((args, kwargs))):
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.carries.add(id(t))
                    self._alive.append(t)
        return out

    @contextlib.contextmanager
    def functions(self) -> Iterator[None]:
        """Mark the forwards of custom autograd functions while recording (Function.apply is not a torch function)."""
        saved = torch.autograd.Function.__dict__["apply"]
        original = saved.__func__
        recorder = self

        def apply(cls, *args, **kwargs):
            recorder.in_function += 1
            try:
                return original(cls, *args, **kwargs)
            finally:
                recorder.in_function -= 1

        torch.autograd.Function.apply = classmethod(apply)
        try:
            yield
        finally:
            torch.autograd.Function.apply = saved


def step_flops(products: Iterable[Product]) -> int:
    """FLOPs of one forward and backward made of these products."""
    return sum(2 * (p.macs + p.backward_macs) for p in products)


def forward_products(model: nn.Module, batch: dict[str, torch.Tensor]) -> list[Product]:
    """The products of one training-mode forward of `model` on `batch`, with gradients tracked as in
    training; the random state, the mode and the parameters are left as they were."""
    was_training = model.training
    model.train()
    try:
        recorder = _Recorder()
        with torch.random.fork_rng(devices=[]), torch.enable_grad(), recorder.functions(), recorder:
            # The products training runs: bench.trial.loss.loss's head over the labelled positions only.
            loss(model, batch) if keeps_logits(model, batch) else model(**batch)
    finally:
        model.train(was_training)
    return recorder.products


def _shaped(batch: dict[str, torch.Tensor], rows: int, width: int | None, labelled: str = "all") -> dict[str, torch.Tensor]:
    """A batch of `rows` rows (and `width` tokens) made of the given one's rows and tokens repeated,
    unpadded (the mask does not change what is multiplied); token labels on every position
    (`labelled` "all") or on the last one of each row ("last")."""
    old_rows = next(iter(batch.values())).shape[0]
    old_width = _text_width(batch)
    out = {}
    for name, t in batch.items():
        t = t[torch.arange(rows) % old_rows]
        if width is not None and t.dim() >= 2 and t.shape[1] == old_width:
            t = t[:, torch.arange(width) % old_width]
            if name == "attention_mask":
                t = torch.ones_like(t)
        out[name] = t
    if width is not None and "labels" in out and "input_ids" in out and out["labels"].shape == out["input_ids"].shape:
        out["labels"] = out["input_ids"].clone()
        if labelled == "last":
            out["labels"][:, :-1] = -100
    return out


@dataclass(frozen=True)
class FlopModel:
    """FLOPs of one training micro-batch of B rows and T tokens of which K positions have a labelled
    next token: c0 + B (c1 + c2 T + c3 T^2) + c4 K."""

    coefficients: tuple[float, float, float, float, float]
    text: bool
    check_error: float
    """Relative error of the polynomial on a sixth, traced shape (0 where exact)."""

    def __call__(self, rows: int, width: int = 1, kept: int | None = None) -> float:
        """`kept` None: every next token labelled, B (T - 1)."""
        c0, c1, c2, c3, c4 = self.coefficients
        kept = rows * (width - 1) if kept is None else kept
        return c0 + rows * (c1 + c2 * width + c3 * width * width) + c4 * kept


FIT_WIDTHS = (8, 12, 16)
CHECK = (3, 20)
"""Shapes the polynomial is fitted on (rows 1 at three widths, rows 2 at the first, and rows 1 at the
first with only the last token labelled) and checked on."""


def flop_model(model: nn.Module, example: dict[str, torch.Tensor]) -> FlopModel:
    """The FLOP polynomial of `model`'s training step, from tiny forwards on batches built from `example`
    (a real micro-batch of the trial, only its rows and tokens are reused)."""

    def traced(rows: int, width: int | None, labelled: str = "all") -> float:
        return float(step_flops(forward_products(model, _shaped(example, rows, width, labelled))))

    if _text_width(example) is None:
        one, two, three = traced(1, None), traced(2, None), traced(CHECK[0], None)
        c1 = two - one
        fit = FlopModel((one - c1, c1, 0.0, 0.0, 0.0), False, 0.0)
        return FlopModel(fit.coefficients, False, _relative(fit(CHECK[0]), three))
    w1, w2, w3 = FIT_WIDTHS
    y1, y2, y3, y4 = traced(1, w1), traced(1, w2), traced(1, w3), traced(2, w1)
    # Per kept position (the vocabulary head): one row, w1 - 1 labelled next tokens against one.
    # A model whose head projects every position anyway gives the same count twice: c4 = 0.
    c4 = (y1 - traced(1, w1, "last")) / (w1 - 2) if "labels" in example else 0.0
    # Per-row part q(T) = c1 + c2 T + c3 T^2 through three widths; c0 = y(1, w1) - q(w1) from two row counts.
    per_row_w1 = y4 - y1
    c0 = y1 - per_row_w1
    q = [y - c0 for y in (y1, y2, y3)]
    c3 = ((q[2] - q[1]) / (w3 - w2) - (q[1] - q[0]) / (w2 - w1)) / (w3 - w1)
    c2 = (q[1] - q[0]) / (w2 - w1) - c3 * (w1 + w2)
    c1 = q[0] - c2 * w1 - c3 * w1 * w1
    # The traces above labelled every next token (K = B (T - 1)): take the head's part out of c1 and c2.
    fit = FlopModel((c0, c1 + c4, c2 - c4, c3, c4), True, 0.0)
    return FlopModel(fit.coefficients, True, _relative(fit(*CHECK), traced(*CHECK)))


def _relative(predicted: float, traced: float) -> float:
    return abs(predicted - traced) / traced if traced else abs(predicted)


@dataclass(frozen=True)
class TrainingFlops:
    """A trial's counted training FLOPs and how they were counted."""

    flops: float
    micro_batches: int
    check_error: float
    """The polynomial's relative error on its check shape: above 1% the model's count is not a
    polynomial in the batch shape (e.g. attention in fixed-size groups) and the figure is approximate."""


def training_flops(model: nn.Module, trainable: list[nn.Parameter], shapes: Iterable[tuple[int, ...]],
                   example: dict[str, torch.Tensor]) -> TrainingFlops:
    """FLOPs of training `model` (its `trainable` parameters) on micro-batches of these (rows, width)
    shapes; `example` is one of the trial's micro-batches. No trainable parameters: nothing trains, 0."""
    shapes = list(shapes)
    if not trainable or not shapes:
        return TrainingFlops(0.0, len(shapes), 0.0)
    fit = flop_model(model, example)
    return TrainingFlops(sum(fit(*shape) for shape in shapes), len(shapes), fit.check_error)


# ---------------------------------------------------------------- peak


MATMUL_SIZES = (512, 1024, 2048)
BUDGET_S = 1.5
"""The measurement stops after this long (the largest size is then timed fewer times)."""


def _measure(device: str, threads: int, dtype: str) -> float:
    """The best FLOP rate of square matmuls at MATMUL_SIZES on `device` with `threads` torch threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    best = 0.0
    deadline = time.perf_counter() + BUDGET_S
    try:
        for n in MATMUL_SIZES:
            a = torch.randn(n, n, dtype=getattr(torch, dtype), device=device)
            b = torch.randn(n, n, dtype=getattr(torch, dtype), device=device)
            torch.mm(a, b)  # warm-up: allocation, kernel selection
            for rep in range(5):
                sync()
                start = time.perf_counter()
                torch.mm(a, b)
                sync()
                best = max(best, 2 * n**3 / (time.perf_counter() - start))
                if rep >= 1 and time.perf_counter() > deadline:
                    break
    finally:
        torch.set_num_threads(before)
    return best


@dataclass(frozen=True)
class Peak:
    """The machine's achievable matmul rate, and where the figure came from."""

    flops_per_s: float
    source: str
    """measured (this call timed it) or cached (read from the machine's file)."""
    machine_class: str
    device: str
    threads: int
    dtype: str
    measured_at: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def cache_path(machine: str | None = None):
    from bench.paths import cache_dir
    from bench.regression.calibrate import machine_class

    return cache_dir() / "machine" / f"{machine or machine_class()}.json"


def peak_flops(device: str = "cpu", threads: int | None = None, dtype: str = "float32",
               measure: Callable[[str, int, str], float] | None = None) -> Peak:
    """The machine's matmul peak for (device, threads, dtype): read from the machine class's cache
    file, or measured (about a second) and stored there. An unreadable cache file is remeasured with a
    warning. `measure` replaces the timing (tests)."""
    from bench.paths import locked
    from bench.regression.calibrate import machine_class

    threads = threads or torch.get_num_threads()
    machine = machine_class()
    path = cache_path(machine)
    key = f"{device}/{dtype}/threads={threads}"
    # Processes that miss the cache together (trials side by side) would each time the peak while the
    # others do, slowing each other: one lane stored 133, the other 154 GFLOP/s for one key. One measures.
    with locked(path):
        entries: dict[str, Any] = {}
        if path.exists():
            try:
                entries = json.loads(path.read_text())
                entry = entries.get(key) if isinstance(entries, dict) else None
                if not isinstance(entries, dict) or (
                        entry is not None and not (isinstance(entry, dict) and entry.get("flops_per_s", 0) > 0)):
                    raise ValueError(f"entry {key!r} is not an object with a positive flops_per_s")
            except (OSError, ValueError) as exc:
                warnings.warn(f"{path}: unreadable machine peak cache ({type(exc).__name__}: {exc}); measuring again", stacklevel=2)
                entries, entry = {}, None
            if entry is not None:
                return Peak(float(entry["flops_per_s"]), "cached", machine, device, threads, dtype, str(entry.get("measured_at", "")))
        rate = (measure or _measure)(device, threads, dtype)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        entries[key] = {"flops_per_s": rate, "measured_at": stamp, "sizes": list(MATMUL_SIZES)}
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries, indent=1, sort_keys=True))
        tmp.replace(path)
    return Peak(rate, "measured", machine, device, threads, dtype, stamp)


def utilization(train_flops: float, train_s: float | None, peak: Peak | None) -> dict[str, Any]:
    """What a result stores: the counted FLOPs, the achieved rate and its fraction of the peak
    (None where nothing trained or nothing was timed)."""
    achieved = train_flops / train_s if train_flops and train_s else None
    return {"train_flops": train_flops, "achieved_flops_per_s": achieved,
            "peak_flops_per_s": peak.flops_per_s if peak else None,
            "fraction": achieved / peak.flops_per_s if achieved and peak else None,
            "peak_source": peak.to_dict() if peak else None}


MEMO = memo.Memo("flops")
MEMO_CODE = ("methods/*.py", "bench/models/*.py", "bench/trial/flops.py", "bench/trial/loss.py")
"""The code a count depends on besides the packages: the methods, model loading, this module and the loss it traces."""


def cached_flop_model(model: nn.Module, example: dict[str, torch.Tensor], spec: dict[str, Any]) -> tuple[FlopModel, str]:
    """flop_model, cached on disk per model, method and code (bench.trial.memo): trials that differ only in
    training settings (optimizer, learning rate, epochs, seed) run the same products, so a sweep traces each
    adapted model once. The key holds the model and method specs, the example's shapes beyond rows and width
    (image sizes), torch's and transformers' versions and a digest of the code (MEMO_CODE). Returns the
    model and whether it was "cached" or "traced"."""
    width = _text_width(example)
    shapes = {k: [d for i, d in enumerate(v.shape) if i > 1 or (i == 1 and v.shape[1] != width)] for k, v in example.items()}
    key = [spec["model"], spec["method"], shapes, next(iter(example.values())).device.type, VERSION,
           memo.versions("torch", "transformers"), memo.code_digest(memo.sources(*MEMO_CODE))]
    if (stored := MEMO.get(key)) is not None:
        try:
            return FlopModel(tuple(float(c) for c in stored["coefficients"]), bool(stored["text"]), float(stored["check_error"])), "cached"
        except (KeyError, TypeError, ValueError):  # not a stored fit: trace again
            pass
    fit = flop_model(model, example)
    MEMO.put(key, asdict(fit))
    return fit, "traced"


def of_trial(adapted, dataset, spec: dict[str, Any], collate, device: torch.device, shapes: list[tuple[int, int, int | None]],
             train_s: float | None) -> dict[str, Any]:
    """A trained trial's `runtime.utilization`: the FLOPs of its micro-batches (`shapes`, as training ran
    them: bench.trial.train.TrainResult.batch_shapes) counted on the adapted model (cached_flop_model,
    traced on the trial's first micro-batch, drawn again with the same seed and collate), and the
    machine's peak for this device, thread count and the model's dtype. Call it outside the timed window."""
    from bench.trial.train import batches

    if not adapted.trainable or not shapes:
        return {**utilization(0.0, train_s, None), "micro_batches": 0}
    example = {k: v.to(device) for k, v in next(batches(dataset, spec["train"], collate, torch.device("cpu"))).items()}
    fit, how = cached_flop_model(adapted.model, example, spec)
    flops = sum(fit(*shape) for shape in shapes)
    peak = peak_flops(device.type, torch.get_num_threads(), spec["model"].get("dtype", "float32"))
    return {**utilization(flops, train_s, peak), "micro_batches": len(shapes), "check_error": fit.check_error, "count": how}

"""The one training loop. Every method trains through it, so differences between methods are
the methods' own and not the loop's. Read it top to bottom: data, optimizer, schedule, steps.
"""

from __future__ import annotations

import collections
import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from bench.trial.loss import batch_shape, keeps_logits, loss
from bench.tasks.tokens import packed_tokens
from bench.trial.measure import StepTimer, grad_bytes, optimizer_bytes, saved_for_backward
from methods.base import Adapted


class Diverged(RuntimeError):
    """The loss became NaN or infinite."""


FUSED_DEVICES = ("cpu", "cuda")
"""Devices where torch has a fused AdamW (one op updates every tensor of a group)."""


def _adamw(groups, t: dict[str, Any]) -> torch.optim.Optimizer:
    """torch's AdamW, fused where every tensor allows it. The default on the CPU (a Python for-loop)
    runs about ten small ops per tensor; all-linear LoRA on SmolLM2-135M trains 420 tensors, which
    made the optimizer step a visible part of a ~2 s training step (benchmarks/lora_step.py); the
    fused op updates a whole group in one call, about four times faster there. Same update rule;
    rounding differs from the for-loop at float32 precision (tests/test_lora_autograd.py compares
    the two)."""
    params = [p for g in groups for p in g["params"]]
    fused = all(p.is_floating_point() and p.device.type in FUSED_DEVICES for p in params)
    optimizer = torch.optim.AdamW(groups, lr=t["lr"], weight_decay=t["weight_decay"], fused=fused)
    if fused:
        optimizer.peftbench_note = "torch AdamW, fused=True (one fused update per parameter group)"
    return optimizer


def _sgd(groups, t: dict[str, Any]) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=t["lr"], momentum=t["momentum"], weight_decay=t["weight_decay"])


def _adamw_8bit(groups, t: dict[str, Any]) -> torch.optim.Optimizer:
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit(groups, lr=t["lr"], weight_decay=t["weight_decay"])


def _paged(name: str) -> Callable[[Any, dict[str, Any]], torch.optim.Optimizer]:
    """A bitsandbytes paged optimizer (state in CUDA unified memory, evicted to the host under
    memory pressure). Paging needs CUDA: elsewhere bitsandbytes warns and runs unpaged, so we
    build the unpaged one ourselves and leave a note that the result records."""

    def build(groups, t: dict[str, Any]) -> torch.optim.Optimizer:
        import bitsandbytes as bnb

        device = groups[0]["params"][0].device
        paged = device.type == "cuda"
        optimizer = getattr(bnb.optim, f"Paged{name}" if paged else name)(groups, lr=t["lr"], weight_decay=t["weight_decay"])
        optimizer.peftbench_note = (  # read by train(): see TrainResult.optimizer_note
            "paged: state in CUDA unified memory, outside torch's allocator peak (counted in memory.accounted.optimizer)"
            if paged else f"paged optimizers need CUDA: ran unpaged bitsandbytes {name} on {device.type}")
        return optimizer

    return build


OPTIMIZERS: dict[str, Callable[[Any, dict[str, Any]], torch.optim.Optimizer]] = {
    "adamw": _adamw,
    "sgd": _sgd,
    "adamw-8bit": _adamw_8bit,
    "paged-adamw": _paged("AdamW"),
    "paged-adamw-8bit": _paged("AdamW8bit"),
}


def _constant(progress: float) -> float:
    return 1.0


def _linear(progress: float) -> float:
    return max(0.0, 1.0 - progress)


def _cosine(progress: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


SCHEDULES: dict[str, Callable[[float], float]] = {"constant": _constant, "linear": _linear, "cosine": _cosine}


def lr_lambda(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    decay = SCHEDULES[schedule]

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return decay((step - warmup) / max(1, total - warmup))

    return factor


def _times(schedule: Callable[[int], float], multiplier: Callable[[int], float]) -> Callable[[int], float]:
    return lambda step: schedule(step) * multiplier(step)


@dataclass
class TrainResult:
    steps: int = 0
    tokens: int = 0
    """Target (non-masked) plus context tokens processed, padding excluded."""
    loss_curve: list[float] = field(default_factory=list)
    lr_curve: list[float] = field(default_factory=list)
    """The first parameter group's learning rate at each optimizer step, as the step applied it."""
    step_times: list[float] = field(default_factory=list)
    step_s_median: float | None = None
    accounted: dict[str, int] = field(default_factory=dict)
    """grads, optimizer and activations bytes measured on the first step."""
    optimizer_class: str | None = None
    """The optimizer that actually ran (a paged one falls back to unpaged off CUDA)."""
    optimizer_note: str | None = None
    """Why the optimizer that ran differs from the one asked for, or what its numbers mean."""
    logits: str | None = None
    """Where the loss projected onto the vocabulary: "labelled" (only positions whose next token is
    labelled, see bench.trial.loss) or "all" (the model's own loss); None when nothing trained."""
    batch_shapes: list[tuple[int, int, int | None]] = field(default_factory=list)
    """Each micro-batch as it ran, in order: bench.trial.loss.batch_shape (rows, width, kept), which
    the trial's FLOP count sums over without drawing the batches a second time."""


def _tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens a micro-batch holds, padding excluded; rows for images (no tokens)."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    if "position_ids" in batch:
        return packed_tokens(batch)
    return batch["input_ids"].numel() if "input_ids" in batch else len(batch["labels"])


def total_steps(n_examples: int, t: dict[str, Any]) -> int:
    if t["max_steps"]:
        return t["max_steps"]
    per_epoch = math.ceil(math.ceil(n_examples / t["batch_size"]) / t["grad_accum"])
    return per_epoch * t["epochs"]


def batches(dataset, t: dict[str, Any], collate, device: torch.device):
    """Micro-batches forever, reshuffled each epoch with the trial's seed."""
    generator = torch.Generator().manual_seed(t["seed"])
    while True:
        loader = torch.utils.data.DataLoader(dataset, batch_size=t["batch_size"], shuffle=True,
                                             generator=generator, collate_fn=collate)
        for batch in loader:
            yield {k: v.to(device) for k, v in batch.items()}


class Lookahead:
    """An iterator whose upcoming items can be read ahead (peek) without being consumed."""

    def __init__(self, items: Iterator[Any]):
        self._items, self._ahead = items, collections.deque()

    def __iter__(self) -> Lookahead:
        return self

    def __next__(self) -> Any:
        return self._ahead.popleft() if self._ahead else next(self._items)

    def peek(self) -> Iterator[Any]:
        i = 0
        while True:
            if i == len(self._ahead):
                self._ahead.append(next(self._items))
            yield self._ahead[i]
            i += 1


def train(adapted: Adapted, dataset, t: dict[str, Any], collate, device: torch.device,
          progress: Callable[[int, int, float], None] | None = None) -> TrainResult:
    """Train `adapted.trainable` on `dataset` with the settings of a suite's [train] table."""
    result = TrainResult()
    if not adapted.trainable:  # frozen baseline: nothing to train
        return result
    torch.manual_seed(t["seed"])
    model = adapted.model
    model.train()
    groups = adapted.hooks.param_groups(adapted.trainable) if adapted.hooks.param_groups else [{"params": adapted.trainable}]
    optimizer = OPTIMIZERS[t["optimizer"]](groups, t)
    result.optimizer_class = f"{type(optimizer).__module__}.{type(optimizer).__name__}"
    result.optimizer_note = getattr(optimizer, "peftbench_note", None)
    steps = total_steps(len(dataset), t)
    factor = lr_lambda(t["schedule"], t["warmup_steps"], steps)
    if adapted.hooks.lr_multiplier:
        factor = _times(factor, adapted.hooks.lr_multiplier)
    # One schedule per group, times the group's lr_scale, which on_epoch hooks may change.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, [lambda s, g=g: factor(s) * g.setdefault("lr_scale", 1.0) for g in optimizer.param_groups])
    timer = StepTimer()
    stream = Lookahead(batches(dataset, t, collate, device))
    per_epoch = total_steps(len(dataset), {**t, "max_steps": None, "epochs": 1})

    for step in range(steps):
        if adapted.hooks.on_epoch and step % per_epoch == 0:
            adapted.hooks.on_epoch(step // per_epoch, stream.peek(), optimizer)
            for group, base, rate in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
                group["lr"] = base * rate(step)
        with timer:
            loss_sum = 0.0
            for micro in range(t["grad_accum"]):
                batch = next(stream)
                result.batch_shapes.append(batch_shape(batch))  # sizes and a count of labelled positions: microseconds
                first = step == 0 and micro == 0
                with saved_for_backward(model) if first else contextlib.nullcontext({"bytes": 0}) as saved:
                    value = loss(model, batch)
                if not torch.isfinite(value):
                    raise Diverged(f"loss is {value.item()} at step {step}")
                (value / t["grad_accum"]).backward()
                loss_sum += value.item()
                result.tokens += _tokens(batch)
                if first:
                    result.accounted["activations"] = saved["bytes"]
                    result.logits = "labelled" if keeps_logits(model, batch) else "all"
            if t["clip"]:
                torch.nn.utils.clip_grad_norm_(adapted.trainable, t["clip"])
            if step == 0:
                result.accounted["grads"] = grad_bytes(adapted.trainable)
            result.lr_curve.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
            if step == 0:
                result.accounted["optimizer"] = optimizer_bytes(optimizer)
            optimizer.zero_grad(set_to_none=True)
            if adapted.hooks.on_step:
                adapted.hooks.on_step(step, optimizer)
        result.loss_curve.append(loss_sum / t["grad_accum"])
        if progress:
            progress(step + 1, steps, result.loss_curve[-1])
    model.eval()
    result.steps = steps
    result.step_times = timer.times
    result.step_s_median = timer.median()
    return result

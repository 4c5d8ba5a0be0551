"""Auto-RGN: surgical fine-tuning that picks its layers itself, by relative gradient norm.

Lee, Chen, Tajwar, Kumar, Yao, Liang, Finn, "Surgical Fine-Tuning Improves Adaptation to
Distribution Shifts", ICLR 2023, arXiv 2210.11466, section 5.

Every tensor is trainable. Before each epoch, on the epoch's first few training batches, each
tensor's relative gradient norm RGN = ||g|| / ||theta|| is averaged over the batches and divided
by the largest one; the result multiplies that tensor's learning rate, so the tensors whose
gradients are large next to their weights (the blocks the shift touches) move most. As in the
reference implementation, the multipliers are recomputed at the start of every epoch and the
per-batch RGNs are averaged (not the gradients).

Two choices of the reference (anniesch/surgical-finetuning, main.py, commit effeec3) are options
here, off by default so that committed results keep their meaning: it builds a new Adam at every
epoch with the new rates, so Adam's moments and step count start over each epoch
(reset_moments = true clears the optimizer's state at each epoch to the same effect; by default
the moments carry over), and it leaves every tensor whose name contains "bn" (the BatchNorm
layers) out of the optimizer (skip_norms = true freezes the normalisation layers' tensors; by
default they are ranked and trained like the others).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from methods.base import Adapted, ConfigError, MethodConfig, require_float, TrainHooks
from methods.layers import blocks


@dataclass(frozen=True, kw_only=True)
class AutoRGNConfig(MethodConfig):
    probe_batches: int = 5
    """Training micro-batches whose gradients set the multipliers at each epoch (the reference uses 5)."""
    reset_moments: bool = False
    """Clear the optimizer's state (Adam's moments, step count) at every epoch, as the reference's per-epoch new Adam does."""
    skip_norms: bool = False
    """Freeze the normalisation layers' tensors, as the reference (which skips its "bn" tensors) does."""

    def validate(self) -> None:
        if self.probe_batches < 1:
            raise ConfigError("probe_batches", f"must be >= 1, got {self.probe_batches}")


def multipliers(rgn: list[float], weight_norms: list[float]) -> list[float]:
    """RGN / max RGN, in [0, 1] with maximum 1. A tensor whose weights are all zero has no
    relative norm: it keeps the full rate (1) and does not enter the max; if every gradient is
    zero there is nothing to rank and every tensor keeps the full rate."""
    ranked = [r for r, w in zip(rgn, weight_norms, strict=True) if w > 0]
    top = max(ranked, default=0.0)
    if top <= 0:
        return [1.0] * len(rgn)
    return [min(1.0, r / top) if w > 0 else 1.0 for r, w in zip(rgn, weight_norms, strict=True)]


class _RGN:
    """The per-tensor learning-rate multipliers of one adapted model, and their history."""

    def __init__(self, model: nn.Module, cfg: AutoRGNConfig):
        self.model, self.cfg = model, cfg
        skipped = norm_parameter_ids(model) if cfg.skip_norms else set()
        named = {id(p): (n, p) for n, p in model.named_parameters() if id(p) not in skipped}  # shared tensors once
        self.names = [n for n, _ in named.values()]
        self.params = [p for _, p in named.values()]
        self.block_of = _block_of(model, self.names)
        self.history: list[dict[str, Any]] = []

    def param_groups(self, trainable: list[nn.Parameter]) -> list[dict[str, Any]]:
        # One group per tensor, so that each can get its own rate through lr_scale.
        ids = {id(p) for p in trainable}
        assert ids == {id(p) for p in self.params}, "Auto-RGN trains every tensor of the model (but norms, with skip_norms)"
        return [{"params": [p], "lr_scale": 1.0} for p in self.params]

    def measure(self, batches: Iterator[dict[str, Tensor]]) -> list[float]:
        sums = [0.0] * len(self.params)
        count = 0
        for batch in itertools.islice(batches, self.cfg.probe_batches):
            # autograd.grad leaves .grad alone: the training step's gradients are its own.
            grads = torch.autograd.grad(self.model(**batch).loss, self.params, allow_unused=True)
            with torch.no_grad():
                for i, (p, g) in enumerate(zip(self.params, grads, strict=True)):
                    w = float(p.detach().float().norm())
                    if g is not None and w > 0:
                        sums[i] += float(g.float().norm()) / w
            count += 1
        return [s / max(count, 1) for s in sums]

    def on_epoch(self, epoch: int, batches: Iterator[dict[str, Tensor]], optimizer: torch.optim.Optimizer) -> None:
        if self.cfg.reset_moments:
            optimizer.state.clear()  # what a new optimizer starts with: no moments, step 0
        rgn = self.measure(batches)
        norms = [float(p.detach().float().norm()) for p in self.params]
        scale = multipliers(rgn, norms)
        for group, value in zip(optimizer.param_groups, scale, strict=True):
            group["lr_scale"] = value
        by_block: dict[str, list[float]] = {}
        for name, value in zip(self.names, scale, strict=True):
            by_block.setdefault(self.block_of[name], []).append(value)
        self.history.append(
            {
                "epoch": epoch,
                "multipliers": dict(zip(self.names, scale, strict=True)),
                "rgn": dict(zip(self.names, rgn, strict=True)),
                "mean_by_block": {k: sum(v) / len(v) for k, v in by_block.items()},
            }
        )

    def report(self) -> dict[str, Any]:
        return {"probe_batches": self.cfg.probe_batches, "epochs": self.history}


def norm_parameter_ids(model: nn.Module) -> set[int]:
    """The tensors of every normalisation layer (LayerNorm, RMSNorm, BatchNorm, ...)."""
    return {id(p) for m in model.modules() if "norm" in type(m).__name__.lower() for p in m.parameters(recurse=False)}


def _block_of(model: nn.Module, names: list[str]) -> dict[str, str]:
    """Map each tensor name to "block i" (inside the repeated blocks) or "other" (stem, embeddings, head)."""
    try:
        layers = blocks(model)
    except ConfigError:
        return dict.fromkeys(names, "other")
    owner = {id(p): f"block {i}" for i, block in enumerate(layers) for p in block.parameters()}
    params = dict(model.named_parameters())
    return {n: owner.get(id(params[n]), "other") for n in names}


class AutoRGN:
    name = "auto_rgn"
    version = "1"
    Config = AutoRGNConfig
    init_atol: ClassVar[float] = 0.0
    battery_configs: ClassVar[list[dict[str, Any]]] = [
        {"probe_batches": 2},
        {"probe_batches": 1, "reset_moments": True, "skip_norms": True},
    ]

    def apply(self, model: nn.Module, cfg: AutoRGNConfig) -> Adapted:
        require_float(list(model.named_parameters()), self.name)
        state = _RGN(model, cfg)
        for p in model.parameters():
            p.requires_grad_(False)
        for p in state.params:
            p.requires_grad_(True)
        hooks = TrainHooks(param_groups=state.param_groups, on_epoch=state.on_epoch, report=state.report)
        return Adapted(model=model, trainable=list(state.params), hooks=hooks)

    def expected_trainable(self, model: nn.Module, cfg: AutoRGNConfig) -> int:
        """Every stored parameter, tied ones once (as full fine-tuning); without the norms' with skip_norms."""
        skipped = norm_parameter_ids(model) if cfg.skip_norms else set()
        unique = {id(p): p for _, p in model.named_parameters(remove_duplicate=False)}
        return sum(p.numel() for i, p in unique.items() if i not in skipped)

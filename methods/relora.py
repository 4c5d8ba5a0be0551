"""ReLoRA: High-Rank Training Through Low-Rank Updates (Lialin et al. 2023, arXiv 2307.05695).

LoRA with restarts. Every `reset_every` optimizer steps each update scaling * B A is merged into
its frozen weight W, A is drawn afresh and B zeroed (so the restart leaves the model's outputs
unchanged), the adapter's optimizer moments are pruned by magnitude, and the learning rate drops
to zero and warms up again (the "jagged" schedule). A sum of k rank-r updates can reach rank k r,
so the total change W_final - W_0 is not confined to rank r, which is the paper's point.

Differences from the paper, which pre-trains from scratch:
- no full-rank warm start: the base is a pretrained model, as in every method of this suite;
- only the adapters train; the paper also trains the layers it does not wrap (embeddings, norms,
  head) fully;
- the jag multiplies the suite's schedule (cosine in the paper) instead of warming up towards the
  envelope's value at the end of the warm-up (Guitaricet/relora, commit 176f376,
  peft_pretraining/training_utils.py `_get_cosine_schedule_with_multiple_warmups_lambda`): the
  same curve up to how the envelope moves during the restart's few warm-up steps (the hook
  that jags sees only the step, not the suite's schedule);
- the order of the zero-learning-rate step: by default the merge follows step k R - 1 and the
  step with learning rate 0 comes right after it (k R), on the fresh adapter; in the reference
  (torchrun_main.py, "MERGE AND REINIT": the merge and the optimizer reset run when
  update_step % relora == 1) the zero-rate step k R comes first, on the old adapter, and the merge
  and the pruning follow it. zero_lr_before_merge = true takes the reference's order (an option,
  so that committed results keep their meaning);
- prune_ratio 0.99 is magnitude pruning of the moments as the paper describes it; the reference
  code offers magnitude pruning (--optimizer_magnitude_pruning, its README recommends 0.9) or a
  reset (--reset_optimizer_on_relora, the default of its example commands, implemented in
  training_utils.py `optimizer_reset` as random pruning with ratio 0.999). The paper's 99% figure
  could not be checked against the paper's text here: unverified;
- the saved adapter holds the merged weights of the targeted layers once a restart has happened
  (their change is full rank: no low-rank file can carry it).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from methods.base import Adapted, AdapterFileError, ConfigError, copy_checked, load_safetensors, save_safetensors, Targets, TrainHooks
from methods.layers import resolve_targets
from methods.lora import LoRA, LoRAConfig, LoRALinear, lora_layers

BASE_FILE = "relora_base.safetensors"
"""The targeted layers' weights with every merged restart in them (empty before the first restart)."""


@dataclass(frozen=True, kw_only=True)
class ReLoRAConfig(LoRAConfig):
    targets: Targets = "all-linear"
    """Which linear layers get an adapter; the paper wraps every attention and feed-forward layer."""
    reset_every: int = 100
    """Optimizer steps between merge-and-reinit restarts (the paper: 5000 in pre-training)."""
    prune_ratio: float = 0.99
    """Fraction of each optimizer moment of the adapter zeroed at a restart, smallest magnitudes
    first (the paper: 0.99); 1.0 zeroes them all (a full reset)."""
    restart_warmup: int = 10
    """Steps of linear learning-rate warm-up from zero after each restart (the paper: 50 to 100);
    0 keeps the suite's schedule unjagged."""
    zero_lr_before_merge: bool = False
    """The reference's order: the zero-learning-rate step k R runs on the old adapter and the merge
    follows it (default: the merge follows step k R - 1, then the zero-rate step)."""

    def validate(self) -> None:
        super().validate()
        if self.reset_every < 1:
            raise ConfigError("reset_every", f"must be >= 1, got {self.reset_every}")
        if not 0 <= self.prune_ratio <= 1:
            raise ConfigError("prune_ratio", f"must be in [0, 1], got {self.prune_ratio}")
        if not 0 <= self.restart_warmup < self.reset_every:
            raise ConfigError("restart_warmup", f"must be in [0, reset_every={self.reset_every}), got {self.restart_warmup}")


def restarts_after(step: int, cfg: ReLoRAConfig) -> bool:
    """Whether a merge-and-reinit follows the optimizer step with this 0-based index: steps
    R - 1, 2 R - 1, ... by default, R, 2 R, ... (each zero-rate step) in the reference's order."""
    if cfg.zero_lr_before_merge:
        return step >= cfg.reset_every and step % cfg.reset_every == 0
    return (step + 1) % cfg.reset_every == 0


def jagged(step: int, reset_every: int, restart_warmup: int) -> float:
    """The factor on the suite's schedule for the step with this 0-based index: 0 on the first
    step after each restart, rising linearly back to 1 over `restart_warmup` steps."""
    if step < reset_every or restart_warmup == 0:
        return 1.0
    return min(1.0, (step % reset_every) / restart_warmup)


@torch.no_grad()
def prune_by_magnitude_(t: Tensor, ratio: float) -> None:
    """Zero exactly round(ratio * numel) entries of `t`, those of smallest magnitude, in place."""
    n = t.numel()
    keep = n - round(ratio * n)
    if keep == n:
        return
    mask = torch.zeros(n, dtype=torch.bool, device=t.device)
    mask[t.abs().flatten().topk(keep).indices] = True
    t.masked_fill_(~mask.view_as(t), 0)


def moments(optimizer: torch.optim.Optimizer, p: nn.Parameter) -> dict[str, Tensor]:
    """The per-element state of `p` (Adam's exp_avg and exp_avg_sq, bitsandbytes' state1 and
    state2, SGD's momentum): every state tensor shaped like the parameter."""
    return {k: v for k, v in optimizer.state.get(p, {}).items() if isinstance(v, Tensor) and v.shape == p.shape}


def check_prunable(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
    for p in params:
        for key, t in moments(optimizer, p).items():
            if not t.is_floating_point():
                raise ConfigError(
                    "train.optimizer",
                    f"ReLoRA prunes the optimizer moments by magnitude, but {type(optimizer).__name__} keeps {key!r} "
                    f"quantized ({t.dtype}); use adamw, paged-adamw or sgd",
                )


@torch.no_grad()
def merge_and_reinit(layer: LoRALinear) -> None:
    """Move scaling * B A into W and start a fresh adapter (A random, B = 0): outputs unchanged."""
    if layer.merged:
        raise RuntimeError("a ReLoRA restart met a layer merged for inference; unmerge before training on")
    weight = layer.base_layer.weight
    if not weight.is_floating_point():
        raise NotImplementedError(f"cannot merge into a quantized base weight ({type(layer.base_layer).__name__})")
    delta = layer.delta_weight()
    # One rounding to W's dtype: adding a bf16-rounded update to a bf16 W would round twice, every restart.
    weight.copy_((weight.to(delta.dtype) + delta).to(weight.dtype))
    nn.init.kaiming_uniform_(layer.lora_A, a=math.sqrt(5))
    layer.lora_B.zero_()


def saved_resets(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        value = (f.metadata() or {}).get("resets", "")
    if not value.isdigit():
        raise AdapterFileError(f"{path}: metadata 'resets' is {value!r}, expected a count of restarts")
    return int(value)


class ReLoRA:
    name = "relora"
    version = "1"
    init_atol: ClassVar[float] = 0.0
    Config = ReLoRAConfig
    battery_configs: ClassVar[list[dict[str, Any]]] = [
        {"r": 2, "targets": "qv", "reset_every": 10, "restart_warmup": 2},
        {"r": 2, "targets": "all-linear", "reset_every": 12, "prune_ratio": 1.0, "restart_warmup": 0},
    ]

    def apply(self, model: nn.Module, cfg: ReLoRAConfig) -> Adapted:
        for name, layer in resolve_targets(model, cfg.targets):
            if not layer.weight.is_floating_point():
                raise ConfigError(
                    "model.quant",
                    f"ReLoRA merges its updates into the base weights, but {name} is quantized "
                    f"({type(layer).__name__}, {layer.weight.dtype}); use a bf16 or fp32 base",
                )
        adapted = LoRA().apply(model, cfg)
        layers = lora_layers(model)
        lora_params = adapted.trainable
        resets = [0]
        checked = [False]

        def on_step(step: int, optimizer: torch.optim.Optimizer) -> None:
            if not checked[0]:  # fail on the first step, not at the first restart
                check_prunable(optimizer, lora_params)
                checked[0] = True
            if not restarts_after(step, cfg):
                return
            for layer in layers.values():
                merge_and_reinit(layer)
            for p in lora_params:
                for t in moments(optimizer, p).values():
                    prune_by_magnitude_(t, cfg.prune_ratio)
            resets[0] += 1

        def weights() -> dict[str, Tensor]:
            return {f"{name}.weight": layer.base_layer.weight for name, layer in layers.items()}

        def save(directory: Path) -> None:
            adapted.save(directory)
            merged = [layer for layer in layers.values() if layer.merged]  # W must not hold the live adapter too
            for layer in merged:
                layer.unmerge()
            save_safetensors(weights() if resets[0] else {}, directory / BASE_FILE, metadata={"resets": str(resets[0])})
            for layer in merged:
                layer.merge()

        def load(directory: Path) -> None:
            path = Path(directory) / BASE_FILE
            state = load_safetensors(path)
            if not state and resets[0]:
                raise AdapterFileError(
                    f"{path}: saved before any restart, but this model's weights already hold {resets[0]} merged "
                    "restart(s); load it into a fresh base model"
                )
            # Each step unmerges merged layers and merges them again, so W ends as W_saved + the loaded B A.
            copy_checked(weights() if state else {}, state, path, layers.values(), what="merged ReLoRA weight")
            adapted.load(directory)  # A and B, checked against r and alpha
            resets[0] = saved_resets(path) if state else resets[0]

        hooks = TrainHooks(on_step=on_step, lr_multiplier=lambda step: jagged(step, cfg.reset_every, cfg.restart_warmup))
        return dataclasses.replace(adapted, hooks=hooks, save_fn=save, load_fn=load)

    def expected_trainable(self, model: nn.Module, cfg: ReLoRAConfig) -> int:
        """As LoRA: r * (in + out) per target (restarts change values, never the count)."""
        return LoRA().expected_trainable(model, cfg)

"""LoRA: Low-Rank Adaptation of Large Language Models (Hu et al. 2021, arXiv 2106.09685).

Each targeted linear layer W stays frozen and gains a trainable low-rank update:
h = W x + (alpha / r) * B A x, with A (r x in) random and B (out x r) zero, so training starts
from the unchanged model. rslora (Kalajdzievski 2023, "A Rank Stabilization Scaling Factor for
Fine-Tuning with LoRA", arXiv 2312.03732) scales by alpha / sqrt(r) instead.

Adapters are saved in Hugging Face peft's on-disk format (adapter_config.json and
adapter_model.safetensors) so that `peft.PeftModel.from_pretrained` loads them unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

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
    Targets,
    write_json,
)
from methods.layers import Conv1D, modules_of, replace_module, resolve_targets

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# peft saves tensors under the PeftModel wrapper's prefix, with the adapter name stripped.
PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True, kw_only=True)
class LowRankConfig(MethodConfig):
    """The settings every method with a B A update shares (LoRA, LoftQ, QA-LoRA, LQ-LoRA)."""

    r: int = 8
    """Rank of the update B A."""
    alpha: float = 16
    """Scale numerator: the update is multiplied by alpha / r."""
    dropout: float = 0.0
    """Dropout on the input of the low-rank branch only."""
    targets: Targets = "qv"
    """Which linear layers get an adapter (see methods.layers.resolve_targets)."""

    def validate(self) -> None:
        if self.r < 1:
            raise ConfigError("r", f"must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ConfigError("alpha", f"must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigError("dropout", f"must be in [0, 1), got {self.dropout}")


@dataclass(frozen=True, kw_only=True)
class LoRAConfig(LowRankConfig):
    rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r) instead of alpha / r (Kalajdzievski 2023, arXiv 2312.03732)."""

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.rslora else self.alpha / self.r

    @property
    def use_dora(self) -> bool:
        """peft's flag for a magnitude vector beside A and B (methods.dora sets it)."""
        return False


def features(layer: nn.Module) -> tuple[int, int]:
    """(in, out) of a Linear, a Conv1D or a quantized Linear (whose weight is packed: 4-bit
    weights are stored as a (n / 2, 1) byte tensor, so its shape says nothing)."""
    if isinstance(layer, Conv1D):
        return tuple(layer.weight.shape)
    return layer.in_features, layer.out_features


def check_rank(targets: list[tuple[str, nn.Module]], rank: int, key: str = "r") -> None:
    """Refuse a rank for which each factor alone outgrows the weight it adapts (rank > max(in, out),
    so A is r x in > out x in and B is out x r > out x in), naming the first such layer. Every
    method with a B A update on its targets checks here.

    Ranks between min(in, out) and max(in, out) are accepted: the update's rank is capped at
    min(in, out) there, but a fixed rank grid (Raschka's r = 256, suites/lora_vs_qlora.toml) must
    still run on a model whose grouped-query key and value projections are narrow (SmolLM2-135M's
    v_proj: 576 in, 192 out)."""
    for name, layer in targets:
        fin, fout = features(layer)
        if rank > max(fin, fout):
            raise ConfigError(key, f"{rank} exceeds both dimensions of {name} ({fin} in x {fout} out): "
                                   f"each factor would be larger than the weight itself; use at most {min(fin, fout)}")


class LowRankLinear(torch.autograd.Function):
    """h = W0 x + b + s * B (A x'), the frozen base layer and the LoRA branch in one autograd node
    (Hu et al. 2021, arXiv 2106.09685, eq. 3: h = W0 x + (alpha / r) B A x), x' being x or, with
    dropout, its dropped copy.

    Why this beats autograd over the plain expression: the branch adds into the base output inside
    one GEMM (addmm with beta 1, the scale s as its alpha) instead of materialising a (tokens x out)
    branch and adding it, and in backward the branch's input gradient adds into the base's the same
    way (tokens x in), so each layer saves two full-size temporaries and two elementwise passes per
    step, and autograd walks one node instead of about eight (benchmarks/lora_step.py times it).

    What backward needs, from the forward above with g = dL/dh, u = A x' (tokens x r):
      dL/dx  = g W0 + s (g B) A      W0, A, B: parameters, nothing new to keep
      dL/dA  = s (g B)^T x'          x' (tokens x in), kept only when A trains (LoRA-FA freezes it)
      dL/dB  = s g^T u               u (tokens x r), kept only when B trains
      dL/db  = sum over tokens of g  nothing kept
    W0 gets no gradient (frozen): LoRALinear.fused() sends a base whose weight or bias trains down
    the plain path, which autograd differentiates in full. So the node keeps at most x' and u, what
    autograd keeps for the plain expression too; nothing is kept for W0 beyond the weight itself.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, x_branch: Tensor | None, weight: Tensor, bias: Tensor | None,
                lora_A: Tensor, lora_B: Tensor, scaling: float, fan_in_fan_out: bool) -> Tensor:
        # x_branch None: the branch reads x itself (no dropout), so one input gradient serves both.
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        branch_in = x2 if x_branch is None else x_branch.reshape(-1, x_branch.shape[-1])
        w = weight if fan_in_fan_out else weight.t()  # (in, out) either way: Conv1D stores W0 transposed
        out = torch.mm(x2, w) if bias is None else torch.addmm(bias, x2, w)
        down = torch.mm(branch_in, lora_A.t())
        out.addmm_(down, lora_B.t(), alpha=scaling)
        need_A, need_B = ctx.needs_input_grad[4:6]
        ctx.save_for_backward(branch_in if need_A else None, down if need_B else None, weight, lora_A, lora_B)
        ctx.scaling, ctx.fan_in_fan_out, ctx.shared = scaling, fan_in_fan_out, x_branch is None
        ctx.in_shape, ctx.branch_shape = x.shape, None if x_branch is None else x_branch.shape
        return out.view(*lead, out.shape[-1])

    @staticmethod
    @torch.autograd.function.once_differentiable  # its in-place accumulations have no derivative of their own
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        branch_in, down, weight, lora_A, lora_B = ctx.saved_tensors
        need_x, need_branch, _, need_bias, need_A, need_B = ctx.needs_input_grad[:6]
        g = grad.reshape(-1, grad.shape[-1])
        # s (g B): (tokens x r), the scaled gradient at the branch's middle; small, so scale it here once.
        up = torch.mm(g, lora_B).mul_(ctx.scaling) if need_x or need_branch or need_A else None
        dx = dx_branch = d_bias = dA = dB = None
        if need_x:
            dx = torch.mm(g, weight.t() if ctx.fan_in_fan_out else weight)
            if ctx.shared:
                dx.addmm_(up, lora_A)
            dx = dx.view(ctx.in_shape)
        if need_branch:
            dx_branch = torch.mm(up, lora_A).view(ctx.branch_shape)
        if need_A:
            dA = torch.mm(up.t(), branch_in)
        if need_B:
            # (u^T g)^T, not g^T u: the same product, but the BLAS reads g along its rows this way,
            # two to three times faster on the CPU for a (tokens x out) g and r = 8.
            dB = torch.mm(down.t(), g).mul_(ctx.scaling).t()
        if need_bias:
            d_bias = g.sum(0)
        return dx, dx_branch, None, d_bias, dA, dB, None, None


class LoRALinear(nn.Module):
    """A frozen nn.Linear or transformers Conv1D plus a trainable low-rank branch."""

    def __init__(self, base_layer: nn.Module, r: int, scaling: float, dropout: float = 0.0):
        super().__init__()
        self.base_layer = base_layer
        # Conv1D stores its weight as (in, out), the transpose of nn.Linear's.
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        weight = base_layer.weight
        self.in_features, self.out_features = features(base_layer)
        # Half-precision adapters train poorly; keep them in float32 (as peft does by default).
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, dtype=dtype, device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=dtype, device=weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = scaling
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    @property
    def weight(self) -> Tensor:
        """The base weight, for model code that inspects `layer.weight` (dtype, device)."""
        return self.base_layer.weight

    def fused(self, x: Tensor) -> bool:
        """Whether LowRankLinear can run this layer: a plain frozen Linear or Conv1D without hooks,
        input, base and adapter all in one dtype, no autocast. Anything else (a quantized or
        half-precision base, a base that trains, autocast, hooks that expect the base module to
        run) takes the plain path below, which autograd differentiates in full."""
        base = self.base_layer
        if not (type(base) is nn.Linear or (self.fan_in_fan_out and type(base) is Conv1D)):
            return False
        if base._forward_hooks or base._forward_pre_hooks or base._backward_hooks or base._backward_pre_hooks:
            return False
        if base.weight.requires_grad:
            return False
        if base.bias is not None and base.bias.requires_grad:
            return False
        device = x.device.type  # meta (bench/trial/forecast.py) has no autocast to ask about
        autocast = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
        return x.dtype == base.weight.dtype == self.lora_A.dtype and not autocast

    def forward(self, x: Tensor) -> Tensor:
        if not self.merged and self.fused(x):
            base = self.base_layer
            dropped = self.dropout(x) if isinstance(self.dropout, nn.Dropout) and self.training else None
            return LowRankLinear.apply(x, dropped, base.weight, base.bias, self.lora_A, self.lora_B, self.scaling, self.fan_in_fan_out)
        result = self.base_layer(x)
        if self.merged:
            return result
        # Two thin matmuls: never materialise the (out x in) product B A while training. The
        # scaling goes on B (out x r), not on the (tokens x out) branch: one full-size
        # elementwise op less per layer, forward and backward.
        branch = F.linear(F.linear(self.dropout(x.to(self.lora_A.dtype)), self.lora_A), self.lora_B * self.scaling)
        return result + branch.to(result.dtype)

    def adapter_tensors(self) -> dict[str, nn.Parameter]:
        """The tensors an adapter file holds for this layer, by peft's key suffix (subclasses add theirs)."""
        return {"lora_A.weight": self.lora_A, "lora_B.weight": self.lora_B}

    def delta_weight(self) -> Tensor:
        """scaling * B A, laid out like the base weight."""
        delta = (self.lora_B @ self.lora_A) * self.scaling
        return delta.T if self.fan_in_fan_out else delta

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            weight = self.base_layer.weight
            if not weight.is_floating_point():  # packed 4-bit or int8: adding would corrupt it
                raise NotImplementedError(f"cannot merge into a quantized base weight ({type(self.base_layer).__name__})")
            weight.add_(self.delta_weight().to(weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            weight = self.base_layer.weight
            weight.sub_(self.delta_weight().to(weight.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.lora_A.shape[0]}, scaling={self.scaling:g}, merged={self.merged}"


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Wrapped layers by module path, in model order."""
    return modules_of(model, LoRALinear)


def is_causal_lm(model: nn.Module) -> bool:
    can_generate = getattr(model, "can_generate", None)
    return bool(can_generate()) if callable(can_generate) else False


def peft_config(model: nn.Module, cfg: LoRAConfig, layers: dict[str, LoRALinear]) -> dict[str, Any]:
    """adapter_config.json as peft 0.21 writes it (the keys it needs; the rest take peft's defaults)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if is_causal_lm(model) else None,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "revision": None,
        "inference_mode": True,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "use_rslora": cfg.rslora,
        "target_modules": list(layers),
        # peft resets this per layer to match the layer type; it only decides the default.
        "fan_in_fan_out": any(layer.fan_in_fan_out for layer in layers.values()),
        "bias": "none",
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_dora": cfg.use_dora,
        "lora_bias": False,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def adapter_state(layers: dict[str, LoRALinear]) -> dict[str, Tensor]:
    """The A and B tensors (and any a subclass adds) under peft's key names."""
    return {f"{PEFT_PREFIX}{name}.{key}": t.detach() for name, layer in layers.items() for key, t in layer.adapter_tensors().items()}


def read_adapter_config(path: Path) -> dict[str, Any]:
    saved = read_json(path)
    if saved.get("peft_type") != "LORA":
        raise AdapterFileError(f"{path}: peft_type is {saved.get('peft_type')!r}, expected 'LORA'")
    return saved


def check_matches(path: Path, saved: dict[str, Any], cfg: LoRAConfig) -> None:
    """A saved adapter with another rank or scaling would load wrongly or not at all."""
    expected = {"r": cfg.r, "lora_alpha": cfg.alpha, "use_rslora": cfg.rslora, "use_dora": cfg.use_dora}
    for key, want in expected.items():
        if key not in saved:
            raise AdapterFileError(f"{path}: missing key {key!r}")
        if saved[key] != want:
            what = "rank mismatch: " if key == "r" else ""
            raise AdapterFileError(f"{path}: {what}{key} is {saved[key]!r}, the model was adapted with {want!r}")


def load_adapter(layers: dict[str, LoRALinear], cfg: LoRAConfig, directory: Path) -> None:
    check_matches(directory / CONFIG_FILE, read_adapter_config(directory / CONFIG_FILE), cfg)
    path = directory / WEIGHTS_FILE
    state = load_safetensors(path)
    params = {f"{PEFT_PREFIX}{name}.{key}": t for name, layer in layers.items() for key, t in layer.adapter_tensors().items()}
    copy_checked(params, state, path, layers.values(), what="LoRA")


class LoRA:
    name = "lora"
    version = "1"
    init_atol: ClassVar[float] = 0.0
    Config = LoRAConfig
    battery_configs: ClassVar[list[dict[str, Any]]] = [
        {"r": 4, "targets": "qv"},
        {"r": 2, "targets": "all-linear", "rslora": True},
    ]

    def wrap(self, layer: nn.Module, cfg: LoRAConfig) -> LoRALinear:
        """The adapter around one target layer (LoRA-FA and DoRA swap in theirs)."""
        return LoRALinear(layer, cfg.r, cfg.scaling, cfg.dropout)

    def apply(self, model: nn.Module, cfg: LoRAConfig) -> Adapted:
        if lora_layers(model):
            raise ConfigError("model", "already has LoRA layers; apply LoRA to a fresh base model")
        targets = resolve_targets(model, cfg.targets)
        check_rank(targets, cfg.r)
        freeze(model)
        for name, layer in targets:
            replace_module(model, name, self.wrap(layer, cfg))
        layers = lora_layers(model)
        trainable = [p for layer in layers.values() for p in layer.adapter_tensors().values() if p.requires_grad]

        def save(directory: Path) -> None:
            write_json(directory / CONFIG_FILE, peft_config(model, cfg, layers))
            save_safetensors(adapter_state(layers), directory / WEIGHTS_FILE, metadata={"format": "pt"})

        return Adapted(
            model=model,
            trainable=trainable,
            **merging(model, layers.values()),
            state_fn=lambda: adapter_state(layers),
            save_fn=save,
            load_fn=lambda directory: load_adapter(layers, cfg, Path(directory)),
        )

    def expected_trainable(self, model: nn.Module, cfg: LoRAConfig) -> int:
        """r * (in + out) per target; a weight's two dims are in and out for Linear and Conv1D alike."""
        return sum(cfg.r * sum(features(layer)) for _, layer in resolve_targets(model, cfg.targets))

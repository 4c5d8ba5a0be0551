"""Tied-LoRA: Enhancing Parameter Efficiency of LoRA with Weight Tying (Renduchintala et al. 2023, arXiv 2311.09578).

LoRA's A (r x in) and B (out x r) are tied across layers: one pair per kind of target (the q_proj
of every block share one pair, the v_proj another; layers that differ only in their block index
form a kind, and must have one shape). Each layer keeps two scaling vectors, u (r) and v (out):

    h = W x + scaling * v ⊙ (B (u ⊙ (A x))),    scaling = alpha / r (or alpha / sqrt(r), rslora)

The paper's configurations differ in which of v, B, u, A train; the others stay frozen at their
init. `train` picks them. The default trains all four, the configuration the paper calls vBuA
and recommends (close to LoRA's scores with a fraction of its trainable parameters). With only
u and v trained (A and B frozen random) it is the paper's VeRA-like configuration; methods.vera
is VeRA itself (one pair for all targets, sliced per layer, no alpha, d = 0.1).

Init: A is random (Kaiming uniform, LoRA's init). Exact identity at init needs one factor at
zero; it is the first trained factor from the output side: B = 0 with u = v = 1 when B trains
(LoRA's init), else v = 0, else u = 0, else A = 0. A frozen B is random like A. Frozen tensors
are saved with the trained ones, so an adapter reloads exactly whatever the seed.

What could be checked: the paper's abstract (arXiv 2311.09578v2) and the authors' related code in
NVIDIA NeMo (nemo/collections/nlp/modules/common/megatron/adapters/parallel_adapters.py,
`ParallelLinearAdapterWeightTying`: one A and B tied across layers, A Xavier-initialised, B zero,
and a learned per-layer position embedding rather than u and v). The paper's Table 1 (its
configurations TL1 to TL6, which of v, B, u, A each trains, and its init of u and v) could not be
read here: the names vBuA and "VeRA-like" above, the mapping to TL1-TL6, and the u = v = 1 init
are unverified; `train` lets a suite set any of the paper's combinations by the factors it trains.

Tying is real sharing: the layers of a kind hold the same Parameter object, so autograd sums the
gradients of every use into its one .grad, and the model lists it once in named_parameters.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
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
    write_json,
)
from methods.layers import replace_module, resolve_targets
from methods.lora import LoRAConfig, LoRALinear, check_rank, features, lora_layers

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter.safetensors"
FACTORS = ("v", "B", "u", "A")


class ScaledLowRankLinear(torch.autograd.Function):
    """h = W0 x + b + s * v ⊙ (B (u ⊙ (A x'))), the frozen base layer and the scaled branch in one
    autograd node (x' is x or, with dropout, its dropped copy): the ScaledLoRALinear forward below,
    computed as methods.lora.LowRankLinear computes LoRA's.

    Why: autograd over the plain expression materialises v ⊙ (B m) and the sum W0 x + that as two
    (tokens x out) tensors per layer in forward, and in backward multiplies the (tokens x out)
    gradient by v and adds the branch's input gradient into the base's as two more. Here the branch
    adds into the base output in place (addcmul), v folds into B (an out x r product) for the
    backward, and the branch's input gradient adds into the base's inside one GEMM.

    What backward needs, with g = dL/dh, d = A x' (tokens x r), m = u ⊙ d, p = B m (tokens x out):
      dL/dm  = s (g ⊙ v) B = g (s v ⊙ B)      nothing kept (v, B are parameters)
      dL/dd  = u ⊙ dL/dm;  dL/du = sum over tokens of d ⊙ dL/dm   d kept when u or B trains
      dL/dv  = s sum over tokens of g ⊙ p                           p kept when v trains
      dL/dx  = g W0 + dL/dd A;  dL/dA = dL/dd^T x'                 x' kept when A trains
      dL/dB  = s v ⊙ (g^T m)                                        m = u ⊙ d, from the kept d
    With A and B frozen (VeRA) it keeps d and p, what autograd keeps for the plain expression.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, x_branch: Tensor | None, weight: Tensor, bias: Tensor | None, lora_A: Tensor,
                lora_B: Tensor, u: Tensor, v: Tensor, scaling: float, fan_in_fan_out: bool) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        branch_in = x2 if x_branch is None else x_branch.reshape(-1, x_branch.shape[-1])
        w = weight if fan_in_fan_out else weight.t()  # (in, out) either way: Conv1D stores W0 transposed
        out = torch.mm(x2, w) if bias is None else torch.addmm(bias, x2, w)
        down = torch.mm(branch_in, lora_A.t())
        need_A, need_B, need_u, need_v = ctx.needs_input_grad[4:8]
        if need_v:
            up = torch.mm(down * u, lora_B.t())
            out.addcmul_(up, v, value=scaling)
        else:  # v folds into B: no (tokens x out) temporary at all
            up = None
            out.addmm_(down * u, (lora_B * v[:, None]).t(), alpha=scaling)
        ctx.save_for_backward(branch_in if need_A else None, down if need_u or need_B else None, up,
                              weight, lora_A, lora_B, u, v)
        ctx.scaling, ctx.fan_in_fan_out, ctx.shared = scaling, fan_in_fan_out, x_branch is None
        ctx.in_shape, ctx.branch_shape = x.shape, None if x_branch is None else x_branch.shape
        return out.view(*lead, out.shape[-1])

    @staticmethod
    @torch.autograd.function.once_differentiable  # its in-place accumulations have no derivative of their own
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        branch_in, down, up, weight, lora_A, lora_B, u, v = ctx.saved_tensors
        need_x, need_branch, _, need_bias, need_A, need_B, need_u, need_v = ctx.needs_input_grad[:8]
        s = ctx.scaling
        g = grad.reshape(-1, grad.shape[-1])
        dx = dx_branch = d_bias = dA = dB = du = dv = None
        if need_x or need_branch or need_A or need_u:
            d_mid = torch.mm(g, lora_B * (v * s)[:, None])  # (tokens x r)
            if need_u:
                du = (d_mid * down).sum(0)
            d_down = d_mid.mul_(u)
            if need_x:
                dx = torch.mm(g, weight.t() if ctx.fan_in_fan_out else weight)
                if ctx.shared:
                    dx.addmm_(d_down, lora_A)
                dx = dx.view(ctx.in_shape)
            if need_branch:
                dx_branch = torch.mm(d_down, lora_A).view(ctx.branch_shape)
            if need_A:
                dA = torch.mm(d_down.t(), branch_in)
        if need_B:
            dB = torch.mm((down * u).t(), g).t().mul_((v * s)[:, None])
        if need_v:
            dv = (g * up).sum(0).mul_(s)
        if need_bias:
            d_bias = g.sum(0)
        return dx, dx_branch, None, d_bias, dA, dB, du, dv, None, None


class ScaledLoRALinear(LoRALinear):
    """A frozen Linear / Conv1D plus scaling * v ⊙ (B (u ⊙ (A x))). A and B may be shared with other
    layers and be larger than this layer needs (VeRA's): it uses A[:, :in] and B[:out]."""

    def __init__(
        self, base_layer: nn.Module, A: nn.Parameter, B: nn.Parameter, u: nn.Parameter, v: nn.Parameter, scaling: float, dropout: float
    ):
        super().__init__(base_layer, A.shape[0], scaling, dropout)
        # Replaces the layer's own A and B: the same Parameter objects sit in every layer that shares them.
        self.lora_A, self.lora_B = A, B
        self.lora_u, self.lora_v = u, v

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.lora_A[:, : self.in_features], self.lora_B[: self.out_features]
        if not self.merged and self.fused(x):
            base = self.base_layer
            dropped = self.dropout(x) if isinstance(self.dropout, nn.Dropout) and self.training else None
            return ScaledLowRankLinear.apply(x, dropped, base.weight, base.bias, a, b, self.lora_u, self.lora_v, self.scaling,
                                             self.fan_in_fan_out)
        result = self.base_layer(x)
        if self.merged:
            return result
        hidden = F.linear(self.dropout(x.to(a.dtype)), a) * self.lora_u
        return result + (F.linear(hidden, b) * (self.lora_v * self.scaling)).to(result.dtype)

    def adapter_tensors(self) -> dict[str, nn.Parameter]:
        return {"lora_A": self.lora_A, "lora_B": self.lora_B, "lora_u": self.lora_u, "lora_v": self.lora_v}

    def delta_weight(self) -> Tensor:
        a, b = self.lora_A[:, : self.in_features], self.lora_B[: self.out_features]
        delta = (self.lora_v[:, None] * b) @ (self.lora_u[:, None] * a) * self.scaling
        return delta.T if self.fan_in_fan_out else delta


def adapter_dtype(layer: nn.Module) -> torch.dtype:
    """Half-precision adapters train poorly: float32 unless the base is float64 (LoRALinear's rule)."""
    dtype = layer.weight.dtype
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def tensor(data: Tensor, trainable: bool) -> nn.Parameter:
    return nn.Parameter(data, requires_grad=trainable)


def wrap_all(model: nn.Module, targets: list[tuple[str, nn.Module]], build: Any) -> dict[str, ScaledLoRALinear]:
    """Freeze the model and swap each target for `build(name, layer)`; the wrapped layers by name."""
    freeze(model)
    for name, layer in targets:
        replace_module(model, name, build(name, layer))
    return lora_layers(model)


def adapted_from(
    model: nn.Module, layers: dict[str, ScaledLoRALinear], method: str, cfg: MethodConfig, checked: tuple[str, ...]
) -> Adapted:
    """The Adapted of a method built from ScaledLoRALinear layers (Tied-LoRA, VeRA): trains what
    requires grad; saves every adapter tensor, frozen ones included, each shared one once."""
    tensors = {id(t): t for layer in layers.values() for t in layer.adapter_tensors().values()}

    def state() -> dict[str, Tensor]:
        return {n: p.detach() for n, p in model.named_parameters() if id(p) in tensors}

    def save(directory: Path) -> None:
        write_json(directory / CONFIG_FILE, {"method": method, "config": cfg.to_dict()})
        save_safetensors(state(), directory / WEIGHTS_FILE)

    def load(directory: Path) -> None:
        path = Path(directory) / CONFIG_FILE
        saved = read_json(path)
        if saved.get("method") != method:
            raise AdapterFileError(f"{path}: method is {saved.get('method')!r}, expected {method!r}")
        config = saved.get("config")
        if not isinstance(config, dict):
            raise AdapterFileError(f"{path}: missing the 'config' object")
        for key in checked:
            if config.get(key) != getattr(cfg, key):
                raise AdapterFileError(f"{path}: {key} is {config.get(key)!r}, the model was adapted with {getattr(cfg, key)!r}")
        path = Path(directory) / WEIGHTS_FILE
        values = load_safetensors(path)
        params = {n: p for n, p in model.named_parameters() if id(p) in tensors}
        copy_checked(params, values, path, layers.values(), what=method)

    return Adapted(
        model=model,
        trainable=[t for t in tensors.values() if t.requires_grad],
        **merging(model, layers.values()),
        state_fn=state,
        save_fn=save,
        load_fn=load,
    )


@dataclass(frozen=True, kw_only=True)
class TiedLoRAConfig(LoRAConfig):
    train: list[str] = field(default_factory=lambda: ["v", "B", "u", "A"])
    """Which of v, B, u, A train (the others stay frozen at init); all four is the paper's vBuA."""

    def validate(self) -> None:
        super().validate()
        unknown = [x for x in self.train if x not in FACTORS]
        if unknown:
            raise ConfigError("train", f"unknown factor(s) {unknown}; choose among {list(FACTORS)}")
        if not self.train:
            raise ConfigError("train", "must name at least one of v, B, u, A")
        if len(set(self.train)) != len(self.train):
            raise ConfigError("train", f"lists a factor twice: {self.train}")


def kinds(model: nn.Module, targets: Any) -> dict[str, list[tuple[str, nn.Module]]]:
    """Targets grouped by name with block indices wildcarded; each group shares one A and B."""
    grouped: dict[str, list[tuple[str, nn.Module]]] = {}
    for name, layer in resolve_targets(model, targets):
        grouped.setdefault(re.sub(r"\.\d+(?=\.|$)", ".*", name), []).append((name, layer))
    for kind, members in grouped.items():
        shapes = sorted({features(layer) for _, layer in members})
        if len(shapes) > 1:
            raise ConfigError("targets", f"the layers {kind} differ in (in, out) shape {shapes}: they cannot share one A and B")
    return grouped


class TiedLoRA:
    name = "tied_lora"
    version = "1"
    init_atol: ClassVar[float] = 0.0
    Config = TiedLoRAConfig
    battery_configs: ClassVar[list[dict[str, Any]]] = [
        {"r": 4, "targets": "qv"},
        {"r": 4, "targets": "all-linear", "train": ["v", "u"]},
    ]

    def apply(self, model: nn.Module, cfg: TiedLoRAConfig) -> Adapted:
        if lora_layers(model):
            raise ConfigError("model", "already has LoRA layers; apply Tied-LoRA to a fresh base model")
        grouped = kinds(model, cfg.targets)
        check_rank([m for members in grouped.values() for m in members], cfg.r)
        zero = next(f for f in ("B", "v", "u", "A") if f in cfg.train)
        shared: dict[str, tuple[nn.Parameter, nn.Parameter]] = {}
        for kind, members in grouped.items():
            fin, fout = features(members[0][1])
            options = {"dtype": adapter_dtype(members[0][1]), "device": members[0][1].weight.device}
            a, b = torch.empty(cfg.r, fin, **options), torch.empty(fout, cfg.r, **options)
            for t, factor in ((a, "A"), (b, "B")):
                if factor == zero:
                    nn.init.zeros_(t)
                else:
                    nn.init.kaiming_uniform_(t, a=math.sqrt(5))
            shared[kind] = (tensor(a, "A" in cfg.train), tensor(b, "B" in cfg.train))
        kind_of = {name: kind for kind, members in grouped.items() for name, _ in members}

        def build(name: str, layer: nn.Module) -> ScaledLoRALinear:
            a, b = shared[kind_of[name]]
            fout = features(layer)[1]
            u = torch.full((cfg.r,), float(zero != "u"), dtype=a.dtype, device=a.device)
            v = torch.full((fout,), float(zero != "v"), dtype=a.dtype, device=a.device)
            return ScaledLoRALinear(layer, a, b, tensor(u, "u" in cfg.train), tensor(v, "v" in cfg.train), cfg.scaling, cfg.dropout)

        layers = wrap_all(model, [t for members in grouped.values() for t in members], build)
        return adapted_from(model, layers, self.name, cfg, ("r", "alpha", "rslora", "targets"))

    def expected_trainable(self, model: nn.Module, cfg: TiedLoRAConfig) -> int:
        """Per kind of target (in, out; L layers): r*in if A trains, out*r if B trains, and
        L*(r if u trains + out if v trains)."""
        total = 0
        for members in kinds(model, cfg.targets).values():
            fin, fout = features(members[0][1])
            total += cfg.r * fin * ("A" in cfg.train) + fout * cfg.r * ("B" in cfg.train)
            total += len(members) * (cfg.r * ("u" in cfg.train) + fout * ("v" in cfg.train))
        return total

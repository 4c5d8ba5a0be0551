"""GLoRA: One-for-All: Generalized LoRA for Parameter-Efficient Fine-tuning (Chavan et al. 2023, arXiv 2306.07967).

A frozen linear layer f(x) = W0 x + b0 becomes, with five trainable support tensors,

    f(x) = (W0 + W0 ⊙ A + B) x + C W0 + D ⊙ b0 + E + b0

(the paper writes W0 C for the prompt term; with C a column of length in, that is the vector W0 C
of length out). A and B act on the weight (scale and shift), C is the weight-driven prompt/shift
term, D and E scale and shift the bias. Each takes a form: "lora" (X = X_d X_u, rank r), "vector"
(per output row for A, B, D, E; per input column for C), "constant" (one scalar; A, B, D, E) or
"none". X_d of every "lora" form and every vector and constant start at zero, X_u Xavier-uniform
(the authors' Arnav0400/ViT-Slim GLoRA/layer.py, commit 0fed674; peft's GLoRA uses Kaiming-uniform),
so the model is exactly unchanged at init. Everything is linear in x, so the layer re-parameterises
into W = W0 + W0 ⊙ A + B and b = b0 + D ⊙ b0 + E + W0 C (merge).

The paper trains a supernet over these forms and picks one per layer by evolutionary search; that
search is out of scope here: one config fixes the forms of all targeted layers (a single subnet).
As in the authors' code, C and E also act on layers without a bias (b0 = 0, so D is dropped there);
peft's GLoRA drops C, D and E on such layers. On a quantized (4-bit, int8) base only the forms
that act through W0 x work: a "lora" A or any C needs W0 itself and is refused.

Support tensors the architecture makes inert. Some forms add a shift that the model reads in a way
that ignores it, so their gradient is zero in exact arithmetic (`methods.layers.shift_invariant_layers`):
on a key projection without rotary positions, C, D and E only add the same vector to every key,
which softmax ignores; on a block output projection of a LayerNorm model (GPT-2, BERT), a constant B
(x.sum() · b, the same for every feature of a token) and a constant E are removed by the
mean-centring LayerNorms that read the residual stream. The paper's search space contains such
subnets (its ViTs are LayerNorm models) and counts their parameters, so they stay trainable: `apply`
names each one with its reason in `Adapted.inert` (the trial result's `params.inert`) and warns, and
the battery holds that exactly these tensors, and no others, get no gradient.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from methods.base import Adapted, ConfigError, freeze, load_trainable, merging, MethodConfig, require_float_weights, Targets
from methods.layers import SHIFT_REASONS, Conv1D, modules_of, replace_module, resolve_targets, shift_invariant_layers
from methods.lora import features

FORMS = {
    "a": ("lora", "vector", "constant", "none"),
    "b": ("lora", "vector", "constant", "none"),
    "c": ("lora", "vector", "none"),
    "d": ("vector", "constant", "none"),
    "e": ("vector", "constant", "none"),
}


@dataclass(frozen=True, kw_only=True)
class GLoRAConfig(MethodConfig):
    r: int = 4
    """Rank of every "lora" form."""
    a: str = "lora"
    """Form of A, the weight scale W0 ⊙ A: lora, vector, constant or none."""
    b: str = "lora"
    """Form of B, the weight shift: lora, vector, constant or none."""
    c: str = "lora"
    """Form of C, the prompt term W0 C added to the bias: lora, vector or none."""
    d: str = "vector"
    """Form of D, the bias scale D ⊙ b0 (dropped on layers without a bias): vector, constant or none."""
    e: str = "vector"
    """Form of E, the bias shift: vector, constant or none."""
    targets: Targets = "all-linear"
    """Which linear layers get the support tensors (the paper adapts every linear layer)."""

    def validate(self) -> None:
        if self.r < 1:
            raise ConfigError("r", f"must be >= 1, got {self.r}")
        for key, known in FORMS.items():
            if getattr(self, key) not in known:
                raise ConfigError(key, f"unknown form {getattr(self, key)!r}; {key} takes {', '.join(known)}")
        if all(getattr(self, key) == "none" for key in FORMS):
            raise ConfigError("a", "a, b, c, d and e are all 'none': nothing to train")

# Which support forms only add a shift that an invariant layer's readers ignore ("token": the same
# vector for every token; "feature": a per-token scalar for every feature).
INERT_SUPPORTS = {
    "token": {"glora_c": FORMS["c"], "glora_d": FORMS["d"], "glora_e": FORMS["e"]},
    "feature": {"glora_b": ("constant",), "glora_e": ("constant",)},
}


class Support(nn.Module):
    """One support tensor in a given form, as a tensor that broadcasts against its target:
    (rows, cols) for "lora", (rows, 1) or (rows,) for "vector", (1,) for "constant"."""

    def __init__(self, form: str, rows: int, cols: int, r: int, column: bool, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.form = form
        if form == "lora":
            self.down = nn.Parameter(torch.zeros(rows, r, dtype=dtype, device=device))
            self.up = nn.Parameter(torch.empty(r, cols, dtype=dtype, device=device))
            nn.init.xavier_uniform_(self.up)  # the authors' (ViT-Slim GLoRA/layer.py); peft uses Kaiming-uniform
        elif form == "vector":
            self.value = nn.Parameter(torch.zeros((rows, 1) if column else (rows,), dtype=dtype, device=device))
        elif form == "constant":
            self.value = nn.Parameter(torch.zeros(1, dtype=dtype, device=device))

    def forward(self) -> Tensor | None:
        if self.form == "none":
            return None
        return self.down @ self.up if self.form == "lora" else self.value

    def extra_repr(self) -> str:
        return self.form


def support_count(form: str, rows: int, cols: int, r: int) -> int:
    return {"lora": r * (rows + cols), "vector": rows, "constant": 1, "none": 0}[form]


class GLoRALinear(nn.Module):
    """A frozen nn.Linear or Conv1D with GLoRA's support tensors A..E."""

    def __init__(self, base_layer: nn.Module, cfg: GLoRAConfig):
        super().__init__()
        self.base_layer = base_layer
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        n_in, n_out = features(base_layer)
        weight = base_layer.weight
        self.has_bias = getattr(base_layer, "bias", None) is not None
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        kw = {"r": cfg.r, "dtype": dtype, "device": weight.device}
        self.glora_a = Support(cfg.a, n_out, n_in, column=True, **kw)
        self.glora_b = Support(cfg.b, n_out, n_in, column=True, **kw)
        self.glora_c = Support(cfg.c, n_in, 1, column=True, **kw)
        self.glora_d = Support(cfg.d if self.has_bias else "none", n_out, 1, column=False, **kw)
        self.glora_e = Support(cfg.e, n_out, 1, column=False, **kw)
        self.dtype = dtype
        self.merged = False
        self.added_bias = False

    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    def base_weight(self) -> Tensor:
        """W0 as (out, in), in the adapter's dtype."""
        w = self.base_layer.weight
        return (w.T if self.fan_in_fan_out else w).to(self.dtype)

    def bias_delta(self, w0: Tensor, b0: Tensor | None) -> Tensor | None:
        """D ⊙ b0 + E + W0 C, or None when all three are absent."""
        c, d, e = self.glora_c(), self.glora_d(), self.glora_e()
        terms = [t for t in (None if d is None else b0 * d, e, None if c is None else (w0 @ c).squeeze(-1)) if t is not None]
        return sum(terms[1:], terms[0]) if terms else None

    def effective(self, w0: Tensor, b0: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """(W0 + W0 ⊙ A + B, b0 + D ⊙ b0 + E + W0 C) from the given W0 (out, in) and b0."""
        a, b = self.glora_a(), self.glora_b()
        w = w0
        if a is not None:
            w = w + w0 * a
        if b is not None:
            w = w + b
        delta = self.bias_delta(w0, b0)
        bias = b0 if delta is None else delta if b0 is None else b0 + delta
        return w, bias

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)
        if self.merged:
            return y
        # The frozen layer's own output plus the update, each term in its cheapest form: only a
        # low-rank A needs W0 ⊙ A materialised (as the paper computes it); a vector or constant A
        # scales W0 x = y - b0, and B's forms are thin matmuls or a sum over x.
        h = x.to(self.dtype)
        b0 = self.base_layer.bias.to(self.dtype) if self.has_bias else None
        w0 = self.base_weight() if self.glora_a.form == "lora" or self.glora_c.form != "none" else None
        terms = []
        if self.glora_a.form == "lora":
            terms.append(F.linear(h, w0 * self.glora_a()))
        elif self.glora_a.form != "none":
            w0x = y.to(self.dtype) if b0 is None else y.to(self.dtype) - b0
            terms.append(w0x * self.glora_a().view(-1))
        if self.glora_b.form == "lora":
            terms.append(F.linear(F.linear(h, self.glora_b.up), self.glora_b.down))
        elif self.glora_b.form != "none":
            terms.append(h.sum(-1, keepdim=True) * self.glora_b().view(-1))
        bias = self.bias_delta(w0, b0)
        if bias is not None:
            terms.append(bias)
        if not terms:
            return y
        return y + sum(terms[1:], terms[0]).to(y.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        layer = self.base_layer
        if not layer.weight.is_floating_point():
            raise NotImplementedError(f"cannot merge into a quantized base weight ({type(layer).__name__})")
        b0 = layer.bias.to(self.dtype) if self.has_bias else None
        w, bias = self.effective(self.base_weight(), b0)
        layer.weight.copy_((w.T if self.fan_in_fan_out else w).to(layer.weight.dtype))
        if bias is not None and not self.has_bias:
            # C and E give a bias-free layer a bias: add one (removed again by unmerge).
            layer.bias = nn.Parameter(torch.zeros(bias.shape, dtype=layer.weight.dtype, device=layer.weight.device), requires_grad=False)
            self.added_bias = True
        if bias is not None:
            layer.bias.copy_(bias.to(layer.bias.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Inverts the merge: W0 = (W - B) / (1 + A), b0 = (b - E - W0 C) / (1 + D); exact up to
        rounding unless an entry of 1 + A or 1 + D is near zero."""
        if not self.merged:
            return
        layer = self.base_layer
        a, b, c, d, e = (s() for s in (self.glora_a, self.glora_b, self.glora_c, self.glora_d, self.glora_e))
        w = self.base_weight()
        if b is not None:
            w = w - b
        if a is not None:
            w = w / (1 + a)
        layer.weight.copy_((w.T if self.fan_in_fan_out else w).to(layer.weight.dtype))
        if self.added_bias:
            layer.bias = None
            self.added_bias = False
        elif self.has_bias:
            bias = layer.bias.to(w.dtype)
            if e is not None:
                bias = bias - e
            if c is not None:
                bias = bias - (w @ c).squeeze(-1)
            if d is not None:
                bias = bias / (1 + d)
            layer.bias.copy_(bias.to(layer.bias.dtype))
        self.merged = False


def glora_layers(model: nn.Module) -> dict[str, GLoRALinear]:
    return modules_of(model, GLoRALinear)


class GLoRA:
    name = "glora"
    version = "2"
    init_atol: ClassVar[float] = 0.0
    Config = GLoRAConfig
    # The second config puts a constant B and E before GPT-2's and BERT's LayerNorms: inert there.
    battery_configs: ClassVar[list[dict[str, Any]]] = [
        {"r": 2, "targets": "qv"},
        {"a": "vector", "b": "constant", "c": "vector", "d": "none", "e": "constant", "targets": "mlp"},
        {"r": 2, "a": "vector", "c": "none", "d": "none", "targets": "qv"},  # the forms a 4-bit base allows
    ]

    def apply(self, model: nn.Module, cfg: GLoRAConfig) -> Adapted:
        if glora_layers(model):
            raise ConfigError("model", "already has GLoRA layers; apply GLoRA to a fresh base model")
        targets = resolve_targets(model, cfg.targets)
        if cfg.a == "lora" or cfg.c != "none":
            # The other forms act through W0 x, which a 4-bit layer computes itself.
            require_float_weights(targets, f"GLoRA's a = {cfg.a!r} and c = {cfg.c!r} read W0 itself (W0 ⊙ A, W0 C): "
                                           "use a float base, or a vector/constant a and c = 'none'")
        invariant = shift_invariant_layers(model)  # before wrapping: it reads the layers' own names
        freeze(model)
        for name, layer in targets:
            replace_module(model, name, GLoRALinear(layer, cfg))
        layers = glora_layers(model)
        trainable = [p for layer in layers.values() for n, p in layer.named_parameters() if not n.startswith("base_layer.")]
        inert = {
            f"{name}.{key}.{leaf}": f"{key} ({support.form}) on {name} {SHIFT_REASONS[invariant[name]]}"
            for name, layer in layers.items()
            if name in invariant
            for key, support in layer.named_children()
            if key in INERT_SUPPORTS[invariant[name]] and support.form in INERT_SUPPORTS[invariant[name]][key]
            for leaf, _ in support.named_parameters()
        }
        if inert:
            warnings.warn(f"GLoRA: {len(inert)} support tensors get no gradient on this architecture "
                          f"(first: {next(iter(inert.values()))}); they stay trainable, see Adapted.inert", stacklevel=2)

        return Adapted(
            model=model,
            trainable=trainable,
            **merging(model, layers.values()),
            load_fn=lambda directory: load_trainable(model, trainable, directory, list(layers.values())),
            inert=inert,
        )

    def expected_trainable(self, model: nn.Module, cfg: GLoRAConfig) -> int:
        """Per target (in, out): A and B each r (out + in) for lora, out for vector, 1 for constant;
        C r (in + 1) for lora, in for vector; D (only with a bias) and E each out for vector, 1 for constant."""
        total = 0
        for _, layer in resolve_targets(model, cfg.targets):
            n_in, n_out = features(layer)
            has_bias = getattr(layer, "bias", None) is not None
            total += support_count(cfg.a, n_out, n_in, cfg.r) + support_count(cfg.b, n_out, n_in, cfg.r)
            total += support_count(cfg.c, n_in, 1, cfg.r) + support_count(cfg.e, n_out, 1, cfg.r)
            total += support_count(cfg.d, n_out, 1, cfg.r) if has_bias else 0
        return total

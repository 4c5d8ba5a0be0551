"""Bottleneck adapters: Parameter-Efficient Transfer Learning for NLP (Houlsby et al. 2019, arXiv 1902.00751).

A small module h + W_up f(W_down h + b_down) + b_up (d -> m -> d, with m << d) is inserted on the
output of a block's sublayer, before that sublayer's residual add: here, on the output of the
projection that closes the sublayer, so the block's own skip connection stays untouched.

Placement "houlsby" puts one after the attention output projection and one after the feed-forward
output projection of every block; "pfeiffer" only after the feed-forward one (Pfeiffer et al. 2020,
"AdapterFusion: Non-Destructive Task Composition for Transfer Learning", arXiv 2005.00247).
Houlsby et al. also train the layer norms of every block (an option here, on by default).

Init ("near_identity", the paper's): both projections drawn from a zero-mean Gaussian truncated
at two standard deviations, biases zero, so each adapter is near the identity. The std is 1e-2
by default; the authors' adapter-bert uses 1e-3 (google-research/adapter-bert, commit 1a31fc6,
modeling.py `feedforward_adapter(..., init_scale=1e-3)`, a truncated normal of that stddev):
init_std = 1e-3 (an option, so that committed results keep their meaning). "zero_up" also
zeroes W_up, which makes the model exactly unchanged at init.

Where the adapter reads (`position`):
- "projection" (default): the output of the sublayer's closing projection, before the dropout
  that BERT and GPT-2 apply to it (Llama has none there).
- "after_dropout": after that dropout, as adapter-bert does (modeling.py `transformer_model`:
  `attention_output = dropout(...)`, then `adapter_fn(attention_output)`, likewise for the layer
  output); on a model without such a dropout it is "projection".
- "stream" (placement "pfeiffer" only): adapter-hub's SeqBnConfig (adapter-hub/adapters, commit
  88f18eb, src/adapters/configuration/adapter_config.py: original_ln_before, original_ln_after,
  residual_before_ln; methods/modeling.py `Adapter.pre_forward` / `post_forward`): with h the
  feed-forward output and x the sublayer's input, the adapter reads LN(h + x), its skip is h,
  and the original LN is applied again: LN(h + x + A(LN(h + x))) on a post-LN model (BERT); on a
  pre-LN model (GPT-2, Llama, no LN there) that is y + A(y), y the block's output. SeqBnConfig
  also defaults to ReLU and m = d / 16 (reduction factor 16): activation = "relu" and size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from methods.base import Adapted, ConfigError, MethodConfig, freeze, load_trainable
from methods.layers import block_norms, blocks, modules_of, replace_module, sublayer_outputs
from methods.lora import features

PLACEMENTS = {"houlsby": ("attention", "ffn"), "pfeiffer": ("ffn",)}
ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}
INITS = ("near_identity", "zero_up")
POSITIONS = ("projection", "after_dropout", "stream")
# The dropout applied to a sublayer's closing projection, by attribute name on its parent module:
# GPT-2's attention (resid_dropout; its attn_dropout acts inside attention) and MLP, BERT's outputs.
_OUTPUT_DROPOUTS = ("resid_dropout", "dropout")


@dataclass(frozen=True, kw_only=True)
class BottleneckConfig(MethodConfig):
    size: int = 64
    """Bottleneck width m (Houlsby et al. sweep 8, 64 and 256)."""
    placement: str = "houlsby"
    """"houlsby": after the attention and the feed-forward sublayers; "pfeiffer": after the feed-forward only."""
    activation: str = "gelu"
    """Non-linearity between the projections: gelu, relu, silu or tanh."""
    init: str = "near_identity"
    """"near_identity": both projections ~ truncated N(0, init_std^2) (the paper); "zero_up": W_up = 0, an exact identity."""
    init_std: float = 1e-2
    """Standard deviation of the truncated Gaussian init (truncated at two of them)."""
    train_norms: bool = True
    """Also train the blocks' layer norms, as Houlsby et al. do."""
    position: str = "projection"
    """What the adapter reads: "projection" (the sublayer's output projection), "after_dropout"
    (adapter-bert's), "stream" (adapter-hub's Pfeiffer: the post-residual stream; pfeiffer only)."""

    def validate(self) -> None:
        if self.size < 1:
            raise ConfigError("size", f"must be >= 1, got {self.size}")
        for key, value, known in [
            ("placement", self.placement, PLACEMENTS),
            ("activation", self.activation, ACTIVATIONS),
            ("init", self.init, INITS),
            ("position", self.position, POSITIONS),
        ]:
            if value not in known:
                raise ConfigError(key, f"unknown {key} {value!r}; known: {', '.join(known)}")
        if not self.init_std > 0:
            raise ConfigError("init_std", f"must be > 0, got {self.init_std}")
        if self.position == "stream" and self.placement != "pfeiffer":
            raise ConfigError("position", "'stream' is adapter-hub's Pfeiffer position: use it with placement = 'pfeiffer'")


class Adapter(nn.Module):
    """The bottleneck up(f(down(h))) on a width-d stream (d and dtype from `projection`, the
    sublayer's output projection), in one of the positions below."""

    def __init__(self, projection: nn.Module, cfg: BottleneckConfig):
        super().__init__()
        d = features(projection)[1]
        weight = projection.weight
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        self.adapter_down = nn.Linear(d, cfg.size, dtype=dtype, device=weight.device)
        self.adapter_up = nn.Linear(cfg.size, d, dtype=dtype, device=weight.device)
        self.act = ACTIVATIONS[cfg.activation]()
        for layer in (self.adapter_down, self.adapter_up):
            nn.init.trunc_normal_(layer.weight, std=cfg.init_std, a=-2 * cfg.init_std, b=2 * cfg.init_std)
            nn.init.zeros_(layer.bias)
        if cfg.init == "zero_up":
            nn.init.zeros_(self.adapter_up.weight)

    def bottleneck(self, h: Tensor) -> Tensor:
        """up(f(down(h))) in the adapter's dtype."""
        return self.adapter_up(self.act(self.adapter_down(h.to(self.adapter_down.weight.dtype))))


class BottleneckAdapter(Adapter):
    """A frozen module (the output projection, or the dropout after it) followed by a residual
    bottleneck: y + up(f(down(y)))."""

    def __init__(self, base_layer: nn.Module, projection: nn.Module, cfg: BottleneckConfig):
        super().__init__(projection, cfg)
        self.base_layer = base_layer

    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)
        return (y.to(self.adapter_down.weight.dtype) + self.bottleneck(y)).to(y.dtype)


class StreamAdapterPostLN(Adapter):
    """Pfeiffer's position on a post-LN block, replacing its feed-forward LN: with s = h + x the
    LN's input, LN(s + A(LN(s))). (Not named "...Norm": block_norms must find the LN inside.)"""

    def __init__(self, norm: nn.Module, projection: nn.Module, cfg: BottleneckConfig):
        super().__init__(projection, cfg)
        self.base_layer = norm

    def forward(self, s: Tensor) -> Tensor:
        return self.base_layer(s + self.bottleneck(self.base_layer(s)).to(s.dtype))


class StreamAdapterPreLN(Adapter):
    """Pfeiffer's position on a pre-LN block: y + A(y) on the block's output y, added by a forward
    hook of the block (whose child this is, so the block keeps its type and its callers' view)."""


def _add_stream_adapter(block: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
    y = output[0] if isinstance(output, tuple) else output
    y = y + block.pfeiffer_adapter.bottleneck(y).to(y.dtype)
    return (y, *output[1:]) if isinstance(output, tuple) else y


def adapter_layers(model: nn.Module) -> dict[str, Adapter]:
    return modules_of(model, Adapter)


def _parent(model: nn.Module, name: str) -> tuple[str, nn.Module]:
    parent = name.rpartition(".")[0]
    return parent, model.get_submodule(parent)


def _place(model: nn.Module, name: str, layer: nn.Module, cfg: BottleneckConfig) -> None:
    """Put one adapter for the sublayer whose output projection is `name` where cfg.position says."""
    parent_name, parent = _parent(model, name)
    if cfg.position == "after_dropout":
        for attr in _OUTPUT_DROPOUTS:
            dropout = getattr(parent, attr, None)
            if isinstance(dropout, nn.Dropout):
                replace_module(model, f"{parent_name}.{attr}", BottleneckAdapter(dropout, layer, cfg))
                return
    if cfg.position == "stream":
        norm = next(((n, m) for n, m in parent.named_children() if "norm" in type(m).__name__.lower()), None)
        # Post-LN (BERT's BertOutput): the sublayer's residual add and LN sit beside its projection in
        # a module of their own. A projection whose parent is the block itself (OPT's fc2) sits
        # among all the block's norms, which says nothing about where the residual add is.
        if norm is not None and not any(parent is b for b in blocks(model)):
            replace_module(model, f"{parent_name}.{norm[0]}", StreamAdapterPostLN(norm[1], layer, cfg))
            return
        block = next(b for b in blocks(model) if any(m is layer for m in b.modules()))
        block.pfeiffer_adapter = StreamAdapterPreLN(layer, cfg)
        block.register_forward_hook(_add_stream_adapter)
        return
    replace_module(model, name, BottleneckAdapter(layer, layer, cfg))


class Bottleneck:
    """One registry name with a `placement` field rather than two names: Houlsby and Pfeiffer
    adapters are the same module with the same parameter formula, and where it goes is a
    hyperparameter to sweep like LoRA's targets, not a different method."""

    name = "bottleneck_adapter"
    version = "1"
    # The paper's near-identity init moves the logits of the tiny test models (|logits| <= 0.57) by
    # at most 2e-4 for the battery configs (7e-4 with m = 256); "zero_up" is exact.
    init_atol: ClassVar[float] = 1e-3
    Config = BottleneckConfig
    battery_configs: ClassVar[list[dict[str, Any]]] = [
        {"size": 8, "placement": "houlsby"},
        {"size": 4, "placement": "pfeiffer", "train_norms": False, "activation": "relu"},
        {"size": 4, "placement": "pfeiffer", "position": "stream", "activation": "relu"},
    ]

    def apply(self, model: nn.Module, cfg: BottleneckConfig) -> Adapted:
        if adapter_layers(model):
            raise ConfigError("model", "already has bottleneck adapters; apply to a fresh base model")
        targets = [t for sublayer in PLACEMENTS[cfg.placement] for t in sublayer_outputs(model, sublayer)]
        freeze(model)
        for name, layer in targets:
            _place(model, name, layer, cfg)
        trainable = [p for layer in adapter_layers(model).values() for m in (layer.adapter_down, layer.adapter_up) for p in m.parameters()]
        if cfg.train_norms:
            trainable += [p for norm in block_norms(model) for p in norm.parameters()]
        for p in trainable:
            p.requires_grad_(True)
        return Adapted(model=model, trainable=trainable, load_fn=lambda directory: load_trainable(model, trainable, directory))

    def expected_trainable(self, model: nn.Module, cfg: BottleneckConfig) -> int:
        """Per adapter 2 d m + d + m (two projections with biases, d the projection's output width),
        one adapter per block and sublayer of the placement; plus the blocks' norm parameters."""
        count = 0
        for sublayer in PLACEMENTS[cfg.placement]:
            for _, layer in sublayer_outputs(model, sublayer):
                d = features(layer)[1]
                count += 2 * d * cfg.size + d + cfg.size
        if cfg.train_norms:
            count += sum(p.numel() for norm in block_norms(model) for p in norm.parameters())
        return count

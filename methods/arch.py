"""A model's layout read from its module structure and its config, not from lists of layer names.

Methods act on roles (the query, key and value projections, the attention output projection, the
feed-forward up and down projections) that every decoder or encoder block has, whatever its
modules are called. `layout(model)` finds them:

- blocks: the longest list of same-type modules (methods.layers.blocks);
- a block's attention: its outermost submodule whose class name says "Attention" (transformers'
  convention for every architecture: LlamaAttention, GPT2Attention, BertAttention, ...);
- inside it, from the config's head counts (num_attention_heads, head_dim or hidden / heads):
  a fused q|k|v projection is the one of width (heads + 2 kv_heads) * head_dim for a whole
  number of kv heads dividing the heads; otherwise the separate q, k and v projections (named
  q_proj / query / q_lin ..., their widths checked against the head counts); the output
  projection is the last linear layer of the attention that writes the hidden width;
- the feed-forward sublayer is the block's linear layers outside the attention: the down
  projection is the last one writing the hidden width, the up projections (up, gate) read it.

The number of key/value heads is read from the projections' widths (and checked against the
config's num_key_value_heads where it has one), so grouped and multi-query attention need no
special case. The one thing neither the weights nor the config state is the order of q, k and v
rows inside a fused projection: it is a convention of the attention's forward code, recorded here
per attention class (FUSED_ARRANGEMENTS) and checked by tests/test_architectures.py, which scales
the rows this module calls q and k by 2 and 1/2 (the scores q.k cannot change) and those it calls
v by 2 (the attention output doubles, like doubling the output projection's input).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from methods.base import ConfigError

# Each fused layout's q|k|v row order, by attention class (see the module docstring):
# "concatenated": [all q heads | all k heads | all v heads] (GPT-2's c_attn: split(hidden, dim=2);
#   GPTBigCode's multi-query c_attn);
# "grouped": per key/value head j, [its heads/kv_heads query heads | k_j | v_j] (GPT-NeoX and Bloom:
#   view(heads, 3 * head_dim), one query head per group; Falcon: view(kv_heads, heads / kv_heads + 2,
#   head_dim), which also covers its multi-query layout, one group, and its 3-per-head layout).
FUSED_ARRANGEMENTS: dict[str, str] = {
    "GPT2Attention": "concatenated",
    "GPTBigCodeAttention": "concatenated",
    "GPTNeoXAttention": "grouped",
    "BloomAttention": "grouped",
    "FalconAttention": "grouped",
}
PARTS = ("q", "k", "v")


def _linears(module: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    from methods.layers import LINEAR_TYPES

    return [(f"{prefix}.{n}" if prefix else n, m) for n, m in module.named_modules() if isinstance(m, LINEAR_TYPES)]


def _width(layer: nn.Module) -> tuple[int, int]:
    from methods.lora import features

    return features(layer)


@dataclass(frozen=True)
class Heads:
    """Attention geometry: query heads, key/value heads and the width of one head."""

    heads: int
    kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class Attention:
    """One block's attention: qualified names of its projections (q, k, v or the fused qkv, o)."""

    name: str
    """The attention module (BERT: the BertAttention around self and output)."""
    o: str
    heads: Heads
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None
    """A fused projection computing q, k and v at once (then q, k, v are None)."""
    arrangement: str | None = None
    """The fused projection's row order (FUSED_ARRANGEMENTS), None when unknown or not fused."""
    attention_class: str = ""

    @property
    def caller(self) -> str:
        """The module that computes q, k and v and calls the attention function (BERT's attention.self)."""
        return (self.qkv or self.q or "").rpartition(".")[0]

    def rows(self, *parts: str) -> Tensor:
        """The output features of the fused projection that hold `parts` ("q", "k", "v"), in
        head order within each part, parts in the order given."""
        if self.qkv is None:
            raise ValueError(f"{self.name} has separate q, k and v projections")
        if self.arrangement is None:
            raise ConfigError(
                "model",
                f"{self.qkv}: the order of q, k and v inside the fused projection of {self.attention_class} is not known "
                f"(known: {', '.join(sorted(FUSED_ARRANGEMENTS))})",
            )
        h = self.heads
        group = h.heads // h.kv_heads
        hd = h.head_dim
        out: list[Tensor] = []
        for part in parts:
            if self.arrangement == "concatenated":
                start = {"q": 0, "k": h.heads * hd, "v": (h.heads + h.kv_heads) * hd}[part]
                count = h.heads * hd if part == "q" else h.kv_heads * hd
                out.append(torch.arange(start, start + count))
            else:  # grouped: each kv group is [group query heads | k | v], (group + 2) * hd rows
                offset, size = {"q": (0, group * hd), "k": (group * hd, hd), "v": ((group + 1) * hd, hd)}[part]
                starts = torch.arange(h.kv_heads) * (group + 2) * hd + offset
                out.append((starts[:, None] + torch.arange(size)[None, :]).reshape(-1))
        return torch.cat(out)


@dataclass(frozen=True)
class Block:
    """One repeated block: its attention and its feed-forward projections."""

    name: str
    attention: Attention
    down: str
    """The feed-forward output projection (down_proj, c_proj, fc2, dense_4h_to_h, output.dense)."""
    up: tuple[str, ...] = ()
    """The feed-forward projections reading the block's hidden width (up and gate)."""


@dataclass(frozen=True)
class Layout:
    blocks: list[Block] = field(default_factory=list)

    def roles(self) -> dict[str, str]:
        """Role of every projection inside the blocks: q, k, v, qkv, o or mlp."""
        out: dict[str, str] = {}
        for block in self.blocks:
            a = block.attention
            for part in ("q", "k", "v", "qkv", "o"):
                if getattr(a, part):
                    out[getattr(a, part)] = part
            for name in (*block.up, block.down):
                out[name] = "mlp"
        return out

    def sublayer_outputs(self, sublayer: str) -> list[str]:
        """The attention ("attention") or feed-forward ("ffn") output projection of every block."""
        return [b.attention.o if sublayer == "attention" else b.down for b in self.blocks]


def _config_heads(model: nn.Module) -> tuple[int, int, int, int | None]:
    """(hidden, heads, head_dim, num_key_value_heads or None) from the model's (text) config."""
    config = getattr(model, "config", None)
    if config is None:
        raise ConfigError("model", f"{type(model).__name__} has no config to read its head counts from")
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = getattr(config, "hidden_size", None)
    heads = getattr(config, "num_attention_heads", None)
    if not isinstance(hidden, int) or not isinstance(heads, int):
        raise ConfigError("model", f"{type(config).__name__} states no hidden_size and num_attention_heads")
    head_dim = getattr(config, "head_dim", None)
    head_dim = head_dim if isinstance(head_dim, int) and head_dim > 0 else hidden // heads
    kv = getattr(config, "num_key_value_heads", None)
    return hidden, heads, head_dim, kv if isinstance(kv, int) else None


def _attention(model_name: str, block: nn.Module, prefix: str, hidden: int, heads: int, head_dim: int, kv_config: int | None) -> Attention:
    from methods.layers import role

    candidates = [(n, m) for n, m in block.named_modules() if n and "attention" in type(m).__name__.lower()]
    # The outermost one: BERT's BertAttention holds BertSelfAttention.
    outer = [(n, m) for n, m in candidates if not any(n.startswith(o + ".") for o, _ in candidates)]
    if not outer:
        raise ConfigError("model", f"{model_name}: block {prefix} has no attention module (a submodule whose class name says Attention)")
    rel, attn = outer[0]
    name = f"{prefix}.{rel}"
    linears = _linears(attn, name)
    if not linears:
        raise ConfigError("model", f"{model_name}: {name} ({type(attn).__name__}) holds no linear layer")
    outputs = [(n, m) for n, m in linears if _width(m)[1] == hidden and _width(m)[0] == heads * head_dim]
    if not outputs:
        raise ConfigError("model", f"{model_name}: {name} has no output projection ({heads * head_dim} in, {hidden} out)")
    o = outputs[-1][0]
    rest = [(n, m) for n, m in linears if n != o]
    fused = []
    for n, m in rest:
        units, remainder = divmod(_width(m)[1], head_dim)
        kv, odd = divmod(units - heads, 2)
        if _width(m)[0] == hidden and not remainder and not odd and 0 < kv <= heads and heads % kv == 0 and units != heads:
            fused.append((n, kv))
    if fused:
        qkv, kv = fused[0]
        if kv_config is not None and kv_config != kv:
            raise ConfigError("model", f"{model_name}: {qkv} holds {kv} key/value heads, the config says {kv_config}")
        cls = type(attn).__name__
        return Attention(
            name=name, o=o, heads=Heads(heads, kv, head_dim), qkv=qkv, arrangement=FUSED_ARRANGEMENTS.get(cls), attention_class=cls
        )
    parts = {role(n): n for n, _ in rest if role(n) in PARTS}
    if set(parts) != set(PARTS):
        missing = ", ".join(p for p in PARTS if p not in parts)
        raise ConfigError("model", f"{model_name}: {name} has no fused q|k|v projection and no separate {missing} projection")
    widths = {p: _width(block.get_submodule(parts[p][len(prefix) + 1 :]))[1] for p in PARTS}
    kv, remainder = divmod(widths["k"], head_dim)
    if widths["q"] != heads * head_dim or widths["v"] != widths["k"] or remainder or not kv or heads % kv:
        raise ConfigError("model", f"{model_name}: {name}'s q, k, v widths {widths} do not fit {heads} heads of {head_dim}")
    if kv_config is not None and kv_config != kv:
        raise ConfigError("model", f"{model_name}: {parts['k']} holds {kv} key/value heads, the config says {kv_config}")
    return Attention(name=name, o=o, heads=Heads(heads, kv, head_dim), attention_class=type(attn).__name__, **parts)


def layout(model: nn.Module) -> Layout:
    """The model's blocks, attention projections and feed-forward projections, or a ConfigError
    saying which part could not be found."""
    from methods.layers import blocks

    model_name = type(model).__name__
    hidden, heads, head_dim, kv_config = _config_heads(model)
    block_list = blocks(model)
    list_name = next(n for n, m in model.named_modules() if m is block_list)
    found = []
    for i, block in enumerate(block_list):
        prefix = f"{list_name}.{i}"
        attention = _attention(model_name, block, prefix, hidden, heads, head_dim, kv_config)
        ffn = [(n, m) for n, m in _linears(block, prefix) if not n.startswith(attention.name + ".")]
        downs = [n for n, m in ffn if _width(m)[1] == hidden]
        if not downs:
            raise ConfigError(
                "model", f"{model_name}: block {prefix} has no feed-forward output projection (a linear layer writing {hidden} features)"
            )
        down = downs[-1]
        up = tuple(n for n, m in ffn if n != down and _width(m)[0] == hidden)
        found.append(Block(name=prefix, attention=attention, down=down, up=up))
    return Layout(blocks=found)


def check_attention_interface(model: nn.Module, method: str) -> str:
    """The name of the attention implementation the model runs (sdpa, eager, ...), or a ConfigError
    when its attention does not go through transformers' attention interface (ALL_ATTENTION_FUNCTIONS),
    where methods that change attention itself (S²-Attn, adaption prompts) go in."""
    if not getattr(type(model), "_supports_attention_backend", False):
        attn = next((type(m).__name__ for m in model.modules() if "attention" in type(m).__name__.lower()), type(model).__name__)
        raise ConfigError(
            "model",
            f"{method} goes in through transformers' attention interface, and {attn} computes its attention itself without it",
        )
    return model.config._attn_implementation


def attention_function(module: nn.Module, implementation: str):  # noqa: ANN201 - transformers' attention signature
    """The attention function `module` calls for `implementation`: a registered one, or "eager",
    which every modeling file defines for itself (GPT-2's scales by layer index, Gemma's caps logits)."""
    import sys

    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if implementation == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[implementation]

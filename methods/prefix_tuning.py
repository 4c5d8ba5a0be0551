"""Prefix-Tuning: Optimizing Continuous Prompts for Generation (Li & Liang 2021, arXiv 2101.00190).

Every layer's attention sees n extra trainable key/value positions before the real tokens; the
model's weights stay frozen. The prefix enters through the transformers KV cache: before each
forward that starts a sequence (no cache, or an empty one, as `generate` passes on its first
step), a cache holding the prefix is built, so later decoding steps find it there and it is never
added twice. The attention mask gains n leading ones and explicit position ids move by n, so
real tokens sit at positions n..n+T-1 as if the prefix were a real past (Li & Liang's code and
peft do the same); logits and labels keep the input's length.

Two parameterisations (§4.3 of the paper): the prefix table P (n x 2·layers·kv_width) trained
directly, or P = MLP(P') with P' (n x e) and a two-layer tanh MLP e -> hidden' -> 2·layers·kv_width,
which the paper found more stable. For grouped-query attention the kv width is kv_heads·head_dim.

Initialisation (§7.2): a N(0, 1) table (peft's default) or, with init = "vocab", the keys and values
the frozen model computes for n random vocabulary tokens. The paper found real-word activations
clearly better than random ones, even for task-irrelevant words; at init the model then reads its
input exactly as if those n words had come before it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from methods.arch import layout
from methods.base import Adapted, ConfigError, MethodConfig, freeze

INITS = ("random", "vocab")


@dataclass(frozen=True, kw_only=True)
class PrefixTuningConfig(MethodConfig):
    n: int = 10
    """Prefix length: virtual key/value positions added to every layer's attention."""
    projection: bool = False
    """Reparameterise the prefix as MLP(P') and train through the MLP (the paper's reparametrization)."""
    projection_dim: int = 512
    """Hidden width of that MLP (hidden' in the paper; 512 in Li & Liang's code); used with projection only."""
    embedding_dim: int | None = None
    """Width of P', the MLP's input; None = the model's hidden size (Li & Liang's code); used with projection only."""
    init: str = "random"
    """"random": N(0, 1); "vocab": the model's own keys and values for n random vocabulary tokens (direct prefix only)."""

    def validate(self) -> None:
        if self.n < 1:
            raise ConfigError("n", f"must be >= 1, got {self.n}")
        if self.projection_dim < 1:
            raise ConfigError("projection_dim", f"must be >= 1, got {self.projection_dim}")
        if self.embedding_dim is not None and self.embedding_dim < 1:
            raise ConfigError("embedding_dim", f"must be >= 1, got {self.embedding_dim}")
        if self.embedding_dim is not None and not self.projection:
            raise ConfigError("embedding_dim", "only applies with projection = true")
        if self.init not in INITS:
            raise ConfigError("init", f"must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.init == "vocab" and self.projection:
            raise ConfigError("init", "vocab sets the prefix table itself, which projection replaces by MLP(P')")


@dataclass(frozen=True)
class KVGeometry:
    """The shape of a decoder's key/value cache."""

    layers: int
    kv_heads: int
    head_dim: int
    hidden: int

    @property
    def width(self) -> int:
        """Columns of the prefix table: a key and a value for every layer."""
        return 2 * self.layers * self.kv_heads * self.head_dim


def kv_geometry(model: nn.Module) -> KVGeometry:
    """Layers, kv heads and head width of a decoder-only model that generates through a KV cache."""
    config = getattr(model, "config", None)
    can_generate = getattr(model, "can_generate", lambda: False)()
    if config is None or getattr(config, "is_encoder_decoder", False) or not can_generate:
        raise ConfigError(
            "model",
            f"prefix tuning injects keys and values through the KV cache of a decoder-only generative model; "
            f"{type(model).__name__} is not one",
        )
    text = config.get_text_config()
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    try:  # the projections' widths: Falcon's multi-query config states no num_key_value_heads
        kv_heads = layout(model).blocks[0].attention.heads.kv_heads
    except ConfigError:
        pass
    return KVGeometry(text.num_hidden_layers, kv_heads, head_dim, text.hidden_size)


class PrefixEncoder(nn.Module):
    """Holds the trainable prefix and returns its keys and values as (2·layers, kv_heads, n, head_dim)."""

    def __init__(self, geometry: KVGeometry, cfg: PrefixTuningConfig):
        super().__init__()
        self.geometry = geometry
        self.n = cfg.n
        # Both tables start N(0, 1), as nn.Embedding does in Li & Liang's code and in peft (init = "vocab" then
        # overwrites the direct table in apply).
        if cfg.projection:
            self.embedding = nn.Parameter(torch.randn(cfg.n, cfg.embedding_dim or geometry.hidden))
            self.mlp = nn.Sequential(
                nn.Linear(self.embedding.shape[1], cfg.projection_dim), nn.Tanh(), nn.Linear(cfg.projection_dim, geometry.width)
            )
        else:
            self.prefix = nn.Parameter(torch.randn(cfg.n, geometry.width))

    def forward(self) -> Tensor:
        table = self.mlp(self.embedding) if hasattr(self, "mlp") else self.prefix
        g = self.geometry
        # Columns are laid out layer by layer, key then value, head by head (peft's layout too).
        return table.view(self.n, 2 * g.layers, g.kv_heads, g.head_dim).permute(1, 2, 0, 3)


@torch.no_grad()
def vocab_prefix(model: nn.Module, geometry: KVGeometry, ids: Tensor) -> Tensor:
    """The (n x width) prefix table holding the frozen model's keys and values for the n token ids (1 x n)."""
    n = ids.shape[1]
    was_training = model.training
    model.eval()  # no dropout in the activations the prefix starts from
    cache = model(input_ids=ids, use_cache=True).cache
    model.train(was_training)
    kv = torch.stack([t[0] for layer in cache.layers[: geometry.layers] for t in (layer.keys, layer.values)])
    # (2·layers, kv_heads, n, head_dim) -> the table layout PrefixEncoder.forward reads.
    return kv.permute(2, 0, 1, 3).reshape(n, geometry.width).float()


def _inject_prefix(encoder: PrefixEncoder) -> Any:
    """A forward pre-hook that puts the prefix into the cache and widens the mask and positions by n."""
    from transformers import DynamicCache

    n = encoder.n

    def hook(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if len(args) > 1:
            raise TypeError("a prefix-tuned model takes input_ids as its only positional argument; pass the rest by keyword")
        if args:
            kwargs["input_ids"] = args[0]
        if model.training and getattr(model, "is_activation_checkpointing", False):
            # Checkpointed layers drop the cache, and with it the prefix.
            raise RuntimeError("prefix tuning does not work with gradient checkpointing (the layers discard the KV cache)")
        inputs = kwargs.get("input_ids")
        if inputs is None:
            inputs = kwargs["inputs_embeds"]
        batch = inputs.shape[0]
        cache = kwargs.pop("cache", None)
        if cache is None:
            cache = kwargs.pop("past_key_values", None)  # the name before transformers 5.40
        if cache is None:
            cache = DynamicCache(config=model.config)
        if cache.get_seq_length() == 0:
            # A non-empty cache was begun here and holds the prefix already.
            kv = encoder().to(model.get_input_embeddings().weight.dtype)
            # One expand and one unbind for the whole table: backward then sums over the batch once and
            # stacks the per-layer gradients once, where indexing per layer would zero-fill and add
            # a table-sized gradient for every key and value (2 x layers of them).
            parts = kv.unsqueeze(1).expand(-1, batch, -1, -1, -1).unbind(0)
            for layer in range(encoder.geometry.layers):
                cache.update(parts[2 * layer], parts[2 * layer + 1], layer)
        kwargs["cache"] = cache
        mask = kwargs.get("attention_mask")
        if mask is not None:
            if mask.dim() != 2:
                raise ValueError(f"prefix tuning needs a 2D attention mask, got shape {tuple(mask.shape)}")
            kwargs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)
        if kwargs.get("position_ids") is not None:
            # generate() counts positions from 0 over the real tokens; without ids the model counts from the cache length.
            kwargs["position_ids"] = kwargs["position_ids"] + n
        return (), kwargs

    return hook


class PrefixTuning:
    name = "prefix_tuning"
    version = "1"
    Config = PrefixTuningConfig
    init_atol: ClassVar[float | None] = None  # the prefix changes every layer's attention from the start
    packs: ClassVar[bool] = False  # a cache holds its prefix, and transformers finds row boundaries only without one
    battery_configs: ClassVar[list[dict[str, Any]]] = [
        {"n": 4},
        {"n": 3, "projection": True, "projection_dim": 16},
        {"n": 2, "init": "vocab"},
    ]
    # BERT has no decoder KV cache to carry a prefix.
    battery_kinds: ClassVar[tuple[str, ...]] = ("llama", "gpt2")

    def apply(self, model: nn.Module, cfg: PrefixTuningConfig) -> Adapted:
        geometry = kv_geometry(model)
        max_positions = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        if max_positions is not None and cfg.n >= max_positions:
            raise ConfigError("n", f"{cfg.n} leaves no positions for tokens: the model has {max_positions}")
        if hasattr(model, "prefix_encoder"):
            raise ConfigError("model", "already has a prefix_encoder; apply prefix tuning once")
        freeze(model)
        weight = model.get_input_embeddings().weight
        encoder = PrefixEncoder(geometry, cfg).to(weight.device)
        if cfg.init == "vocab":
            # Before the hook exists, so that the model computes these without a prefix.
            with torch.no_grad():
                ids = torch.randint(weight.shape[0], (1, cfg.n), device=weight.device)
                encoder.prefix.copy_(vocab_prefix(model, geometry, ids))
        model.prefix_encoder = encoder
        model.register_forward_pre_hook(_inject_prefix(encoder), with_kwargs=True)
        return Adapted(model=model, trainable=list(encoder.parameters()))

    def expected_trainable(self, model: nn.Module, cfg: PrefixTuningConfig) -> int:
        """W = 2 · layers · kv_heads · head_dim. Direct: n · W.
        With projection (e = embedding_dim or hidden, h = projection_dim): n·e + (e·h + h) + (h·W + W)."""
        g = kv_geometry(model)
        if not cfg.projection:
            return cfg.n * g.width
        e, h = cfg.embedding_dim or g.hidden, cfg.projection_dim
        return cfg.n * e + e * h + h + h * g.width + g.width

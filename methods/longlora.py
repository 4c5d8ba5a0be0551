"""LongLoRA: Efficient Fine-tuning of Long-Context Large Language Models (Chen et al. 2023, arXiv 2309.12307).

Two parts, for causal language models with rotary positions whose attention goes through
transformers' attention interface (Llama, Mistral, Qwen2, Gemma-3, Phi, GPT-NeoX):
- Shifted sparse attention (S²-Attn), while training only: the sequence is cut into groups of G
  tokens (G = group_size_ratio * length; 1/4 in the paper) and every token attends within its
  group; half of the heads use groups shifted by G/2, so that information flows between
  neighbouring groups. In eval mode (lm-eval, generation) attention is the model's own full one.
- LoRA on the attention projections plus trainable embeddings and normalisation layers: the
  paper's "LoRA+", without which LoRA does not adapt to longer contexts. The authors' fine-tune.py
  trains the parameters named "embed" and "norm" (ModelScope swift's port keeps that default); on
  their untied Llama-2 that leaves the output head frozen, but on a model that ties the head to the
  input embeddings (SmolLM2, Gemma) training the embeddings trains the head too, at the same learning
  rate as the LoRA matrices.

A long-context method: the paper trains at 8k-100k tokens, G = 2048 or more. At short context both
parts cost accuracy, measured (suites/longlora_ablation.toml; SmolLM2-135M, ARC-Easy rows of at most
128 tokens, lr 2.74e-3, seed 0, scored on 128 validation rows, one seed each, standard error about
0.044): LoRA 0.648, LongLoRA 0.445, LongLoRA without the embeddings 0.547, S²-Attn alone on LoRA 0.516,
LoRA+ under full attention 0.578.
- S²-Attn: with groups of at most 32 tokens, the first training step's loss is 10.80, about that of a
  uniform guess over the 49,152 tokens, where the same step under full attention gives 4.08; the
  model trains under that attention and is scored under full attention.
- LoRA+: the tied embeddings and head trained at the LoRA rate fit the 256 training rows (mean loss
  of the last 8 steps 0.55 under full attention, LoRA's 1.74).
The authors train at 2e-5 (their README's supervised-fine-tune.py command: --learning_rate 2e-5,
--model_max_length 16384; dvlab-research/LongLoRA), far under the rates LoRA tunes to here.

Refused by name: models that are not causal LMs (BERT: S²-Attn's groups are causal spans of a
sequence read left to right), models with learned absolute positions (GPT-2, OPT: the context the
method extends cannot outgrow their position table), and models that compute attention
themselves (Falcon).

S²-Attn goes in through transformers' attention interface: a function registered in
ALL_ATTENTION_FUNCTIONS (and the model's own mask function under the same name) that the model's
config selects, so no module is patched and bench/ knows nothing of it.

Differences from the paper's pseudo-code:
- a length that is not a multiple of G is padded at the end, where causal attention never looks
  (G is ceil(group_size_ratio * length), so any training batch works; nothing raises);
- the pseudo-code rolls the shifted heads by G/2, which puts the last G/2 tokens and the first
  G/2 in one group, where the first ones see the future (the authors' issue #90). We cut the
  shifted heads' sequence into [0, G/2), [G/2, 3G/2), ..., [n - G/2, n) instead, with no roll:
  the partition of the authors' later flash-attention code, causal everywhere;
- within a group the model's own mask applies (causal, and padding of right-padded batches);
- the paper trains with flash-attention kernels; this calls torch's scaled_dot_product_attention
  once per kind of group: is_causal without a mask when the batch has no padding (torch may then
  pick its flash kernel), an explicit boolean mask otherwise.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from methods.arch import attention_function, check_attention_interface
from methods.base import Adapted, AdapterFileError, ConfigError, Targets, load_into, load_safetensors, save_safetensors
from methods.lora import LoRA, LoRAConfig, is_causal_lm

EXTRA_FILE = "longlora_trainable.safetensors"
"""The embeddings and normalisation weights, by parameter name (the LoRA part is peft's files)."""
BASE_ATTENTION = ("sdpa", "eager")
"""The model attention implementations S²-Attn falls back to in eval mode (their masks are dense)."""
_BASES: dict[str, str] = {}
"""S²-Attn's registered names -> the attention they wrap (models built from one shared config
object all see the name that the first `apply` set)."""


@dataclass(frozen=True, kw_only=True)
class LongLoRAConfig(LoRAConfig):
    targets: Targets = "attention"
    """Which linear layers get an adapter; the paper adapts q, k, v and o."""
    group_size_ratio: float = 0.25
    """Group size G as a fraction of the training sequence length (the paper: 1/4)."""
    shift: bool = True
    """Shift half of the heads by G/2; without it groups never exchange information (the paper's ablation)."""
    train_embeddings: bool = True
    """Train the input embeddings fully (the paper's LoRA+)."""
    train_norms: bool = True
    """Train every normalisation layer fully (the paper's LoRA+)."""

    def validate(self) -> None:
        super().validate()
        if not 0 < self.group_size_ratio <= 1:
            raise ConfigError("group_size_ratio", f"must be in (0, 1], got {self.group_size_ratio}")


def _allowed(mask: Tensor | None) -> Tensor | None:
    """The model's (batch, 1, q, k) mask as booleans (batch, q, k); None means plainly causal.
    Eager masks are additive: 0 where attention is allowed, the dtype's minimum elsewhere."""
    if mask is None:
        return None
    return (mask if mask.dtype == torch.bool else mask == 0)[:, 0]


def _within_groups(
    q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None, start: int, stop: int, size: int, scaling: float, dropout: float
) -> Tensor:
    """Attention inside each group [start, start + size), ... up to `stop`, on (batch, n, heads, d)
    tensors; `allowed` (batch, n, n) is the model's mask, None for plainly causal."""
    batch, _, heads, dim = q.shape
    groups = (stop - start) // size

    def grouped(t: Tensor) -> Tensor:
        return t[:, start:stop].reshape(batch * groups, size, heads, dim).transpose(1, 2)

    mask = None
    if allowed is not None:
        block = allowed[:, start:stop, start:stop].reshape(-1, groups, size, groups, size).diagonal(dim1=1, dim2=3)
        # A query with nothing to attend (padding) attends itself, so that softmax has no empty row.
        mask = block.permute(0, 3, 1, 2) | torch.eye(size, dtype=torch.bool, device=q.device)
        mask = mask.expand(batch, groups, size, size).reshape(batch * groups, 1, size, size)
    # Without a mask the groups are plainly causal, which lets torch pick its flash kernel.
    out = F.scaled_dot_product_attention(
        grouped(q), grouped(k), grouped(v), attn_mask=mask, dropout_p=dropout, is_causal=mask is None, scale=scaling
    )
    return out.transpose(1, 2).reshape(batch, stop - start, heads, dim)


def shifted_sparse_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mask: Tensor | None,
    group_size_ratio: float,
    shift: bool,
    scaling: float,
    dropout: float = 0.0,
) -> Tensor:
    """S²-Attn. query (batch, heads, n, d), key and value (batch, kv_heads, n, d), mask as the
    model built it (or None: causal) -> (batch, n, heads, d), as transformers' attention functions.

    With G = ceil(group_size_ratio * n), heads [0, ceil(H/2)) attend within groups [0, G),
    [G, 2G), ...; heads [ceil(H/2), H) within groups shifted by G/2: [0, G/2), [G/2, 3G/2), ...,
    the last one G - G/2 long. Within a group the model's (causal, padding) mask applies. A
    length that G does not divide is padded at the end: causal attention never looks there."""
    batch, heads, n, dim = query.shape
    if key.shape[2] != n:
        raise ValueError(
            f"S²-Attn attends within one sequence of {n} tokens, got {key.shape[2]} keys (a cache?): "
            "it is for training; call model.eval() to generate"
        )
    size = math.ceil(n * group_size_ratio)
    padded = math.ceil(n / size) * size
    # (batch, n, heads, d), grouped-query heads repeated as repeat_kv does, padded to whole groups.
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    if padded > n:
        q, k, v = (F.pad(t, (0, 0, 0, 0, 0, padded - n)) for t in (q, k, v))
    k, v = (t.repeat_interleave(heads // t.shape[2], dim=2) for t in (k, v))
    allowed = _allowed(mask)
    if allowed is not None and padded > n:
        allowed = F.pad(allowed, (0, padded - n, 0, padded - n), value=False)
    split = heads - heads // 2  # the pseudo-code's chunk(2) along heads
    offset = size // 2 if shift else 0
    parts = [_within_groups(q[:, :, :split], k[:, :, :split], v[:, :, :split], allowed, 0, padded, size, scaling, dropout)]
    if split < heads:
        q, k, v = q[:, :, split:], k[:, :, split:], v[:, :, split:]
        bounds = [(0, offset, offset), (offset, padded - size + offset, size), (padded - size + offset, padded, size - offset)]
        parts.append(torch.cat([_within_groups(q, k, v, allowed, a, b, g, scaling, dropout) for a, b, g in bounds if b > a], dim=1))
    return torch.cat(parts, dim=2)[:, :n].contiguous()


def register_s2_attention(base: str, group_size_ratio: float, shift: bool) -> str:
    """Register S²-Attn over the model's attention `base` (used as is in eval mode) with
    transformers and return the name to set as the model's attention implementation."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = f"longlora_s2_{base}_{group_size_ratio:g}_{'shift' if shift else 'noshift'}"
    if name in ALL_ATTENTION_FUNCTIONS:
        return name
    _BASES[name] = base

    def attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, **kwargs: Any):
        if not module.training:
            return attention_function(module, base)(module, query, key, value, attention_mask, **kwargs)
        out = shifted_sparse_attention(
            query, key, value, attention_mask, group_size_ratio, shift, kwargs.get("scaling") or module.scaling, kwargs.get("dropout", 0.0)
        )
        return out, None

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name


def extra_parameters(model: nn.Module, cfg: LongLoRAConfig) -> dict[str, nn.Parameter]:
    """The embeddings and normalisation weights LoRA+ trains, by parameter name (tied ones once)."""
    wanted: set[int] = set()
    if cfg.train_embeddings:
        wanted.add(id(model.get_input_embeddings().weight))
    if cfg.train_norms:
        wanted |= {id(p) for m in model.modules() if "norm" in type(m).__name__.lower() for p in m.parameters(recurse=False)}
    return {n: p for n, p in model.named_parameters() if id(p) in wanted}


class LongLoRA:
    name = "longlora"
    version = "1"
    init_atol: ClassVar[float] = 0.0
    packs: ClassVar[bool] = False  # S2-Attn groups positions by their index in the row: rows end to end would share groups
    battery_kinds: ClassVar[tuple[str, ...]] = ("llama",)  # GPT-2 (absolute positions) and BERT (an encoder) are refused
    Config = LongLoRAConfig
    battery_configs: ClassVar[list[dict[str, Any]]] = [
        {"r": 4},
        {"r": 2, "targets": "qv", "group_size_ratio": 0.5, "train_embeddings": False},
    ]

    def apply(self, model: nn.Module, cfg: LongLoRAConfig) -> Adapted:
        if not is_causal_lm(model):
            raise ConfigError("model", f"LongLoRA's S²-Attn groups a causal LM's sequence; {type(model).__name__} is not a causal LM")
        if not any("rotary" in type(m).__name__.lower() for m in model.modules()):
            raise ConfigError(
                "model",
                f"LongLoRA extends the context of models with rotary positions; {type(model).__name__} has learned absolute "
                "positions, whose table caps the context",
            )
        implementation = check_attention_interface(model, "LongLoRA's S²-Attn")
        base = _BASES.get(implementation, implementation)
        if base not in BASE_ATTENTION:
            raise ConfigError("model", f"S²-Attn runs over {' or '.join(BASE_ATTENTION)} attention, this model uses {base!r}")
        adapted = LoRA().apply(model, cfg)
        extra = extra_parameters(model, cfg)
        for p in extra.values():
            p.requires_grad_(True)
        model.set_attn_implementation(register_s2_attention(base, cfg.group_size_ratio, cfg.shift))

        def save(directory: Path) -> None:
            adapted.save(directory)
            save_safetensors(extra, directory / EXTRA_FILE)

        def load(directory: Path) -> None:
            path = Path(directory) / EXTRA_FILE
            state = load_safetensors(path)
            missing = sorted(set(extra) - set(state))
            if missing:
                raise AdapterFileError(
                    f"{path}: missing {len(missing)} tensor(s), e.g. {missing[0]!r} (saved with other train_* settings?)"
                )
            load_into(model, state, source=path)
            adapted.load(directory)

        return dataclasses.replace(adapted, trainable=adapted.trainable + list(extra.values()), save_fn=save, load_fn=load)

    def expected_trainable(self, model: nn.Module, cfg: LongLoRAConfig) -> int:
        """LoRA's r * (in + out) per target, plus vocab * hidden for the embeddings and the
        weights (and biases) of every normalisation layer: hidden * (2 * layers + 1) for Llama (two
        per block and the final one), more for Gemma-3 (four per block and per-head q, k norms) or
        LayerNorms with biases."""
        c = model.config.get_text_config()
        norms = [m for m in model.modules() if "norm" in type(m).__name__.lower()]
        return (
            LoRA().expected_trainable(model, cfg)
            + (c.vocab_size * c.hidden_size if cfg.train_embeddings else 0)
            + (sum(p.numel() for m in norms for p in m.parameters(recurse=False)) if cfg.train_norms else 0)
        )

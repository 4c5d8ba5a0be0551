"""The training loss, and what it reads of a batch: the one definition the training loop, the FLOP
count (bench/trial/flops.py) and the memory forecast (bench/trial/forecast.py) share, so that the
products counted and the bytes forecast are those training runs.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any

import torch
from torch.nn import functional as F


def keeps_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> bool:
    """Whether `loss` can project only the labelled positions onto the vocabulary: a causal LM batch
    (token labels beside input_ids) and a transformers model whose forward slices its hidden states
    with `slice_logits_to_keep` (which takes a boolean mask per row) before the head."""
    ids, labels = batch.get("input_ids"), batch.get("labels")
    if ids is None or labels is None or labels.shape != ids.shape or ids.dim() != 2:
        return False
    module = sys.modules.get(type(model).__module__)
    return hasattr(module, "slice_logits_to_keep") and "logits_to_keep" in inspect.signature(model.forward).parameters


def packs(method: Any, model: torch.nn.Module) -> bool:
    """Whether the rows of a micro-batch can train laid end to end in shared rows
    (bench.tasks.tokens.collate_packed): same loss and gradients as the padded batch, fewer tokens
    through every layer. It takes a causal LM whose transformers code builds its attention mask with
    masking_utils.create_causal_mask, which turns restarting position_ids into a mask that stops at
    row boundaries, and a method that computes each token from its own row only: methods that put
    positions in front of a row (prompt, prefix tuning) or group positions (LongLoRA's shifted
    attention) say `packs = False` (tests/test_methods.py checks every method that packs)."""
    if not getattr(method, "packs", True) or any(getattr(child, "prepends_positions", False) for child in model.children()):
        return False
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    module = sys.modules.get(type(model).__module__)
    can_generate = getattr(model, "can_generate", None)
    attention = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return (hasattr(module, "create_causal_mask") and callable(can_generate) and can_generate()
            and attention in ALL_MASK_ATTENTION_FUNCTIONS  # its mask is built by masking_utils (LLaMA-Adapter registers one)
            and {"position_ids", "use_cache"} <= inspect.signature(model.forward).parameters.keys())


def packing_cost(method: Any, model: torch.nn.Module) -> float | None:
    """What Prepared.collate_for needs: the model's width_cost where it trains packed rows (`packs`), else None."""
    return width_cost(model) if packs(method, model) else None


def width_cost(model: torch.nn.Module) -> float:
    """Attention's work per position per unit of row width over the linear layers' work per
    position (bench.tasks.tokens.collate_packed weighs bin widths with it): per layer, scores and
    their weighted sum take ~4 x hidden multiply-adds per position per position attended, the
    linear layers ~2 x their parameters per position."""
    config = model.config
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 1)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd")
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    per_layer = sum(p.numel() for p in model.parameters() if id(p) not in embeddings) / layers
    return 4 * hidden / (2 * per_layer)


def prepended(model: torch.nn.Module) -> int:
    """Positions a method puts in front of every input (methods/prompt_tuning.py Prefix.n); 0 for none."""
    return sum(child.n for child in model.children() if getattr(child, "prepends_positions", False))


def labelled_positions(labels: torch.Tensor) -> torch.Tensor:
    """Rows x width booleans: the positions whose next token is labelled, the only logits a causal LM
    loss reads."""
    keep = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    keep[:, :-1] = labels[:, 1:] != -100
    return keep


def loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], labelled_only: bool = True) -> torch.Tensor:
    """The training loss of `batch`: the model's own (`model(**batch).loss`), except that a causal LM
    projects onto its vocabulary only the positions whose next token is labelled. Instruction and
    classification rows label their answer alone (two of ~60 tokens a row in SST-2), so the head's
    matrix product, its full-vocabulary log-softmax and their backward (a fifth of SmolLM2-135M's
    step) were spent on logits the loss ignores. Same value: the mean next-token cross-entropy over
    labelled tokens, computed in float32 as transformers' ForCausalLMLoss does. `labelled_only` False:
    the model's own loss always (how trials ran before; bench.trial.forecast.compare replays them)."""
    # A packed batch (position_ids, no attention_mask): transformers looks for row boundaries only
    # without a cache, and builds one unless told not to; training reads none.
    extra = {"use_cache": False} if "position_ids" in batch and "attention_mask" not in batch else {}
    if not labelled_only or not keeps_logits(model, batch):
        return model(**batch, **extra).loss
    labels = batch["labels"]
    if n := prepended(model):
        # The prompt's positions score nothing, except its last, which scores the input's first token
        # (as the model's own loss counts it): the labels of the whole sequence the model runs.
        labels = torch.cat([labels.new_full((labels.shape[0], n), -100), labels], dim=1)
    keep = labelled_positions(labels)
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}, logits_to_keep=keep, **extra).logits
    return F.cross_entropy(logits.float(), labels[:, 1:][keep[:, :-1]])


def _text_width(batch: dict[str, torch.Tensor]) -> int | None:
    ids = batch.get("input_ids")
    return int(ids.shape[1]) if ids is not None and ids.dim() == 2 else None


def batch_shape(batch: dict[str, torch.Tensor]) -> tuple[int, int, int | None]:
    """(rows, width, kept) of a micro-batch as the model runs it (padding included; width 1 without
    tokens; kept: the positions whose next token is labelled, None without token labels)."""
    labels, width = batch.get("labels"), _text_width(batch)
    kept = int((labels[:, 1:] != -100).sum()) if width is not None and labels is not None and labels.dim() == 2 else None
    return int(next(iter(batch.values())).shape[0]), width or 1, kept

"""The training loss, and what it reads of a batch: the one definition the training loop, the FLOP
count (bench/trial/flops.py) and the memory forecast (bench/trial/forecast.py) share, so that the
products counted and the bytes forecast are those training runs.
"""

from __future__ import annotations

import inspect
import sys

import torch
from torch.nn import functional as F


def keeps_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> bool:
    """Whether `loss` can project only the labelled positions onto the vocabulary: a causal LM batch
    (token labels beside input_ids) and a transformers model whose forward slices its hidden states
    with `slice_logits_to_keep` (which takes a boolean mask per row) before the head."""
    ids, labels = batch.get("input_ids"), batch.get("labels")
    if ids is None or labels is None or labels.shape != ids.shape or ids.dim() != 2:
        return False
    if any(getattr(child, "prepends_positions", False) for child in model.children()):  # methods/prompt_tuning.py
        return False
    module = sys.modules.get(type(model).__module__)
    return hasattr(module, "slice_logits_to_keep") and "logits_to_keep" in inspect.signature(model.forward).parameters


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
    if not labelled_only or not keeps_logits(model, batch):
        return model(**batch).loss
    labels = batch["labels"]
    keep = labelled_positions(labels)
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}, logits_to_keep=keep).logits
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

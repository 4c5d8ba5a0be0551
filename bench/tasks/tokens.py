"""Text rows into training tensors: tokenization (cached on disk), and collation: right-padded rows,
or rows laid end to end without padding."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from typing import Any

import datasets
import torch

from bench.paths import cache_dir
from bench.tasks.registry import Example

# Bump when a prompt format or the tokenization changes, so cached datasets are rebuilt.
FORMAT_VERSION = 1


def _encode(batch: dict[str, list[str]], tokenizer: Any, max_length: int) -> dict[str, list[list[int]]]:
    out: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
    prompts = tokenizer(batch["prompt"])["input_ids"]
    # Tokenize prompt + answer together and split at the prompt's length, as lm-eval does
    # when it scores a continuation, so training sees the very tokens that are scored.
    wholes = tokenizer([p + a for p, a in zip(batch["prompt"], batch["answer"], strict=True)])["input_ids"]
    for prompt, whole in zip(prompts, wholes, strict=True):
        answer = whole[len(prompt):][: max_length - 2] + [tokenizer.eos_token_id]
        context = whole[: len(prompt)]
        context = context[max(0, len(context) - (max_length - len(answer))):]  # keep the answer
        out["input_ids"].append(context + answer)
        out["labels"].append([-100] * len(context) + answer)
    return out


def tokenized(name: str, key: list[Any], rows: Any, tokenizer: Any, max_length: int) -> datasets.Dataset:
    """input_ids and labels (-100 on prompt tokens) of the Examples `rows()` returns, unpadded.

    Cached under cache_dir()/data/ by `key` (what selects the rows) and the tokenizer, so later
    trials with the same data and tokenizer reuse it without calling `rows`.
    """
    digest = json.dumps([FORMAT_VERSION, *key, max_length, tokenizer.name_or_path, len(tokenizer)])
    # A file task's name is a path: keep only safe characters in the folder name.
    label = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)[-40:]
    path = cache_dir() / "data" / f"{label}-{hashlib.sha256(digest.encode()).hexdigest()[:16]}"
    if not path.exists():
        examples: list[Example] = rows()
        data = datasets.Dataset.from_list([{"prompt": e.prompt, "answer": e.answer} for e in examples]).map(
            _encode, batched=True, remove_columns=["prompt", "answer"],
            fn_kwargs={"tokenizer": tokenizer, "max_length": max_length})
        # Trials may build the same dataset at once: write aside, then rename into place.
        tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex}")
        data.save_to_disk(str(tmp))
        try:
            os.rename(tmp, path)
        except OSError:  # another trial finished first; its copy is identical
            shutil.rmtree(tmp)
    return datasets.load_from_disk(str(path))


def collate(batch: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch of tokenized rows: padding gets attention 0 and label -100."""
    width = max(len(row["input_ids"]) for row in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    for i, row in enumerate(batch):
        length = len(row["input_ids"])
        input_ids[i, :length] = torch.as_tensor(row["input_ids"])
        attention_mask[i, :length] = 1
        labels[i, :length] = torch.as_tensor(row["labels"])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _bins(lengths: list[int], width: int) -> list[list[int]]:
    """Row indices per bin of `width` positions: first fit, longest rows first (ties keep the order)."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fit = next((b for b, free in enumerate(room) if lengths[i] <= free), None)
        if fit is None:
            bins.append([i])
            room.append(width - lengths[i])
        else:
            bins[fit].append(i)
            room[fit] -= lengths[i]
    return bins


def collate_packed(batch: list[dict[str, Any]], pad_id: int, width_cost: float) -> dict[str, torch.Tensor]:
    """A batch's rows laid end to end in as few rows ("bins") as hold them (first fit, longest rows
    first), in transformers' packed-sequence format:
    position_ids restart at 0 on each row and there is no attention_mask, from which the model builds
    a causal mask that stops at row boundaries (masking_utils.find_packed_sequence_indices). Each
    row's first label is -100, so no row is scored from the row before it; a bin's unused tail is a
    segment of its own, padding, unlabelled. SST-2 rows of 8 padded to their longest are a third
    padding, which every layer computes. The bins' width is the longest row times 1, 2, 4, ... or
    all rows together, whichever costs least as positions x (1 + width_cost x width): the linear
    layers' work grows with the positions, attention's with positions x width (bench.trial.loss.
    width_cost, from the model's sizes). A wide model (SmolLM2, 576) takes one row of everything;
    the CI suite's 32-wide ones keep bins as wide as their longest row (one row cost them 4x the
    activations). When bins save no row, the padded batch (collate)."""
    lengths = [len(row["input_ids"]) for row in batch]
    widths = [max(lengths) << k for k in range(16) if max(lengths) << k < sum(lengths)] + [sum(lengths)]
    options = [(len(b) * w * (1 + width_cost * w), w, b) for w in widths for b in [_bins(lengths, w)]]
    _, width, bins = min(options, key=lambda o: o[0])  # ties: the narrower (listed first)
    if len(bins) == len(batch):
        return collate(batch, pad_id)
    input_ids = torch.full((len(bins), width), pad_id, dtype=torch.long)
    labels = torch.full((len(bins), width), -100, dtype=torch.long)
    position_ids = torch.zeros((len(bins), width), dtype=torch.long)
    for b, rows in enumerate(bins):
        start = 0
        for i in rows:
            end = start + lengths[i]
            input_ids[b, start:end] = torch.as_tensor(batch[i]["input_ids"])
            labels[b, start + 1:end] = torch.as_tensor(batch[i]["labels"][1:], dtype=torch.long)
            position_ids[b, start:end] = torch.arange(lengths[i])
            start = end
        position_ids[b, start:] = torch.arange(width - start)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def packed_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens of the rows in a collate_packed batch, its bins' tails excluded: a tail is what follows
    a bin's last labelled position (every tokenized row ends with its labelled end-of-sequence)."""
    labelled = (batch["labels"] != -100).int()
    last = labelled.shape[1] - 1 - labelled.flip(-1).argmax(-1)
    return int((last + 1).sum())

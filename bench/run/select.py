"""`peftbench run SUITE --only SELECTOR`: run only the suite's trials that a selector picks.

A selector is a comma-separated list of terms, each a trial-id prefix or a `key=value` filter on
the trial's expanded spec (what `suite.load` makes of the file; every result file holds it under
`spec`):

    --only 3aafd58f,b0ef08f2                      two trials by id prefix
    --only method=lora,targets=qv,train.seed=0    LoRA on q and v at seed 0
    --only data.task=fmnist-contrast,train.seed=0,method=frozen,method=full

Terms of the same key are alternatives (OR), terms of different keys must all hold (AND); a bare
term is a prefix of the trial id (key `id`). Keys, as a suite's grid writes them:
  - `section.field...`: a dotted path into the spec: `data.task`, `train.lr`, `model.quant`,
    `method.config.r`, `method.version`;
  - `method`, `model`: the method's or model's name;
  - any other bare key: a method config field (`r`, `targets`, `blocks`).
A value matches a string equal to it, a number equal to it as a number (`train.lr=1e-3` matches
0.001), true/false a bool, none a null; a list setting (targets = ["q", "v"]) matches one of its
elements or them joined with + (`q+v`), as trial labels write it.

Every term must match at least one trial of the suite, and the whole selector at least one: a typo
is an error, never a silently smaller run. Tuned studies (bench/run/tune.py) make their trials as
the search goes, so a study is selected whole, when every trial it could make (its search and final
trials at the space's edges, its final trials at every seed) matches the filters; an id prefix
never selects a study.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Protocol

from bench.run.suite import ID_SECTIONS, Suite, Trial, _suggest

ID = "id"
ABSENT = object()


class Selectable(Protocol):
    """What a selector reads: a suite's Trial, or a recorded result (Recorded)."""

    @property
    def id(self) -> str: ...

    @property
    def spec(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Recorded:
    """A result file as a selector sees it: its trial id and spec."""

    id: str
    spec: dict[str, Any]
# Bare keys that name a section's own name rather than a method field.
NAMES = {"method": ("method", "name"), "model": ("model", "name")}


class SelectError(ValueError):
    """A selector that is malformed, or picks nothing (or has a term that picks nothing) in a suite."""


@dataclass(frozen=True)
class Term:
    """One `key=value` (or bare id prefix) of a selector."""

    text: str
    """As written, for messages."""
    key: str
    """The key as written (`id` for a bare prefix)."""
    path: tuple[str, ...]
    """Where in the spec it looks (empty for `id`)."""
    value: str

    def setting(self, trial: Selectable) -> Any:
        """The trial's value at the key, or ABSENT."""
        node: Any = trial.spec
        for part in self.path:
            if not isinstance(node, dict) or part not in node:
                return ABSENT
            node = node[part]
        return node

    def matches(self, trial: Selectable) -> bool:
        if self.key == ID:
            return trial.id.startswith(self.value.lower())
        setting = self.setting(trial)
        return setting is not ABSENT and not isinstance(setting, dict) and _equal(setting, self.value)


def _equal(setting: Any, text: str) -> bool:
    if isinstance(setting, list):
        return any(_equal(item, text) for item in setting) or "+".join(map(str, setting)) == text
    if isinstance(setting, bool):
        return text.lower() == str(setting).lower()
    if setting is None:
        return text.lower() in ("none", "null")
    if isinstance(setting, (int, float)):
        try:
            number = float(text)
        except ValueError:
            return False
        return number == setting or math.isclose(number, setting, rel_tol=1e-12)
    return str(setting) == text


@dataclass(frozen=True)
class Selector:
    """A parsed --only: terms grouped by key; a trial matches when, for every key, one of its terms does."""

    text: str
    groups: dict[str, tuple[Term, ...]]

    @property
    def terms(self) -> list[Term]:
        return [term for group in self.groups.values() for term in group]

    def matches(self, trial: Selectable) -> bool:
        return all(any(term.matches(trial) for term in group) for group in self.groups.values())


def parse(text: str) -> Selector:
    """A selector from its text; SelectError names the bad term."""
    groups: dict[str, list[Term]] = {}
    parts = [part.strip() for part in text.split(",")]
    if not any(parts):
        raise SelectError("--only: empty selector: give trial-id prefixes and/or key=value filters, comma-separated")
    for part in parts:
        if not part:
            raise SelectError(f"--only {text!r}: an empty term (two commas in a row, or one at an end)")
        key, eq, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not eq:
            key, value = ID, part
        if not key or not value:
            raise SelectError(f"--only {part!r}: a filter is key=value, both non-empty")
        if key == ID:
            if not all(c in "0123456789abcdefABCDEF" for c in value):
                raise SelectError(f"--only {part!r}: a trial-id prefix is hexadecimal (ids look like 3aafd58f93f6613b); "
                                  "a filter is key=value")
            path: tuple[str, ...] = ()
        elif key in NAMES:
            path = NAMES[key]
        elif "." in key:
            path = tuple(key.split("."))
            if path[0] not in ID_SECTIONS or not all(path):
                raise SelectError(f"--only {part!r}: {path[0]!r} is not a section of a trial spec{_suggest(path[0], ID_SECTIONS)}")
        elif key in ID_SECTIONS:
            raise SelectError(f"--only {part!r}: {key!r} is a section of the trial spec: filter one of its settings ({key}.<field>=...)")
        else:  # as in a suite's grid: a bare key is a method field
            path = ("method", "config", key)
        groups.setdefault(key, []).append(Term(part, key, path, value))
    return Selector(text, {key: tuple(terms) for key, terms in groups.items()})


def _study_trials(study) -> list[Trial]:
    """Every kind of trial a study can make: its corners and a final trial at each seed."""
    low = {d.key: d.edges()[0] for d in study.tune.space}
    return [*study.corners(), *(study.final_trial(low, seed, {}) for seed in study.tune.seeds)]


def _check_terms(selector: Selector, candidates: list[Selectable], where: str) -> None:
    """Every term must match one of the candidates: a typo is an error, not a smaller run."""
    for term in selector.terms:
        if term.key == ID:
            if not any(term.matches(t) for t in candidates):
                raise SelectError(f"--only {term.text!r}: matches no trial of {where}")
            continue
        settings = [s for s in map(term.setting, candidates) if s is not ABSENT]
        if tables := [s for s in settings if isinstance(s, dict)]:
            keys = ", ".join(".".join((*term.path, k)) for k in sorted(tables[0]))
            raise SelectError(f"--only {term.text!r}: {'.'.join(term.path)} is a table in {where}, not a setting (its keys: {keys})")
        if not any(_equal(s, term.value) for s in settings):
            why = f": no trial's spec has {'.'.join(term.path)}" if not settings else ""
            raise SelectError(f"--only {term.text!r}: matches no trial of {where}{why}")


def _nothing(text: str, where: str) -> SelectError:
    return SelectError(f"--only {text!r}: matches no trial of {where}: each term matches some trial, but none matches "
                       f"them all (terms of different keys must all hold)")


def only(suite: Suite, text: str) -> Suite:
    """The suite cut to what the selector picks; SelectError (one line, naming the selector and the
    suite) when a term or the whole picks nothing."""
    selector = parse(text)
    where = f"suite {suite.name!r} ({suite.path})"
    studies = [(study, _study_trials(study)) for study in suite.studies]
    _check_terms(selector, [*suite.trials, *(t for _, made in studies for t in made)], where)
    trials = [t for t in suite.trials if selector.matches(t)]
    chosen = [study for study, made in studies if ID not in selector.groups and all(selector.matches(t) for t in made)]
    if not trials and not chosen:
        raise _nothing(text, where)
    return dataclasses.replace(suite, trials=trials, studies=chosen)


def pick(recorded: list[Recorded], text: str, where: str) -> list[Recorded]:
    """The recorded trials (result files, `where` names their folder) that the selector picks, by the
    same rules and errors as `only`."""
    selector = parse(text)
    _check_terms(selector, list(recorded), where)
    chosen = [r for r in recorded if selector.matches(r)]
    if not chosen:
        raise _nothing(text, where)
    return chosen

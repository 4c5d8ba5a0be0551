"""Tuning every method on the same budget: search on validation rows, then seeds on held-out rows.

    [tune]                                   # every [[sweep]] block is tuned (a block may say tune = false)
    space = { "train.lr" = { log = [1e-5, 1e-2] }, rank = { choices = [{ r = 4, alpha = 8 }, { r = 16, alpha = 32 }] } }
    trials = 8                               # search trials per tuned configuration: the same for every block
    sampler = "tpe"                          # or "lhs": a Latin hypercube of `trials` points, the budget spread evenly
    seeds = [0, 1, 2]                        # the chosen configuration, retrained once per seed
    metric = "acc"                           # lm-eval metric on the validation rows of the trial's own task
    validation = 64                          # rows carved from the task's train split (never its eval rows)

A block's own `tune` table overrides keys of the top-level one. Each grid point of a tuned block
is one study: `trials` search trials, each an ordinary trial (one result file) that trains on the
train rows minus the validation rows and is scored on the validation rows only (eval.split =
"validation"); the best validation score picks the configuration; `seeds` final trials retrain it
and are scored on the task's eval rows. Two samplers, both seeded:
  tpe  optuna's TPE: `startup` random trials, then proposals modelled on the scores so far. It
       refines near the best, and so may spend trials on near-duplicates (methods_tuned's first run:
       3 of 8 learning rates within 13% of each other).
  lhs  scipy's Latin hypercube, unscrambled: each dimension cut into `trials` equal strata (in log
       space for log ranges), one trial at the centre of each, the strata paired across dimensions at
       random; run in ascending order, so of equal validation scores the lowest setting is chosen.
       It ignores the scores, so every method is searched at the same points: on a one-dimensional
       space, an ascending log grid (McKay, Beckman & Conover 1979).
No study database is kept: the study is rebuilt by replaying the search results on disk in order,
so a resumed run asks the same questions and makes the same choice.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import itertools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SAMPLERS = {"tpe": "optuna.samplers.TPESampler", "lhs": "scipy.stats.qmc.LatinHypercube(scramble=False)"}
"""[tune] sampler -> what each result records as its sampler."""
LEARNS = {"tpe"}
"""Samplers whose next proposal depends on the scores so far: their search runs one trial at a time."""
KINDS = ("log", "uniform", "int", "choices")
KEYS = ("space", "trials", "seeds", "metric", "validation", "seed", "sampler", "startup")


class TuneError(ValueError):
    """A [tune] table that cannot run: (key, message), placed by the suite loader."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key, self.message = key, message


@dataclass(frozen=True)
class Dimension:
    """One searched setting: a grid-style key (train.lr, a method field, or a name whose choices
    are tables that set several keys at once) and its range or choices."""

    key: str
    kind: str
    low: float = 0.0
    high: float = 0.0
    choices: tuple[Any, ...] = ()

    def distribution(self) -> Any:
        from optuna import distributions as d

        if self.kind == "choices":  # by index: optuna's categorical values must be plain scalars
            return d.CategoricalDistribution(list(range(len(self.choices))))
        if self.kind == "int":
            return d.IntDistribution(int(self.low), int(self.high))
        return d.FloatDistribution(self.low, self.high, log=self.kind == "log")

    def at(self, u: float) -> Any:
        """The raw value at `u` in [0, 1) of the range (log-scaled for log ranges): how a Latin
        hypercube's unit point becomes a proposal, in the form optuna would have proposed it."""
        if self.kind == "choices":
            return min(int(u * len(self.choices)), len(self.choices) - 1)
        if self.kind == "int":
            return min(int(self.low + u * (self.high - self.low + 1)), int(self.high))
        if self.kind == "log":
            return math.exp(math.log(self.low) + u * (math.log(self.high) - math.log(self.low)))
        return self.low + u * (self.high - self.low)

    def setting(self, raw: Any) -> dict[str, Any]:
        """The keys a sampled value sets (a table choice sets several). A float is kept to 4
        significant digits: the trial id must not hang on the sampler's last bits, which may differ
        between machines and numpy builds."""
        value = self.choices[raw] if self.kind == "choices" else raw
        if isinstance(value, float):
            value = float(f"{value:.4g}")
        return dict(value) if isinstance(value, dict) else {self.key: value}

    def edges(self) -> list[Any]:
        """Raw values that bound the space: both ends, or every choice (checked before anything runs)."""
        if self.kind == "choices":
            return list(range(len(self.choices)))
        return [int(self.low), int(self.high)] if self.kind == "int" else [self.low, self.high]

    def record(self) -> dict[str, Any]:
        return {"choices": list(self.choices)} if self.kind == "choices" else {self.kind: [self.low, self.high]}


@dataclass(frozen=True)
class TuneSpec:
    """A block's tuning settings, after the top-level [tune] and the block's own are merged."""

    space: tuple[Dimension, ...]
    trials: int
    seeds: tuple[int, ...]
    metric: str = "acc"
    validation: int = 64
    seed: int = 0
    """The sampler's seed."""
    sampler: str = "tpe"
    """A key of SAMPLERS: "tpe" (adaptive) or "lhs" (the budget spread evenly over the space)."""
    startup: int = 0
    """tpe only: search trials sampled at random before TPE models the results (default: half the budget)."""

    def record(self) -> dict[str, Any]:
        """What each result says about how it was tuned."""
        startup = self.startup if self.sampler == "tpe" else None
        return {"sampler": SAMPLERS[self.sampler], "sampler_seed": self.seed, "startup_trials": startup, "budget": self.trials,
                "space": {d.key: d.record() for d in self.space}, "seeds": list(self.seeds), "metric": self.metric,
                "validation_rows": self.validation}


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise TuneError(key, f"must be a finite number, got {value!r}")
    return float(value)


def _dimension(key: str, raw: Any) -> Dimension:
    where = f"space.{key}"
    if not isinstance(raw, dict) or len(raw) != 1 or next(iter(raw)) not in KINDS:
        raise TuneError(where, f"must be a table with one of {', '.join(KINDS)}, e.g. {{ log = [1e-5, 1e-2] }}, got {raw!r}")
    kind, value = next(iter(raw.items()))
    if kind == "choices":
        if not isinstance(value, list) or not value:
            raise TuneError(f"{where}.choices", "must be a non-empty list")
        return Dimension(key, kind, choices=tuple(value))
    if not isinstance(value, list) or len(value) != 2:
        raise TuneError(f"{where}.{kind}", f"must be [low, high], got {value!r}")
    low, high = (_number(f"{where}.{kind}", v) for v in value)
    if not low < high:
        raise TuneError(f"{where}.{kind}", f"low must be below high, got {value!r}")
    if kind == "log" and low <= 0:
        raise TuneError(f"{where}.{kind}", f"a log range must be positive, got {value!r}")
    if kind == "int" and (low != int(low) or high != int(high)):
        raise TuneError(f"{where}.{kind}", f"must be whole numbers, got {value!r}")
    return Dimension(key, kind, low, high)


def parse(raw: dict[str, Any]) -> TuneSpec:
    """A merged [tune] table, checked; TuneError names the key."""
    for key in raw:
        if key not in KEYS:
            raise TuneError(key, f"unknown key (known: {', '.join(KEYS)})")
    space = raw.get("space")
    if not isinstance(space, dict) or not space:
        raise TuneError("space", "required: a table of searched settings, e.g. { \"train.lr\" = { log = [1e-5, 1e-2] } }")
    dims = tuple(_dimension(k, v) for k, v in space.items())
    trials = raw.get("trials")
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise TuneError("trials", f"required: the search budget, a whole number >= 1, got {trials!r}")
    seeds = raw.get("seeds")
    # Types before set(): a table among the seeds is unhashable.
    if (not isinstance(seeds, list) or len(seeds) < 3
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds) or len(set(seeds)) != len(seeds)):
        raise TuneError("seeds", f"required: at least 3 distinct whole numbers (the final retrainings), got {seeds!r}")
    metric = raw.get("metric", "acc")
    if not isinstance(metric, str) or not metric:
        raise TuneError("metric", f"must be an lm-eval metric name such as acc, got {metric!r}")
    validation = raw.get("validation", 64)
    if isinstance(validation, bool) or not isinstance(validation, int) or validation < 1:
        raise TuneError("validation", f"must be a whole number of rows >= 1, got {validation!r}")
    sampler = raw.get("sampler", "tpe")
    if sampler not in SAMPLERS:
        raise TuneError("sampler", f"unknown sampler {sampler!r} (known: {', '.join(SAMPLERS)})")
    if sampler != "tpe" and "startup" in raw:
        raise TuneError("startup", f"applies to the tpe sampler only; {sampler} takes no startup trials")
    seed = raw.get("seed", 0)
    startup = raw.get("startup", max(1, trials // 2))
    for key, value in (("seed", seed), ("startup", startup)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise TuneError(key, f"must be a whole number >= 0, got {value!r}")
    return TuneSpec(dims, trials, tuple(seeds), metric, validation, seed, sampler, startup)


def merged(top: Any, block: Any) -> dict[str, Any] | None:
    """A block's tuning table: the top-level [tune] with the block's keys over it; None: untuned."""
    if block is False or (top is None and block is None):
        return None
    out = copy.deepcopy(top) if isinstance(top, dict) else {}
    if isinstance(block, dict):
        out.update(copy.deepcopy(block))
    return out


@dataclass
class Study:
    """One grid point of a tuned block: makes its search and final trials through the suite's own
    expansion (`expand(extra_choices)` -> one Trial), so every setting is validated as a grid is."""

    where: str
    """The block, "sweep[3]", and the grid point, for messages."""
    tune: TuneSpec
    expand: Callable[[dict[str, Any]], Any]

    @functools.cached_property
    def key(self) -> str:
        """A stable name for the study: the digest of its final trial's spec without seed and searched settings."""
        base = self.expand(self._fixed({}))
        return hashlib.sha256(json.dumps(base.spec, sort_keys=True).encode()).hexdigest()[:16]

    def _fixed(self, extra: dict[str, Any]) -> dict[str, Any]:
        return {"data.validation": self.tune.validation, **extra}

    def settings(self, raw: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for dim in self.tune.space:
            out.update(dim.setting(raw[dim.key]))
        return out

    def search_trial(self, raw: dict[str, Any], index: int) -> Any:
        base = self.expand(self._fixed({}))
        task = base.spec["data"]["task"]
        # Scored on the validation rows of its own task, and nothing else: no eval row, no
        # forgetting measure (it reads no task rows but costs time that tuning does not need).
        trial = self.expand(self._fixed({**self.settings(raw), "eval.tasks": [task], "eval.split": "validation",
                                         "eval.forgetting": False, "eval.limit": None}))
        return _tagged(trial, {"role": "search", "index": index, "study": self.key, "params": self.settings(raw),
                               **self.tune.record()})

    def final_trial(self, raw: dict[str, Any], seed: int, chosen: dict[str, Any]) -> Any:
        trial = self.expand(self._fixed({**self.settings(raw), "train.seed": seed}))
        return _tagged(trial, {"role": "final", "study": self.key, "params": self.settings(raw), **chosen, **self.tune.record()})

    def corners(self) -> list[Any]:
        """Search and final trials at the space's edges, validated before anything runs."""
        low = {d.key: d.edges()[0] for d in self.tune.space}
        out = []
        for dim in self.tune.space:
            for value in dim.edges():
                raw = {**low, dim.key: value}
                out += [self.search_trial(raw, 0), self.final_trial(raw, self.tune.seeds[0], {})]
        return out


def _tagged(trial: Any, tune: dict[str, Any]) -> Any:
    import dataclasses

    return dataclasses.replace(trial, tune=tune)


def validation_score(result: dict[str, Any], metric: str) -> float | None:
    """A search trial's score on its validation rows, None if it has none (failed, diverged).
    Refuses any result that was not scored on validation rows: selection never sees eval rows."""
    spec = result["spec"]
    if spec["eval"].get("split") != "validation":
        raise ValueError(f"trial {result['trial_id']}: scored on {spec['eval'].get('split', 'eval')} rows, not validation rows")
    if result["status"] != "success":
        return None
    value = result["eval"]["lm_eval"].get(spec["data"]["task"], {}).get(metric)
    return None if value is None or not math.isfinite(value) else float(value)


def select(scores: list[float | None]) -> int | None:
    """The index of the best validation score (the earliest of equals), None if none scored."""
    scored = [(s, -i) for i, s in enumerate(scores) if s is not None]
    return -max(scored)[1] if scored else None


def _tpe(tune: TuneSpec):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(direction="maximize",
                               sampler=optuna.samplers.TPESampler(seed=tune.seed, n_startup_trials=tune.startup))


@dataclass
class _Asked:
    params: dict[str, Any]


class _LatinHypercube:
    """The study interface run() uses (ask, tell) over a fixed design: scipy's unscrambled Latin
    hypercube, whose points sit at the centres of their strata. optuna's own QMCSampler would not
    do: it draws the first trial at random to learn the space, which breaks the strata."""

    def __init__(self, tune: TuneSpec):
        from scipy.stats import qmc

        self.space = tune.space
        # In order (by the first dimension, then the next): scipy's seeded permutation of the strata
        # differs between its `seed` and `rng` arguments and may between releases; the order decides
        # which of equal validation scores is chosen (the earliest), so it must not hang on it. On a
        # one-dimensional space nothing then depends on scipy's random numbers.
        design = qmc.LatinHypercube(d=len(tune.space), scramble=False, seed=tune.seed).random(tune.trials)
        self.points = sorted(tuple(float(u) for u in row) for row in design)
        self.asked = 0

    def ask(self, distributions: dict[str, Any]) -> _Asked:
        row = self.points[self.asked]
        self.asked += 1
        return _Asked({d.key: d.at(u) for d, u in zip(self.space, row)})

    def tell(self, *_: Any, **__: Any) -> None:
        """The design does not depend on the scores."""


def _sampler(tune: TuneSpec):
    return {"tpe": _tpe, "lhs": _LatinHypercube}[tune.sampler](tune)


@dataclass
class Outcome:
    """What a study did: its search trials with their validation scores, the choice, the finals."""

    search: list[tuple[str, dict[str, Any], float | None]]
    chosen: int | None
    finals: list[str]


def run(study: Study, outcomes: Callable[[list[Any]], list[dict[str, Any]]]) -> Outcome:
    """Search, choose, retrain: `outcomes(trials)` returns the trials' results in order (read from
    disk for those that succeeded before, else run and published), so it may run them side by side.
    The trials it gets at once: a sampler that learns from scores asks one search trial at a time,
    one that ignores them (lhs) the whole search, and the finals come together. The sampler only
    ever learns validation scores, in the order of its questions, so the choice is the same however
    the trials were run."""
    from optuna.trial import TrialState

    sampler = _sampler(study.tune)
    distributions = {d.key: d.distribution() for d in study.tune.space}
    search: list[tuple[str, dict[str, Any], float | None]] = []
    raws: list[dict[str, Any]] = []
    batch = 1 if study.tune.sampler in LEARNS else study.tune.trials
    while len(raws) < study.tune.trials:
        asked = [sampler.ask(distributions) for _ in range(min(batch, study.tune.trials - len(raws)))]
        trials = [study.search_trial(a.params, len(raws) + i) for i, a in enumerate(asked)]
        for a, trial, result in zip(asked, trials, outcomes(trials)):
            score = validation_score(result, study.tune.metric)
            if score is None:
                sampler.tell(a, state=TrialState.FAIL)
            else:
                sampler.tell(a, score)
            search.append((trial.id, study.settings(a.params), score))
            raws.append(a.params)
    best = select([s for _, _, s in search])
    if best is None:
        return Outcome(search, None, [])
    chosen = {"chosen_from": search[best][0], "validation_score": search[best][2],
              "search_trials": [tid for tid, _, _ in search]}
    finals = [study.final_trial(raws[best], seed, chosen) for seed in study.tune.seeds]
    outcomes(finals)
    return Outcome(search, best, [trial.id for trial in finals])


def planned(study: Study) -> list[Any]:
    """The trials a study would run if every search trial scored alike (for --dry-run's estimate):
    the search trials' settings then depend on the sampler's seed only."""
    sampler = _sampler(study.tune)
    distributions = {d.key: d.distribution() for d in study.tune.space}
    trials, first = [], None
    for index in range(study.tune.trials):
        asked = sampler.ask(distributions)
        trials.append(study.search_trial(asked.params, index))
        sampler.tell(asked, 0.0)
        first = first or asked.params
    return trials + [study.final_trial(first, seed, {}) for seed in study.tune.seeds]


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, list[Any]]]:
    """A grid cut into its points, each a grid of single choices (the suite expands each alone)."""
    axes = [[c if isinstance(c, dict) else {key: c} for c in choices] for key, choices in grid.items()]
    return [{f"_axis{i}": [choice] for i, choice in enumerate(combo)} for combo in itertools.product(*axes)]


def check_equal_budgets(path: Path, studies: list[Study]) -> tuple[str, str] | None:
    """(key, message) when the tuned blocks do not all get the same search budget and the same seeds."""
    if not studies:
        return None
    first = studies[0]
    for study in studies[1:]:
        if study.tune.trials != first.tune.trials:
            return (f"{study.where}.tune.trials", f"{study.tune.trials} search trials, but {first.where} has "
                    f"{first.tune.trials}: every method gets the same tuning budget")
        if study.tune.seeds != first.tune.seeds:
            return (f"{study.where}.tune.seeds", f"seeds {list(study.tune.seeds)}, but {first.where} has "
                    f"{list(first.tune.seeds)}: every method is retrained on the same seeds")
    return None

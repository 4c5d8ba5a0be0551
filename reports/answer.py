"""The answer box: per model and device, the best configuration for each memory budget.

A configuration fits a budget on its worst seed's peak (the maximum over seeds, not the mean: a
user who reruns it with another seed must still fit). The best is the highest mean score among
those that fit; the runners-up are the others whose 95% interval overlaps the best one's, i.e.
the data cannot tell them apart. The interval is the t interval over seeds, or with one seed
lm-eval's standard error (score ± 1.96 stderr); a configuration with neither is a point.
Only budgets that change the answer get a row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from reports import stats
from reports.blocks import Cell, Section, Table, c_bytes, c_config, natural_key, short_label
from reports.results import score_metrics

BUDGETS_GIB = (0.25, 0.5, 0.75, 1, 1.5, 2, 2.5, 3, 4, 6, 8, 12, 16, 24, 32, 40, 48, 64, 80, 96, 141, 192)
Z95 = 1.959964  # the normal 95% quantile, for lm-eval's standard error of a single run
MAX_RUNNERS_UP = 4  # named in the table; the count says how many more


@dataclass(frozen=True)
class Option:
    """One configuration as the answer box sees it."""

    config: str
    label: str
    n: int
    mean: float
    lo: float
    hi: float
    noise: str  # how lo / hi were obtained
    worst_peak: float  # bytes: the largest peak over seeds

    def score_text(self) -> str:
        if self.noise == "ci":
            return f"{100 * self.mean:.1f} ± {100 * (self.hi - self.mean):.1f}% (n={self.n}, 95% CI)"
        if self.noise == "stderr":
            return f"{100 * self.mean:.1f} ± {100 * (self.hi - self.mean):.1f}% (1 seed, ±1.96 lm-eval stderr)"
        return f"{100 * self.mean:.1f}% (1 seed, no error estimate)"

    def overlaps(self, other: Option) -> bool:
        return self.lo <= other.hi and other.lo <= self.hi


@dataclass(frozen=True)
class Answer:
    budget_gib: float
    best: Option
    close: list[Option]  # within noise of the best, best first
    fits: int  # configurations that fit the budget


def _stderr(trials: pd.DataFrame) -> dict[str, float]:
    """config -> lm-eval's standard error of the score (the mean over tasks) for single-run configs."""
    metrics = score_metrics(trials)
    out: dict[str, float] = {}
    for config, g in trials[trials["status"] == "success"].groupby("config", sort=False):
        errs = [g.iloc[0].get(f"eval.lm_eval.{task}.{metric}_stderr") for task, metric in metrics.items()]
        errs = [float(e) for e in errs if e is not None and not pd.isna(e)]
        if errs and len(errs) == len(metrics):
            out[str(config)] = math.sqrt(sum(e * e for e in errs)) / len(errs)
    return out


def options(trials: pd.DataFrame, groups: pd.DataFrame) -> list[Option]:
    stderr = _stderr(trials)
    out = []
    for _, g in groups.iterrows():
        est = stats.estimate(g["score_values"])
        peaks = [p for p in g["peak_values"] if not pd.isna(p)]
        if est is None or not peaks:
            continue
        if est.has_ci:
            lo, hi, noise = est.lo, est.hi, "ci"
        elif g["config"] in stderr:
            half = Z95 * stderr[g["config"]]
            lo, hi, noise = est.mean - half, est.mean + half, "stderr"
        else:
            lo, hi, noise = est.mean, est.mean, "none"
        out.append(Option(g["config"], str(g["config_label"]), est.n, est.mean, lo, hi, noise, max(peaks)))
    return out


def answers(opts: list[Option]) -> list[Answer]:
    """One answer per budget of the ladder where the best configuration changes."""
    if not opts:
        return []
    lo, hi = min(o.worst_peak for o in opts), max(o.worst_peak for o in opts)
    out: list[Answer] = []
    for budget in BUDGETS_GIB:
        if budget * 2**30 < lo:
            continue
        fits = [o for o in opts if o.worst_peak <= budget * 2**30]
        best = max(fits, key=lambda o: (o.mean, -o.worst_peak))
        if not out or out[-1].best.config != best.config:
            close = sorted((o for o in fits if o is not best and o.overlaps(best)), key=lambda o: (-o.mean, o.worst_peak))
            out.append(Answer(budget, best, close, len(fits)))
        if budget * 2**30 >= hi:
            break
    return out


def _name(o: Option) -> str:
    return short_label(o.label)


def sentence(a: Answer) -> str:
    b = a.best
    text = f"With {a.budget_gib:g} GiB, {_name(b)} scores best ({100 * b.mean:.1f}%, worst-seed peak {c_bytes(b.worst_peak).text})"
    if b.noise == "none":
        text += ", but it ran once and records no error estimate, so how sure that is cannot be said"
    elif not a.close:
        text += f"; none of the other {a.fits - 1} that fit is within noise of it" if a.fits > 1 else \
            "; it is the only configuration that fits"
    else:
        cheapest = min(a.close, key=lambda o: o.worst_peak)
        text += (f"; {len(a.close)} other{'s' if len(a.close) > 1 else ''} within noise of it, so the data cannot "
                 "separate them")
        if cheapest.worst_peak < b.worst_peak:
            text += f" (the lightest of those, {_name(cheapest)}, peaks at {c_bytes(cheapest.worst_peak).text})"
    return text + "."


def table(ans: list[Answer]) -> Table:
    rows = []
    for a in ans:
        close = ", ".join(f"{_name(o)} ({100 * o.mean:.1f}%)" for o in a.close[:MAX_RUNNERS_UP])
        if len(a.close) > MAX_RUNNERS_UP:
            close += f" and {len(a.close) - MAX_RUNNERS_UP} more"
        rows.append([Cell(f"≤ {a.budget_gib:g} GiB", a.budget_gib), c_config(a.best.label),
                     Cell(a.best.score_text(), a.best.mean), c_bytes(a.best.worst_peak),
                     Cell(close or "none", len(a.close)), Cell(sentence(a))])
    return Table(["budget", "best configuration", "score", "worst-seed peak", "within noise of the best", "in one sentence"],
                 rows)


def section(trials: pd.DataFrame, groups: pd.DataFrame) -> Section:
    """The answer box; no blocks (so the report drops it) when no configuration has a score and a peak."""
    s = Section("answer", "Answer: the best configuration per memory budget")
    if trials.empty or groups.empty:
        return s
    device = trials[trials["status"] == "success"].groupby("config")["env.device"].first() \
        if "env.device" in trials else pd.Series(dtype=object)
    g = groups.assign(device=groups["config"].map(device).fillna("unknown device"))
    keys = sorted(g.groupby(["model", "device"], sort=False).groups, key=lambda k: natural_key(f"{k[0]} {k[1]}"))
    for model, dev in keys:
        part = g[(g["model"] == model) & (g["device"] == dev)]
        ans = answers(options(trials, part))
        if not ans:
            continue
        t = table(ans)
        t.caption = f"{model} on {dev}"
        s.table(t)
    if s.blocks:
        s.note("A configuration fits a budget when its worst seed's peak memory (the largest over seeds) is within it; "
               "the best is the highest mean score among those. Within noise: the 95% intervals overlap (t interval "
               "over seeds, or ±1.96 lm-eval standard errors for a single run). A budget gets a row only when the "
               "answer changes.")
    return s


"""The answer box: per model and device, the best configuration for each memory budget.

A configuration fits a budget on its worst seed's peak (the maximum over seeds, not the mean: a
user who reruns it with another seed must still fit). The best is the highest mean score among
those that fit; the runners-up are the others whose 95% interval overlaps the best one's, i.e.
the data cannot tell them apart. Where the results record a validation score for every
configuration (eval.accuracy.val), the best is chosen on it and its test score reported. The
interval is the t interval over seeds, or with one seed lm-eval's standard error (score ± 1.96
stderr); a configuration with neither is a point.
Only budgets that change the answer get a row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from reports import stats
from reports.blocks import Cell, Section, Table, c_bytes, natural_key, short_label
from reports.ranking import ROLE
from reports.results import score_metrics

BUDGETS_GIB = (0.25, 0.5, 0.75, 1, 1.5, 2, 2.5, 3, 4, 6, 8, 12, 16, 24, 32, 40, 48, 64, 80, 96, 141, 192)
VALIDATION = "eval.accuracy.val"
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
    val: float = float("nan")  # mean validation score where the results record one (eval.accuracy.val)

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


def _validation(trials: pd.DataFrame) -> dict[str, float]:
    """config -> mean validation score over its trials, where the results record one."""
    if VALIDATION not in trials:
        return {}
    ok = trials[trials["status"] == "success"]
    vals = pd.to_numeric(ok[VALIDATION], errors="coerce").groupby(ok["config"]).mean().dropna()
    return {str(k): float(v) for k, v in vals.items()}


def options(trials: pd.DataFrame, groups: pd.DataFrame) -> list[Option]:
    stderr = _stderr(trials)
    val = _validation(trials)
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
        out.append(Option(g["config"], str(g["config_label"]), est.n, est.mean, lo, hi, noise, max(peaks),
                          val.get(g["config"], float("nan"))))
    return out


def answers(opts: list[Option]) -> list[Answer]:
    """One answer per budget of the ladder where the best configuration changes."""
    if not opts:
        return []
    lo, hi = min(o.worst_peak for o in opts), max(o.worst_peak for o in opts)
    # Where every configuration has a validation score, the choice is made on it, as the suite chose its
    # learning rates: picking the best of many on the test score would flatter it.
    on_val = all(not math.isnan(o.val) for o in opts)
    out: list[Answer] = []
    for budget in BUDGETS_GIB:
        if budget * 2**30 < lo:
            continue
        fits = [o for o in opts if o.worst_peak <= budget * 2**30]
        best = max(fits, key=lambda o: (o.val if on_val else o.mean, -o.worst_peak))
        if not out or out[-1].best.config != best.config:
            close = sorted((o for o in fits if o is not best and o.overlaps(best)), key=lambda o: (-o.mean, o.worst_peak))
            out.append(Answer(budget, best, close, len(fits)))
        if budget * 2**30 >= hi:
            break
    return out


NAME_LIMIT = 96
"""Characters of a configuration's name in the answer (the full label is on hover): wider than a table
cell's, since a name that is cut where two configurations differ answers nothing."""


def _words(label: str) -> tuple[str, list[str], list[str]] | None:
    """A label as its method, its settings and the words after them; None without settings."""
    head, paren, rest = short_label(label, 0).partition("(")
    if not paren or ")" not in rest:
        return None
    inner, _, tail = rest.partition(")")
    return head, [p.strip() for p in inner.split(",") if p.strip()], tail.split()


def common_words(labels: list[str]) -> list[str]:
    """What every label shares, said once for the group instead of in every name: the words after the
    method's settings ('adamw', 'ep10', 'task=sst2') and, where the labels differ, the settings they
    share ('r=8', 'qv'; a lone configuration keeps its settings in its name)."""
    parsed = [w for w in map(_words, labels) if w is not None]
    if not parsed or len(parsed) < len(labels):
        return []
    words = parsed[0][1] + parsed[0][2] if len(set(labels)) > 1 else parsed[0][2]
    return [w for w in words if all(w in p[1] + p[2] for p in parsed[1:])]


def name(label: str, common: list[str]) -> str:
    if (words := _words(label)) is None:
        return short_label(label, NAME_LIMIT)
    head, settings, tail = words
    kept = [w for w in settings if w not in common]
    text = head + (f"({', '.join(kept)})" if kept else "") + " " + " ".join(w for w in tail if w not in common)
    return short_label(text.strip(), NAME_LIMIT)


def sentence(a: Answer, common: list[str]) -> str:
    b = a.best
    chosen = f"has the best validation score ({100 * b.val:.1f}%), test" if not math.isnan(b.val) else "scores best"
    text = (f"Up to {a.budget_gib:g} GiB, {name(b.label, common)} {chosen}: {b.score_text()}, worst-seed peak "
            f"{c_bytes(b.worst_peak).text}")
    if b.noise == "none":
        text += "; it ran once with no error estimate, so how sure that is cannot be said"
    elif not a.close:
        text += ("; it is the only configuration that fits" if a.fits == 1 else
                 "; the one other that fits is not within noise of it" if a.fits == 2 else
                 f"; none of the other {a.fits - 1} that fit is within noise of it")
    else:
        text += f"; {len(a.close)} other{'s are' if len(a.close) > 1 else ' is'} within noise of it"
        cheapest = min(a.close, key=lambda o: o.worst_peak)
        if cheapest.worst_peak < b.worst_peak:
            text += f", the lightest {name(cheapest.label, common)} at {c_bytes(cheapest.worst_peak).text}"
    return text + "."


def rows(setting: str, ans: list[Answer], common: list[str]) -> list[list[Cell]]:
    out = []
    for a in ans:
        close = ", ".join(f"{name(o.label, common)} ({100 * o.mean:.1f}%)" for o in a.close[:MAX_RUNNERS_UP])
        if len(a.close) > MAX_RUNNERS_UP:
            close += f" and {len(a.close) - MAX_RUNNERS_UP} more"
        out.append([Cell(setting, setting), Cell(f"≤ {a.budget_gib:g} GiB", a.budget_gib),
                    Cell(sentence(a, common), a.best.mean, title=a.best.label), Cell(close or "none", len(a.close))])
    return out


def section(trials: pd.DataFrame, groups: pd.DataFrame) -> Section:
    """The answer box; no blocks (so the report leaves it out) when no configuration has a score and a peak.
    One group per model, task and device: a best configuration across tasks would mean nothing."""
    s = Section("answer", "Answer: the best configuration per memory budget")
    if trials.empty or groups.empty:
        return s
    # A tuning search trial is scored on validation rows carved from the training split: ranked beside held-out
    # scores it would compete on other rows, and the search's best would be a choice made on the score shown.
    search = set(trials.loc[trials[ROLE] == "search", "config"]) if ROLE in trials else set()
    groups = groups[~groups["config"].isin(search)]
    if groups.empty:
        return s
    ok = trials[trials["status"] == "success"]
    device = ok.groupby("config")["env.device"].first() if "env.device" in ok else pd.Series(dtype=object)
    g = groups.assign(device=[memory_of(d) for d in groups["config"].map(device)],
                      task=groups["spec"].map(lambda sp: _task(sp)))
    out: list[list[Cell]] = []
    devices = sorted(g["device"].unique())
    keys = sorted(g.groupby(["model", "task", "device"], sort=False).groups, key=lambda k: natural_key(" ".join(k)))
    for model, task, dev in keys:
        part = g[(g["model"] == model) & (g["task"] == task) & (g["device"] == dev)]
        ans = answers(options(trials, part))
        if not ans:
            continue
        common = common_words(list(part["config_label"]))
        shared = [w for w in common if w not in (f"task={task}", f"model={model}")]
        setting = f"{model}, {task}" + (f", {dev}" if len(devices) > 1 else "") + (f" (all: {', '.join(shared)})" if shared else "")
        out += rows(setting, ans, [*common, f"task={task}", f"model={model}"])  # both are in the setting
    if out:
        header = ["model, task" + (", device" if len(devices) > 1 else ""), "budget",
                  "the answer (hover for the full configuration)", "also within noise of the best"]
        caption = "" if len(devices) > 1 else f"On {devices[0]}"
        if len({row[0].text for row in out}) == 1:  # one setting: said once, in the caption, not on every row
            caption = out[0][0].text + (f" on {devices[0]}" if len(devices) == 1 else "")
            header, out = header[1:], [row[1:] for row in out]
        s.table(Table(header, out, caption=caption))
        s.note("A configuration fits a budget when its worst seed's peak memory (the largest over seeds) is within it; "
               "the best is the highest mean score among those. Within noise: the 95% intervals overlap (t interval "
               "over seeds, or ±1.96 lm-eval standard errors for a single run). A budget gets a row only when the "
               "answer changes." + (" Where the results record a validation score for every configuration, the best "
                                    "is chosen on it and its test score shown: choosing on the test score would flatter it."
                                    if any(not math.isnan(v) for v in _validation(trials).values()) else "")
               + (f" The {len(search)} tuning search trial(s) are left out: they are scored on validation rows; each "
                  "tuned method enters with its chosen configuration, retrained per seed and scored on the held-out rows."
                  if search else ""))
    return s


def memory_of(device: object) -> str:
    """The memory a budget is of: a GPU's own (its name), or the host's RAM for any CPU. A suite run
    over sessions on an Intel and an AMD host is one answer: the CPU model changes step times and
    last bits, not what fits in memory."""
    if not isinstance(device, str):
        return "unknown device"
    return "CPU" if device.startswith("cpu") else device


def _task(spec: dict) -> str:
    data = spec.get("data") if isinstance(spec, dict) else None
    return str(data.get("task")) if isinstance(data, dict) and data.get("task") else "unknown task"

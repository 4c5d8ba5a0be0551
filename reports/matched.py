"""Matched comparisons: configurations that differ in exactly one setting, aggregated over all such pairs.

A single pair (nf4 against bf16 at r=8 on qv with AdamW) with one seed says little; twelve pairs
that all move the same way say a lot. For each axis (the base's quantization, its dtype, the layer
targets, the epochs, the optimizer, the rank) the configurations equal in everything else form
matched pairs; over the pairs of one comparison the report gives how many moved each way, the
median change in score and in peak memory, and the Wilcoxon signed-rank test of those paired
changes (two-sided, exact for small samples). The frozen model is the floor every tuned trial is
set against.
"""

from __future__ import annotations

import statistics
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
from scipy import stats as scipy_stats

from reports.blocks import Cell, Section, Table, c_int, c_pct, c_text, missing, natural_key
from reports.results import get_path, spec_key

ALPHA = 0.05


# ---- Axes ---------------------------------------------------------------------------------------

def _reference_first(preferred: Sequence[Any]) -> Callable[[list[Any]], list[tuple[Any, Any]]]:
    """Comparisons of every value against one reference: the first of `preferred` present, else the
    first value in natural order."""
    def steps(values: list[Any]) -> list[tuple[Any, Any]]:
        ref = next((v for v in preferred if v in values), sorted(values, key=_order)[0])
        return [(ref, v) for v in sorted(values, key=_order) if v != ref]
    return steps


def _adjacent(values: list[Any]) -> list[tuple[Any, Any]]:
    """Comparisons of each value against the next one up: r=4 -> 8 -> 16 -> 64, 1 -> 2 epochs."""
    ordered = sorted(values, key=_order)
    return list(zip(ordered, ordered[1:]))


def _order(v: Any) -> tuple:
    return natural_key(str(v))


@dataclass(frozen=True)
class Axis:
    """One setting a matched comparison varies; everything outside `paths` is held equal."""

    name: str
    """Shown in the table: what differs between the two sides of a pair."""
    column: str
    """The seed-group column (reports.results.tidy) holding the setting's value."""
    paths: tuple[str, ...]
    """Spec paths allowed to differ within a pair: the setting and what travels with it (SGD's learning rate)."""
    steps: Callable[[list[Any]], list[tuple[Any, Any]]]
    """From the values present in a matched set, the (reference, changed) comparisons to make."""


AXES: tuple[Axis, ...] = (
    # Quantizing a base also sets its double quantization and compute dtype; the storage dtype stays.
    Axis("quantization", "quant", ("model.quant", "model.double_quant", "model.compute_dtype"), _reference_first(["none"])),
    Axis("dtype", "dtype", ("model.dtype",), _reference_first(["float32"])),
    Axis("layer targets", "targets", ("method.config.targets",), _reference_first(["qv"])),
    Axis("epochs", "epochs", ("train.epochs",), _adjacent),
    # A sweep tunes the learning rate (and SGD's momentum) with the optimizer: not a difference to hold fixed.
    Axis("optimizer", "optimizer", ("train.optimizer", "train.lr", "train.momentum", "train.weight_decay"),
         _reference_first(["adamw"])),
    # alpha = 2r travels with the rank in the committed suites.
    Axis("rank", "r", ("method.config.r", "method.config.alpha"), _adjacent),
)


@dataclass
class Pair:
    """Two seed groups (reports.results.seed_groups rows) equal except on one axis."""

    axis: Axis
    a: pd.Series
    b: pd.Series


def pairs(groups: pd.DataFrame, axis: Axis) -> list[Pair]:
    """Every matched pair along one axis."""
    if groups.empty or axis.column not in groups:
        return []
    # The frozen model is the floor (floors below), not a configuration of its own: quantizing it changes no tuning.
    groups = groups[groups["method"] != "frozen"]
    keys = groups["spec"].map(lambda s: spec_key(s, axis.paths))
    out = []
    for _, g in groups.groupby(keys, sort=False):
        values = [v for v in dict.fromkeys(g[axis.column]) if not missing(v)]
        if len(values) < 2:
            continue
        for a, b in axis.steps(values):
            for _, ra in g[g[axis.column] == a].iterrows():
                for _, rb in g[g[axis.column] == b].iterrows():
                    out.append(Pair(axis, ra, rb))
    return out


# ---- Paired statistics ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Paired:
    """Changes b - a over matched pairs, and whether they lean one way beyond chance."""

    n: int
    lower: int
    higher: int
    ties: int
    median: float
    lo: float
    hi: float
    p: float | None
    """Wilcoxon signed-rank, two-sided; None when every change is zero (nothing to test)."""

    @property
    def min_p(self) -> float:
        """The smallest two-sided p the exact test can give with these pairs (ties dropped)."""
        return 2 * 0.5 ** (self.n - self.ties) if self.n > self.ties else 1.0

    @property
    def significant(self) -> bool:
        return self.p is not None and self.p < ALPHA


def paired(changes: Sequence[float]) -> Paired | None:
    xs = [float(x) for x in changes if not missing(x)]
    if not xs:
        return None
    nonzero = [x for x in xs if x != 0]
    p = None
    if nonzero:
        with warnings.catch_warnings():
            # scipy warns when ties or zeros make it fall back from the exact distribution; the p stays valid.
            warnings.simplefilter("ignore")
            p = float(scipy_stats.wilcoxon(nonzero).pvalue)
    return Paired(len(xs), sum(x < 0 for x in xs), sum(x > 0 for x in xs), len(xs) - len(nonzero),
                  statistics.median(xs), min(xs), max(xs), p)


@dataclass
class Comparison:
    """All matched pairs of one axis with the same two values, e.g. quantization none -> nf4."""

    axis: Axis
    a: Any
    b: Any
    pairs: list[Pair]
    score: Paired | None  # changes in percentage points
    peak: Paired | None  # changes in % of the reference side's peak
    time: Paired | None  # train time, % change

    @property
    def a_name(self) -> str:
        return side_name(self.axis, self.pairs[0].a)

    @property
    def b_name(self) -> str:
        return side_name(self.axis, self.pairs[0].b)


def side_name(axis: Axis, row: pd.Series) -> str:
    """How one side is called: a quantized base by its format, an unquantized one by its dtype ("bfloat16")."""
    if axis.name == "quantization":
        return str(row.get("base"))
    v = row.get(axis.column)
    if axis.column == "r":
        return f"r={int(v)}"
    if axis.column == "epochs":
        return f"{int(v)} epoch{'s' if int(v) != 1 else ''}"
    return str(v)


def _pct_change(new: Any, old: Any) -> float:
    return float("nan") if missing(new) or missing(old) or not old else 100 * (new / old - 1)


def comparisons(groups: pd.DataFrame, axes: Sequence[Axis] = AXES) -> list[Comparison]:
    out = []
    for axis in axes:
        by: dict[tuple[str, str], list[Pair]] = {}
        for p in pairs(groups, axis):
            by.setdefault((side_name(axis, p.a), side_name(axis, p.b)), []).append(p)
        for ps in by.values():
            out.append(Comparison(
                axis, ps[0].a[axis.column], ps[0].b[axis.column], ps,
                paired([100 * (p.b["score"] - p.a["score"]) for p in ps]),
                paired([_pct_change(p.b["peak"], p.a["peak"]) for p in ps]),
                paired([_pct_change(p.b.get("train_s"), p.a.get("train_s")) for p in ps])))
    return out


def _p_text(x: Paired) -> str:
    if x.p is None:
        return "no change in any pair"
    return f"Wilcoxon signed-rank p = {x.p:.2g}"


def score_sentence(c: Comparison) -> str:
    """The score finding of one comparison with its strength, e.g. 'nf4 scores lower than its bfloat16
    twin in 11 of 12 matched pairs (1 tied; median -13.5 pts, ...; Wilcoxon signed-rank p = 0.00098).'"""
    s = c.score
    assert s is not None
    direction = "lower" if s.lower >= s.higher else "higher"
    count = s.lower if direction == "lower" else s.higher
    tied = f"{s.ties} tied; " if s.ties else ""
    text = (f"{c.b_name} scores {direction} than its {c.a_name} twin in {count} of {s.n} matched pair{'s' if s.n != 1 else ''} "
            f"({tied}median {s.median:+.1f} pts, range {s.lo:+.1f} to {s.hi:+.1f}; {_p_text(s)})")
    if s.significant:
        return text + ": a consistent difference."
    if s.min_p >= ALPHA:
        return text + f": too few pairs for the test to reach 5% (its smallest possible p is {s.min_p:.2g})."
    return text + ": not distinguishable from no difference."


def peak_sentence(c: Comparison) -> str:
    m = c.peak
    assert m is not None
    return (f"peak memory {m.median:+.1f}% (median; range {m.lo:+.1f} to {m.hi:+.1f}%, higher in {m.higher} of {m.n}; "
            f"{_p_text(m)})")


def _paired_cells(x: Paired | None, unit: str) -> list[Cell]:
    if x is None:
        return [Cell("—", ""), Cell("—", ""), Cell("—", "")]
    return [Cell(f"{x.lower} / {x.higher} / {x.ties}", x.lower - x.higher),
            Cell(f"{x.median:+.1f}{unit} ({x.lo:+.1f} to {x.hi:+.1f})", x.median),
            Cell("—", "") if x.p is None else Cell(f"{x.p:.2g}" + ("" if x.min_p < ALPHA else " (n too small)"), x.p)]


def table(comps: Sequence[Comparison], caption: str) -> Table:
    rows = []
    for c in comps:
        rows.append([c_text(c.axis.name), Cell(f"{c.a_name} → {c.b_name}"), c_int(len(c.pairs)),
                     *_paired_cells(c.score, " pts"), *_paired_cells(c.peak, "%"),
                     Cell("—", "") if c.time is None else Cell(f"{c.time.median:+.0f}%", c.time.median)])
    return Table(["axis", "comparison", "pairs", "score lower / higher / tied", "median score change (range)",
                  "Wilcoxon p (score)", "peak lower / higher / tied", "median peak change (range)", "Wilcoxon p (peak)",
                  "median train-time change"], rows, caption=caption)


# ---- The frozen model as the floor ------------------------------------------------------------------

def _floor_key(spec: dict) -> str:
    """Trials scored on the same rows of the same task by the same base share a frozen baseline."""
    return spec_key({"model": spec.get("model"), "task": get_path(spec, "data.task"), "eval": spec.get("eval")})


@dataclass(frozen=True)
class Floor:
    """The untuned model's score and how many tuned trials (seed groups) on the same base fall below it."""

    label: str
    base: str
    score: float
    tuned: int
    below: int
    below_ci: int | None
    """Of those below: how many sit below it by more than the frozen score's lm-eval standard error (None: it has none)."""


def floors(trials: pd.DataFrame | None, groups: pd.DataFrame) -> list[Floor]:
    """One Floor per frozen configuration that tuned configurations share a base, task and evaluation with;
    `trials` supplies lm-eval's standard errors (None: counted against the score alone)."""
    if groups.empty or "method" not in groups:
        return []
    frozen = groups[(groups["method"] == "frozen") & groups["score"].notna()]
    tuned = groups[(groups["method"] != "frozen") & groups["score"].notna()]
    if frozen.empty or tuned.empty:
        return []
    stderr = _stderr_by_config(trials) if trials is not None else {}
    tuned_keys = tuned["spec"].map(_floor_key)
    many_tasks = "task" in frozen and frozen["task"].nunique() > 1
    out = []
    for _, f in frozen.iterrows():
        mine = tuned[tuned_keys == _floor_key(f["spec"])]
        if mine.empty:
            continue
        se = stderr.get(f["config"])
        where = f"{f['base']}, {f['task']}" if many_tasks else str(f["base"])
        out.append(Floor(f"{f['model']} ({where})", str(f["base"]), float(f["score"]), len(mine),
                         int((mine["score"] < f["score"]).sum()),
                         None if se is None else int((mine["score"] < f["score"] - se).sum())))
    return out


def _stderr_by_config(trials: pd.DataFrame) -> dict[str, float]:
    """The lm-eval standard error of each configuration's score (the first task's, first seed)."""
    out: dict[str, float] = {}
    cols = [c for c in trials.columns if c.startswith("eval.lm_eval.") and c.endswith("_stderr")]
    for _, r in trials.iterrows():
        for c in cols:
            v = r.get(c)
            if not missing(v) and r["config"] not in out:
                out[r["config"]] = float(v)
    return out


def floor_sentence(f: Floor) -> str:
    return (f"The untuned {f.label} scores {100 * f.score:.1f}%: {f.below} of {f.tuned} tuned configurations on that base "
            f"score below it" + ("." if f.below_ci is None else f" ({f.below_ci} by more than its lm-eval standard error)."))


# ---- The section -------------------------------------------------------------------------------------

def section(trials: pd.DataFrame, groups: pd.DataFrame) -> Section:
    """Every matched comparison in the results, strongest first, and the frozen floor."""
    s = Section("matched", "Matched comparisons: one setting changed, everything else equal")
    fl = floors(trials, groups)
    for f in fl:
        s.p(floor_sentence(f))
    if fl:
        s.table(Table(["frozen model", "score", "tuned configurations", "below it", "below by more than its standard error"],
                      [[c_text(f.label), c_pct(f.score), c_int(f.tuned), c_int(f.below),
                        Cell("no standard error", "") if f.below_ci is None else c_int(f.below_ci)] for f in fl],
                      caption="The untuned model on each base, against the configurations tuned from it (same task and "
                              "evaluation rows)"))
    comps = [c for c in comparisons(groups) if c.score is not None or c.peak is not None]
    if not comps:
        s.p("No two successful configurations differ in one setting only.")
        return s
    comps.sort(key=lambda c: (AXES.index(c.axis), _order(c.a), _order(c.b)))
    strong = [c for c in comps if c.score is not None and c.score.significant]
    for c in strong:
        s.p(score_sentence(c) + ("" if c.peak is None else f" Its {peak_sentence(c)}."))
    weak = [c for c in comps if c not in strong and c.score is not None]
    if weak:
        s.p("No consistent score difference (Wilcoxon p ≥ 0.05) for: " + "; ".join(
            f"{c.b_name} against {c.a_name} ({c.score.lower} lower, {c.score.higher} higher of {c.score.n}, "
            f"median {c.score.median:+.1f} pts, p = {'—' if c.score.p is None else f'{c.score.p:.2g}'})"
            for c in weak) + ".")
    s.table(table(comps, "Matched pairs per comparison: the same configuration except for one setting (seed means where "
                         "there are several seeds). Counts: pairs where the changed side is lower / higher / equal. Wilcoxon "
                         "signed-rank test of the paired changes, two-sided; '(n too small)': with so few pairs even a "
                         "unanimous change cannot reach p < 0.05."))
    return s


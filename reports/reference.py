"""Every score of a run against a reference run of the same trials, beside the reference's seed spread:
the comparison benchmarks/scores_vs_reference.py prints and the report's section "Scores against a
reference run" shows (`python -m reports.render RUN_DIR --reference REF_DIR`). No torch here.

For every trial id with a successful result in both, every number the result holds under `eval`
(lm-eval metrics per task, the forgetting measure and the held-out losses it comes from, vision
accuracies; lm-eval's standard errors are left out: they describe a score, they are not one) is
compared, and whether |ours - reference| is within the reference's seed spread:

  - "seeds": the trial's configuration (its spec but train.seed) ran at several seeds in the reference:
    the spread is that metric's max - min over them;
  - "suite": it did not: the largest such spread among the replicated configurations of the same
    suite in the reference that record the metric (how far apart seeds alone put a score in that suite);
  - "none": no configuration of the suite was replicated: no spread, so no verdict (only identity).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reports import results as rr
from reports.blocks import Cell, Section, Table, c_num, c_text

RULES = ("seeds", "suite", "none")
RULE_TEXT = {"seeds": "seeds = max - min of the metric over the trial configuration's own seeds in the reference",
             "suite": "suite = no seeds of its own: the largest such spread among the suite's replicated configurations",
             "none": "none = the suite has no replicated configuration: no verdict"}


@dataclass(frozen=True)
class Row:
    """One score of one trial, ours against the reference's."""

    trial_id: str
    label: str
    metric: str
    """The key under `eval`, dotted: lm_eval.sst2.acc, forgetting, accuracy.test."""
    reference: float
    ours: float
    difference: float
    """ours - reference."""
    spread: float | None
    """The reference's seed spread of this metric (max - min), by `rule`; None: unknown."""
    rule: str
    """seeds, suite or none (the module's docstring)."""
    seeds: int
    """Seeds the spread comes from: the configuration's own (rule seeds), the largest-spread one's (suite)."""

    @property
    def identical(self) -> bool:
        return self.ours == self.reference

    @property
    def within(self) -> bool | None:
        return None if self.spread is None else abs(self.difference) <= self.spread


def scores(result: dict[str, Any]) -> dict[str, float]:
    """The numbers under a result's `eval`, by dotted key; standard errors left out."""
    out: dict[str, float] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}.{key}" if prefix else str(key))
        elif isinstance(node, (int, float)) and not isinstance(node, bool) and math.isfinite(node):
            if not prefix.endswith("_stderr"):
                out[prefix] = float(node)

    walk(result.get("eval") or {}, "")
    return out


def successful(*directories: str | Path) -> dict[str, dict[str, Any]]:
    """The folders' successful results by trial id (none: empty); rr.ResultFileError names a bad folder or file."""
    results = (rr.load_file(path) for path in rr.files(*directories))
    return {r["trial_id"]: r for r in results if r.get("status") == "success"}


def load(directory: str | Path) -> dict[str, dict[str, Any]]:
    """successful(), and a ResultFileError where the folder holds no result file at all."""
    if not rr.files(directory):
        raise rr.ResultFileError(f"{directory}: no result files")
    return successful(directory)


@dataclass(frozen=True)
class Spread:
    value: float
    seeds: int


def seed_spreads(reference: dict[str, dict[str, Any]]) -> tuple[dict[str, dict[str, Spread]], dict[str, dict[str, Spread]]]:
    """Per configuration (rr.spec_key: the spec but train.seed) and per suite, each metric's seed
    spread: a configuration's own where it ran at two seeds or more; a suite's is the largest of its
    replicated configurations'."""
    by_config: dict[str, dict[int, dict[str, float]]] = {}
    suite_of: dict[str, str] = {}
    for result in reference.values():
        key = rr.spec_key(result["spec"])
        seed = (result["spec"].get("train") or {}).get("seed")
        by_config.setdefault(key, {})[seed] = scores(result)  # a repeated seed is one sample
        suite_of[key] = result.get("suite", "")
    own: dict[str, dict[str, Spread]] = {}
    suite: dict[str, dict[str, Spread]] = {}
    for key, per_seed in by_config.items():
        if len(per_seed) < 2:
            continue
        metrics = set().union(*per_seed.values())
        for metric in sorted(metrics):
            values = [s[metric] for s in per_seed.values() if metric in s]
            if len(values) < 2:
                continue
            spread = Spread(max(values) - min(values), len(values))
            own.setdefault(key, {})[metric] = spread
            best = suite.setdefault(suite_of[key], {}).get(metric)
            if best is None or spread.value > best.value:
                suite[suite_of[key]][metric] = spread
    return own, suite


def compare(run: dict[str, dict[str, Any]], reference: dict[str, dict[str, Any]]) -> list[Row]:
    own, suite = seed_spreads(reference)
    rows = []
    for trial_id in sorted(set(run) & set(reference), key=lambda i: (reference[i].get("label", ""), i)):
        ref, ours = reference[trial_id], run[trial_id]
        ref_scores, our_scores = scores(ref), scores(ours)
        key = rr.spec_key(ref["spec"])
        for metric in sorted(set(ref_scores) & set(our_scores)):
            spread, rule = own.get(key, {}).get(metric), "seeds"
            if spread is None:
                spread, rule = suite.get(ref.get("suite", ""), {}).get(metric), "suite"
            if spread is None:
                rule = "none"
            rows.append(Row(trial_id, ref.get("label", ""), metric, ref_scores[metric], our_scores[metric],
                            our_scores[metric] - ref_scores[metric], spread.value if spread else None, rule,
                            spread.seeds if spread else 0))
    return rows


@dataclass(frozen=True)
class Summary:
    trials: int
    scores: int
    outside: int
    identical: int
    no_spread: int
    only_run: int
    """Successful trials in the run without a successful reference (not compared)."""
    only_reference: int

    def line(self) -> str:
        extra = f", no spread known: {self.no_spread}" if self.no_spread else ""
        return f"{self.trials} trials, {self.scores} scores, {self.outside} outside spread, identical: {self.identical}{extra}"


def summarize(rows: list[Row], run: dict[str, Any], reference: dict[str, Any]) -> Summary:
    return Summary(trials=len({r.trial_id for r in rows}), scores=len(rows), outside=sum(r.within is False for r in rows),
                   identical=sum(r.identical for r in rows), no_spread=sum(r.within is None for r in rows),
                   only_run=len(set(run) - set(reference)), only_reference=len(set(reference) - set(run)))


# ---- The report's section ------------------------------------------------------------------------

@dataclass(frozen=True)
class Reference:
    """A reference run handed to the report (render --reference) and the report's own results, both as
    successful results by trial id."""

    folder: str
    results: dict[str, dict[str, Any]]
    run: dict[str, dict[str, Any]]

    @classmethod
    def read(cls, folder: str | Path, run_folders: list[str | Path]) -> Reference:
        """A ResultFileError names a missing folder or a bad file; a reference without any result file is an error too."""
        return cls(str(folder), load(folder), successful(*run_folders))


def _threads(results: dict[str, dict[str, Any]]) -> str:
    found = sorted({str((r.get("env") or {}).get("torch_threads")) for r in results.values()})
    return "/".join(found) if found else "?"


def section(reference: Reference | None) -> Section:
    """Our scores against the reference run's, trial by trial: a summary line and every score that differs."""
    s = Section("reference", "Scores against a reference run")
    if reference is None:
        s.p("No reference run given: python -m reports.render RESULTS_DIR --reference REF_DIR compares every score "
            "with an earlier run of the same trials, within the reference's seed spread (benchmarks/scores_vs_reference.py).")
        return s
    run = reference.run
    rows = compare(run, reference.results)
    if not rows:
        s.p(f"No successful trial with a score in both these results and the reference {reference.folder}.")
        return s
    summary = summarize(rows, run, reference.results)
    s.p(f"Reference: {reference.folder} ({len(reference.results)} successful trials, torch threads "
        f"{_threads(reference.results)}; here {_threads(run)}). Every score under eval (lm-eval metrics, forgetting and "
        f"its held-out losses, accuracies) of each trial in both, ours against the reference's, and whether the "
        f"difference is within the reference's seed spread: {summary.line()}."
        + (f" Not compared: {summary.only_run} trial(s) only here, {summary.only_reference} only in the reference."
           if summary.only_run or summary.only_reference else ""))
    per_trial: dict[str, list[Row]] = {}
    for r in rows:
        if r.metric.startswith("lm_eval."):
            per_trial.setdefault(r.trial_id, []).append(r)
    if per_trial:
        same = sum(all(r.identical for r in found) for found in per_trial.values())
        s.p(f"lm-eval scores identical to the reference's in {same} of {len(per_trial)} trials.")
    if outside := [r for r in rows if r.within is False]:
        s.p("Outside the spread: " + "; ".join(
            f"{r.trial_id[:8]} {r.label} {r.metric} {r.difference:+.3g} (spread {r.spread:.3g})" for r in outside[:5])
            + (f"; and {len(outside) - 5} more" if len(outside) > 5 else "") + ".")
    s.note("Spread: " + "; ".join(RULE_TEXT[rule] for rule in RULES if any(r.rule == rule for r in rows))
           + ". Numerics may differ with the thread count; with the same threads a trial's score is reproducible.")
    differing = sorted((r for r in rows if not r.identical),
                       key=lambda r: (r.within is not False, -(abs(r.difference) / r.spread if r.spread else math.inf)))
    table = Table(["id", "label", "metric", "reference", "ours", "difference", "spread", "rule", "within spread"],
                  [[c_text(r.trial_id[:8]), c_text(r.label), c_text(r.metric), c_num(r.reference, 4), c_num(r.ours, 4),
                    Cell(f"{r.difference:+.3g}", r.difference), c_num(r.spread, 4),
                    c_text(r.rule if r.rule == "none" else f"{r.rule} (n={r.seeds})"),
                    Cell({True: "yes", False: "NO", None: "—"}[r.within], {True: 1, False: 0, None: -1}[r.within])]
                   for r in differing],
                  caption=f"The {len(differing)} scores that are not identical to the reference's, those outside the "
                          "spread first, then by difference over spread", filterable=True, collapsed=len(differing) > 12)
    if differing:
        s.table(table)
    else:
        # Every score identical: still a result, shown as a one-row table so the section counts as data.
        s.table(Table(["trials", "scores", "identical"], [[Cell(str(summary.trials)), Cell(str(summary.scores)),
                                                           Cell(str(summary.identical))]],
                      caption="Every compared score is identical to the reference's"))
    return s

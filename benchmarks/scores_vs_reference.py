"""Every score of a run against a reference run of the same trials, beside the reference's seed spread.

    python benchmarks/scores_vs_reference.py RUN_DIR REF_DIR [--json OUT]

For every trial id with a successful result in both folders, every number the result holds under
`eval` (lm-eval metrics per task, the forgetting measure and the held-out losses it comes from,
vision accuracies; lm-eval's standard errors are left out: they describe a score, they are not one)
is printed as reference, ours, difference, and whether |difference| is within the reference's seed
spread:

  - "seeds": the trial's configuration (its spec but train.seed) ran at several seeds in REF_DIR:
    the spread is that metric's max - min over them;
  - "suite": it did not: the largest such spread among the replicated configurations of the same
    suite in REF_DIR that record the metric (how far apart seeds alone put a score in that suite);
  - "none": no configuration of the suite was replicated: no spread, so no verdict (only identity).

The last line: "N trials, M scores, K outside spread, identical: J" (and how many scores had no
spread, if any). --json OUT writes every row and that summary. Exit 0; bad input (a missing or
unreadable folder or result, no trial in both) is one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from reports import results as rr

RULES = ("seeds", "suite", "none")


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


def load(directory: str) -> dict[str, dict[str, Any]]:
    """The folder's successful results by trial id; rr.ResultFileError names a bad folder or file."""
    found = rr.files(directory)
    if not found:
        raise rr.ResultFileError(f"{directory}: no result files")
    results = (rr.load_file(path) for path in found)
    return {r["trial_id"]: r for r in results if r.get("status") == "success"}


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
    """Successful trials in RUN_DIR without a successful reference (not compared)."""
    only_reference: int

    def line(self) -> str:
        extra = f", no spread known: {self.no_spread}" if self.no_spread else ""
        return f"{self.trials} trials, {self.scores} scores, {self.outside} outside spread, identical: {self.identical}{extra}"


def summarize(rows: list[Row], run: dict[str, Any], reference: dict[str, Any]) -> Summary:
    return Summary(trials=len({r.trial_id for r in rows}), scores=len(rows), outside=sum(r.within is False for r in rows),
                   identical=sum(r.identical for r in rows), no_spread=sum(r.within is None for r in rows),
                   only_run=len(set(run) - set(reference)), only_reference=len(set(reference) - set(run)))


def table(rows: list[Row]) -> str:
    head = ("id", "label", "metric", "reference", "ours", "difference", "spread", "rule", "within")
    body = [(r.trial_id[:8], r.label, r.metric, f"{r.reference:.4f}", f"{r.ours:.4f}", f"{r.difference:+.3g}" if r.difference else "0",
             "-" if r.spread is None else f"{r.spread:.4f}", r.rule if r.rule == "none" else f"{r.rule} (n={r.seeds})",
             {True: "yes", False: "NO", None: "-"}[r.within] + (" (identical)" if r.identical else ""))
            for r in rows]
    widths = [max(len(str(cell)) for cell in col) for col in zip(head, *body)]
    right = {3, 4, 5, 6}
    return "\n".join("  ".join(str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(line, widths))).rstrip()
                     for line in (head, *body))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", metavar="RUN_DIR")
    parser.add_argument("ref_dir", metavar="REF_DIR")
    parser.add_argument("--json", metavar="OUT", help="also write the rows and the summary here")
    args = parser.parse_args(argv)
    try:
        run, reference = load(args.run_dir), load(args.ref_dir)
    except rr.ResultFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rows = compare(run, reference)
    if not rows:
        print(f"error: {args.run_dir} and {args.ref_dir}: no successful trial with a score in both", file=sys.stderr)
        return 2
    summary = summarize(rows, run, reference)
    print(table(rows))
    print()
    used = {r.rule for r in rows}
    print("spread: " + "; ".join(text for rule, text in (
        ("seeds", "seeds = max - min of the metric over the trial configuration's own seeds in the reference"),
        ("suite", "suite = no seeds of its own: the largest such spread among the suite's replicated configurations"),
        ("none", "none = the suite has no replicated configuration: no verdict")) if rule in used))
    if summary.only_run or summary.only_reference:
        print(f"not compared: {summary.only_run} successful trial(s) only in {args.run_dir}, "
              f"{summary.only_reference} only in {args.ref_dir}")
    print(summary.line())
    if args.json:
        out = {rr.BENCHMARK_KEY: "scores_vs_reference", "run_dir": args.run_dir, "ref_dir": args.ref_dir,
               "summary": asdict(summary), "rows": [{**asdict(r), "within": r.within, "identical": r.identical} for r in rows]}
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

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
unreadable folder or result, no trial in both) is one line and exit 2. The comparison itself is
reports/reference.py's, which the HTML report shows too (`python -m reports.render RUN_DIR --reference REF_DIR`).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from reports import results as rr
# The comparison lives in reports (the report's section "Scores against a reference run" shows it too).
from reports.reference import RULE_TEXT, RULES, Row, compare, load, summarize


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
    print("spread: " + "; ".join(RULE_TEXT[rule] for rule in RULES if rule in used))
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

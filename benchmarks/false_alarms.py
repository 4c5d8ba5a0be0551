"""Unchanged reruns of the regression suite against its baseline: how many false alarms?

    python benchmarks/false_alarms.py [--runs 5] [--suite suites/ci.toml] [--baseline DIR]

Runs the suite N times into fresh folders, compares each run with the baseline under the
default rules of `peftbench compare`, and prints per run the alarms and the range of each
metric's change over the trials, then over all runs: how much room each limit has.
Exit status 1 when any run raised an alarm.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import compare  # noqa: E402


def spans_text(spans: dict[str, tuple[float, float]]) -> str:
    return ", ".join(f"{m.rsplit('.', 1)[-1]} {low:+.1%}..{high:+.1%}" for m, (low, high) in spans.items())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--suite", type=Path, default=ROOT / "suites" / "ci.toml")
    parser.add_argument("--baseline", type=Path, help="default: results/baselines/<machine class>/ci")
    args = parser.parse_args()
    if args.baseline is None:
        from bench.calibrate import machine_class

        args.baseline = ROOT / "results" / "baselines" / machine_class() / "ci"
    baseline = compare.load(args.baseline)
    limits = compare.parse_limits([])
    span_all: dict[str, tuple[float, float]] = {}
    alarms = 0
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(1, args.runs + 1):
            out = Path(tmp) / f"run{run}"
            subprocess.run([sys.executable, "-m", "bench.cli", "run", str(args.suite), "--results", str(out), "--no-progress"],
                           cwd=ROOT, env=env, check=True, capture_output=True)
            current = compare.load(out / args.baseline.name)
            compare.check_comparable(current, baseline, out, args.baseline)
            report = compare.compare(current, baseline, limits)
            span: dict[str, tuple[float, float]] = {}
            for check in report.checks:
                if check.change is not None and not math.isinf(check.change):
                    for spans in (span, span_all):
                        low, high = spans.get(check.metric, (math.inf, -math.inf))
                        spans[check.metric] = min(low, check.change), max(high, check.change)
            noise = sum(c.verdict == "noise" for c in report.checks)
            n = len(report.regressions) + len(report.failures)
            alarms += n
            print(f"run {run}: {n} alarms, {noise} past a limit within noise; changes: {spans_text(span)}", flush=True)
            for line in compare.details(report):
                if not line.startswith("note"):
                    print(f"    {line}")
    print(f"{args.runs} unchanged reruns, {alarms} false alarms; changes over all runs: {spans_text(span_all)}")
    print("limits: " + ", ".join(f"{m.rsplit('.', 1)[-1]} +{pct:g}%" for m, pct in limits.items() if pct is not None))
    return 1 if alarms else 0


if __name__ == "__main__":
    sys.exit(main())

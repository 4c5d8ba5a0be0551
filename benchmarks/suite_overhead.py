"""A run's time outside training and evaluation, and where it goes, from its result files.

    python benchmarks/suite_overhead.py RESULTS_DIR [--only SELECTOR] [--json OUT]

Over the trials in RESULTS_DIR (those --only picks: the selector of `peftbench run --only`,
bench/run/select.py) that recorded the runner's process time:

  - the sums of runtime.process_s (the trial's process, as the runner timed it: start to exit),
    train_s and eval_s, and (process - train - eval) / process: the share outside train+eval;
  - the same without the first trial (by runtime.process_started_at), which starts the fork server;
  - the runner's wall-clock span (first process_started_at to last process_ended_at) and, with the
    parallel level the trials recorded (env.parallel), the lanes' time (span x parallel): the share
    of it outside train+eval adds the runner's own time between trial processes and, with parallel
    lanes, a lane's idle time while the last trials finish on the others;
  - per trial, the median of each other runtime.*_s field (load_s, forecast_s, calibration_s summed
    over its calibrations, utilization_s, save_s, data_s, base_loss_s and any other), and of process
    start and exit (process_s - wall_s, wall_s being the trial's own clock) and of what is left of
    the trial's own time (wall_s - train_s - eval_s - those fields): where the rest goes.

Results recorded before a field existed lack it: a figure that needs it says n/a, and each median
says how many trials it is over. Bad input (missing folder, unreadable result, a selector that
matches nothing) is one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.run import select
from reports import results as rr

# The runtime fields that are not parts of the trial's time (rates, ratios, counts) or that the
# figures above use on their own.
NOT_PARTS = {"process_s", "train_s", "eval_s", "wall_s", "step_s_median", "tokens_per_s", "step_ratio",
             "calibration_every", "process_started_at", "process_ended_at", "utilization"}
START_EXIT = "start/exit (process_s - wall_s)"
REST = "rest of the trial (wall_s - train - eval - parts)"


def parts(runtime: dict[str, Any]) -> dict[str, float]:
    """A trial's time outside train and eval, by field: every other runtime.*_s number (a list, as
    calibration_s, summed)."""
    out: dict[str, float] = {}
    for key, value in runtime.items():
        if key in NOT_PARTS or not key.endswith("_s"):
            continue
        if isinstance(value, list):
            value = sum(v for v in value if isinstance(v, (int, float)))
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(value)
    return out


@dataclass(frozen=True)
class Share:
    """Sums over trials and the share of process time outside train+eval."""

    trials: int
    process_s: float
    train_s: float
    eval_s: float

    @property
    def outside(self) -> float:
        return (self.process_s - self.train_s - self.eval_s) / self.process_s


def share(runtimes: list[dict[str, Any]]) -> Share:
    return Share(len(runtimes), sum(r["process_s"] for r in runtimes), sum(r.get("train_s") or 0 for r in runtimes),
                 sum(r.get("eval_s") or 0 for r in runtimes))


@dataclass
class Overhead:
    folder: str
    selector: str | None
    statuses: dict[str, int]
    all: Share
    without_first: Share | None
    """None: the trials do not record when they started, so the first is not known."""
    first: str | None
    span_s: float | None
    parallel: int | None
    lanes_outside: float | None
    """(span x parallel - train - eval) / (span x parallel)."""
    medians: dict[str, tuple[float, int]] = field(default_factory=dict)
    """Field -> (median seconds per trial, trials that record it)."""
    left_out: int = 0
    """Result files without runtime.process_s (hand-made, or recorded without running)."""


def measure(results: list[dict[str, Any]], folder: str, selector: str | None = None) -> Overhead:
    timed = [r for r in results if isinstance(r["runtime"].get("process_s"), (int, float))]
    if not timed:
        raise rr.ResultFileError(f"{folder}: no result records runtime.process_s (the runner's time of the trial's process)")
    runtimes = [r["runtime"] for r in timed]
    statuses: dict[str, int] = {}
    for r in timed:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    dated = all(isinstance(rt.get("process_started_at"), (int, float)) and isinstance(rt.get("process_ended_at"), (int, float))
                for rt in runtimes)
    without_first = first = span = parallel = lanes_outside = None
    if dated:
        order = sorted(timed, key=lambda r: r["runtime"]["process_started_at"])
        first = f"{order[0]['trial_id'][:8]} {order[0].get('label', '')}"
        without_first = share([r["runtime"] for r in order[1:]]) if len(order) > 1 else None
        span = max(rt["process_ended_at"] for rt in runtimes) - min(rt["process_started_at"] for rt in runtimes)
        levels = {(r.get("env") or {}).get("parallel") or (r.get("run") or {}).get("parallel") or 1 for r in timed}
        if len(levels) == 1:
            parallel = levels.pop()
            whole = share(runtimes)
            lanes_outside = (span * parallel - whole.train_s - whole.eval_s) / (span * parallel)
    per_field: dict[str, list[float]] = {}
    for rt in runtimes:
        found = parts(rt)
        for key, value in found.items():
            per_field.setdefault(key, []).append(value)
        if isinstance(rt.get("wall_s"), (int, float)):
            per_field.setdefault(START_EXIT, []).append(rt["process_s"] - rt["wall_s"])
            per_field.setdefault(REST, []).append(rt["wall_s"] - (rt.get("train_s") or 0) - (rt.get("eval_s") or 0) - sum(found.values()))
    medians = {key: (statistics.median(values), len(values)) for key, values in per_field.items()}
    return Overhead(folder, selector, statuses, share(runtimes), without_first, first, span, parallel, lanes_outside,
                    medians, len(results) - len(timed))


def load(folder: str, selector: str | None) -> list[dict[str, Any]]:
    found = rr.files(folder)
    if not found:
        raise rr.ResultFileError(f"{folder}: no result files")
    results = {r["trial_id"]: r for r in map(rr.load_file, found)}
    if selector is None:
        return list(results.values())
    chosen = select.pick([select.Recorded(i, r["spec"]) for i, r in results.items()], selector, f"results folder {folder}")
    return [results[c.id] for c in chosen]


def report(o: Overhead) -> str:
    def line(name: str, s: Share) -> str:
        outside_s = s.process_s - s.train_s - s.eval_s
        return (f"{name}: {s.trials} trials, process {s.process_s:.1f} s, train {s.train_s:.1f} s, eval {s.eval_s:.1f} s: "
                f"(process - train - eval) / process = {100 * s.outside:.1f}% ({outside_s / s.trials:.2f} s a trial)")

    statuses = ", ".join(f"{n} {status}" for status, n in sorted(o.statuses.items()))
    out = [f"{o.folder}{f' --only {o.selector}' if o.selector else ''}: {statuses}"
           + (f"; {o.left_out} result(s) without runtime.process_s left out" if o.left_out else ""),
           line("all", o.all)]
    if o.without_first is not None:
        out.append(line(f"without the first ({o.first})", o.without_first))
    else:
        out.append("without the first: n/a (" + ("one trial" if o.first else "the results do not record runtime.process_started_at") + ")")
    if o.span_s is None:
        out.append("runner span: n/a (the results do not record runtime.process_started_at/ended_at)")
    else:
        lanes = "" if o.parallel is None else (
            f", x {o.parallel} lane{'s' if o.parallel > 1 else ''} = {o.span_s * o.parallel:.1f} s, "
            f"outside train+eval (idle lanes included) {100 * o.lanes_outside:.1f}%")
        mixed = " (trials recorded different parallel levels: no lane figure)" if o.parallel is None else ""
        out.append(f"runner span (first process start to last exit): {o.span_s:.1f} s{lanes}{mixed}")
    out.append("per trial, median (trials):")
    width = max(len(k) for k in o.medians) if o.medians else 0
    known = [START_EXIT, REST]
    for key in sorted(o.medians, key=lambda k: (k in known, known.index(k) if k in known else 0, -o.medians[k][0])):
        median, n = o.medians[key]
        out.append(f"  {key.ljust(width)}  {median:8.3f} s  ({n})")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results_dir", metavar="RESULTS_DIR")
    parser.add_argument("--only", metavar="SELECTOR", help="these trials only: peftbench run --only's selector")
    parser.add_argument("--json", metavar="OUT", help="also write the figures here")
    args = parser.parse_args(argv)
    try:
        o = measure(load(args.results_dir, args.only), args.results_dir, args.only)
    except (rr.ResultFileError, select.SelectError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report(o))
    if args.json:
        record = {rr.BENCHMARK_KEY: "suite_overhead", **asdict(o),
                  "outside": o.all.outside, "outside_without_first": o.without_first.outside if o.without_first else None}
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`peftbench compare CURRENT BASELINE`: regressions of one results folder against another.

Trials are matched by trial id, which hashes the resolved experiment including the method's
version; a method whose version changed is reported as such, never compared with the old one.
Only increases fail, each metric under its own rule (`--fail METRIC:PCT` sets the allowed
increase in percent, `--fail METRIC:off` drops a check; any numeric key of a result works):

    memory.accounted.*   1%   computed, not sampled: deterministic, so held tightly
    memory.peak_bytes    10%  process peak RSS on CPU: noisy, so held loosely
    runtime.step_ratio   15%  median over the steps of step time / the calibration timed right
                              after it (bench/regression/calibrate.py); the change counts only when the two
                              runs' per-step ratios differ significantly (one-sided Mann-Whitney U,
                              p < 0.01), so that one run's noisy steps do not count as a shift.
                              15% leaves a 1.3x slower step caught under every condition of
                              benchmarks/false_alarms.py (results/baselines/README.md)

Exit status: 0 no regression, 1 a regression, 2 bad input (a missing folder, an unreadable
result, a baseline from another machine class or result schema, which is refused, not compared).
`--update` records CURRENT as the new BASELINE instead, on purpose.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import shutil
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.records import results

META = ".baseline.json"
"""Beside a baseline's result files: the machine class and schema it was recorded under. A dot
file, so that nothing reading results takes it for one."""
RATIO = "runtime.step_ratio"
WARMUP = 2
"""Leading steps left out of the step-time spread, as bench.trial.measure.StepTimer leaves them out of its median."""
DEFAULT_LIMITS: dict[str, float] = {
    "memory.accounted.weights": 1.0,
    "memory.accounted.grads": 1.0,
    "memory.accounted.optimizer": 1.0,
    "memory.accounted.activations": 1.0,
    "memory.peak_bytes": 10.0,
    RATIO: 15.0,
}
ALPHA = 0.01
"""Significance a step-ratio shift needs (one-sided Mann-Whitney U over the steady steps' ratios)."""
UPDATE_HINT = "record a baseline on this machine on purpose: nox -s regression -- --update"


class CompareError(ValueError):
    """Input that cannot be compared: the message is one line, naming the file."""


@dataclass(frozen=True)
class Spread:
    """A median and the interquartile range around it."""

    median: float
    low: float
    high: float


@dataclass
class Check:
    trial_id: str
    label: str
    metric: str
    baseline: float | None
    current: float | None
    limit: float
    verdict: str
    """ok, REGRESSION, improved, noise (past the limit, not significant) or n/a."""

    @property
    def change(self) -> float | None:
        if self.baseline is None or self.current is None:
            return None
        if self.baseline == 0:
            return 0.0 if self.current == 0 else math.inf
        return self.current / self.baseline - 1


@dataclass
class Report:
    checks: list[Check]
    failures: list[str]
    """Trial-level regressions (a trial that no longer succeeds), one line each."""
    notes: list[str]
    labels: dict[str, str]
    metrics: list[str]

    @property
    def regressions(self) -> list[Check]:
        return [c for c in self.checks if c.verdict == "REGRESSION"]

    @property
    def failed(self) -> bool:
        return bool(self.regressions or self.failures)


# --- loading ---------------------------------------------------------------------------------


def _schema_of(path: Path) -> Any:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data.get("schema") if isinstance(data, dict) else None


def load(folder: Path) -> dict[str, dict[str, Any]]:
    """Result files of one folder (and below) by trial id; any bad file is a CompareError."""
    from reports import results as rr

    if not folder.is_dir():
        raise CompareError(f"{folder}: no such results folder")
    found: dict[str, dict[str, Any]] = {}
    where: dict[str, Path] = {}
    for path in rr.files(folder):
        try:
            result = results.read(path)
        except results.ResultFileError as exc:
            schema = _schema_of(path)
            if schema is not None and schema != results.SCHEMA:
                raise CompareError(f"{path}: result schema {schema}, this peftbench reads schema {results.SCHEMA}: "
                                   f"refusing to compare across schema versions; {UPDATE_HINT}") from None
            raise CompareError(str(exc)) from None
        trial_id = result.get("trial_id")
        if not isinstance(trial_id, str):
            raise CompareError(f"{path}: result has no trial_id")
        if trial_id in found:
            raise CompareError(f"{path}: trial {trial_id} also in {where[trial_id]}: pass one suite's folder")
        found[trial_id], where[trial_id] = result, path
    if not found:
        raise CompareError(f"{folder}: no result files")
    return found


def machine_class(trials: dict[str, dict[str, Any]], folder: Path) -> str:
    classes = {(r.get("env") or {}).get("machine_class") or "unknown" for r in trials.values()}
    if len(classes) > 1:
        raise CompareError(f"{folder}: results from several machine classes ({', '.join(sorted(classes))})")
    return classes.pop()


def check_comparable(current: dict[str, dict[str, Any]], baseline: dict[str, dict[str, Any]],
                     current_dir: Path, baseline_dir: Path) -> None:
    """Refuse a baseline recorded on another machine class or under another schema."""
    ours = machine_class(current, current_dir)
    theirs = machine_class(baseline, baseline_dir)
    meta_path = baseline_dir / META
    if meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
            theirs_meta, schema = meta["machine_class"], meta["schema"]
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise CompareError(f"{meta_path}: unreadable baseline metadata ({type(exc).__name__}: {exc})") from None
        if schema != results.SCHEMA:
            raise CompareError(f"{meta_path}: baseline recorded under result schema {schema}, this peftbench writes "
                               f"schema {results.SCHEMA}: refusing to compare; {UPDATE_HINT}")
        theirs = theirs_meta if theirs == "unknown" else theirs
    if ours != theirs:
        raise CompareError(f"{baseline_dir}: baseline from machine class {theirs}, current results from {ours}: "
                           f"memory and time do not carry across machines, refusing to compare; {UPDATE_HINT}")


# --- rules -----------------------------------------------------------------------------------


def parse_limits(specs: list[str]) -> dict[str, float | None]:
    """The default limits with `--fail METRIC:PCT` (or METRIC:off) applied."""
    limits: dict[str, float | None] = dict(DEFAULT_LIMITS)
    for spec in specs:
        metric, sep, pct = spec.rpartition(":")
        pct = pct.strip().removesuffix("%")
        if not sep or not metric:
            raise CompareError(f"--fail {spec!r}: expected METRIC:PCT, e.g. memory.peak_bytes:10")
        if pct == "off":
            limits[metric] = None
            continue
        try:
            limits[metric] = float(pct)
        except ValueError:
            raise CompareError(f"--fail {spec!r}: {pct!r} is not a percentage (or 'off')") from None
        if not limits[metric] >= 0:
            raise CompareError(f"--fail {spec!r}: the allowed increase must be >= 0")
    return limits


def value(result: dict[str, Any], metric: str) -> float | None:
    """A numeric value at a dotted key, or None."""
    node: Any = result
    for part in metric.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return float(node) if isinstance(node, (int, float)) and not isinstance(node, bool) else None


def _quartiles(xs: list[float]) -> tuple[float, float, float]:
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q2, q3


def ratios(step_times: list[float], calibration_s: list[float], every: int = 1) -> list[float]:
    """Each steady step's time in units of the calibration timed right after it. The calibration
    follows every `every`-th step (runtime.calibration_every; absent in older results: 1), so the
    i-th calibration belongs to step (i + 1) * every - 1."""
    pairs = [(i, step_times[i], c) for i, c in zip(range(every - 1, len(step_times), every), calibration_s)]
    return [step / calibration for _, step, calibration in [p for p in pairs if p[0] >= WARMUP] or pairs]


def step_ratio(step_times: list[float], calibration_s: list[float], every: int = 1) -> float | None:
    """runtime.step_ratio of a result: the median of its ratios."""
    found = ratios(step_times, calibration_s, every)
    return statistics.median(found) if found else None


def ratio_spread(result: dict[str, Any]) -> Spread | None:
    """The median ratio with the interquartile range around it."""
    found = _steady_ratios(result)
    if not found:
        return None
    q1, median, q3 = _quartiles(found)
    return Spread(median, q1, q3)


def _steady_ratios(result: dict[str, Any]) -> list[float]:
    rt = result.get("runtime") or {}
    return ratios((result.get("train") or {}).get("step_times") or [], rt.get("calibration_s") or [], rt.get("calibration_every") or 1)


def _shift_p(base: dict[str, Any], cur: dict[str, Any], alternative: str) -> float:
    """p-value that the current run's step ratios are greater (or less) than the baseline's."""
    from scipy.stats import mannwhitneyu

    return float(mannwhitneyu(_steady_ratios(cur), _steady_ratios(base), alternative=alternative).pvalue)


def check_time(trial_id: str, label: str, base: dict[str, Any], cur: dict[str, Any], limit: float) -> Check:
    b, c = ratio_spread(base), ratio_spread(cur)
    if b is None or c is None:
        return Check(trial_id, label, RATIO, b and b.median, c and c.median, limit, "n/a")
    factor = 1 + limit / 100
    if c.median > b.median * factor:
        verdict = "REGRESSION" if _shift_p(base, cur, "greater") < ALPHA else "noise"
    elif b.median > c.median * factor:
        verdict = "improved" if _shift_p(base, cur, "less") < ALPHA else "noise"
    else:
        verdict = "ok"
    return Check(trial_id, label, RATIO, b.median, c.median, limit, verdict)


def check_value(trial_id: str, label: str, base: dict[str, Any], cur: dict[str, Any], metric: str, limit: float) -> Check:
    check = Check(trial_id, label, metric, value(base, metric), value(cur, metric), limit, "n/a")
    change = check.change
    if change is not None:
        check.verdict = "REGRESSION" if change * 100 > limit else "improved" if change * 100 < -limit else "ok"
    return check


# --- comparing -------------------------------------------------------------------------------


def label_of(result: dict[str, Any]) -> str:
    model = ((result.get("spec") or {}).get("model") or {}).get("name", "?")
    return f"{model.removeprefix('synthetic:')} {result.get('label', '?')}"


def _experiment(result: dict[str, Any]) -> str:
    """The experiment without the method's version: finds a trial whose method version changed."""
    spec = json.loads(json.dumps(result.get("spec") or {}))
    (spec.get("method") or {}).pop("version", None)
    return json.dumps(spec, sort_keys=True)


def _version(result: dict[str, Any]) -> str:
    return str(((result.get("spec") or {}).get("method") or {}).get("version"))


def compare(current: dict[str, dict[str, Any]], baseline: dict[str, dict[str, Any]],
            limits: dict[str, float | None]) -> Report:
    active = {m: pct for m, pct in limits.items() if pct is not None}
    for metric in active:
        if metric != RATIO and metric not in DEFAULT_LIMITS and not any(
                value(r, metric) is not None for r in [*current.values(), *baseline.values()]):
            raise CompareError(f"--fail {metric}: no result has a numeric value there")
    report = Report([], [], [], {}, list(active))
    by_experiment = {_experiment(r): r for r in baseline.values()}
    matched = 0
    for trial_id, cur in sorted(current.items(), key=lambda kv: label_of(kv[1])):
        label = label_of(cur)
        base = baseline.get(trial_id)
        if base is None or _version(base) != _version(cur):
            old = by_experiment.get(_experiment(cur))
            if old is not None:
                report.notes.append(f"{trial_id} {label}: method version {_version(old)} -> {_version(cur)}, "
                                    f"not compared with trial {old['trial_id']}; refresh the baseline")
            else:
                report.notes.append(f"{trial_id} {label}: new, no baseline")
            continue
        matched += 1
        report.labels[trial_id] = label
        if base["status"] != "success":
            report.notes.append(f"{trial_id} {label}: baseline status {base['status']}, not compared")
            continue
        if cur["status"] != "success":
            report.failures.append(f"{trial_id} {label}: status success -> {cur['status']}: {cur.get('error')}")
            continue
        for metric, limit in active.items():
            if metric == RATIO:
                report.checks.append(check_time(trial_id, label, base, cur, limit))
            else:
                report.checks.append(check_value(trial_id, label, base, cur, metric, limit))
    for trial_id, base in baseline.items():
        if trial_id not in current and not any(_experiment(c) == _experiment(base) for c in current.values()):
            report.notes.append(f"{trial_id} {label_of(base)}: in the baseline, not in the current results")
    if not matched:
        raise CompareError("no trial of the current results is in the baseline: wrong folders?")
    changed = _package_changes(current, baseline)
    if changed:
        report.notes.append(f"packages differ from the baseline's ({changed}): peak memory and time may move with them")
    return report


def _package_changes(current: dict[str, dict[str, Any]], baseline: dict[str, dict[str, Any]]) -> str:
    """Installed versions of the packages a result records, baseline -> current, where they differ."""
    ours, theirs = ((next(iter(side.values())).get("env") or {}).get("packages") or {} for side in (current, baseline))
    return ", ".join(f"{name} {theirs.get(name)} -> {ours.get(name)}" for name in sorted(set(ours) | set(theirs))
                     if ours.get(name) != theirs.get(name))


# --- output ----------------------------------------------------------------------------------


def _fmt(metric: str, v: float | None) -> str:
    if v is None:
        return "-"
    if "bytes" in metric or metric.startswith("memory.accounted."):
        for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
            if abs(v) >= size:
                return f"{v / size:.2f} {unit}"
        return f"{v:.0f} B"
    return f"{v:.4g}"


MARKS = {"REGRESSION": " !!", "noise": " ~", "improved": " +", "ok": "", "n/a": ""}


def _cell(check: Check) -> str:
    change = check.change
    if change is None:
        return "-"
    return ("+inf%" if math.isinf(change) else f"{change:+.1%}") + MARKS[check.verdict]


def table(report: Report) -> tuple[list[str], list[list[str]]]:
    short = [m.rsplit(".", 1)[-1] for m in report.metrics]
    names = short if len(set(short)) == len(short) else report.metrics
    header = ["trial", "model and method", *names]
    cells = {(c.trial_id, c.metric): c for c in report.checks}
    rows = []
    for trial_id, label in report.labels.items():
        rows.append([trial_id[:8], label, *(_cell(cells[trial_id, m]) if (trial_id, m) in cells else "-" for m in report.metrics)])
    return header, rows


def _detail(check: Check) -> str:
    return (f"{check.verdict} {check.trial_id} {check.label}: {check.metric} {_fmt(check.metric, check.baseline)} -> "
            f"{_fmt(check.metric, check.current)} ({_cell(check).split()[0]}, limit +{check.limit:g}%)")


def details(report: Report) -> list[str]:
    lines = [f"REGRESSION {line}" for line in report.failures]
    order = {"REGRESSION": 0, "noise": 1, "improved": 2}
    lines += [_detail(c) for c in sorted(report.checks, key=lambda c: order.get(c.verdict, 3)) if c.verdict in order]
    return lines + [f"note: {n}" for n in report.notes]


def summary(report: Report) -> str:
    n = len(report.regressions) + len(report.failures)
    verdict = f"{n} regression{'s' if n != 1 else ''}" if n else "no regression"
    return f"compare: {len(report.labels)} trials, {len(report.checks)} checks: {verdict}"


def render_text(report: Report) -> str:
    header, rows = table(report)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.append("change vs baseline; !! regression, ~ past the limit but within noise, + improved")
    return "\n".join([*lines, *details(report), summary(report)]) + "\n"


def render_markdown(report: Report) -> str:
    header, rows = table(report)
    lines = [f"### peftbench {summary(report)}", "", "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", "`!!` regression, `~` past the limit but within noise, `+` improved", ""]
    lines += [f"- {line}" for line in details(report)]
    return "\n".join(lines) + "\n"


# --- baselines -------------------------------------------------------------------------------


def update(current_dir: Path, baseline_dir: Path) -> str:
    """Make CURRENT the baseline: its result files replace BASELINE's, with the metadata beside."""
    current = load(current_dir)
    failed = [f"{t} ({r['status']})" for t, r in current.items() if r["status"] != "success"]
    if failed:
        raise CompareError(f"{current_dir}: {len(failed)} trial(s) did not succeed, not a baseline: {', '.join(failed)}")
    machine = machine_class(current, current_dir)
    baseline_dir.mkdir(parents=True, exist_ok=True)
    for old in baseline_dir.glob("*.json"):
        old.unlink()
    shutil.rmtree(baseline_dir / "adapters", ignore_errors=True)
    for trial_id, result in current.items():
        results.write(results.path_for(baseline_dir, trial_id), result)
    env = next(iter(current.values()))["env"]
    meta = {"machine_class": machine, "schema": results.SCHEMA, "trials": len(current),
            "recorded": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": env.get("device"), "python": env.get("python"), "torch": (env.get("packages") or {}).get("torch"),
            "git_sha": env.get("git_sha"), "git_dirty": env.get("git_dirty"), "host": env.get("host")}
    (baseline_dir / META).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return f"baseline {baseline_dir}: {len(current)} trials recorded for machine class {machine}"


# --- command line ----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("current", type=Path, help="results folder of one suite, e.g. results/ci")
    parser.add_argument("baseline", type=Path, help="baseline folder, e.g. results/baselines/x86_64-2cpu-cpu/ci")
    parser.add_argument("--fail", action="append", default=[], metavar="METRIC:PCT",
                        help="allowed increase in percent (or 'off'), e.g. memory.peak_bytes:10; repeatable; "
                             f"defaults: {', '.join(f'{m}:{p:g}' for m, p in DEFAULT_LIMITS.items())}")
    parser.add_argument("--markdown", type=Path, metavar="FILE",
                        help="also append the table as markdown to FILE (e.g. $GITHUB_STEP_SUMMARY)")
    parser.add_argument("--update", action="store_true", help="record CURRENT as the new BASELINE instead of comparing")


def main(args: argparse.Namespace) -> int:
    try:
        if args.update:
            print(update(args.current, args.baseline))
            return 0
        limits = parse_limits(args.fail)
        current, baseline = load(args.current), load(args.baseline)
        check_comparable(current, baseline, args.current, args.baseline)
        report = compare(current, baseline, limits)
    except CompareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(render_text(report))
    if args.markdown:
        try:
            with open(args.markdown, "a") as f:
                f.write(render_markdown(report))
        except OSError as exc:
            print(f"error: {args.markdown}: cannot write the markdown summary ({exc.strerror})", file=sys.stderr)
            return 2
    return 1 if report.failed else 0

"""How close a run came to the machine: the runner's wall time, read from the trials' own process times,
each trial's utilization (runtime.utilization, bench/trial/flops.py) by method, and the frozen floor's
utilization from benchmarks/lora_step.py's records (`python -m reports.render RESULTS_DIR --floor PATH`).
No torch here: reports never import it."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from reports import results as rr
from reports import trials as trial_table
from reports.blocks import Section, Table, c_int, c_num, c_pct, c_text, missing

FLOOR = "lora_step"
"""benchmarks/lora_step.py's tag in its JSON (reports.results.BENCHMARK_KEY)."""
STARTED, ENDED = "runtime.process_started_at", "runtime.process_ended_at"


# ---- The runner's wall time ----------------------------------------------------------------------

@dataclass(frozen=True)
class Span:
    """The runner's wall time as the results record it: the first trial process's start to the last one's exit."""

    seconds: float
    trials: int
    """Trials that dated their process (runtime.process_started_at and process_ended_at)."""
    undated: int
    """Trials without those fields (recorded before the runner dated its trial processes): outside the span."""
    lanes: int | None
    """Trials run at once (env.parallel, else run.parallel, else 1); None where the trials disagree."""
    threads: list[int]
    """The distinct torch thread counts the trials ran with (env.torch_threads)."""
    process_s: float
    """Sum of the dated trials' runtime.process_s: the lanes' busy time."""

    @property
    def busy(self) -> float | None:
        """The share of the lanes' time (span x lanes) a trial process was running."""
        return self.process_s / (self.seconds * self.lanes) if self.lanes and self.seconds > 0 else None


def _numbers(trials: pd.DataFrame, column: str) -> pd.Series:
    return pd.to_numeric(trials[column], errors="coerce") if column in trials else pd.Series(float("nan"), index=trials.index)


def trained(trials: pd.DataFrame) -> pd.Series:
    """runtime.utilization.fraction of the successful trials that record it (a frozen model trains nothing: none)."""
    fraction = _numbers(trials, trial_table.UTILIZATION)
    return fraction[(trials["status"] == "success") & fraction.notna()] if not trials.empty else fraction


def span(trials: pd.DataFrame) -> Span | None:
    """The wall-time span of the trials that dated their process; None where none did."""
    if trials.empty:
        return None
    start, end = _numbers(trials, STARTED), _numbers(trials, ENDED)
    dated = start.notna() & end.notna()
    if not dated.any():
        return None
    lanes = _numbers(trials, "env.parallel").fillna(_numbers(trials, "run.parallel")).fillna(1)[dated]
    threads = sorted({int(t) for t in _numbers(trials, "env.torch_threads")[dated].dropna()})
    return Span(seconds=float(end[dated].max() - start[dated].min()), trials=int(dated.sum()), undated=int((~dated).sum()),
                lanes=int(lanes.iloc[0]) if lanes.nunique() == 1 else None, threads=threads,
                process_s=float(_numbers(trials, "runtime.process_s")[dated].fillna(0).sum()))


def span_text(sp: Span) -> str:
    threads = "/".join(map(str, sp.threads)) or "?"
    lanes = (f"{sp.lanes} lane{'s' if sp.lanes != 1 else ''} (trials at once, env.parallel) of {threads} torch "
             f"thread{'s' if threads != '1' else ''} each" if sp.lanes else
             f"trials that recorded different parallel levels (no lane figure), {threads} torch threads")
    busy = f"; the trial processes sum to {sp.process_s:,.0f} s, {100 * sp.busy:.1f}% of span x lanes" if sp.busy else ""
    undated = f" ({sp.undated} trial(s) without process times are not in it)" if sp.undated else ""
    return (f"Runner wall time: {sp.seconds:,.0f} s ({sp.seconds / 60:.1f} min) for {sp.trials} trials{undated}, from the "
            f"first trial process's start to the last one's exit (runtime.process_started_at, process_ended_at), in "
            f"{lanes}{busy}.")


# ---- The frozen floor: benchmarks/lora_step.py -------------------------------------------------------

@dataclass(frozen=True)
class Floor:
    """One run of benchmarks/lora_step.py: its step times and utilization, the floor's first."""

    path: str
    threads: int
    tokens: str
    """batch x seq."""
    peak_flops_per_s: float
    peak_threads: int
    machine_class: str
    step_s: dict[str, float]
    """Median step time per variant: floor, ours, peft."""
    fraction: dict[str, float]
    """Counted FLOPs per second over the matmul peak, per variant."""


def check_floor(record: Any, source: str) -> Floor:
    """A lora_step record as a Floor; else a ResultFileError naming the source and the key."""
    if not isinstance(record, dict) or record.get(rr.BENCHMARK_KEY) != FLOOR:
        raise rr.ResultFileError(f"{source}: not a {FLOOR} record (its {rr.BENCHMARK_KEY!r} key is not {FLOOR!r})")

    def get(*keys: str) -> Any:
        node: Any = record
        for i, key in enumerate(keys):
            if not isinstance(node, dict) or key not in node:
                raise rr.ResultFileError(f"{source}: key {'.'.join(keys[:i + 1])} missing"
                                         + (" (recorded before lora_step.py stored utilization)" if keys[0] == "utilization" else ""))
            node = node[key]
        return node

    get("utilization", "floor", "fraction")  # the floor is what this record is read for
    variants = [v for v in get("step_s_median") if v in get("utilization")]
    for v in variants:
        if not isinstance(get("utilization", v, "fraction"), (int, float)):
            raise rr.ResultFileError(f"{source}: key utilization.{v}.fraction is not a number")
    return Floor(path=source, threads=int(get("config", "threads")), tokens=f"{get('config', 'batch')} x {get('config', 'seq')}",
                 peak_flops_per_s=float(get("utilization", "peak", "flops_per_s")), peak_threads=int(get("utilization", "peak", "threads")),
                 machine_class=str(get("utilization", "peak", "machine_class")),
                 step_s={v: float(get("step_s_median", v)) for v in variants},
                 fraction={v: float(get("utilization", v, "fraction")) for v in variants})


def floor_records(paths: list[str | Path]) -> list[dict[str, Any]]:
    """benchmarks/lora_step.py outputs from JSON files, or from folders (every lora_step record in them),
    each with its `path`, as reports.results.benchmark_records gives them; a ResultFileError names a bad one."""
    out: list[dict[str, Any]] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = rr.benchmark_records(path).get(FLOOR, [])
            if not found:
                raise rr.ResultFileError(f"{path}: no benchmarks/lora_step.py output in this folder")
            out += found
            continue
        try:
            record = json.loads(path.read_text())
        except OSError as exc:
            raise rr.ResultFileError(f"{path}: cannot read ({exc.strerror})") from None
        except ValueError as exc:
            raise rr.ResultFileError(f"{path}: not JSON ({exc})") from None
        check_floor(record, str(path))
        out.append({**record, "path": str(path)})
    return out


# ---- The section ----------------------------------------------------------------------------------

def _group(row: pd.Series) -> str:
    return f"{row['method']} {row['targets']}" if not missing(row.get("targets")) else str(row["method"])


def by_method(trials: pd.DataFrame) -> Table | None:
    """Utilization per method (and targets), over the trials that trained and recorded it."""
    done = trained(trials)
    if done.empty:
        return None
    rate = _numbers(trials, "runtime.utilization.achieved_flops_per_s")
    frame = pd.DataFrame({"group": trials.loc[done.index].apply(_group, axis=1), "fraction": done, "rate": rate[done.index]})
    groups = [("all trained trials", frame), *sorted(frame.groupby("group"), key=lambda kv: -kv[1]["fraction"].median())]
    rows = [[c_text(name), c_int(len(g)), c_pct(g["fraction"].median()), c_pct(g["fraction"].min()),
             c_pct(g["fraction"].max()), c_num(g["rate"].median() / 1e9, 1, " GFLOP/s")] for name, g in groups]
    return Table(["method", "trials", "median", "min", "max", "median achieved"], rows,
                 caption="Utilization by method and targets: counted training FLOPs per second of runtime.train_s over "
                         "the machine's matmul peak at the trial's thread count")


def floor_table(floors: list[Floor]) -> Table:
    variants = list(dict.fromkeys(v for f in floors for v in f.step_s))
    rows = [[c_text(Path(f.path).name), c_int(f.threads), c_text(f.tokens),
             c_num(f.peak_flops_per_s / 1e9, 1, f" GFLOP/s ({f.peak_threads} thr)"),
             *(c_num(f.step_s.get(v), 3, " s") for v in variants), *(c_pct(f.fraction.get(v)) for v in variants)]
            for f in floors]
    return Table(["file", "threads", "tokens", "matmul peak", *(f"{v} step" for v in variants),
                  *(f"{v} utilization" for v in variants)], rows,
                 caption="benchmarks/lora_step.py, one row per recorded run: median step times, and each step's counted "
                         "FLOPs per second over the matmul peak (floor: backward to the inputs through the frozen model, "
                         "the least any adapter can cost)")


def _spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.1f}%"
    return f"a median {100 * statistics.median(values):.1f}% (min {100 * min(values):.1f}%, max {100 * max(values):.1f}%)"


def floor_text(floors: list[Floor], trials: pd.DataFrame) -> str:
    """The floor's utilization over the recorded runs, beside the trials'."""
    values = [f.fraction["floor"] for f in floors]
    threads = sorted({f.threads for f in floors})
    text = (f"The frozen floor (benchmarks/lora_step.py: backward to the inputs through the frozen model, "
            f"{' / '.join(sorted({f.tokens for f in floors}))} tokens, {'/'.join(map(str, threads))} threads) ran at "
            f"{_spread(values)} of the matmul peak over {len(floors)} run{'s' if len(floors) > 1 else ''} "
            f"({', '.join(Path(f.path).name for f in floors)}).")
    if len(done := trained(trials)):
        trial_threads = sorted({int(t) for t in _numbers(trials, "runtime.utilization.peak_source.threads")[done.index].dropna()})
        text += (f" These trials: a median {100 * done.median():.1f}% of the peak at "
                 f"{'/'.join(map(str, trial_threads)) or '?'} thread(s), {done.median() / statistics.median(values):.2f}x the "
                 "floor's median.")
        if trial_threads != threads:
            text += (" Each figure is against the peak measured at its own thread count, so the two compare how much of "
                     "the machine's matmul rate each reached, not the same absolute rate.")
    return text


def headline(trials: pd.DataFrame, records: dict[str, list[dict[str, Any]]]) -> str | None:
    """One line for the overview: the runner's wall time, the trials' median utilization and the floor's;
    None where the results record neither process dates nor utilization."""
    parts = []
    if sp := span(trials):
        parts.append(f"{sp.seconds:,.0f} s of runner wall time ({sp.seconds / 60:.1f} min)"
                     + (f" in {sp.lanes} lane{'s' if sp.lanes != 1 else ''} of {'/'.join(map(str, sp.threads)) or '?'} thread(s)"
                        if sp.lanes else ""))
    if len(done := trained(trials)):
        parts.append(f"the {len(done)} trained trials at a median {100 * done.median():.1f}% of the matmul peak "
                     f"(min {100 * done.min():.1f}%, max {100 * done.max():.1f}%)")
    if not parts:  # the floor alone says nothing about this run: its section shows it
        return None
    if floors := [check_floor(r, r["path"]) for r in records.get(FLOOR, [])]:
        parts.append(f"the frozen floor at {_spread([f.fraction['floor'] for f in floors])} over {len(floors)} "
                     f"benchmarks/lora_step.py run{'s' if len(floors) > 1 else ''}")
    return f"Run: {'; '.join(parts)} (section Wall time and utilization)."


def section(trials: pd.DataFrame, records: dict[str, list[dict[str, Any]]]) -> Section:
    s = Section("utilization", "Wall time and utilization")
    sp = span(trials)
    s.p(span_text(sp) if sp else "Runner wall time: not recorded (these results predate runtime.process_started_at).")
    if line := trial_table.utilization_summary(trials):
        s.p(line)
    if table := by_method(trials):
        s.table(table)
    floors = [check_floor(r, r["path"]) for r in records.get(FLOOR, [])]
    if floors:
        s.p(floor_text(floors, trials))
        s.table(floor_table(floors))
    else:
        s.p("The frozen floor: no benchmarks/lora_step.py record given (python -m reports.render RESULTS_DIR --floor PATH, "
            "PATH being its JSON files or a folder holding them, such as results/reference/perf).")
    return s

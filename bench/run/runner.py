"""Runs a suite's trials, one process each, resumable.

Results live in <results>/<suite name>/<trial id>.json. A rerun skips trials whose result is
`success`, reruns the others, and never touches a file except by atomic rename. The runner
holds a lock on the folder so two runners cannot race for the same trial.

With `[run] parallel = N` (or `--parallel N`) N trials run at once, each still a process of its
own, pinned to one of N disjoint sets of this machine's cores (a Lane); threads of this process
wait on them, and every publish goes through the Sweep's lock.
"""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import itertools
import json
import math
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

from bench.records import results, track
from bench.run.forkserver import trial_context
from bench.run.suite import Suite, Trial

class RunnerError(RuntimeError):
    pass


@dataclass
class SweepReport:
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    statuses: dict[str, str] = field(default_factory=dict)
    wall_s: float = 0.0
    inside_s: float = 0.0
    """Seconds the trials spent training and evaluating: the rest is the sweep's overhead."""
    tracking_errors: dict[str, dict[str, str]] = field(default_factory=dict)
    """Trial id -> tracker -> why it holds no copy; `peftbench track` replays them."""
    parallel: int = 1
    """Trials at once: the sweep had parallel x wall_s seconds of lanes to spend, inside_s of them inside trials."""


@dataclass(frozen=True)
class Lane:
    """Where a trial of the local runner runs. With parallel N: one of N disjoint sets of this
    machine's cores, which the worker pins the trial's process to before any thread starts."""

    parallel: int
    """Trials at once in the sweep (1: one at a time, as before; nothing is pinned)."""
    cpus: tuple[int, ...] | None = None
    """Cores the trial's process is pinned to (None: not pinned)."""
    threads: int | None = None
    """torch threads when the trial's [run] threads does not say (None: torch's default)."""

    def threads_for(self, trial: Trial) -> int | None:
        return trial.run.get("threads") or self.threads

    @property
    def where(self) -> str:
        """For the `.running` marker: which cores."""
        return f"cpus={','.join(map(str, self.cpus))}" if self.cpus else ""


def lanes(parallel: int, cpus: Iterable[int] | None = None) -> list[Lane]:
    """`parallel` lanes over `cpus` (default: the cores this process may run on): disjoint sets whose
    sizes differ by at most one, each lane with cores // parallel threads. Every lane gets the same
    thread count, so a trial's numerics never depend on which lane it drew; with more lanes than
    cores, lanes share cores in turn."""
    if parallel == 1:
        return [Lane(1)]
    cores = sorted(os.sched_getaffinity(0) if cpus is None else cpus)
    if parallel > len(cores):
        sets = [(cores[i % len(cores)],) for i in range(parallel)]
    else:
        size, extra = divmod(len(cores), parallel)
        bounds = [i * size + min(i, extra) for i in range(parallel + 1)]
        sets = [tuple(cores[a:b]) for a, b in zip(bounds, bounds[1:])]
    return [Lane(parallel, cpus, max(1, len(cores) // parallel)) for cpus in sets]


def parallel_level(suite: Suite) -> int:
    """The suite's `[run] parallel`: how the whole sweep runs, so its blocks must agree."""
    levels = {t.run.get("parallel", 1) for t in [*suite.trials, *(study.corners()[0] for study in suite.studies)]}
    if len(levels) > 1:
        raise RunnerError(f"{suite.path}: run.parallel: the blocks say {sorted(levels)}, but it is how many trials of the whole "
                          f"suite run at once: set it once, in the top-level [run] table")
    return levels.pop() if levels else 1


def lanes_text(suite: Suite, level: int) -> str:
    """How the local runner would run the suite at `level` trials at once, for --dry-run: the lanes,
    the torch threads a trial gets in one ([run] threads, else the lane's share, else torch's
    default) and the cores each lane is pinned to."""
    import torch

    found = lanes(level)
    trials = [*suite.trials, *(study.corners()[0] for study in suite.studies)]
    threads = sorted({found[0].threads_for(t) or torch.get_num_threads() for t in trials})
    each = f"{threads[0]}" if len(threads) == 1 else f"{threads[0]}-{threads[-1]}"
    cores = " | ".join(",".join(map(str, lane.cpus)) for lane in found if lane.cpus) or "not pinned"
    return f"parallel: {level} lane{'s' if level > 1 else ''} x {each} thread{'s' if threads[-1] > 1 else ''} per lane (cores: {cores})"


def check_results_dir(directory: Path) -> None:
    """Refuse a results folder that a file stands in for (the folder itself or one above it),
    before any trial runs; creates nothing."""
    for path in (directory, *directory.parents):
        if path.exists():
            if not path.is_dir():
                where = "" if path == directory else f", so it cannot hold the results folder {directory}"
                raise RunnerError(f"{path}: is a file, not a folder{where} (--results names a folder)")
            return


def _lock(directory: Path):
    check_results_dir(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        handle = open(directory / ".lock", "w")
    except OSError as exc:
        raise RunnerError(f"{directory}: cannot create the results folder ({exc.strerror})") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise RunnerError(f"{directory}: another peftbench run holds this results folder") from None
    return handle


def _succeeded(path: Path) -> dict[str, Any] | None:
    """A trial's result where it is a success, else None; an unreadable file is kept aside, not lost."""
    if not path.exists():
        return None
    try:
        result = results.read(path)
    except results.ResultFileError as exc:
        aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
        path.rename(aside)
        print(f"warning: {exc}; moved to {aside.name}, the trial runs again", file=sys.stderr)
        return None
    return result if result["status"] == "success" else None


def oom_kills() -> int | None:
    """The cgroup's count of OOM kills (cgroup v2), to tell an OOM kill from any other SIGKILL."""
    try:
        for line in Path("/sys/fs/cgroup/memory.events").read_text().splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _death_status(exitcode: int | None, timed_out: bool, timeout: float, ooms_before: int | None) -> tuple[str, str]:
    if timed_out:
        return "timeout", f"trial ran past its timeout of {timeout:g} s and was killed"
    if exitcode is not None and exitcode < 0:
        sig = signal.Signals(-exitcode).name
        ooms = oom_kills()
        if -exitcode == signal.SIGKILL and ooms is not None and ooms_before is not None and ooms > ooms_before:
            return "oom", "trial process killed by the kernel's OOM killer (cgroup oom_kill count rose)"
        return "failed", f"trial process killed by signal {sig}"
    return "failed", f"trial process exited with code {exitcode} without writing a result"


def _in_environment(env: dict[str, str], *args) -> None:
    """The trial under the caller's environment, not the fork server's: a Ray worker is handed
    other GPUs (CUDA_VISIBLE_DEVICES) for each task, after its fork server started."""
    from bench.run import worker

    for key in set(os.environ) - set(env):
        del os.environ[key]
    os.environ.update(env)
    worker.main(*args)


# multiprocessing reads a child's exit code from its sentinel once, and Process.start() polls every
# other child too: from several threads, one could read another's exit code and leave it 255.
_PROCESSES = threading.Lock()


def execute(ctx, trial: Trial, draft: Path, adapters: Path | None, progress: bool, started=None,
            env: dict[str, str] | None = None, lane: Lane | None = None) -> dict[str, Any]:
    """Run one trial in a fresh process and return its result, a recorded failure if the process
    died or timed out; publishing it is the caller's job. `started(pid)` learns the process id;
    `env`, if given, is the trial's whole environment; `lane`, where a local trial runs. Safe to
    call from several threads at once."""
    from bench.run import worker

    draft.unlink(missing_ok=True)
    args = (trial, str(draft), str(adapters) if adapters else None, progress, os.getpid(), lane)
    proc = ctx.Process(target=worker.main if env is None else _in_environment, name=f"trial-{trial.id}",
                       args=args if env is None else (env, *args))
    start, started_at = time.perf_counter(), time.time()
    ooms_before = oom_kills()
    with _PROCESSES:
        proc.start()
    if started is not None:
        started(proc.pid)
    wait([proc.sentinel], trial.run["timeout"])  # the exit code is read under the lock below
    with _PROCESSES:
        timed_out = proc.is_alive()
        if timed_out:
            proc.kill()
    if timed_out:
        wait([proc.sentinel])
    with _PROCESSES:
        proc.join()
        exitcode = proc.exitcode
    process_s = time.perf_counter() - start
    if not timed_out and exitcode == 0 and draft.exists():
        result = results.read(draft)
    else:
        status, error = _death_status(exitcode, timed_out, trial.run["timeout"], ooms_before)
        result = results.skeleton(trial, status, error)
        if lane is not None:  # what the trial would have recorded itself
            result["env"].update(parallel=lane.parallel, torch_threads=lane.threads_for(trial),
                                 cpu_affinity=sorted(lane.cpus or os.sched_getaffinity(0)))
    draft.unlink(missing_ok=True)
    result["runtime"]["process_s"] = process_s
    # Wall-clock bounds of the trial's process, seen by the runner: which trials ran side by side.
    result["runtime"]["process_started_at"], result["runtime"]["process_ended_at"] = started_at, time.time()
    return result


class Stopped(Exception):
    """A parallel sweep is stopping (an error or Ctrl-C elsewhere): start nothing more."""


class Lanes:
    """Trials onto a sweep's lanes, each lane running the queued work of highest priority (lowest
    key) next. Tuned studies drive themselves from threads of their own and queue their trials as
    they make them, so one study's trials that are ready together (a search that ignores its scores,
    the finals) run side by side, and a lane that one study cannot fill takes another's work: no
    lane idles while any trial is ready."""

    def __init__(self, sweep: "Sweep", lanes: list[Lane]):
        self.sweep = sweep
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._order = itertools.count()  # equal keys keep their order; work itself is never compared
        self._threads = [threading.Thread(target=self._serve, args=(lane,), name=f"peftbench-lane{i}", daemon=True)
                         for i, lane in enumerate(lanes)]

    def start(self) -> None:
        """The lanes take work from now on (again: nothing)."""
        for thread in self._threads:
            if thread.ident is None:  # never started
                thread.start()

    def submit(self, key: tuple, work: Callable[[Lane], Any]) -> Future:
        if self.sweep.stopping:
            raise Stopped
        future: Future = Future()
        self._queue.put((key, next(self._order), work, future))
        return future

    def _serve(self, lane: Lane) -> None:
        while True:
            _, _, work, future = self._queue.get()
            if work is None:
                return
            if self.sweep.stopping:
                future.set_exception(Stopped())
                continue
            try:
                future.set_result(work(lane))
            except BaseException as exc:
                if not isinstance(exc, Stopped):
                    self.sweep.stop()  # now, before this lane takes the next trial
                future.set_exception(exc)

    def close(self) -> None:
        """Once nothing can submit more: the lanes answer what is queued (Stopped, if stopping) and end."""
        for _ in self._threads:
            self._queue.put(((math.inf,), next(self._order), None, None))
        for thread in self._threads:
            thread.join()


class Sweep:
    """What every backend shares: the folder lock, which trials to run (resume), publishing each
    result by atomic rename, the `.running` marker, the progress bar and the report.

    The child writes a draft; only the sweep publishes it, so a trial whose runner died can never
    leave a result behind, and a rerun redoes exactly the trials without a successful result.
    Several trials may run at once (side_by_side, the Ray backend): what they share is locked."""

    def __init__(self, suite: Suite, results_root: Path, force: bool = False, progress: bool = True):
        from tqdm import tqdm

        self.directory = results_root / suite.name
        self._lock = _lock(self.directory)
        for stale in [*self.directory.glob(".*.tmp"), *self.directory.glob(".*.draft.json")]:  # left by a kill; never results
            stale.unlink()
        self.report = SweepReport()
        self._tracking = track.Session(self.directory)  # opens a tracker only when a trial asks for it
        self._start = time.perf_counter()
        self.todo: list[Trial] = []
        for trial in suite.trials:
            if not force and _succeeded(results.path_for(self.directory, trial.id)) is not None:
                self.report.skipped.append(trial.id)
                self.report.statuses[trial.id] = "success"
            elif trial.run.get("memory_budget_gb") and (skipped := _over_budget(trial)) is not None:
                # Recorded, not run: a rerun forecasts again, so a larger budget runs it.
                results.write(results.path_for(self.directory, trial.id), skipped)
                self.report.statuses[trial.id] = skipped["status"]
                print(f"{trial.id} {trial.label}: {skipped['status']}: {skipped['error']}", file=sys.stderr)
            else:
                self.todo.append(trial)
        self._running: dict[str, tuple[Trial, str]] = {}
        self._pids: dict[str, int] = {}
        self._mutex = threading.RLock()
        self._stopping = threading.Event()
        self._bar = tqdm(total=len(self.todo), desc=suite.name, unit="trial", position=0, dynamic_ncols=True, disable=not progress)

    def __enter__(self) -> "Sweep":
        return self

    def __exit__(self, *exc) -> None:
        self._bar.close()
        (self.directory / ".running").unlink(missing_ok=True)
        self.report.wall_s = time.perf_counter() - self._start
        self._lock.close()

    def grow(self, n: int) -> None:
        """n more trials to come (a tuned study's, made as its search goes)."""
        with self._mutex:
            self._bar.total += n
            self._bar.refresh()

    def advance(self, n: int = 1) -> None:
        with self._mutex:
            self._bar.update(n)

    def skip(self, trial: Trial) -> None:
        """A trial that succeeded before, found as a tuned study replays its search."""
        with self._mutex:
            self.report.skipped.append(trial.id)
            self.report.statuses[trial.id] = "success"
            self._bar.update(1)

    def draft(self, trial: Trial) -> Path:
        return self.directory / f".{trial.id}.draft.json"

    def started(self, trial: Trial, pid: int, where: str = "") -> None:
        """Which trial runs in which process (and where), for a person or a test who wants to look."""
        with self._mutex:
            self._running[trial.id] = (trial, f"{trial.id} {pid}{f' {where}' if where else ''}")
            self._show()

    def started_here(self, trial: Trial, pid: int, where: str = "") -> None:
        """started() for a process of this machine, which stop() may kill."""
        with self._mutex:
            self._pids[trial.id] = pid
            if self._stopping.is_set():  # it began as the sweep stopped
                _kill(pid)
            self.started(trial, pid, where)

    def stop(self) -> None:
        """Kill this machine's running trials and publish nothing more, as a stopped sequential
        runner leaves its running trial (which dies with it) unpublished."""
        with self._mutex:
            self._stopping.set()
            for pid in self._pids.values():
                _kill(pid)

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def publish(self, trial: Trial, result: dict[str, Any]) -> None:
        with self._mutex:
            self._pids.pop(trial.id, None)
            if self._stopping.is_set():  # killed by stop(): its death is not the trial's result
                self._running.pop(trial.id, None)
                return
            path = results.path_for(self.directory, trial.id)
            results.write(path, result)
            if trial.run.get("track"):  # only after the publish: a tracker never holds a trial the folder does not
                if errors := self._tracking.log(track.Record.read(path)).errors:
                    self.report.tracking_errors[trial.id] = errors
            self.report.ran.append(trial.id)
            self.report.statuses[trial.id] = result["status"]
            rt = result["runtime"]
            self.report.inside_s += (rt.get("train_s") or 0) + (rt.get("eval_s") or 0)
            if result["status"] != "success":
                self._bar.write(f"{trial.id} {trial.label}: {result['status']}: {result['error']}", file=sys.stderr)
            self._running.pop(trial.id, None)
            self._bar.update(1)
            if self._running:  # else the line stays until the next start, as readers of the local runner expect
                self._show()

    def _show(self) -> None:
        tmp = self.directory / ".running.tmp"
        tmp.write_text("".join(f"{line}\n" for _, line in self._running.values()))
        tmp.replace(self.directory / ".running")  # a reader never sees half a line
        labels = [trial.label for trial, _ in self._running.values()]
        if labels:
            self._bar.set_postfix_str(labels[0] if len(labels) == 1 else f"{len(labels)} running: {'; '.join(labels)}", refresh=True)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def peaks_first(trials: list[Trial], lane: Lane) -> None:
    """Time the machine's matmul peak (bench.trial.flops.peak_flops) for the trials' dtypes and thread
    counts here, alone on one lane's cores, before the lanes start. Left to the trials, the first to
    finish training times it while the other lanes train, which slows it: one sweep stored 133 and 154
    GFLOP/s for one key. Cached peaks are read, not timed again."""
    import torch

    from bench.regression import calibrate
    from bench.trial import flops
    from bench.trial.measure import trial_device

    if not trials or trial_device().type != "cpu":
        return
    keys = sorted({(t.spec["model"].get("dtype", "float32"), lane.threads_for(t) or torch.get_num_threads()) for t in trials})
    # The peaks are stored under the machine's class, which a process reads once: read it before
    # pinning, or this process takes the lane's share of the cores for the machine and stores the
    # peaks where no trial looks (each trial then timed its own beside the other lanes).
    calibrate.machine_class()
    before = os.sched_getaffinity(0)
    if lane.cpus:
        os.sched_setaffinity(0, lane.cpus)
    try:
        for dtype, threads in keys:
            flops.peak_flops("cpu", threads, dtype)
    finally:
        os.sched_setaffinity(0, before)


def _over_budget(trial: Trial) -> dict[str, Any] | None:
    """The result of a trial whose memory forecast breaks its [run] memory_budget_gb (status
    skipped_memory, the error naming the component), or None if it fits."""
    from bench.trial import forecast
    from bench.trial.measure import trial_device

    f = forecast.forecast(trial.spec, device=trial_device().type, cache=True)
    reason = f.over(trial.run["memory_budget_gb"] * forecast.GB)
    if reason is None:
        return None
    result = results.skeleton(trial, forecast.SKIPPED, reason)
    result["memory"]["forecast"] = f.to_dict()
    return result


def run(suite: Suite, results_root: Path, force: bool = False, progress: bool = True,
        save_adapters: bool = True, parallel: int | None = None) -> SweepReport:
    """Run the suite's trials and tuned studies; `parallel` (default: the suite's [run] parallel)
    of them at once (the untuned trials first, then the studies, the longest first within each),
    else one at a time in the suite's order."""
    level = parallel or parallel_level(suite)
    with Sweep(suite, results_root, force, progress) as sweep:
        sweep.report.parallel = level
        ctx = trial_context()
        adapters = sweep.directory / "adapters" if save_adapters else None

        def one(trial: Trial, lane: Lane) -> dict[str, Any]:
            if sweep.stopping:
                raise Stopped
            trial = dataclasses.replace(trial, run={**trial.run, "parallel": level})  # --parallel, in the record
            # Several trials' step bars would draw over each other: the sweep's bar alone then.
            return execute(ctx, trial, sweep.draft(trial), adapters, progress and level == 1,
                           lambda pid: sweep.started_here(trial, pid, lane.where), lane=lane)

        def published(trial: Trial, lane: Lane) -> dict[str, Any]:
            result = one(trial, lane)
            sweep.publish(trial, result)
            return result

        found = lanes(level)
        if level == 1:  # in this thread, in the suite's order: the untuned trials, then each study in turn
            for trial in sweep.todo:
                published(trial, found[0])
            run_studies(suite, sweep, functools.partial(one, lane=found[0]), force)
            return sweep.report
        peaks_first([*sweep.todo, *(study.corners()[0] for study in suite.studies)], found[0])
        side_by_side(suite, sweep, Lanes(sweep, found), published, force)
    return sweep.report


def side_by_side(suite: Suite, sweep: Sweep, pool: Lanes, published, force: bool = False) -> None:
    """The sweep on its lanes: the untuned trials first (in a tuned suite they are the references,
    the frozen model, that every partial report ranks against), then the studies' trials, the
    longest study first, so that the last to finish is a short one; within a study, in the order it
    makes them. An error (or Ctrl-C) anywhere stops the sweep and is raised here once every thread
    has ended."""
    pending = [pool.submit((0, -cost(trial)), functools.partial(published, trial)) for trial in sweep.todo]
    sweep.grow(sum(study.tune.trials + len(study.tune.seeds) for study in suite.studies))

    studies = sorted(suite.studies, key=lambda study: -study_cost(study))
    # A resumed study first replays its finished trials from disk: the lanes wait until every study
    # has queued its first new trial (or ended), else they would start a fresh, later study's trials
    # while the longest study is still reading its files.
    ready = [threading.Event() for _ in studies]

    def drive(rank: int, study) -> None:
        def execute(trials: list[Trial]) -> list[dict[str, Any]]:
            futures = [pool.submit((1, rank), functools.partial(published, trial)) for trial in trials]
            ready[rank].set()
            return [future.result() for future in futures]

        try:
            run_study(study, sweep, execute, force)
        except Stopped:
            pass
        except BaseException:
            sweep.stop()
            raise
        finally:
            ready[rank].set()

    drivers = ThreadPoolExecutor(max(1, len(studies)), thread_name_prefix="peftbench-study")
    pending += [drivers.submit(drive, rank, study) for rank, study in enumerate(studies)]
    errors: list[BaseException] = []
    try:
        for event in ready:
            event.wait()
        pool.start()
        for done in as_completed(pending):
            try:
                done.result()
            except Stopped:
                pass
            except BaseException as exc:
                errors.append(exc)
                sweep.stop()
    except BaseException:  # Ctrl-C (or SIGTERM) while waiting
        sweep.stop()
        raise
    finally:
        pool.start()  # if stopped before: the lanes answer Stopped to what is queued, so every driver ends
        drivers.shutdown(wait=True)
        pool.close()
    if errors:
        raise errors[0]


def run_studies(suite: Suite, sweep: Sweep, execute_one, force: bool = False) -> None:
    """Each tuned study in turn (run_study), each trial run by `execute_one(trial) -> result` and
    published as it ends."""
    sweep.grow(sum(study.tune.trials + len(study.tune.seeds) for study in suite.studies))

    def execute(trials: list[Trial]) -> list[dict[str, Any]]:
        results_ = []
        for trial in trials:
            results_.append(execute_one(trial))
            sweep.publish(trial, results_[-1])
        return results_

    for study in suite.studies:
        run_study(study, sweep, execute, force)


def run_study(study, sweep: Sweep, execute, force: bool = False) -> None:
    """One tuned study (bench/run/tune.py): a trial that succeeded before is read back from its
    result file, the others go to `execute(trials) -> results`, which runs and publishes them (side
    by side, or one after another), so an interrupted study resumes by replaying the same choices.
    Studies share nothing but the sweep, so several may run at once."""
    from bench.run import tune

    def outcomes(trials: list[Trial]) -> list[dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        for trial in trials:
            if not force and (result := _succeeded(results.path_for(sweep.directory, trial.id))) is not None:
                sweep.skip(trial)
                found[trial.id] = result
        todo = [trial for trial in trials if trial.id not in found]
        found.update(zip((trial.id for trial in todo), execute(todo) if todo else []))
        return [found[trial.id] for trial in trials]

    done = tune.run(study, outcomes)
    if done.chosen is None:
        sweep.advance(len(study.tune.seeds))
        print(f"{study.where}: no search trial scored on the validation rows; no final trials", file=sys.stderr)


def cost(trial: Trial) -> float:
    """A trial's relative cost, to start the longest first: the model's parameters times the rows
    it trains on and scores. Not seconds (estimate() below is the fuller, slower one)."""
    from bench.trial.train import total_steps

    s = trial.spec
    s_data = s["data"]
    trained = total_steps(s_data["train_examples"], s["train"]) * s["train"]["batch_size"] * s["train"]["grad_accum"]
    # Training a row costs about three forwards (forward, backward to inputs, weight gradients).
    return _parameters(json.dumps(s["model"], sort_keys=True)) * (3 * trained + _scored(s)) * (s_data.get("max_length") or 1)


def _scored(spec: dict[str, Any]) -> float:
    """The forwards lm-eval runs to score a trial: one per continuation of every row it scores."""
    from bench.tasks import data

    forwards = 0.0
    for name in spec["eval"]["tasks"]:
        task, split = data.text_task(name, spec["data"]), (spec["eval"].get("split", "eval"), spec["data"].get("validation"))
        rows = task.size(*split)
        forwards += min(rows, spec["eval"]["limit"] or rows) * task.continuations(*split)
    return forwards


def study_cost(study) -> float:
    """A tuned study's: its trial count times one final trial's cost."""
    return (study.tune.trials + len(study.tune.seeds)) * cost(study.corners()[1])


@functools.lru_cache(maxsize=64)
def _parameters(model: str) -> int:
    from bench import models

    return sum(p.numel() for p in models.skeleton(json.loads(model)).parameters())


def estimate(suite: Suite) -> list[dict[str, Any]]:
    """A rough cost per trial for --dry-run, from parameter and token counts, beside the memory
    forecast (bench/trial/forecast.py: accounted components and peak, GB).

    Compute per token: forward 2N FLOPs, backward to the inputs 2N more, and weight gradients
    2N more only for trained weights; lm-eval scores each choice with one forward. The
    throughput (PEFTBENCH_FLOPS, default 1e11 FLOP/s, about this 2-core CPU in fp32) sizes a
    sweep and ranks its trials; it does not predict to the second."""
    import methods
    from bench.tasks import data, vision
    from bench.trial import forecast
    from bench import models
    from bench.trial.measure import param_counts, trial_device
    from bench.trial.train import total_steps

    device = trial_device().type  # the memory forecast is for where trials will run
    flops_per_s = float(os.environ.get("PEFTBENCH_FLOPS", 1e11))
    lengths: dict[str, float] = {}

    def mean_tokens(s: dict[str, Any]) -> float:
        key = json.dumps([s["model"], s["data"]], sort_keys=True)
        if not data.get_task(s["data"]["task"], s["data"]).needs_tokenizer:
            return vision.TOKENS_PER_IMAGE
        if key not in lengths:
            tokenizer = models.load_tokenizer(s["model"])
            rows = data.tokenized(s["data"]["task"], tokenizer, s["data"]["max_length"], s["data"]["train_examples"], spec=s["data"])
            lengths[key] = sum(len(r) for r in rows["input_ids"]) / len(rows)
        return lengths[key]

    from bench.run import tune

    # The learning rate changes neither the parameter counts nor the memory forecast (the seed
    # does: it orders the batches), and a tuned suite repeats every configuration at many: each is
    # applied and forecast once.
    known: dict[str, tuple[dict[str, int], bool, dict[str, Any]]] = {}

    def shape(s: dict[str, Any]) -> tuple[dict[str, int], bool, dict[str, Any]]:
        key = json.dumps({**s, "train": {k: v for k, v in s["train"].items() if k != "lr"}}, sort_keys=True)
        if key not in known:
            model = models.skeleton(s["model"])
            method = methods.get(s["method"]["name"])
            adapted = method.apply(model, method.Config.from_dict(s["method"]["config"]))
            known[key] = (param_counts(model, adapted.trainable), bool(adapted.trainable),
                          forecast.columns(forecast.forecast(s, device=device, cache=True)))
        return known[key]

    rows = []
    for trial in [*suite.trials, *(t for study in suite.studies for t in tune.planned(study))]:
        s = trial.spec
        counts, trains, memory = shape(s)
        t = s["train"]
        steps = total_steps(s["data"]["train_examples"], t) if trains else 0
        length = mean_tokens(s)
        tokens = steps * t["batch_size"] * t["grad_accum"] * length
        flops = tokens * (4 * counts["total"] + 2 * counts["trainable"])
        flops += _scored(s) * length * 2 * counts["total"]
        rows.append({"trial_id": trial.id, "label": trial.label, "trainable": counts["trainable"],
                     "steps": steps, "est_s": flops / flops_per_s, **memory})
    return rows

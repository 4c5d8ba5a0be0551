"""Runs a suite's trials on a Ray cluster: `peftbench run SUITE --backend ray [--address ADDR]`.

Each trial is one Ray task, reserving the suite's [run] cpus, gpus and memory_gb. The task is a
supervisor: it runs the trial exactly as the local runner does, in a fresh process forked from a
fork server (its own memory high-water mark, its own crash, its timeout), and returns the result
and the adapter files. Only the driver writes them, into the same folder and by the same atomic
rename as a local run (bench.runner.Sweep), so resume, statuses and the folder lock are the
local runner's own, and the nodes need no shared filesystem.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from bench import results, runner
from bench.runner import RunnerError, Sweep, SweepReport
from bench.suite import Suite, Trial

INSTALL = "pip install 'peftbench[ray]'"
# What the driver decided about the hub (bench/cli.py) holds on every node, and so do the test hooks (bench/inject.py).
FORWARD = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TOKENIZERS_PARALLELISM", "TRANSFORMERS_VERBOSITY")


def import_ray():
    try:
        import ray
    except ImportError as exc:
        raise RunnerError(f"--backend ray needs Ray, which is not installed ({exc}); install it with: {INSTALL}") from None
    return ray


class _Tracker:
    """A Ray actor that hears which worker process picked up which trial: tasks cannot write to
    the driver's disk, and the driver keeps `.running` and the progress bar up to date."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int, str]] = []

    def started(self, trial_id: str, pid: int, node_ip: str) -> None:
        self.events.append((trial_id, pid, node_ip))

    def drain(self) -> list[tuple[str, int, str]]:
        events, self.events = self.events, []
        return events


_CONTEXT = None


def _run_on_worker(trial: Trial, save_adapters: bool, tracker) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The Ray task: run the trial in a process of its own on this node; return the result and
    the adapter files (relative path -> bytes) for the driver to publish."""
    global _CONTEXT
    import ray

    if _CONTEXT is None:  # one fork server per Ray worker process, reused by its later trials
        _CONTEXT = runner.trial_context()
    node_ip = ray.util.get_node_ip_address()
    env = dict(os.environ)  # as Ray set it for this task: CUDA_VISIBLE_DEVICES, OMP_NUM_THREADS
    if not trial.run["gpus"]:  # Ray leaves every GPU visible to a task that reserved none
        env["CUDA_VISIBLE_DEVICES"] = ""
    files: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory(prefix=f"peftbench-{trial.id}-") as tmp:
        adapters = Path(tmp) / "adapters" if save_adapters else None
        result = runner.execute(
            _CONTEXT,
            trial,
            Path(tmp) / "draft.json",
            adapters,
            False,
            lambda pid: tracker.started.remote(trial.id, os.getpid(), node_ip),
            env=env,
        )
        if result.get("adapter_dir"):
            directory = Path(result["adapter_dir"])
            files = {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}
    result["env"]["ray"] = {"node_ip": node_ip, "node_id": ray.get_runtime_context().get_node_id(), "worker_pid": os.getpid()}
    return result, files


def _publish_adapters(directory: Path, trial: Trial, result: dict[str, Any], files: dict[str, bytes]) -> None:
    """Write a trial's adapter files beside its result: into a hidden folder, then renamed whole."""
    if not result.get("adapter_dir"):
        return
    final = directory / "adapters" / trial.id
    tmp = final.with_name(f".{trial.id}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for name, data in files.items():
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_bytes(data)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    result["adapter_dir"] = str(final)


def _options(trial: Trial) -> dict[str, Any]:
    r = trial.run
    options = {
        "num_cpus": r["cpus"] or r["threads"] or 1,
        "num_gpus": r["gpus"],
        "max_retries": r["retries"],
        "retry_exceptions": False,
        "name": f"trial-{trial.id}",
    }
    if r["memory_gb"]:
        options["memory"] = int(r["memory_gb"] * 1e9)
    return options


def _died(ray, trial: Trial, exc: Exception) -> dict[str, Any]:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, ray.exceptions.OutOfMemoryError):
        return results.skeleton(trial, "oom", f"Ray's memory monitor killed the trial's worker: {first}")
    retries = trial.run["retries"]
    return results.skeleton(
        trial,
        "failed",
        f"the Ray task running the trial failed after {retries} retr{'y' if retries == 1 else 'ies'} ({type(exc).__name__}): {first}",
    )


def run(
    suite: Suite, results_root: Path, address: str | None = None, force: bool = False, progress: bool = True, save_adapters: bool = True
) -> SweepReport:
    ray = import_ray()
    with Sweep(suite, results_root, force, progress) as sweep:
        if not sweep.todo:
            return sweep.report
        # Trial output stays in the workers' logs: the result records every error, and the driver
        # shows the progress bar, not a stream of prefixed log lines.
        env = {k: v for k, v in os.environ.items() if k in FORWARD or k.startswith("PEFTBENCH_")}
        ray.init(address=address, log_to_driver=False, configure_logging=False, runtime_env={"env_vars": env})
        try:
            tracker = ray.remote(_Tracker).options(num_cpus=0).remote()
            task = ray.remote(_run_on_worker)
            pending = {}
            for trial in sweep.todo:
                options = _options(trial)
                # Without threads, the trial gets as many torch threads as CPUs it reserved.
                trial = dataclasses.replace(trial, run={**trial.run, "threads": trial.run["threads"] or max(1, int(options["num_cpus"]))})
                pending[task.options(**options).remote(trial, save_adapters, tracker)] = trial
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
                ids = {t.id: t for t in pending.values()}
                for trial_id, pid, node_ip in ray.get(tracker.drain.remote()):
                    if trial_id in ids:  # a late event of a trial already published is dropped
                        sweep.started(ids[trial_id], pid, node_ip)
                for ref in done:
                    trial = pending.pop(ref)
                    try:
                        result, files = ray.get(ref)
                    except ray.exceptions.RayError as exc:  # worker or node died (retries spent), OOM-killed, ...
                        result, files = _died(ray, trial, exc), {}
                    _publish_adapters(sweep.directory, trial, result, files)
                    sweep.publish(trial, result)
        finally:  # a driver that leaves takes its unfinished tasks with it; what it published stays
            ray.shutdown()
    return sweep.report

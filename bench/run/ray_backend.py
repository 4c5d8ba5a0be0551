"""Runs a suite's trials on a Ray cluster: `peftbench run SUITE --backend ray [--address ADDR]`.

Each trial is one Ray task, reserving the suite's [run] cpus, gpus and memory_gb. The task is a
supervisor: it runs the trial exactly as the local runner does, in a fresh process forked from a
fork server (its own memory high-water mark, its own crash, its timeout), and returns the result
and the adapter files. Only the driver writes them, into the same folder and by the same atomic
rename as a local run (bench.run.runner.Sweep), so resume, statuses and the folder lock are the
local runner's own, and the nodes need no shared filesystem.

Which cluster a sweep joins is explicit (`Cluster`): the one at --address (else $RAY_ADDRESS), or
else a cluster of the run's own. Ray's own defaults read state that earlier runs leave behind: a
plain `ray.init()` joins the address that the last `ray start` recorded under /tmp/ray, turns on
token auth when ~/.ray/auth_token exists and writes that file when it does not. The own cluster
therefore gets its own temp dir, a token that lives only in its processes' environment, and
loopback only; it is stopped and its temp dir removed when the run ends.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import secrets
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.records import results
from bench.run import forkserver, runner
from bench.run.runner import RunnerError, Sweep, SweepReport
from bench.run.suite import Suite, Trial

INSTALL = "pip install 'peftbench[ray]'"
# What the driver decided about the hub (bench/cli.py) holds on every node, and so do the test hooks (bench/trial/inject.py).
FORWARD = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TOKENIZERS_PARALLELISM", "TRANSFORMERS_VERBOSITY")
# Ray reads these, in the driver and in the processes it starts; an own cluster sets every one.
OWN_AUTH = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
# One token per driver process: Ray caches the token it loaded, so a second own cluster in the same
# process (several suites in one command) must be started with the same one.
_OWN_TOKEN = secrets.token_hex(32)


def check_installed() -> None:
    """Fails, saying how to install Ray, when it is missing; does not import it, because an own
    cluster must set Ray's environment (loopback only) before the first import."""
    try:
        found = importlib.util.find_spec("ray") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise RunnerError(f"--backend ray needs Ray, which is not installed; install it with: {INSTALL}")


def import_ray():
    try:
        import ray
    except ImportError as exc:
        raise RunnerError(f"--backend ray needs Ray, which is not installed ({exc}); install it with: {INSTALL}") from None
    return ray


@dataclasses.dataclass
class Cluster:
    """The Ray cluster a sweep runs on. `address` set: exactly that cluster, nothing else (where
    it came from is `source`: --address or $RAY_ADDRESS); None: a new one-machine cluster of this
    run's own, started in `temp_dir` and gone, with that folder, when the run ends."""

    address: str | None
    source: str = ""
    temp_dir: Path | None = None

    @classmethod
    def resolve(cls, address: str | None) -> "Cluster":
        if address:
            return cls(_checked(address, "--address"), "--address")
        if os.environ.get("RAY_ADDRESS"):
            return cls(_checked(os.environ["RAY_ADDRESS"], "$RAY_ADDRESS"), "$RAY_ADDRESS")
        return cls(None)

    @contextlib.contextmanager
    def joined(self, runtime_env: dict[str, Any]) -> Iterator[Any]:
        """ray.init into this cluster, ray.shutdown after; a cluster that cannot be joined is a
        RunnerError of one line, and whatever Ray printed while trying is kept for a successful join."""
        with self._environment():
            kwargs: dict[str, Any] = {"log_to_driver": False, "configure_logging": False, "runtime_env": runtime_env}
            if self.address is None:
                # "local", not None: None would join the address the last `ray start` left in /tmp/ray.
                kwargs.update(address="local", _temp_dir=str(self.temp_dir), include_dashboard=False)
            else:
                _listening(self.address, self.source)  # before importing Ray: seconds sooner
                kwargs.update(address=self.address)
            ray = import_ray()
            try:
                with _quiet_stderr() as said:
                    context = ray.init(**kwargs)
            except Exception as exc:  # Ray raises many kinds here; all mean this cluster cannot be used
                raise RunnerError(self._why(exc, "".join(said))) from None
            print(self._describe(context), file=sys.stderr)
            try:
                yield ray
            finally:
                ray.shutdown()

    @contextlib.contextmanager
    def _environment(self) -> Iterator[None]:
        if self.address is not None:
            yield
            return
        # Short, under TMPDIR: Ray's unix sockets live under it and their paths must stay under 108 bytes.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="pbray-"))
        own = {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": _OWN_TOKEN,  # from the environment, so nothing is written to ~/.ray
            "RAY_TMPDIR": str(self.temp_dir),  # whatever Ray puts in its default temp dir lands here too
            # Ray otherwise binds the machine's routable address; with this, loopback and no other node.
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        }
        saved = {key: os.environ.get(key) for key in (*OWN_AUTH, *own)}
        os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
        os.environ.update(own)
        try:
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def _describe(self, context) -> str:
        gcs = getattr(context, "address_info", {}).get("gcs_address", "?")
        if self.address is None:
            return f"ray: a local cluster of this run's own at {gcs} (temp dir {self.temp_dir}), stopped when the run ends"
        return f"ray: joined the cluster at {self.address} (from {self.source})"

    def _why(self, exc: BaseException, printed: str) -> str:
        said = " ".join(printed.split())
        chain = []
        while exc is not None and len(chain) < 10:
            chain.append(exc)
            exc = exc.__cause__ or exc.__context__
        text = " ".join(" ".join(str(e).split()) for e in chain)
        where = f"the Ray cluster at {self.address} ({self.source})" if self.address else "a local Ray cluster"
        if "InvalidAuthToken" in text or "InvalidAuthToken" in said:
            mode = os.environ.get("RAY_AUTH_MODE", "unset")
            sent = "a token that is not the cluster's" if mode == "token" else f"no token (RAY_AUTH_MODE is {mode})"
            return (
                f"{where} refused this driver: it sent {sent}; set RAY_AUTH_MODE=token and the cluster's token "
                "in RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH"
            )
        if "Version mismatch" in text:
            return f"cannot join {where}: {text[text.index('Version mismatch'):]}"
        last = next((m for m in reversed([" ".join(str(e).split()) for e in chain]) if m), type(chain[0]).__name__)
        return f"cannot {'join' if self.address else 'start'} {where}: {last[:500]}"


def _checked(address: str, source: str) -> str:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or "/" in address:
        raise RunnerError(f"{source} {address!r}: expected the cluster's GCS address, host:port (what `ray start --head` prints)")
    return address


def _listening(address: str, source: str) -> None:
    """Fails at once, in one line, when nothing listens at the address (a stopped cluster, a wrong
    port): Ray itself would retry for some 20 s and then raise a traceback."""
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise RunnerError(f"no Ray cluster at {address} ({source}): nothing answers there ({reason}); is it still running?") from None


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[list[str]]:
    """Holds back what Ray's C++ core writes to stderr (a warning per failed connection attempt),
    into the list it yields, filled when the block ends. It is written out after all if the block
    succeeds: nothing is lost."""
    said: list[str] = []
    with tempfile.TemporaryFile() as held:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(held.fileno(), 2)
        ok = False
        try:
            yield said
            ok = True
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            said.append(held.read().decode(errors="replace"))
            if ok and said[0]:
                sys.stderr.write(said[0])


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
        _CONTEXT = forkserver.trial_context()
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
    cluster = Cluster.resolve(address)
    with Sweep(suite, results_root, force, progress) as sweep:
        if not sweep.todo:
            return sweep.report
        # Trial output stays in the workers' logs: the result records every error, and the driver
        # shows the progress bar, not a stream of prefixed log lines.
        env = {k: v for k, v in os.environ.items() if k in FORWARD or k.startswith("PEFTBENCH_")}
        # Leaving the cluster takes the unfinished tasks with it; what was published stays.
        with cluster.joined({"env_vars": env}) as ray:
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
    return sweep.report

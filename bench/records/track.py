"""Tracking: each published trial copied into MLflow (one run) and TensorBoard (event files).

The result JSON stays the record; a tracker holds a copy. The sweep's parent process writes it
right after the result's atomic publish (bench.run.runner.Sweep.publish), so a tracker can never hold
a trial the results folder does not. A tracker that fails (a server that is down, a store that is
not writable) costs the trial nothing: the result is published, the error goes into the sweep's
summary, and `peftbench track RESULTS_DIR` later writes what is missing. Every copy carries the
trial id and a digest of its result file, so a replay adds nothing twice, and a trial that ran
again replaces its older copy (the older MLflow run is deleted, MLflow's soft delete).

Where, by default beside the results it mirrors (the reports skip this folder):

    results/<suite>/tracking/mlflow.db       MLflow's SQLite store: one experiment named after the
                                             suite, one run per trial (--tracking-uri: elsewhere)
    results/<suite>/tracking/mlartifacts/    each run's result JSON and adapter folder
    results/<suite>/tracking/tensorboard/    one folder per trial: train/loss and train/lr per step

Needs the `track` extra: mlflow-skinny (with sqlalchemy and alembic for the SQLite store),
tensorboardX to write event files, tensorboard to read and view them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from bench.records import results

INSTALL = "pip install 'peftbench[track]'"
FOLDER = "tracking"
"""The subfolder of a suite's results folder that local trackers write to."""
TRIAL_TAG, DIGEST_TAG, SUITE_TAG = "peftbench.trial_id", "peftbench.digest", "peftbench.suite"
METRIC_SECTIONS = ("params", "memory", "runtime", "eval", "train")
"""Result sections whose numeric values become MLflow metrics (scores, memory, runtime, forgetting,
the memory forecast when there is one); lists in them are per-step series, logged by CURVES."""
CURVES = {"train.loss": "loss_curve", "train.lr": "lr_curve"}
"""Per-step series: metric name -> key under the result's `train`."""
# MLflow's status of a run for each trial status: a failed trial is still a finished record.
RUN_STATUS = {"success": "FINISHED", "timeout": "KILLED"}
# A server that is down must cost a sweep seconds, once, not MLflow's default minutes of retries per call.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


class TrackingError(RuntimeError):
    """Tracking cannot start: the extra is not installed, or a tracker name is unknown."""


@dataclass(frozen=True)
class Record:
    """A published trial as the trackers see it."""

    path: Path
    result: dict[str, Any]
    digest: str
    """sha256 of the result file's bytes (16 hex digits): which version of the trial a copy holds."""

    @classmethod
    def read(cls, path: Path) -> "Record":
        result = results.read(path)  # raises ResultFileError on a damaged file
        return cls(path, result, hashlib.sha256(path.read_bytes()).hexdigest()[:16])

    @property
    def trial_id(self) -> str:
        return self.result["trial_id"]

    def adapter_dir(self) -> Path | None:
        """The trial's saved adapter: beside the result, else where the result says it went."""
        if not self.result.get("adapter_dir"):
            return None
        for candidate in (self.path.parent / "adapters" / self.trial_id, Path(self.result["adapter_dir"])):
            if candidate.is_dir():
                return candidate
        return None


def _flat(node: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _flat(value, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, node


def _key(name: str) -> str:
    """A name MLflow accepts: letters, digits and _ - . / space only, at most 250 characters."""
    return re.sub(r"[^\w.\- /]", "_", name)[:250]


def metrics(result: dict[str, Any]) -> dict[str, float]:
    """The result's scalar numbers under METRIC_SECTIONS, by dotted key."""
    out = {}
    for section in METRIC_SECTIONS:
        for key, value in _flat(result.get(section) or {}, section):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[_key(key)] = float(value)
    return out


def curves(result: dict[str, Any]) -> dict[str, list[float]]:
    """The per-step series the result has (results older than train.lr_curve have no lr)."""
    train = result.get("train") or {}
    return {name: [float(v) for v in train[key]] for name, key in CURVES.items() if train.get(key)}


def params(result: dict[str, Any]) -> dict[str, str]:
    """The flattened spec and the trial id, as MLflow params (strings; lists as JSON)."""
    out = {"trial_id": result["trial_id"]}
    for key, value in _flat(result.get("spec") or {}, "spec"):
        out[_key(key)] = (value if isinstance(value, str) else json.dumps(value))[:6000]
    return out


def tags(record: Record) -> dict[str, str]:
    r = record.result
    env = r.get("env") or {}
    out = {TRIAL_TAG: record.trial_id, DIGEST_TAG: record.digest, SUITE_TAG: r.get("suite") or "", "status": r["status"],
           "label": r.get("label") or "", "synthetic": str(bool(r.get("synthetic"))).lower()}
    if env.get("git_sha"):
        out["git_sha"] = out["mlflow.source.git.commit"] = env["git_sha"]
        out["git_dirty"] = str(env.get("git_dirty")).lower()
    if env.get("machine_class"):
        out["machine_class"] = env["machine_class"]
    if r.get("error"):
        out["error"] = str(r["error"])[:8000]
    return out


def _times_ms(record: Record) -> tuple[int, int]:
    """The trial's start and end, from the result file's time and the trial process's run time."""
    end = record.path.stat().st_mtime
    spent = (record.result.get("runtime") or {}).get("process_s") or 0.0
    return int((end - spent) * 1000), int(end * 1000)


class Tracker(Protocol):
    def log(self, record: Record) -> bool:
        """Copy the trial in; False when the tracker already holds this version of it."""


def _chunks(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


class MlflowTracker:
    """One MLflow run per trial, in an experiment named after the suite."""

    def __init__(self, directory: Path, experiment: str, uri: str | None):
        from mlflow.tracking import MlflowClient

        # Alembic announces each migration of a new SQLite store on the sweep's terminal.
        for name in ("mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)
        if uri is None:
            root = (directory / FOLDER).resolve()
            root.mkdir(parents=True, exist_ok=True)
            uri = f"sqlite:///{root / 'mlflow.db'}"
        elif uri.startswith(("http://", "https://")):
            for key, value in HTTP_DEFAULTS.items():
                os.environ.setdefault(key, value)
        # A server decides where artifacts go; without one MLflow would put them in ./mlruns of
        # whatever folder the command ran in: they go beside the SQLite file instead.
        artifacts = None
        if uri.startswith("sqlite:///"):
            artifacts = (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=artifacts)
        else:
            self.experiment_id = found.experiment_id
            if found.lifecycle_stage == "deleted":
                self.client.restore_experiment(self.experiment_id)

    def runs(self, trial_id: str | None = None) -> list:
        """The experiment's active runs (of one trial), every page."""
        where = f"tags.`{TRIAL_TAG}` = '{trial_id}'" if trial_id else ""
        out, token = [], None
        while True:
            page = self.client.search_runs([self.experiment_id], where, max_results=1000, page_token=token)
            out += list(page)
            token = page.token
            if not token:
                return out

    def log(self, record: Record) -> bool:
        from mlflow.entities import Metric, Param

        older = self.runs(record.trial_id)
        # A run still RUNNING is one whose writing was cut short: it is replaced, not kept.
        if any(r.data.tags.get(DIGEST_TAG) == record.digest and r.info.status != "RUNNING" for r in older):
            return False
        start, end = _times_ms(record)
        run_id = self.client.create_run(self.experiment_id, start_time=start, tags=tags(record),
                                        run_name=record.result.get("label") or record.trial_id).info.run_id
        values = [Metric(k, v, end, 0) for k, v in metrics(record.result).items()]
        values += [Metric(name, v, end, step) for name, series in curves(record.result).items() for step, v in enumerate(series)]
        for batch in _chunks(values, 1000):  # MLflow's limits per log_batch call
            self.client.log_batch(run_id, metrics=batch)
        for batch in _chunks([Param(k, v) for k, v in params(record.result).items()], 100):
            self.client.log_batch(run_id, params=batch)
        self.client.log_artifact(run_id, str(record.path))
        if adapter := record.adapter_dir():
            self.client.log_artifacts(run_id, str(adapter), "adapter")
        self.client.set_terminated(run_id, RUN_STATUS.get(record.result["status"], "FAILED"), end)
        for run in older:  # an earlier result of this trial, or a copy cut short
            self.client.delete_run(run.info.run_id)
        return True


class TensorBoardTracker:
    """Event files per trial: train/loss and train/lr against the optimizer step."""

    DIGEST_FILE = "peftbench-digest"

    def __init__(self, directory: Path, experiment: str, uri: str | None):
        import tensorboardX  # noqa: F401  (fail here, at open, when the extra is missing)

        self.root = directory / FOLDER / "tensorboard"

    def folder(self, record: Record) -> Path:
        """A run name TensorBoard shows: the trial's label, then its id's first 8 digits."""
        label = re.sub(r"[/\\\0]", "_", record.result.get("label") or "")[:180]
        return self.root / f"{label} {record.trial_id[:8]}".strip()

    def log(self, record: Record) -> bool:
        from tensorboardX import SummaryWriter

        final = self.folder(record)
        marker = final / self.DIGEST_FILE
        if marker.is_file() and marker.read_text() == record.digest:
            return False
        # Written whole into a hidden folder, then renamed: event files are append-only, and a
        # second copy of a curve in the same run folder would draw it twice.
        tmp = self.root / f".{record.trial_id}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        _, end = _times_ms(record)
        with SummaryWriter(logdir=str(tmp)) as writer:
            for name, series in curves(record.result).items():
                for step, value in enumerate(series):
                    writer.add_scalar(name.replace(".", "/"), value, step, walltime=end / 1000)
        (tmp / self.DIGEST_FILE).write_text(record.digest)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        return True


TRACKERS: dict[str, type] = {"mlflow": MlflowTracker, "tensorboard": TensorBoardTracker}
"""Tracker name (suite key `[run] track`, `--track`) -> the class that writes it."""
MODULES = {"mlflow": ("mlflow", "sqlalchemy", "alembic"), "tensorboard": ("tensorboardX", "tensorboard")}


def check(names: Sequence[str]) -> None:
    """Raise TrackingError, with the install hint, unless every named tracker can run here."""
    import importlib.util

    for name in names:
        if name not in TRACKERS:
            raise TrackingError(f"unknown tracker {name!r} (known: {', '.join(TRACKERS)})")
        missing = [m for m in MODULES[name] if importlib.util.find_spec(m) is None]
        if missing:
            raise TrackingError(f"tracking with {name} needs {', '.join(missing)}, not installed; install them with: {INSTALL}")


def parse(text: str) -> list[str]:
    """The value of --track: names separated by commas; "" or "none" for no tracking."""
    names = [] if text.strip().lower() in ("", "none") else [n.strip() for n in text.split(",") if n.strip()]
    for name in names:
        if name not in TRACKERS:
            raise TrackingError(f"--track: unknown tracker {name!r} (known: {', '.join(TRACKERS)}, or none)")
    return list(dict.fromkeys(names))


def configure(trials: list, names: str | None, uri: str | None) -> list:
    """The trials with `peftbench run --track/--tracking-uri` (None: as the suite says) in their
    [run] table, so that each result records where it was tracked, for `peftbench track`."""
    import dataclasses

    override: dict[str, Any] = {}
    if names is not None:
        override["track"] = parse(names)
    if uri is not None:
        override["tracking_uri"] = uri
    return [dataclasses.replace(t, run={**t.run, **override}) for t in trials] if override else trials


def _error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


@dataclass
class Logged:
    """What copying one result into its trackers did."""

    trackers: list[str]
    """The trackers asked for."""
    written: list[str] = field(default_factory=list)
    """Those that copied the result in (the others held it already, or failed)."""
    errors: dict[str, str] = field(default_factory=dict)
    """Tracker -> why it could not."""


@dataclass
class Session:
    """The trackers one suite's results folder writes to, each opened when a trial first needs it.

    A tracker that fails once is not tried again in this session: a server that is down would
    otherwise cost every trial its timeout. Its later trials are recorded as not tracked."""

    directory: Path
    _open: dict[tuple[str, str | None], Tracker] = field(default_factory=dict, init=False)
    _broken: dict[tuple[str, str | None], str] = field(default_factory=dict, init=False)

    def log(self, record: Record, names: Sequence[str] | None = None, uri: str | None = None) -> Logged:
        """Copy one published result into trackers (`names`, else wanted(record)) at `uri` (else
        the trial's own, else the local store). Never raises for a tracker's failure."""
        out = Logged(list(names or wanted(record)))
        uri = uri or (record.result.get("run") or {}).get("tracking_uri")
        for name in out.trackers:
            key = (name, uri)
            if key in self._broken:
                out.errors[name] = f"not tried after an earlier error ({self._broken[key]})"
                continue
            try:
                if key not in self._open:
                    self._open[key] = TRACKERS[name](self.directory, record.result.get("suite") or self.directory.name, uri)
                if self._open[key].log(record):
                    out.written.append(name)
            except Exception as exc:  # any tracker failure: the trial is published already, tracking is a copy
                self._broken[key] = out.errors[name] = _error(exc)
        return out


@dataclass
class Replay:
    """What `peftbench track` did."""

    written: dict[str, int] = field(default_factory=dict)
    """Tracker -> trials copied in."""
    present: dict[str, int] = field(default_factory=dict)
    """Tracker -> trials it held already (this version of them)."""
    errors: dict[str, dict[str, str]] = field(default_factory=dict)
    """Trial id -> tracker -> error."""


def wanted(record: Record) -> list[str]:
    """The trackers a result is copied to when none are named: those its trial ran with, else all."""
    return list((record.result.get("run") or {}).get("track") or TRACKERS)


def replay(paths: Sequence[Path], names: Sequence[str] | None = None, uri: str | None = None) -> Replay:
    """Copy result files into the trackers that do not hold them yet (Session.log says which).
    Every file is read, and every tracker checked, before anything is written: a damaged file
    raises ResultFileError, a missing extra TrackingError."""
    records = [Record.read(path) for path in paths]
    check(sorted({name for record in records for name in (names or wanted(record))}))
    out = Replay()
    sessions: dict[Path, Session] = {}
    for record in records:
        logged = sessions.setdefault(record.path.parent, Session(record.path.parent)).log(record, names, uri)
        for name in logged.trackers:
            if name in logged.written:
                out.written[name] = out.written.get(name, 0) + 1
            elif name not in logged.errors:
                out.present[name] = out.present.get(name, 0) + 1
        if logged.errors:
            out.errors[record.trial_id] = logged.errors
    return out

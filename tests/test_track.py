"""Tracking and export with the real libraries: a smoke sweep copied into a local MLflow store and
TensorBoard event files and read back with their own readers; a sweep whose tracking store cannot
be written still publishes everything and is replayed later, once; the export's table read back
by pandas from CSV and parquet."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from bench.records import results, track
from bench.run import suite
from reports import results as rr

REPO = Path(__file__).parent.parent
STEPS = 3
LR = 1e-3
SUITE = f"""
name = "{{name}}"
[model]
name = "synthetic:llama-tiny"
[data]
task = "sst2"
train_examples = 16
max_length = 32
[train]
lr = {LR}
batch_size = 4
max_steps = {STEPS}
warmup_steps = 1
schedule = "cosine"
[eval]
tasks = []
[run]
timeout = 120
threads = 1
{{run}}
[[sweep]]
method = "lora"
grid.rank = [{{{{ r = 2, alpha = 4 }}}}, {{{{ r = 4, alpha = 8 }}}}]
[[sweep]]
method = "frozen"
"""


def make_suite(tmp: Path, name: str, run: str = "") -> Path:
    path = tmp / f"{name}.toml"
    path.write_text(SUITE.format(name=name, run=run))
    return path


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "bench.cli", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def published(directory: Path) -> dict[str, dict]:
    return {p.stem: results.read(p) for p in directory.glob("*.json") if not p.name.startswith(".")}


def scalars(node, prefix="") -> dict[str, float]:
    """Every number in a result section by dotted key: what the MLflow run must hold as metrics."""
    out = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(scalars(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = float(value)
    return out


def mlflow_runs(uri: str, experiment: str) -> pd.DataFrame:
    import mlflow

    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(experiment_names=[experiment])


def store_uri(directory: Path) -> str:
    return f"sqlite:///{(directory / 'tracking' / 'mlflow.db').resolve()}"


@pytest.fixture(scope="module")
def tracked(tmp_path_factory) -> Path:
    """A smoke sweep tracked by the command-line flags (its suite names no tracker)."""
    tmp = tmp_path_factory.mktemp("tracked")
    proc = cli("run", str(make_suite(tmp, "tracked")), "--results", str(tmp / "r"), "--no-progress", "--track", "mlflow,tensorboard")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "tracking:" not in proc.stderr, proc.stderr
    return tmp / "r" / "tracked"


def test_sweep_is_tracked_in_mlflow_one_run_per_trial_equal_to_the_results(tracked):
    from mlflow.tracking import MlflowClient

    found = published(tracked)
    assert len(found) == 3 and all(r["status"] == "success" for r in found.values())
    runs = mlflow_runs(store_uri(tracked), "tracked")
    assert sorted(runs["tags.peftbench.trial_id"]) == sorted(found)  # one run per trial, none twice
    client = MlflowClient(store_uri(tracked))
    for _, run in runs.iterrows():
        result = found[run["tags.peftbench.trial_id"]]
        expected = {k: v for section in track.METRIC_SECTIONS for k, v in scalars(result.get(section) or {}, f"{section}.").items()}
        assert {"memory.peak_bytes", "memory.accounted.weights", "runtime.train_s", "params.trainable"} <= expected.keys()
        got = {c.removeprefix("metrics."): v for c, v in run.items() if c.startswith("metrics.") and not pd.isna(v)}
        for key, value in expected.items():
            assert got[key] == value, key
        assert run["params.trial_id"] == result["trial_id"]
        assert run["params.spec.model.name"] == "synthetic:llama-tiny"
        assert run["params.spec.train.lr"] == json.dumps(LR)
        assert run["tags.status"] == "success" and run["status"] == "FINISHED"
        assert run["tags.git_sha"] == result["env"]["git_sha"] and run["tags.machine_class"] == result["env"]["machine_class"]
        # Per-step curves: every step, in order, equal to the result file's.
        for metric, key in (("train.loss", "loss_curve"), ("train.lr", "lr_curve")):
            history = sorted(client.get_metric_history(run["run_id"], metric), key=lambda m: m.step)
            assert [(m.step, m.value) for m in history] == list(enumerate(result["train"][key]))
        artifacts = {a.path for a in client.list_artifacts(run["run_id"])}
        assert f"{result['trial_id']}.json" in artifacts
        local = Path(client.download_artifacts(run["run_id"], f"{result['trial_id']}.json", str(tracked.parent / "dl")))
        assert local.read_bytes() == (tracked / f"{result['trial_id']}.json").read_bytes()
        trained = result["spec"]["method"]["name"] == "lora"
        assert ("adapter" in artifacts) == trained
        if trained:
            assert result["train"]["lr_curve"][:2] == [pytest.approx(LR / 2, rel=1e-12), pytest.approx(LR, rel=1e-12)]  # warmup, then peak
            saved = sorted(p.name for p in (tracked / "adapters" / result["trial_id"]).iterdir())
            assert sorted(a.path.removeprefix("adapter/") for a in client.list_artifacts(run["run_id"], "adapter")) == saved
    # The tracked copies (each run keeps its result JSON) are no extra rows for the reports.
    assert len(rr.frame(tracked)) == 3


def test_sweep_is_tracked_as_tensorboard_curves(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found = published(tracked)
    folders = [p for p in (tracked / "tracking" / "tensorboard").iterdir() if not p.name.startswith(".")]
    assert len(folders) == 3
    for folder in folders:
        result = next(r for i, r in found.items() if folder.name.endswith(i[:8]))
        assert folder.name.startswith(result["label"])
        events = EventAccumulator(str(folder))
        events.Reload()
        curves = {tag: events.Scalars(tag) for tag in events.Tags()["scalars"]}
        if result["spec"]["method"]["name"] == "frozen":  # nothing trained: no curves
            assert curves == {}
            continue
        for tag, key in (("train/loss", "loss_curve"), ("train/lr", "lr_curve")):
            values = result["train"][key]
            assert len(values) == STEPS
            assert [e.step for e in curves[tag]] == list(range(STEPS))
            # TensorBoard keeps float32 scalars.
            assert [e.value for e in curves[tag]] == pytest.approx(values, rel=1e-6)


def test_replay_of_a_tracked_sweep_adds_nothing(tracked):
    proc = cli("track", str(tracked))
    assert proc.returncode == 0, proc.stderr
    assert "mlflow: copied 0 trial(s), 3 already there" in proc.stdout
    assert "tensorboard: copied 0 trial(s), 3 already there" in proc.stdout
    assert len(mlflow_runs(store_uri(tracked), "tracked")) == 3


def test_replay_into_another_sqlite_store_keeps_artifacts_beside_it(tracked, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow's own default would be ./mlruns here
    (tmp_path / "other").mkdir()
    done = track.replay(rr.files(tracked), ["mlflow"], "sqlite:///other/mlflow.db")
    assert done.written == {"mlflow": 3} and not done.errors
    assert not (tmp_path / "mlruns").exists()
    saved = {p.name for p in (tmp_path / "other" / "mlartifacts").glob("*/artifacts/*.json")}
    assert saved == {f"{i}.json" for i in published(tracked)}


def test_unwritable_store_loses_no_trial_and_replay_adds_each_once(tmp_path):
    path = make_suite(tmp_path, "blocked", 'track = ["mlflow", "tensorboard"]')
    directory = tmp_path / "r" / "blocked"
    directory.mkdir(parents=True)
    (directory / "tracking").write_text("a file where the tracking folder goes: no tracker can write")
    proc = cli("run", str(path), "--results", str(tmp_path / "r"), "--no-progress")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    found = published(directory)
    assert len(found) == 3 and all(r["status"] == "success" for r in found.values())
    assert all(r["run"]["track"] == ["mlflow", "tensorboard"] for r in found.values())
    assert "tracking: 3 published trial(s) have no tracked copy" in proc.stderr
    assert f"peftbench track {directory}" in proc.stderr

    # A server that is down: every trial reported, none lost, quickly (the tracker is not retried per trial).
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = cli("track", str(directory), "--track", "mlflow", "--tracking-uri", f"http://127.0.0.1:{port}", timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert len([line for line in proc.stderr.splitlines() if ": not tracked: mlflow: " in line]) == 3
    assert proc.stderr.count("not tried after an earlier error") == 2

    (directory / "tracking").unlink()  # the store is writable again; replayed here in-process (the command is tested above)
    done = track.replay(rr.files(directory))
    assert done.written == {"mlflow": 3, "tensorboard": 3} and not done.present and not done.errors
    done = track.replay(rr.files(directory))
    assert done.present == {"mlflow": 3, "tensorboard": 3} and not done.written and not done.errors
    runs = mlflow_runs(store_uri(directory), "blocked")
    assert sorted(runs["tags.peftbench.trial_id"]) == sorted(found)

    # A trial that ran again replaces its copy: still one run per trial, now the new result's.
    trial_id = sorted(found)[0]
    result = found[trial_id]
    result["runtime"]["train_s"] = (result["runtime"]["train_s"] or 0) + 1.5
    results.write(directory / f"{trial_id}.json", result)
    done = track.replay(rr.files(directory))
    assert done.written == {"mlflow": 1, "tensorboard": 1} and done.present == {"mlflow": 2, "tensorboard": 2}
    runs = mlflow_runs(store_uri(directory), "blocked")
    assert sorted(runs["tags.peftbench.trial_id"]) == sorted(found)
    assert runs.set_index("tags.peftbench.trial_id").loc[trial_id, "metrics.runtime.train_s"] == result["runtime"]["train_s"]
    assert len([p for p in (directory / "tracking" / "tensorboard").iterdir() if trial_id[:8] in p.name]) == 1


def _same(cell, value) -> bool:
    """A cell read back from CSV or parquet against the result file's value."""
    if value is None:
        return cell is None or (isinstance(cell, float) and math.isnan(cell))
    if isinstance(value, (list, dict)):
        return json.loads(cell) == value
    if isinstance(value, bool):
        return cell in (value, str(value))
    if isinstance(value, (int, float)):
        return math.isclose(float(cell), value, rel_tol=1e-12)
    return str(cell) == value  # CSV has no types: a version "1" reads back as 1


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_export_round_trips_through_pandas(tracked, tmp_path, suffix):
    out = tmp_path / f"table{suffix}"
    # In a fresh interpreter: the export is the reports' table and must not pull torch in.
    code = ("import sys; from bench import cli; rc = cli.main(['export', sys.argv[1], '-o', sys.argv[2]]); "
            "assert 'torch' not in sys.modules, 'export imported torch'; sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, str(tracked), str(out)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    back = pd.read_csv(out) if suffix == ".csv" else pd.read_parquet(out)
    found = published(tracked)
    assert sorted(back["trial_id"]) == sorted(found)
    reports = rr.frame(tracked)
    assert set(back.columns) == set(reports.columns) - {"spec"}  # the reports' table, every column
    for _, row in back.iterrows():
        result = found[row["trial_id"]]
        flat = pd.json_normalize({k: v for k, v in result.items() if k != "train"}, sep=".").iloc[0].to_dict()
        assert {"spec.method.name", "memory.peak_bytes", "runtime.train_s", "params.trainable"} <= flat.keys()
        for key, value in flat.items():
            assert _same(row[key], value), (key, row[key], value)


def test_export_refuses_an_unknown_format(tracked, tmp_path):
    proc = cli("export", str(tracked), "-o", str(tmp_path / "table.xlsx"))
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert "unknown output type '.xlsx'" in proc.stderr and "Traceback" not in proc.stderr


def test_unknown_tracker_is_a_one_line_error(tmp_path, capsys):
    path = make_suite(tmp_path, "bad", 'track = ["mlfow"]')
    with pytest.raises(suite.SuiteError, match=r"run\.track .*unknown tracker 'mlfow'; did you mean 'mlflow'"):
        suite.load(path)
    from bench import cli as peftbench

    assert peftbench.main(["run", str(make_suite(tmp_path, "ok")), "--track", "mlflow,tensorbord"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--track: unknown tracker 'tensorbord'" in err


def test_missing_extra_is_an_install_hint(tmp_path, monkeypatch, capsys):
    import importlib.util

    from bench import cli as peftbench

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    directory = tmp_path / "r" / "ok"
    assert peftbench.main(["run", str(make_suite(tmp_path, "ok", 'track = ["mlflow"]')), "--results", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'peftbench[track]'" in err
    assert not directory.exists()  # nothing ran
    directory.mkdir(parents=True)
    results.write(directory / "x.json", {"schema": 1, "status": "success", "trial_id": "x", "run": {"track": ["mlflow"]}})
    assert peftbench.main(["track", str(directory)]) == 2
    assert "pip install 'peftbench[track]'" in capsys.readouterr().err

"""The runner end to end on a tiny synthetic model: results on disk, resume after a kill,
timeouts and killed trials recorded while the sweep goes on."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.records import results
from bench.run import suite

REQUIRED = {
    "schema", "trial_id", "suite", "status", "error", "spec",
    "params.trainable", "params.total", "params.adapter_bytes",
    "memory.peak_bytes", "memory.peak_source", "memory.accounted.weights", "memory.accounted.grads",
    "memory.accounted.optimizer", "memory.accounted.activations",
    "runtime.train_s", "runtime.step_s_median", "runtime.tokens_per_s", "runtime.eval_s",
    "eval.lm_eval", "eval.forgetting", "train.loss_curve", "train.steps", "env",
}

SUITE = """
name = "{name}"
[model]
name = "synthetic:llama-tiny"
[data]
task = "sst2"
train_examples = 16
max_length = 32
[train]
lr = 1e-3
batch_size = 4
max_steps = {steps}
[eval]
tasks = []
[run]
timeout = {timeout}
threads = 1
[[sweep]]
method = "lora"
grid.rank = [{{ r = 2, alpha = 4 }}, {{ r = 4, alpha = 8 }}, {{ r = 8, alpha = 16 }}]
[[sweep]]
method = "frozen"
"""


RUNNING: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_orphans():
    """A failing test must not leave a runner (and its trials) eating the CPU of the next."""
    yield
    while RUNNING:
        proc = RUNNING.pop()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the runner leads its own session
            proc.wait()


def run_cli(*args: str, **kw) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    kw.setdefault("start_new_session", True)
    proc = subprocess.Popen([sys.executable, "-m", "bench.cli", "run", *args, "--no-progress"],
                            cwd=Path(__file__).parent.parent, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)
    RUNNING.append(proc)
    return proc


def make_suite(tmp_path: Path, name="t", steps=3, timeout=120) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(SUITE.format(name=name, steps=steps, timeout=timeout))
    return path


def result_files(directory: Path) -> list[Path]:
    return [p for p in directory.glob("*.json") if not p.name.startswith(".")]


def load_all(directory: Path) -> dict[str, dict]:
    return {p.stem: results.read(p) for p in result_files(directory)}


def flat_keys(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out[key] = v
        if isinstance(v, dict) and v:
            out.update(flat_keys(v, key + "."))
    return out


def wait_for(predicate, timeout=120.0, every=0.1):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError("condition not met")


def test_sweep_writes_one_complete_result_per_trial_and_resumes(tmp_path):
    path = make_suite(tmp_path)
    proc = run_cli(str(path), "--results", str(tmp_path / "r"))
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    found = load_all(tmp_path / "r" / "t")
    assert len(found) == 4
    for result in found.values():
        assert result["status"] == "success", result["error"]
        flat = flat_keys(result)
        assert REQUIRED <= flat.keys(), REQUIRED - flat.keys()
        trained = result["spec"]["method"]["name"] != "frozen"
        assert flat["params.total"] > 0 and flat["memory.peak_bytes"] > 0
        assert flat["memory.accounted.weights"] > 0
        assert result["env"]["packages"]["torch"]
        if trained:
            assert flat["params.trainable"] > 0 and flat["train.steps"] == 3 and len(flat["train.loss_curve"]) == 3
            assert flat["memory.accounted.grads"] > 0 and flat["memory.accounted.optimizer"] > 0
            assert flat["memory.accounted.activations"] > 0 and flat["runtime.step_s_median"] > 0
            assert flat["params.adapter_bytes"] > 0
            # Counted FLOPs over train_s against the machine's cached matmul peak (bench/trial/flops.py).
            assert flat["runtime.utilization.train_flops"] > 0 and 0 < flat["runtime.utilization.fraction"]
            assert result["runtime"]["utilization"]["peak_source"]["source"] in ("cached", "measured")
        else:  # nothing trains: no FLOPs, no fraction
            assert flat["runtime.utilization.train_flops"] == 0 and flat["runtime.utilization.fraction"] is None
    # A rerun skips every success.
    proc = run_cli(str(path), "--results", str(tmp_path / "r"))
    out, _ = proc.communicate(timeout=300)
    assert "ran 0, skipped 4" in out, out


def test_sigkill_runner_mid_sweep_then_resume(tmp_path):
    path = make_suite(tmp_path, steps=60)
    directory = tmp_path / "r" / "t"
    proc = run_cli(str(path), "--results", str(tmp_path / "r"))
    # Kill while the second trial runs: one result done, one in flight.
    wait_for(lambda: len(result_files(directory)) >= 1 and (directory / ".running").exists()
             and (directory / ".running").read_text().split()[0] not in {p.stem for p in result_files(directory)})
    running_id, child_pid = (directory / ".running").read_text().split()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    # The orphaned trial dies with its runner instead of racing the rerun.
    wait_for(lambda: not Path(f"/proc/{child_pid}").exists() or "Z" in Path(f"/proc/{child_pid}/stat").read_text().split()[2], timeout=30)
    before = load_all(directory)
    assert before and running_id not in before
    assert all(r["status"] == "success" for r in before.values())
    assert not list(directory.glob("*.tmp"))
    mtimes = {p.stem: p.stat().st_mtime_ns for p in result_files(directory)}

    proc = run_cli(str(path), "--results", str(tmp_path / "r"))
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    after = load_all(directory)
    assert len(after) == 4 and all(r["status"] == "success" for r in after.values())
    assert after[running_id]["status"] == "success"
    for trial_id, mtime in mtimes.items():  # completed trials were not rerun
        assert (directory / f"{trial_id}.json").stat().st_mtime_ns == mtime
    assert f"skipped {len(mtimes)}" in out


@pytest.mark.parametrize(("sig", "word"), [(signal.SIGINT, "interrupted"), (signal.SIGTERM, "terminated")])
def test_ctrl_c_or_sigterm_mid_sweep_says_what_it_kept_and_exits_128_plus_signal(tmp_path, sig, word):
    """SIGINT is Ctrl-C; SIGTERM is how a background run (which ignores SIGINT) or a scheduler stops one."""
    path = make_suite(tmp_path, name="int", steps=60)
    directory = tmp_path / "r" / "int"
    # Ctrl-C reaches a foreground process. One started under a background job (a CI script run with `&`)
    # inherits SIGINT ignored, and Python keeps ignoring it: restore the default, as a terminal's would be.
    proc = run_cli(str(path), "--results", str(tmp_path / "r"), preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wait_for(lambda: len(result_files(directory)) >= 1 and (directory / ".running").exists()
             and (directory / ".running").read_text().split()[0] not in {p.stem for p in result_files(directory)})
    running_id, child_pid = (directory / ".running").read_text().split()
    os.kill(proc.pid, sig)
    out, _ = proc.communicate(timeout=60)
    kept = load_all(directory)
    assert proc.returncode == 128 + sig, out
    assert f"{word}: {len(kept)} trial result(s) kept in {directory}" in out, out
    assert "Traceback" not in out, out
    assert kept and running_id not in kept and all(r["status"] == "success" for r in kept.values())
    assert not (directory / ".running").exists()
    wait_for(lambda: not Path(f"/proc/{child_pid}").exists() or "Z" in Path(f"/proc/{child_pid}/stat").read_text().split()[2], timeout=30)


def test_timeout_is_recorded_and_sweep_goes_on(tmp_path):
    path = make_suite(tmp_path, name="slow", steps=100000, timeout=8)
    proc = run_cli(str(path), "--results", str(tmp_path / "r"))
    out, _ = proc.communicate(timeout=300)
    found = load_all(tmp_path / "r" / "slow")
    statuses = sorted(r["status"] for r in found.values())
    assert statuses == ["success", "timeout", "timeout", "timeout"], out
    timed = [r for r in found.values() if r["status"] == "timeout"]
    assert all("timeout of 8 s" in r["error"] for r in timed)
    assert all(r["spec"]["method"]["name"] == "lora" for r in timed)


def test_trial_killed_from_outside_is_recorded_and_sweep_goes_on(tmp_path):
    path = make_suite(tmp_path, name="killed", steps=100000, timeout=600)
    directory = tmp_path / "r" / "killed"
    frozen = {t.id for t in suite.load(path).trials if t.spec["method"]["name"] == "frozen"}
    proc = run_cli(str(path), "--results", str(tmp_path / "r"))
    killed = set()
    # Kill each long LoRA trial's process as the OS would (SIGKILL); the frozen one finishes
    # (by id, not by timing: on a loaded machine it can take longer than the wait below).
    while proc.poll() is None:
        running = directory / ".running"
        if running.exists():
            trial_id, pid = running.read_text().split()
            if trial_id not in killed and trial_id not in frozen:
                time.sleep(1.0)
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
                killed.add(trial_id)
        time.sleep(0.1)
    found = load_all(directory)
    assert len(found) == 4
    dead = [r for r in found.values() if r["status"] != "success"]
    assert len(dead) == 3
    assert all(r["status"] in ("failed", "oom") and "SIGKILL" in r["error"] for r in dead)
    assert [r["spec"]["method"]["name"] for r in found.values() if r["status"] == "success"] == ["frozen"]


def test_corrupt_result_is_kept_aside_and_rerun(tmp_path):
    path = make_suite(tmp_path, name="c")
    proc = run_cli(str(path), "--results", str(tmp_path / "r"))
    proc.communicate(timeout=300)
    directory = tmp_path / "r" / "c"
    victim = sorted(result_files(directory))[0]
    victim.write_text('{"schema": 1, "status": "succ')
    proc = run_cli(str(path), "--results", str(tmp_path / "r"))
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0
    assert "unreadable result file" in out and victim.name in out
    assert list(directory.glob(f"{victim.name}.corrupt-*"))
    assert results.read(victim)["status"] == "success"
    assert "ran 1, skipped 3" in out


def test_show_reports_corrupt_file_clearly(tmp_path, capsys):
    from bench import cli

    d = tmp_path / "res"
    d.mkdir()
    (d / "x.json").write_text("{not json")
    assert cli.main(["show", str(d)]) == 2
    err = capsys.readouterr().err
    assert "x.json" in err and "unreadable" in err
    json.loads('{"ok": 1}')


@pytest.mark.parametrize("dry", [True])
def test_dry_run_lists_trials_with_cost_and_writes_nothing(tmp_path, dry):
    path = make_suite(tmp_path, name="d")
    proc = run_cli(str(path), "--results", str(tmp_path / "r"), "--dry-run")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "4 trials" in out and "est_s" in out
    assert not (tmp_path / "r").exists()

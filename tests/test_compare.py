"""`peftbench compare`: the rules on hand-made results, bad input, refused baselines, and the
injected regressions (bench/trial/inject.py) caught end to end through the real runner and measurement."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.regression import calibrate, compare
from bench import cli
from bench.trial import inject
from bench.records import results
from bench.trial.measure import StepTimer, weight_bytes
from methods.base import Adapted

ROOT = Path(__file__).resolve().parents[1]
MACHINE = "x86_64-2cpu-cpu"


def fake(trial_id: str = "a" * 16, *, weights: int = 1_000_000, peak: int = 400 * 2**20, step: float = 0.1,
         calibration: float = 0.05, version: str = "1", status: str = "success", machine: str = MACHINE) -> dict:
    """A result with what compare reads; step and calibration times jitter by a few percent."""
    jitter = [1.0, 1.03, 0.98, 1.01, 0.97, 1.02, 0.99, 1.04, 0.96, 1.0, 1.01, 0.99]
    steps, calibrations = [step * j for j in jitter], [calibration * j for j in reversed(jitter)]
    return {
        "schema": results.SCHEMA, "trial_id": trial_id, "suite": "ci", "status": status, "error": None,
        "label": "lora(r=8) adamw ep1 seed0",
        "spec": {"model": {"name": "synthetic:llama-tiny"}, "method": {"name": "lora", "version": version, "config": {"r": 8}}},
        "memory": {"peak_bytes": peak, "accounted": {"weights": weights, "grads": 1000, "optimizer": 2000, "activations": 50_000}},
        "runtime": {"calibration_s": calibrations, "step_ratio": compare.step_ratio(steps, calibrations)},
        "train": {"step_times": steps},
        "env": {"machine_class": machine},
    }


def write(folder: Path, *found: dict) -> Path:
    for r in found:
        results.write(results.path_for(folder, r["trial_id"]), r)
    return folder


def run(*args: str | Path) -> int:
    return cli.main(["compare", *map(str, args)])


@pytest.fixture
def baseline(tmp_path: Path) -> Path:
    return write(tmp_path / "base", fake())


def test_unchanged_passes(tmp_path, baseline, capsys):
    assert run(write(tmp_path / "cur", fake()), baseline) == 0
    out = capsys.readouterr().out
    assert "aaaaaaaa" in out and "no regression" in out


@pytest.mark.parametrize("weights, code", [(1_005_000, 0), (1_200_000, 1), (800_000, 0)])
def test_accounted_memory_is_held_tightly(tmp_path, baseline, capsys, weights, code):
    assert run(write(tmp_path / "cur", fake(weights=weights)), baseline) == code
    out = capsys.readouterr().out
    if code:
        assert f"REGRESSION {'a' * 16}" in out and "memory.accounted.weights" in out and "+20.0%" in out
    if weights < 1_000_000:
        assert "improved" in out


@pytest.mark.parametrize("peak_mib, code", [(430, 0), (460, 1)])
def test_peak_rss_is_held_loosely(tmp_path, baseline, capsys, peak_mib, code):
    assert run(write(tmp_path / "cur", fake(peak=peak_mib * 2**20)), baseline) == code
    assert ("memory.peak_bytes" in capsys.readouterr().out) == bool(code)


def test_time_is_compared_in_calibrations(tmp_path, baseline, capsys):
    # Twice the step time on the same machine: a regression.
    assert run(write(tmp_path / "slow", fake(step=0.2)), baseline) == 1
    assert "runtime.step_ratio" in capsys.readouterr().out
    # Twice the step time on a machine twice as busy: the calibration slowed too, no regression.
    assert run(write(tmp_path / "busy", fake(step=0.2, calibration=0.1)), baseline) == 0


def test_time_within_noise_does_not_fail(tmp_path, baseline, capsys):
    """Past the factor, but the noisy steps do not differ significantly from the baseline's: noise, not a regression."""
    noisy = fake(step=0.16)
    noisy["train"]["step_times"] = [0.16 * j for j in (1, 1, 0.3, 0.4, 0.5, 1.0, 1.0, 1.0, 1.5, 1.6, 1.7, 1.8)]
    assert run(write(tmp_path / "cur", noisy), baseline) == 0
    assert "noise" in capsys.readouterr().out


def test_fail_overrides(tmp_path, baseline, capsys):
    cur = write(tmp_path / "cur", fake(step=0.2, peak=600 * 2**20))
    assert run(cur, baseline, "--fail", "runtime.step_ratio:150", "--fail", "memory.peak_bytes:off") == 0
    assert run(cur, baseline, "--fail", "runtime.step_ratio:off", "--fail", "memory.peak_bytes:off") == 0
    assert run(cur, baseline, "--fail", "memory.peak_bytes:60%", "--fail", "runtime.step_ratio:off") == 0
    assert run(cur, baseline, "--fail", "memory.peak_bytes:10", "--fail", "runtime.step_ratio:off") == 1
    capsys.readouterr()
    for bad in ("memory.peak_bytes", "memory.peak_bytes:lots", "memory.peak_bytes:-5", "no.such.metric:5"):
        assert run(cur, baseline, "--fail", bad) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --fail") and err.count("\n") == 1


def test_any_numeric_key_can_be_held(tmp_path, baseline, capsys):
    more = fake()
    more["memory"]["accounted"]["grads"] = 2000
    assert run(write(tmp_path / "cur", more), baseline, "--fail", "memory.accounted.grads:off") == 0
    assert run(write(tmp_path / "cur", more), baseline, "--fail", "memory.accounted.grads:100") == 0
    assert run(write(tmp_path / "cur", more), baseline) == 1


def test_changed_packages_are_noted(tmp_path, baseline, capsys):
    newer = fake()
    newer["env"]["packages"] = {"torch": "2.14.0"}
    assert run(write(tmp_path / "cur", newer), baseline) == 0
    assert "packages differ from the baseline's (torch None -> 2.14.0)" in capsys.readouterr().out


def test_a_trial_that_stops_succeeding_is_a_regression(tmp_path, baseline, capsys):
    assert run(write(tmp_path / "cur", fake(status="failed")), baseline) == 1
    assert "status success -> failed" in capsys.readouterr().out


def test_method_version_change_is_not_compared(tmp_path, baseline, capsys):
    cur = write(tmp_path / "cur", fake(), fake("b" * 16, version="2"))
    assert run(cur, baseline) == 0
    out = capsys.readouterr().out
    assert "method version 1 -> 2" in out and "refresh the baseline" in out
    # Nothing in common at all: the folders are wrong, which is bad input.
    assert run(write(tmp_path / "other", fake("b" * 16, version="2")), baseline) == 2


@pytest.mark.parametrize("breakage", ["missing", "corrupt", "empty", "not_a_result"])
def test_bad_input_is_one_line_naming_the_file(tmp_path, baseline, capsys, breakage):
    cur = tmp_path / "cur"
    cur.mkdir()
    bad = cur / f"{'c' * 16}.json"
    if breakage == "missing":
        cur = tmp_path / "nowhere"
        bad = cur
    elif breakage == "corrupt":
        write(cur, fake())
        bad.write_text('{"schema": 1, "status": "succ')
    elif breakage == "not_a_result":
        bad.write_text("[1, 2]")
    elif breakage == "empty":
        bad = cur
    assert run(cur, baseline) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}") and err.count("\n") == 1


def test_hidden_files_are_not_results(tmp_path, baseline):
    cur = write(tmp_path / "cur", fake())
    (cur / ".lock").write_text("")
    (cur / ".x.json.123.tmp").write_text("{")
    (cur / ".draft.json").write_text("{")
    assert run(cur, baseline) == 0


def test_another_machine_class_is_refused(tmp_path, baseline, capsys):
    cur = write(tmp_path / "cur", fake(machine="aarch64-8cpu-cpu"))
    assert run(cur, baseline) == 2
    err = capsys.readouterr().err
    assert "machine class x86_64-2cpu-cpu" in err and "aarch64-8cpu-cpu" in err and "refusing" in err


def test_another_schema_is_refused(tmp_path, baseline, capsys):
    old = fake()
    old["schema"] = 0
    assert run(write(tmp_path / "cur", fake()), write(tmp_path / "old", old)) == 2
    err = capsys.readouterr().err
    assert "schema 0" in err and "refusing" in err and err.count("\n") == 1


def test_update_records_a_baseline_with_metadata(tmp_path, capsys):
    cur = write(tmp_path / "cur", fake())
    (cur / "adapters").mkdir()
    base = tmp_path / "baselines" / MACHINE / "ci"
    assert run(cur, base, "--update") == 0
    meta = json.loads((base / compare.META).read_text())
    assert meta["machine_class"] == MACHINE and meta["schema"] == results.SCHEMA and meta["trials"] == 1
    assert sorted(p.name for p in base.iterdir()) == [compare.META, f"{'a' * 16}.json"]
    assert run(cur, base) == 0
    # The metadata alone (results that predate machine classes) refuses another schema or machine.
    write(base, {**fake(), "env": {}})
    for key, other in (("schema", 0), ("machine_class", "aarch64-8cpu-cpu")):
        (base / compare.META).write_text(json.dumps(dict(meta, **{key: other})))
        assert run(cur, base) == 2
        assert f"{other}" in capsys.readouterr().err
    # A run with failed trials is no baseline.
    assert run(write(tmp_path / "bad", fake(status="failed")), base, "--update") == 2


def test_markdown_summary(tmp_path, baseline, capsys):
    md = tmp_path / "summary.md"
    md.write_text("earlier step\n")
    assert run(write(tmp_path / "cur", fake(weights=1_300_000)), baseline, "--markdown", md) == 1
    text = md.read_text()
    assert text.startswith("earlier step\n### peftbench compare: 1 trials") and "| trial |" in text
    assert "REGRESSION aaaaaaaaaaaaaaaa" in text and "memory.accounted.weights" in text


def test_warmup_matches_the_step_timer():
    assert compare.WARMUP == StepTimer().warmup


def test_each_step_is_divided_by_the_calibration_timed_after_it():
    r = fake(step=0.1, calibration=0.05)
    r["train"]["step_times"][:2] = [5.0, 5.0]  # warm-up steps are left out
    # A step slowed by load, and the calibration right after it slowed alike: no outlier.
    r["train"]["step_times"][5] *= 3
    r["runtime"]["calibration_s"][5] *= 3
    assert compare.ratios(r["train"]["step_times"], r["runtime"]["calibration_s"])[3] == pytest.approx(2, rel=0.1)
    spread = compare.ratio_spread(r)
    assert spread.low < spread.median < spread.high < 2.2
    assert spread.median == pytest.approx(2.0, rel=0.05) == compare.step_ratio(r["train"]["step_times"], r["runtime"]["calibration_s"])
    assert compare.ratio_spread({**r, "runtime": {}}) is None and compare.step_ratio([], []) is None


# --- the measurement side: calibration and the test-only injections ---------------------------


def test_calibration_is_fixed_work_that_leaves_no_trace():
    rng = torch.get_rng_state()
    calibration = calibrate.Calibration(torch.device("cpu"))
    with torch.no_grad():  # whatever the caller's grad mode, the same work is timed
        times = [calibration() for _ in range(3)]
    assert calibration.times == times and calibration.spent == pytest.approx(sum(times)) and min(times) > 0
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None and not p.requires_grad for block in calibration.blocks for p in block.parameters())


def test_machine_class_names_arch_cpus_and_accelerator():
    machine = calibrate.machine_class()
    arch, cpus, accelerator = machine.rsplit("-", 2)
    assert arch and cpus.endswith("cpu") and int(cpus[:-3]) >= 1 and accelerator in ("cpu", "cuda")


def test_injections_are_off_by_default(tiny_model, monkeypatch):
    monkeypatch.delenv(inject.EXTRA_MEMORY, raising=False)
    monkeypatch.delenv(inject.SLOWDOWN, raising=False)
    adapted = Adapted(model=tiny_model("llama"), trainable=[])
    assert inject.apply(adapted) == {} and adapted.hooks.on_step is None


def test_extra_memory_injection_counts_as_weights(tiny_model, monkeypatch):
    model = tiny_model("llama")
    before = sum(weight_bytes(model).values())
    monkeypatch.setenv(inject.EXTRA_MEMORY, "0.2")
    assert inject.apply(Adapted(model=model, trainable=[])) == {inject.EXTRA_MEMORY: 0.2}
    assert sum(weight_bytes(model).values()) / before == pytest.approx(1.2, abs=1e-3)
    assert "_peftbench_test_extra" not in model.state_dict()


# --- end to end: the runner, the real measurements, compare ------------------------------------

SUITE = """
name = "reg"
[model]
name = "synthetic:llama-tiny"
[data]
task = "sst2"
train_examples = 192
max_length = 64
[train]
lr = 1e-3
batch_size = 16
max_steps = 12
[eval]
tasks = []
forgetting = false
[run]
timeout = 300
threads = 1
[[sweep]]
method = "lora"
"""


def run_suite(suite: Path, results_root: Path, **inject_env: str) -> Path:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PEFTBENCH_TEST_")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", **inject_env)
    subprocess.run([sys.executable, "-m", "bench.cli", "run", str(suite), "--results", str(results_root), "--no-progress"],
                   cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
    return results_root / "reg"


def compare_cli(current: Path, baseline: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.cli", "compare", str(current), str(baseline)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("regression")
    suite = tmp / "reg.toml"
    suite.write_text(SUITE)
    return suite, run_suite(suite, tmp / "baseline")


def test_injected_memory_regression_is_caught(recorded, tmp_path):
    suite, baseline = recorded
    current = run_suite(suite, tmp_path, **{inject.EXTRA_MEMORY: "0.2"})
    (trial_id,) = [p.stem for p in current.glob("*.json")]
    assert results.read(current / f"{trial_id}.json")["test_injected"] == {inject.EXTRA_MEMORY: 0.2}
    proc = compare_cli(current, baseline)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("REGRESSION"))
    assert trial_id in line and "memory.accounted.weights" in line and "+20.0%" in line


def test_injected_slowdown_is_caught(recorded, tmp_path):
    suite, baseline = recorded
    # 4x, not 2x: a few steps of a tiny model on a busy machine can spread a 2x slowdown into "within noise".
    current = run_suite(suite, tmp_path, **{inject.SLOWDOWN: "4"})
    (trial_id,) = [p.stem for p in current.glob("*.json")]
    proc = compare_cli(current, baseline)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("REGRESSION")]
    assert trial_id in line and "runtime.step_ratio" in line
    # The accounted memory is untouched by a slowdown: only time is named.
    assert "memory" not in line


def test_unchanged_rerun_passes(recorded, tmp_path):
    suite, baseline = recorded
    current = run_suite(suite, tmp_path)
    proc = compare_cli(current, baseline)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Deterministic figures are identical, not just close.
    cur, base = (results.read(next(d.glob("*.json"))) for d in (current, baseline))
    assert cur["memory"]["accounted"] == base["memory"]["accounted"]
    assert copy.deepcopy(cur["spec"]) == base["spec"]

"""Parallel trials on one machine (`[run] parallel`, `--parallel`): the same trials, statuses and,
at the same thread count, the same numbers bit for bit as one at a time; trials that really
overlap, each pinned to its own cores; a timeout that costs only its own trial; tuned studies side
by side making the choices they make one after another; bad settings stopped before anything runs."""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import threading
import time
from pathlib import Path

import pytest

from bench.cli import main
from bench.records import results
from bench.regression import calibrate
from bench.run import runner, suite, tune
from tests import test_tune

TRIALS = """
name = "{name}"
[model]
name = "{model}"
[data]
task = "sst2"
train_examples = 16
max_length = 32
[train]
lr = 1e-2
batch_size = 4
max_steps = 4
[eval]
tasks = {tasks}
limit = 8
forgetting_texts = 4
[run]
timeout = 300
threads = 1
parallel = {parallel}
[[sweep]]
method = "lora"
grid.rank = [{{ r = 2, alpha = 4 }}, {{ r = 4, alpha = 8 }}]
[[sweep]]
method = "frozen"
{extra}
"""


def write(tmp_path: Path, name: str, model: str = "synthetic:llama-tiny", parallel: int = 2, tasks: str = "[]",
          extra: str = "") -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(TRIALS.format(name=name, model=model, parallel=parallel, tasks=tasks, extra=extra))
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """A tiny Llama saved as a local checkpoint folder: not synthetic, so its trials are scored."""
    from bench import models

    out = tmp_path_factory.mktemp("tiny-llama")
    model = models.build_synthetic("llama-tiny")
    model.save_pretrained(out)
    models._tiny_tokenizer(model.config.vocab_size).save_pretrained(out)
    return str(out)


def ran(root: Path, name: str) -> dict[str, dict]:
    return {p.stem: results.read(p) for p in (root / name).glob("*.json")}


def overlap(a: dict, b: dict) -> bool:
    ra, rb = a["runtime"], b["runtime"]
    return ra["process_started_at"] < rb["process_ended_at"] and rb["process_started_at"] < ra["process_ended_at"]


def test_parallel_runs_the_same_trials_to_the_same_numbers_side_by_side(tmp_path, checkpoint):
    path = write(tmp_path, "p", model=checkpoint, tasks='["sst2"]')
    s = suite.load(path)
    one = runner.run(s, tmp_path / "seq", progress=False, parallel=1)
    two = runner.run(s, tmp_path / "par", progress=False)  # the suite's parallel = 2
    assert one.parallel == 1 and two.parallel == 2
    assert one.statuses == two.statuses and set(one.statuses) == {t.id for t in s.trials}
    assert set(one.statuses.values()) == {"success"}
    seq, par = ran(tmp_path / "seq", "p"), ran(tmp_path / "par", "p")
    assert seq.keys() == par.keys() == set(one.statuses)

    # The same trial at the same thread count, in another process pinned elsewhere: bit for bit.
    for trial_id, a in seq.items():
        b = par[trial_id]
        assert a["env"]["torch_threads"] == b["env"]["torch_threads"] == 1
        assert a["train"]["loss_curve"] == b["train"]["loss_curve"]
        assert a["eval"]["lm_eval"] == b["eval"]["lm_eval"] and a["eval"]["forgetting"] == b["eval"]["forgetting"]
        assert math.isfinite(a["eval"]["forgetting"]) and a["eval"]["lm_eval"]["sst2"]
        if a["spec"]["method"]["name"] == "lora":
            assert len(a["train"]["loss_curve"]) == 4 and all(math.isfinite(v) for v in a["train"]["loss_curve"])

    # Recorded: the level, and where each trial ran.
    cores = sorted(os.sched_getaffinity(0))
    assert all(r["env"]["parallel"] == 1 and r["run"]["parallel"] == 1 and r["env"]["cpu_affinity"] == cores for r in seq.values())
    assert all(r["env"]["parallel"] == 2 and r["run"]["parallel"] == 2 for r in par.values())
    lanes = {tuple(lane.cpus) for lane in runner.lanes(2)}
    assert {tuple(r["env"]["cpu_affinity"]) for r in par.values()} <= lanes
    # The machine's class, not the lane's share of it: baselines, the forecast's calibration and the
    # matmul peak cache are stored under it.
    assert {r["env"]["machine_class"] for r in [*seq.values(), *par.values()]} == {calibrate.machine_class()}

    # Two trials ran at once (by the runner's clock), on disjoint cores where there are two.
    pairs = [(a, b) for a, b in itertools.combinations(par.values(), 2) if overlap(a, b)]
    assert pairs, [(r["runtime"]["process_started_at"], r["runtime"]["process_ended_at"]) for r in par.values()]
    if len(cores) >= 2:
        assert all(not set(a["env"]["cpu_affinity"]) & set(b["env"]["cpu_affinity"]) for a, b in pairs)
    assert not any(overlap(a, b) for a, b in itertools.combinations(seq.values(), 2))

    # A rerun skips every success, in parallel too.
    again = runner.run(s, tmp_path / "par", progress=False)
    assert again.ran == [] and sorted(again.skipped) == sorted(one.statuses)


def test_a_timeout_in_parallel_costs_only_its_own_trial(tmp_path):
    # The first block's trial trains forever and is killed at 6 s; it starts first (the longest).
    path = write(tmp_path, "slow", extra='[[sweep]]\nmethod = "lora"\ngrid.rank = [{ r = 8, alpha = 16 }]\n'
                                           'train = { max_steps = 100000 }\nrun = { timeout = 6 }\n')
    s = suite.load(path)
    slow = next(t.id for t in s.trials if t.spec["train"]["max_steps"] == 100000)
    report = runner.run(s, tmp_path / "r", progress=False)
    found = ran(tmp_path / "r", "slow")
    assert report.statuses == {trial_id: r["status"] for trial_id, r in found.items()}
    assert found[slow]["status"] == "timeout" and "timeout of 6 s" in found[slow]["error"]
    assert found[slow]["env"]["parallel"] == 2 and found[slow]["env"]["torch_threads"] == 1
    others = [r for trial_id, r in found.items() if trial_id != slow]
    assert len(others) == 3 and all(r["status"] == "success" for r in others)
    assert any(overlap(found[slow], r) for r in others)  # they ran while it was being timed out
    assert not (tmp_path / "r" / "slow" / ".running").exists()


def test_an_error_stops_the_sweep_and_kills_the_trial_beside_it(tmp_path, monkeypatch):
    """An error in one lane (here: raised as the frozen trial's result comes back) stops the sweep
    as it would stop a sequential one: the trial running beside it is killed, not waited for, and
    nothing more is published or started."""
    # The frozen trial trains nothing whatever max_steps says: a large one puts it first in the queue.
    path = write(tmp_path, "stop", extra='[[sweep]]\nmethod = "frozen"\ntrain = { max_steps = 200000 }\n'
                                           '[[sweep]]\nmethod = "lora"\ngrid.rank = [{ r = 8, alpha = 16 }]\n'
                                           'train = { max_steps = 100000 }\n')
    s = suite.load(path)
    quick, slow = (next(t.id for t in s.trials if t.spec["train"]["max_steps"] == n) for n in (200000, 100000))
    real, pids = runner.execute, {}

    def failing(ctx, trial, draft, adapters, progress, started=None, env=None, lane=None):
        def record(pid):
            pids[trial.id] = pid
            started(pid)

        result = real(ctx, trial, draft, adapters, progress, record, env, lane)
        if trial.id == quick:
            raise RuntimeError("the sweep broke")
        return result

    monkeypatch.setattr(runner, "execute", failing)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="the sweep broke"):
        runner.run(s, tmp_path / "r", progress=False)
    assert time.monotonic() - start < 120  # the slow trial trains for hours and has a 300 s timeout
    assert set(pids) == {quick, slow}  # the queue's first two; the others never started
    assert not list((tmp_path / "r" / "stop").glob("*.json"))
    zombie = Path(f"/proc/{pids[slow]}/stat")
    assert not zombie.exists() or zombie.read_text().split()[2] in ("Z", "X")


def test_tuned_studies_side_by_side_choose_as_they_do_one_after_another(tmp_path, monkeypatch):
    """test_tune's suite and fake trials (a validation score that peaks at lr = 1e-3): what is
    tested is which trials each study makes and chooses, and that two studies ran at once."""
    meeting = threading.Barrier(2, timeout=60)  # the first two trials wait for each other: fails unless side by side
    gate, met = threading.Lock(), []
    scored = test_tune.fake(1.0, [])

    def fake(ctx, trial, draft, adapters, progress, started=None, env=None, lane=None):
        with gate:
            first = lane.parallel == 2 and len(met) < 2
            if first:
                met.append(trial.id)
        if first:
            meeting.wait()
        return scored(trial)

    monkeypatch.setattr(runner, "execute", fake)
    s = suite.load(test_tune.write(tmp_path), check_models=False)
    outcomes: dict[int, dict[str, tune.Outcome]] = {1: {}, 2: {}}
    original = tune.run
    for level in (1, 2):
        def recording(study, outcome, level=level):
            outcomes[level][study.key] = original(study, outcome)
            return outcomes[level][study.key]

        monkeypatch.setattr(tune, "run", recording)
        report = runner.run(s, tmp_path / f"r{level}", progress=False, parallel=level)
        assert len(report.ran) == 3 * (6 + 3) and set(report.statuses.values()) == {"success"}
    assert len(met) == 2 and not meeting.broken
    assert outcomes[1] == outcomes[2] and len(outcomes[1]) == 3
    assert all(o.chosen is not None and len(o.finals) == 3 for o in outcomes[1].values())


def test_one_study_runs_its_trials_that_are_ready_together_side_by_side(tmp_path, monkeypatch):
    """An lhs study's search trials ignore each other's scores and its finals each other's: on two
    lanes they run two at a time (a suite run --only one method once left the second lane idle for
    the whole study). A tpe study asks one search trial at a time. The choices are those made one
    at a time."""
    from bench.run import select

    meet = {"search": threading.Barrier(2, timeout=30), "final": threading.Barrier(2, timeout=30)}
    overlapping: dict[str, list[str]] = {"search": [], "final": []}
    scored = test_tune.fake(1.0, [])

    def fake(ctx, trial, draft, adapters, progress, started=None, env=None, lane=None):
        role = trial.tune["role"]
        if lane.parallel == 2 and (trial.tune.get("index") in (0, 1) or trial.spec["train"]["seed"] in (0, 1) and role == "final"):
            overlapping[role].append(trial.id)
            meet[role].wait()  # broken (an error) unless the two run at once
        return scored(trial)

    monkeypatch.setattr(runner, "execute", fake)
    outcomes: dict[int, tune.Outcome] = {}
    original = tune.run
    for level in (1, 2):
        def recording(study, outcome, level=level):
            outcomes[level] = original(study, outcome)
            return outcomes[level]

        monkeypatch.setattr(tune, "run", recording)
        s = select.only(suite.load(test_tune.write(tmp_path, sampler="lhs"), check_models=False), "method=ia3")
        report = runner.run(s, tmp_path / f"r{level}", progress=False, parallel=level)
        assert len(report.ran) == 6 + 3 and set(report.statuses.values()) == {"success"}
    assert outcomes[1] == outcomes[2] and outcomes[1].chosen is not None
    assert [len(set(ids)) for ids in overlapping.values()] == [2, 2]
    assert not any(barrier.broken for barrier in meet.values())


def test_a_resumed_longest_study_goes_on_first(tmp_path, monkeypatch):
    """Resumed side by side, the longest study (the first of equal ones) replays its finished trials
    from disk before it can queue its next: the lanes wait for it, rather than start a later study
    whose first trials were queued at once."""
    s = suite.load(test_tune.write(tmp_path, sampler="lhs"), check_models=False)
    first = min(s.studies, key=lambda study: -runner.study_cost(study))
    with pytest.raises(KeyboardInterrupt), runner.Sweep(s, tmp_path / "r", progress=False) as sweep:
        runner.run_studies(dataclasses.replace(s, studies=[first]), sweep, test_tune.fake(1.0, [], stop_after=4))  # 4 of 6 searched
    reading = results.read

    def slow(path, *args, **kwargs):
        time.sleep(0.5)
        return reading(path, *args, **kwargs)

    started: list[dict] = []
    scored = test_tune.fake(1.0, [])

    def fake(ctx, trial, draft, adapters, progress, started_here=None, env=None, lane=None):
        started.append(trial.tune)
        return scored(trial)

    monkeypatch.setattr(results, "read", slow)
    monkeypatch.setattr(runner, "execute", fake)
    runner.run(s, tmp_path / "r", progress=False, parallel=2)
    assert sorted((t["study"], t["role"], t["index"]) for t in started[:2]) == [(first.key, "search", 4), (first.key, "search", 5)]
    assert len(started) == 3 * (6 + 3) - 4


def test_a_tuned_suite_starts_its_untuned_references_first(tmp_path, monkeypatch):
    """Side by side the studies go longest first, but the untuned trials (the frozen reference a
    partial run's ranking is read against) start before any study, though they are the cheapest."""
    started: list[str] = []
    scored = test_tune.fake(1.0, [])

    def fake(ctx, trial, draft, adapters, progress, started_here=None, env=None, lane=None):
        started.append(trial.spec["method"]["name"])
        return scored(trial)

    monkeypatch.setattr(runner, "execute", fake)
    path = test_tune.write(tmp_path)
    path.write_text(path.read_text() + '[[sweep]]\nmethod = "frozen"\ntune = false\n')
    s = suite.load(path, check_models=False)
    assert runner.cost(s.trials[0]) < min(runner.study_cost(study) for study in s.studies)
    runner.run(s, tmp_path / "r", progress=False, parallel=2)
    # Two lanes start two jobs at once, in either order; the frozen trial is one of them.
    assert "frozen" in started[:2] and started.count("frozen") == 1 and len(started) == 1 + 3 * (6 + 3)


def test_bad_parallel_is_stopped_before_anything_runs(tmp_path, capsys):
    path = write(tmp_path, "bad", parallel=0)
    with pytest.raises(suite.SuiteError) as caught:
        suite.load(path)
    assert "run.parallel" in str(caught.value) and "must be >= 1" in str(caught.value)
    assert main(["run", str(path), "--results", str(tmp_path / "r"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "bad.toml" in err and "run.parallel" in err and "Traceback" not in err

    # Blocks that disagree: parallel says how the whole sweep runs.
    mixed = write(tmp_path, "mixed", parallel=2, extra='[[sweep]]\nmethod = "lora"\nrun = { parallel = 3 }\n')
    assert main(["run", str(mixed), "--results", str(tmp_path / "r"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "run.parallel" in err and "[2, 3]" in err and "Traceback" not in err

    good = write(tmp_path, "good")
    with pytest.raises(SystemExit) as exited:
        main(["run", str(good), "--parallel", "0", "--results", str(tmp_path / "r")])
    assert exited.value.code == 2 and "--parallel: must be a whole number >= 1" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_lanes_split_the_cores_disjointly_with_equal_threads():
    assert runner.lanes(1) == [runner.Lane(1)]
    five = runner.lanes(2, range(5))
    assert [lane.cpus for lane in five] == [(0, 1, 2), (3, 4)] and {lane.threads for lane in five} == {2}
    assert [lane.cpus for lane in runner.lanes(3, [4, 6])] == [(4,), (6,), (4,)]  # more lanes than cores: shared
    assert {lane.threads for lane in runner.lanes(3, [4, 6])} == {1}

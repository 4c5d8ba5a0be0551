"""benchmarks/scores_vs_reference.py and benchmarks/suite_overhead.py on small synthetic result
folders: which scores are compared, which seed spread each gets (its own seeds, else the suite's
largest), the verdicts and the summary line; the overhead sums, the share without the first trial,
the runner's span, the per-trial medians, --only; and bad input as one line and exit 2."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest

from bench.records import results
from bench.run.suite import trial_id
from benchmarks import scores_vs_reference as svr
from benchmarks import suite_overhead

SPEC = {"model": {"name": "smollm2-135m", "dtype": "float32"}, "data": {"task": "sst2", "train_examples": 256, "max_length": 128},
        "method": {"name": "lora", "version": "1", "config": {"r": 8, "alpha": 16, "targets": "qv"}},
        "train": {"optimizer": "adamw", "lr": 1e-3, "seed": 0, "epochs": 1}, "eval": {"tasks": ["sst2"]}}


def spec(method: str = "lora", seed: int = 0, task: str = "sst2", **config: Any) -> dict[str, Any]:
    out = copy.deepcopy(SPEC)
    out["method"]["name"] = method
    if method != "lora":
        out["method"]["config"] = {}
    out["method"]["config"].update(config)
    out["train"]["seed"] = seed
    out["data"]["task"] = task
    return out


def result(s: dict[str, Any], suite: str = "sweep", status: str = "success", evaluation: dict | None = None,
           runtime: dict | None = None, env: dict | None = None) -> dict[str, Any]:
    return {"schema": results.SCHEMA, "trial_id": trial_id(s), "suite": suite, "status": status, "error": None,
            "label": f"{s['method']['name']}({s['method']['config'].get('r', '')}) seed{s['train']['seed']}", "spec": s,
            "eval": evaluation or {"lm_eval": {}, "forgetting": None}, "runtime": runtime or {}, "env": env or {}}


def lm(acc: float, forgetting: float) -> dict[str, Any]:
    return {"lm_eval": {"sst2": {"acc": acc, "acc_stderr": 0.02}}, "forgetting": forgetting}


def write(folder: Path, found: list[dict[str, Any]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for r in found:
        results.write(folder / f"{r['trial_id']}.json", r)
    return folder


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    """A reference with two replicated LoRA configurations (r=8 at seeds 0-2: accuracy spread 0.04,
    forgetting 0.2; r=16 at seeds 0-1: 0.08 and 0.05), an unreplicated frozen trial, a failed one, and
    a vision suite with no replicates; a run of some of them."""
    vision = spec("surgical", task="fmnist-noise", blocks="0")
    ref = [result(spec(seed=0), evaluation=lm(0.80, 0.1)), result(spec(seed=1), evaluation=lm(0.84, 0.3)),
           result(spec(seed=2), evaluation=lm(0.82, 0.2)),
           result(spec(seed=0, r=16), evaluation=lm(0.70, 0.40)), result(spec(seed=1, r=16), evaluation=lm(0.78, 0.45)),
           result(spec("frozen"), evaluation=lm(0.75, 0.0)),
           result(spec(seed=3), status="failed"),
           result(vision, suite="vis", evaluation={"accuracy": {"test": 0.70, "val": 0.72}, "forgetting": None, "lm_eval": {}})]
    run = [result(spec(seed=0), evaluation=lm(0.80, 0.1)),          # identical
           result(spec(seed=1), evaluation=lm(0.87, 0.3)),          # +0.03 within its own 0.04
           result(spec(seed=2), evaluation=lm(0.90, 0.55)),         # +0.08 and +0.35: outside 0.04 and 0.2
           result(spec("frozen"), evaluation=lm(0.80, 0.0)),        # +0.05: within the suite's largest, 0.08
           result(spec(seed=3), evaluation=lm(0.81, 0.1)),          # its reference failed: not compared
           result(vision, suite="vis", evaluation={"accuracy": {"test": 0.73, "val": 0.72}, "forgetting": None, "lm_eval": {}}),
           result(spec(seed=5), evaluation=lm(0.5, 0.1))]           # only here
    return write(tmp_path / "run", run), write(tmp_path / "ref", ref)


def test_scores_against_the_reference_seed_spread(pair, tmp_path, capsys):
    run, ref = pair
    out_json = tmp_path / "cmp.json"
    assert svr.main([str(run), str(ref), "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    # 5 trials compared: lora seeds 0-2 and frozen with acc and forgetting each, the vision one with two accuracies;
    # outside: seed 2's acc and forgetting; identical: seed 0's two, seed 1's forgetting, frozen's forgetting, val.
    assert out.strip().splitlines()[-1] == "5 trials, 10 scores, 2 outside spread, identical: 5, no spread known: 2"
    assert "acc_stderr" not in out and "2 successful trial(s) only in" in out and "seeds = max - min" in out
    rows = {(r["label"], r["metric"]): r for r in json.loads(out_json.read_text())["rows"]}
    own = rows[("lora(8) seed1", "lm_eval.sst2.acc")]
    assert own["rule"] == "seeds" and own["seeds"] == 3 and own["spread"] == pytest.approx(0.04) and own["within"] is True
    assert own["difference"] == pytest.approx(0.03)
    assert rows[("lora(8) seed2", "lm_eval.sst2.acc")]["within"] is False
    worst = rows[("lora(8) seed2", "forgetting")]
    assert worst["spread"] == pytest.approx(0.2) and worst["within"] is False
    frozen = rows[("frozen() seed0", "lm_eval.sst2.acc")]
    assert frozen["rule"] == "suite" and frozen["spread"] == pytest.approx(0.08) and frozen["seeds"] == 2 and frozen["within"] is True
    assert rows[("frozen() seed0", "forgetting")]["spread"] == pytest.approx(0.2)  # the largest forgetting spread: r=8's
    test = rows[("surgical() seed0", "accuracy.test")]
    assert test["rule"] == "none" and test["spread"] is None and test["within"] is None and not test["identical"]
    assert json.loads(out_json.read_text())["benchmark"] == "scores_vs_reference"


def test_scores_bad_input_is_one_line_and_exit_2(pair, tmp_path, capsys):
    run, ref = pair
    assert svr.main([str(run), str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    other = write(tmp_path / "other", [result(spec(seed=9), evaluation=lm(0.5, 0.1))])
    assert svr.main([str(other), str(ref)]) == 2
    err = capsys.readouterr().err
    assert "no successful trial with a score in both" in err and err.count("\n") == 1
    (run / "broken.json").write_text("{")
    assert svr.main([str(run), str(ref)]) == 2
    assert "broken.json" in capsys.readouterr().err


T0 = 1.8e9


def timed(s: dict[str, Any], start: float, process: float, train: float, evaluation: float, parallel: int = 1,
          **extra: Any) -> dict[str, Any]:
    runtime = {"process_s": process, "train_s": train, "eval_s": evaluation, "wall_s": process - 0.5,
               "process_started_at": T0 + start, "process_ended_at": T0 + start + process, **extra}
    return result(s, runtime=runtime, env={"parallel": parallel})


def test_overhead_sums_shares_span_and_medians(tmp_path, capsys):
    folder = write(tmp_path / "r", [
        timed(spec("frozen"), 0, 20, 15, 3, forecast_s=0.3, calibration_s=[0.1, 0.2], load_s=0.4),  # first: starts the fork server
        timed(spec(seed=0), 20, 10, 6, 2, forecast_s=0.1, calibration_s=[0.05, 0.05], load_s=0.2),
        timed(spec(seed=1), 30, 10, 7, 1, forecast_s=0.2, calibration_s=[0.3], load_s=0.3),
    ])
    assert suite_overhead.main([str(folder), "--json", str(tmp_path / "o.json")]) == 0
    out = capsys.readouterr().out
    # (40 - 34) / 40; without the first: (20 - 16) / 20; the span 0..40 at parallel 1: (40 - 34) / 40.
    assert "all: 3 trials, process 40.0 s, train 28.0 s, eval 6.0 s: (process - train - eval) / process = 15.0%" in out
    assert "without the first (" in out and "frozen() seed0): 2 trials, process 20.0 s" in out and "= 20.0%" in out
    assert "runner span (first process start to last exit): 40.0 s, x 1 lane = 40.0 s, " in out
    assert "outside train+eval (idle lanes included) 15.0%" in out
    medians = dict(re.fullmatch(r"  (.+?) +(-?[0-9.]+) s  \(3\)", line).groups() for line in out.splitlines() if line.startswith("  "))
    assert {k: float(v) for k, v in medians.items()} == {
        "forecast_s": pytest.approx(0.2), "calibration_s": pytest.approx(0.3), "load_s": pytest.approx(0.3),
        suite_overhead.START_EXIT: pytest.approx(0.5), suite_overhead.REST: pytest.approx(0.7)}  # 0.5, 1.1, 0.7
    record = json.loads((tmp_path / "o.json").read_text())
    assert record["benchmark"] == "suite_overhead" and record["outside"] == pytest.approx(0.15)
    assert record["outside_without_first"] == pytest.approx(0.2)

    # --only: the same selector as peftbench run's, over the recorded specs.
    assert suite_overhead.main([str(folder), "--only", "method=lora"]) == 0
    out = capsys.readouterr().out
    assert "all: 2 trials, process 20.0 s" in out and "runner span (first process start to last exit): 20.0 s" in out
    assert suite_overhead.main([str(folder), "--only", "method=dora"]) == 2
    err = capsys.readouterr().err
    assert "'method=dora': matches no trial of results folder" in err and err.count("\n") == 1


def test_overhead_of_results_recorded_before_the_runner_dated_them(tmp_path, capsys):
    old = [result(spec(seed=i), runtime={"process_s": 4.0, "train_s": 2.0, "eval_s": 1.0, "wall_s": 3.9}) for i in range(2)]
    hand_made = result(spec(seed=7), runtime={"train_s": 1.0})
    folder = write(tmp_path / "old", [*old, hand_made])
    assert suite_overhead.main([str(folder)]) == 0
    out = capsys.readouterr().out
    assert "= 25.0%" in out and "1 result(s) without runtime.process_s left out" in out
    assert "without the first: n/a" in out and "runner span: n/a" in out
    only_hand_made = write(tmp_path / "hand", [hand_made])
    assert suite_overhead.main([str(only_hand_made)]) == 2
    assert "no result records runtime.process_s" in capsys.readouterr().err

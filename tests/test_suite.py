"""Suites: expansion, trial ids, and the errors a malformed suite gets (file and key named, exit 2, nothing written)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from bench import cli
from bench.run import suite

GOOD = """
name = "t"
[model]
name = "synthetic:llama-tiny"
[data]
task = "sst2"
train_examples = 8
[train]
lr = 1e-3
[[sweep]]
method = "lora"
grid.rank = [{ r = 4, alpha = 8 }, { r = 8, alpha = 16 }]
grid.targets = [["qv"], ["all-linear"]]
grid."train.optimizer" = ["adamw", "sgd"]
[[sweep]]
method = "frozen"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "s.toml"
    path.write_text(textwrap.dedent(text))
    return path


def test_expands_cartesian_product(tmp_path):
    s = suite.load(write(tmp_path, GOOD))
    assert len(s.trials) == 2 * 2 * 2 + 1
    lora = [t for t in s.trials if t.spec["method"]["name"] == "lora"]
    pairs = {(t.spec["method"]["config"]["r"], t.spec["method"]["config"]["alpha"]) for t in lora}
    assert pairs == {(4, 8), (8, 16)}
    assert {t.spec["train"]["optimizer"] for t in lora} == {"adamw", "sgd"}
    assert len({t.id for t in s.trials}) == len(s.trials)


def test_trial_id_is_stable_and_tracks_method_version(tmp_path):
    a = suite.load(write(tmp_path, GOOD)).trials[0]
    b = suite.load(write(tmp_path, GOOD)).trials[0]
    assert a.id == b.id
    changed = dict(a.spec, method=dict(a.spec["method"], version="999"))
    assert suite.trial_id(changed) != a.id
    # How a trial is run (its timeout) is not part of what it measures.
    c = suite.load(write(tmp_path, GOOD + "\n[run]\ntimeout = 5\n")).trials[0]
    assert c.id == a.id


BAD = {
    "unknown method": (GOOD.replace('method = "frozen"', 'method = "lorra"'), "sweep[1].method", "did you mean 'lora'"),
    "rank 0": (GOOD.replace("{ r = 4, alpha = 8 }", "{ r = 0, alpha = 8 }"), "sweep[0].r", ">= 1"),
    "negative lr": (GOOD.replace("lr = 1e-3", "lr = -1e-3"), "train.lr", "> 0"),
    "target matches nothing": (GOOD.replace('[["qv"], ["all-linear"]]', '[["qv"], ["nonexistent_proj"]]'), "targets", "matches no"),
    "unknown optimizer": (GOOD.replace('["adamw", "sgd"]', '["adamw", "adamm"]'), "train.optimizer", "unknown optimizer"),
    "wrong type": (GOOD.replace("train_examples = 8", 'train_examples = "eight"'), "data.train_examples", "expected int"),
    "duplicate key": (GOOD.replace("lr = 1e-3", "lr = 1e-3\nlr = 2e-3"), "line", "invalid TOML"),
    "missing model": (GOOD.replace('name = "synthetic:llama-tiny"', 'name = "no-such-model-xyz"'), "model.name", "cannot resolve model"),
    "broken toml": (GOOD.replace("[data]", "[data"), "line", "invalid TOML"),
    "empty grid": (GOOD.replace('["adamw", "sgd"]', "[]"), 'grid.train.optimizer', "empty list"),
    "model section missing": (GOOD.replace('[model]\nname = "synthetic:llama-tiny"', ""), "model.name", "required"),
    "unknown method field": (GOOD.replace("{ r = 4, alpha = 8 }", "{ r = 4, alfa = 8 }"), "alfa", "unknown key"),
    "grid not a list": (GOOD.replace('["adamw", "sgd"]', '"adamw"'), "grid.train.optimizer", "list of choices"),
    "unknown task": (GOOD.replace('task = "sst2"', 'task = "sst3"'), "data.task", "unknown task"),
    "no sweep": (GOOD.split("[[sweep]]")[0], "sweep", "at least one"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_suite_one_line_error_exit_2_nothing_written(case, tmp_path, capsys):
    text, key, message = BAD[case]
    path = write(tmp_path, text)
    results = tmp_path / "results"
    code = cli.main(["run", str(path), "--results", str(results), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert str(path) in err and key in err and message in err, err
    assert not results.exists()


def test_all_suites_in_repo_validate():
    from bench.serving import serve_bench

    for path in sorted(Path(__file__).parent.parent.joinpath("suites").glob("*.toml")):
        if path.stem.startswith("serving"):  # a serving benchmark's grid, not a trial suite
            assert serve_bench.load_suite(path).adapters, path
        elif "synthetic" in path.read_text() or path.stem == "smoke":
            assert suite.load(path).trials, path
        else:
            assert suite.load(path, check_models=False).trials, path

"""`peftbench run SUITE --only SELECTOR` (bench/run/select.py): id prefixes and key=value filters on the
expanded spec (the same key ORs, different keys AND), a selector or term that picks nothing stopped
with one line and exit 2, the selected trials run into the same folder as a full run (which then
skips them), tuned studies selected whole; and --dry-run's parallel level."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench.cli import main
from bench.records import results
from bench.run import select, suite
from tests import test_tune

SUITE = """
name = "sel"
[model]
name = "synthetic:llama-tiny"
[data]
task = "sst2"
train_examples = 16
max_length = 32
[train]
lr = 1e-2
batch_size = 4
max_steps = 2
[eval]
tasks = []
forgetting = false
[run]
timeout = 300
threads = 1
[[sweep]]
method = "lora"
grid.rank = [{ r = 2, alpha = 4 }, { r = 4, alpha = 8 }]
grid.targets = [["q", "v"], "all-linear"]
grid."train.seed" = [0, 1]
[[sweep]]
method = "frozen"
[[sweep]]
method = "ia3"
train = { lr = 3e-3, seed = 1 }
"""


@pytest.fixture(scope="module")
def loaded(tmp_path_factory) -> suite.Suite:
    path = tmp_path_factory.mktemp("sel") / "sel.toml"
    path.write_text(SUITE)
    return suite.load(path)


def picked(s: suite.Suite, text: str) -> list[str]:
    return sorted(t.label for t in select.only(s, text).trials)


def test_same_key_ors_different_keys_and(loaded):
    assert len(loaded.trials) == 10
    assert picked(loaded, "method=frozen,method=ia3") == ["frozen() adamw ep1 seed0", "ia3(vectors=None) adamw ep1 seed1"]
    lora_seed1 = picked(loaded, "method=lora,train.seed=1")
    assert len(lora_seed1) == 4 and all(label.startswith("lora(") and label.endswith("seed1") for label in lora_seed1)
    # A bare key is a method field, as in a suite's grid; r=2 OR r=4, AND on q+v targets, AND seed 0.
    qv = picked(loaded, "r=2,r=4,targets=q+v,train.seed=0")
    assert len(qv) == 2 and all("targets=q+v" in label and label.endswith("seed0") for label in qv)
    assert picked(loaded, "targets=q") == picked(loaded, "targets=q+v")  # one element of a list setting
    assert picked(loaded, "method.config.r=4,targets=all-linear") == picked(loaded, "r=4,targets=all-linear")
    assert len(picked(loaded, "r=4,targets=all-linear")) == 2
    # Numbers compare as numbers: 3e-3 is 0.003 in the spec.
    assert picked(loaded, "train.lr=3e-3") == picked(loaded, "train.lr=0.003") == ["ia3(vectors=None) adamw ep1 seed1"]
    assert picked(loaded, "method=lora,model.name=synthetic:llama-tiny,eval.forgetting=false") == picked(loaded, "method=lora")


def test_id_prefixes_and_their_combination_with_filters(loaded):
    ids = sorted(t.id for t in loaded.trials)
    a, b = ids[0], ids[5]
    chosen = select.only(loaded, f"{a[:8]},{b[:6].upper()}")
    assert sorted(t.id for t in chosen.trials) == [a, b]
    assert chosen.name == loaded.name and chosen.path == loaded.path  # same results folder as a full run
    frozen = next(t for t in loaded.trials if t.spec["method"]["name"] == "frozen")
    assert [t.id for t in select.only(loaded, f"{frozen.id[:8]},{a[:8]},method=frozen").trials] == [frozen.id]


@pytest.mark.parametrize("selector, says", [
    ("method=loar", "matches no trial of suite 'sel'"),
    ("method=lora,method=loar", "'method=loar': matches no trial"),  # one bad alternative is a typo too
    ("method=ia3,train.seed=0", "none matches them all"),
    ("rank=2", "no trial's spec has method.config.rank"),
    ("deadbeef", "'deadbeef': matches no trial"),
    ("trian.seed=0", "did you mean 'train'"),
    ("train=0", "'train' is a section"),
    ("method.config=x", "is a table"),
    ("method=lora,", "an empty term"),
    ("=lora", "key=value"),
    ("xyz", "hexadecimal"),
])
def test_a_selector_that_picks_nothing_is_one_line_and_exit_2(tmp_path, loaded, capsys, selector, says):
    with pytest.raises(select.SelectError) as caught:
        select.only(loaded, selector)
    assert says in str(caught.value)
    assert main(["run", str(loaded.path), "--only", selector, "--results", str(tmp_path / "r"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_only_runs_into_the_full_runs_folder_and_a_full_run_skips_them(tmp_path, loaded, capsys):
    root = tmp_path / "r"
    frozen = next(t for t in loaded.trials if t.spec["method"]["name"] == "frozen")
    ia3 = next(t for t in loaded.trials if t.spec["method"]["name"] == "ia3")
    assert main(["run", str(loaded.path), "--only", "method=frozen,method=ia3", "--results", str(root), "--no-progress"]) == 0
    assert "ran 2, skipped 0" in capsys.readouterr().out
    found = {p.stem: results.read(p) for p in (root / "sel").glob("*.json")}
    assert sorted(found) == sorted([frozen.id, ia3.id]) and {r["status"] for r in found.values()} == {"success"}
    # Resume as ever: selecting them again runs nothing; the full run finds them done.
    assert main(["run", str(loaded.path), "--only", f"{ia3.id[:8]}", "--results", str(root), "--no-progress",
                 "--dry-run"]) == 0
    assert "1 trials (--only" in capsys.readouterr().out
    assert main(["run", str(loaded.path), "--only", "method=ia3", "--results", str(root), "--no-progress"]) == 0
    assert "ran 0, skipped 1" in capsys.readouterr().out
    from bench.run import runner

    with runner.Sweep(loaded, root, progress=False) as sweep:  # what a full run would do next
        assert sorted(sweep.report.skipped) == sorted([frozen.id, ia3.id]) and len(sweep.todo) == 8


def test_dry_run_lists_only_the_selected_trials_and_the_parallel_level(tmp_path, loaded, capsys):
    assert main(["run", str(loaded.path), "--dry-run", "--only", "method=lora,train.seed=1,r=2", "--parallel", "2",
                 "--results", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if "adamw ep1" in line]
    assert len(rows) == 2 and all("lora(r=2" in row and "seed1" in row for row in rows), out
    cores = sorted(os.sched_getaffinity(0))
    # [run] threads = 1 in this suite; the two lanes split this machine's cores.
    assert "parallel: 2 lanes x 1 thread per lane" in out
    if len(cores) >= 2:
        assert f"(cores: {','.join(map(str, cores[:len(cores) // 2]))} |" in out
    assert not (tmp_path / "r").exists()
    assert main(["run", str(loaded.path), "--dry-run", "--only", "method=frozen", "--parallel", "1"]) == 0
    assert "parallel: 1 lane x 1 thread per lane (cores: not pinned)" in capsys.readouterr().out


def test_tuned_studies_are_selected_whole_by_their_fixed_settings(tmp_path):
    s = suite.load(test_tune.write(tmp_path), check_models=False)
    assert len(s.studies) == 3 and not s.trials
    lora = select.only(s, "method=lora")
    assert len(lora.studies) == 2 and {st.corners()[0].spec["method"]["name"] for st in lora.studies} == {"lora"}
    assert len(select.only(s, "method=lora,r=8").studies) == 1
    # Its trials vary the searched learning rate and the seed: a filter on either cannot pick the
    # whole study, and no study has an id of its own.
    for selector in ("method=lora,train.seed=0", "method=ia3,train.lr=1e-5"):
        with pytest.raises(select.SelectError, match="none matches them all"):
            select.only(s, selector)
    any_id = s.studies[0].corners()[0].id
    with pytest.raises(select.SelectError, match="none matches them all"):
        select.only(s, f"{any_id[:8]},method=lora")
    assert len(select.only(s, "data.task=sst2").studies) == 3


def test_parse_groups_terms_by_key():
    sel = select.parse(" method=lora , 3aafd58f,method=full,train.seed=0 ")
    assert {k: [t.value for t in g] for k, g in sel.groups.items()} == {
        "method": ["lora", "full"], "id": ["3aafd58f"], "train.seed": ["0"]}
    assert sel.groups["method"][0].path == ("method", "name") and sel.groups["train.seed"][0].path == ("train", "seed")
    assert select.parse("targets=qv").groups["targets"][0].path == ("method", "config", "targets")
    assert select.parse("model=smollm2-135m").groups["model"][0].path == ("model", "name")
    with pytest.raises(select.SelectError, match="empty selector"):
        select.parse(" ")


def test_write_nothing_for_a_bad_selector_in_any_of_several_suites(tmp_path, loaded, capsys):
    other = tmp_path / "other.toml"
    no_ia3 = 'method = "frozen"\nmodel = { name = "synthetic:gpt2-tiny" }'
    other.write_text(SUITE.replace('name = "sel"', 'name = "other"').replace('method = "ia3"', no_ia3))
    assert main(["run", str(loaded.path), str(other), "--only", "method=ia3", "--results", str(tmp_path / "r"), "--no-progress"]) == 2
    assert "suite 'other'" in capsys.readouterr().err
    assert not Path(tmp_path / "r").exists()

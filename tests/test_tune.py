"""Tuning (bench/run/tune.py): selection reads validation scores only, a resumed study makes the
same choices, every tuned block gets the same budget. Trials are faked (a score computed from the
learning rate): what is tested is which trials are made, read and chosen, not training."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import pytest

from bench.cli import main
from bench.records import results
from bench.run import runner, suite, tune
from bench.tasks.text import PACKAGED

SUITE = """
name = "tuned"
[model]
name = "synthetic:llama-tiny"
[data]
task = "sst2"
train_examples = 16
max_length = 64
[eval]
tasks = ["sst2"]
[tune]
space = {{ "train.lr" = {{ log = [1e-5, 1e-1] }} }}
trials = 6
seeds = [0, 1, 2]
validation = 40
sampler = "{sampler}"
[[sweep]]
method = "lora"
grid.rank = [{{ r = 4, alpha = 8 }}, {{ r = 8, alpha = 16 }}]
[[sweep]]
method = "ia3"
tune = {{ trials = {ia3_trials} }}
"""


def write(tmp_path: Path, ia3_trials: int = 6, sampler: str = "tpe") -> Path:
    path = tmp_path / "tuned.toml"
    path.write_text(textwrap.dedent(SUITE.format(ia3_trials=ia3_trials, sampler=sampler)))
    return path


def fake(eval_sign: float, ran: list[str], stop_after: int | None = None):
    """A trial's result without training: on validation rows the score peaks at lr = 1e-3; on eval
    rows it is `eval_sign` times the opposite (poisoned: it would pick the other end)."""

    def execute(trial) -> dict:
        if stop_after is not None and len(ran) >= stop_after:
            raise KeyboardInterrupt  # the runner killed mid-study
        ran.append(trial.id)
        distance = (math.log10(trial.spec["train"]["lr"]) + 3) ** 2
        on_validation = trial.spec["eval"].get("split") == "validation"
        result = results.skeleton(trial, "success")
        result["eval"]["lm_eval"] = {"sst2": {"acc": 0.9 - 0.01 * distance if on_validation else 0.5 + eval_sign * 0.01 * distance}}
        return result

    return execute


def run(path: Path, root: Path, execute) -> list[tune.Outcome]:
    s = suite.load(path, check_models=False)
    outcomes = []
    original = tune.run

    def recording(study, outcome):
        outcomes.append(original(study, outcome))
        return outcomes[-1]

    tune.run = recording
    try:
        with runner.Sweep(s, root, progress=False) as sweep:
            runner.run_studies(s, sweep, execute)
    finally:
        tune.run = original
    return outcomes


@pytest.mark.parametrize("sampler", sorted(tune.SAMPLERS))
def test_choice_reads_validation_rows_only(tmp_path, sampler):
    """Poisoning the eval rows' scores (either sign) changes no choice; every search trial is scored
    on validation rows carved from train, disjoint from the eval rows and from the rows it trains on."""
    path = write(tmp_path, sampler=sampler)
    ran_a: list[str] = []
    ran_b: list[str] = []
    a = run(path, tmp_path / "a", fake(+1.0, ran_a))
    b = run(path, tmp_path / "b", fake(-1.0, ran_b))
    assert [(o.chosen, o.finals) for o in a] == [(o.chosen, o.finals) for o in b]
    assert ran_a == ran_b
    assert len(a) == 3 and all(len(o.search) == 6 and len(o.finals) == 3 for o in a)
    for o in a:  # the choice is the best validation score, which the eval rows would never pick
        scores = [s for _, _, s in o.search]
        assert scores[o.chosen] == max(scores)
    # Every search result says it was scored on validation rows; finals on eval rows, with the tuning record.
    for o in a:
        for trial_id, _, _ in o.search:
            r = results.read(results.path_for(tmp_path / "a" / "tuned", trial_id))
            assert r["spec"]["eval"]["split"] == "validation" and r["tune"]["role"] == "search"
            assert r["tune"]["budget"] == 6 and r["tune"]["sampler"] == tune.SAMPLERS[sampler]
        for trial_id in o.finals:
            r = results.read(results.path_for(tmp_path / "a" / "tuned", trial_id))
            assert "split" not in r["spec"]["eval"] and r["tune"]["role"] == "final"
            assert r["tune"]["chosen_from"] == o.search[o.chosen][0]
    # The selector refuses a result scored on eval rows.
    final = results.read(results.path_for(tmp_path / "a" / "tuned", a[0].finals[0]))
    with pytest.raises(ValueError, match="not validation rows"):
        tune.validation_score(final, "acc")
    # The rows: validation carved from train, never an eval row, never trained on.
    task = PACKAGED["sst2"]
    validation = {e.prompt for e in task.carved("validation", 40)}
    train = {e.prompt for e in task.carved("train", 40)}
    evaluation = {e.prompt for e in task.rows("eval")}
    assert len(validation) == 40 and not validation & evaluation and not validation & train
    assert len(train) + len(validation) == task.size("train")


@pytest.mark.parametrize("sampler", sorted(tune.SAMPLERS))
def test_resumed_study_makes_the_same_choices(tmp_path, sampler):
    path = write(tmp_path, sampler=sampler)
    whole: list[str] = []
    reference = run(path, tmp_path / "whole", fake(1.0, whole))
    first: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        run(path, tmp_path / "resumed", fake(1.0, first, stop_after=4))
    assert len(first) == 4
    rest: list[str] = []
    resumed = run(path, tmp_path / "resumed", fake(1.0, rest))
    assert first + rest == whole  # nothing ran twice, nothing was skipped
    assert [(o.search, o.chosen, o.finals) for o in resumed] == [(o.search, o.chosen, o.finals) for o in reference]


def test_latin_hypercube_puts_one_trial_at_the_centre_of_each_stratum(tmp_path):
    """lhs on a log range: the 6 search learning rates of every study are the centres of 6 equal
    log strata of [1e-5, 1e-1] (4 significant digits, as trial ids keep them), one each, in
    ascending order, the same points for every method."""
    outcomes = run(write(tmp_path, sampler="lhs"), tmp_path / "r", fake(1.0, []))
    centres = sorted(float(f"{10 ** (-5 + 4 * (i + 0.5) / 6):.4g}") for i in range(6))
    for o in outcomes:  # ascending, so that the earliest of equal scores is the lowest rate, whatever scipy's permutation
        assert [setting["train.lr"] for _, setting, _ in o.search] == centres
    records = [results.read(p) for p in (tmp_path / "r" / "tuned").glob("*.json")]
    assert {r["tune"]["startup_trials"] for r in records} == {None}
    with pytest.raises(tune.TuneError, match="applies to the tpe sampler only"):
        tune.parse({"space": {"train.lr": {"log": [1e-5, 1e-1]}}, "trials": 4, "seeds": [0, 1, 2], "sampler": "lhs", "startup": 2})
    with pytest.raises(tune.TuneError, match="unknown sampler 'grid' \\(known: tpe, lhs\\)"):
        tune.parse({"space": {"train.lr": {"log": [1e-5, 1e-1]}}, "trials": 4, "seeds": [0, 1, 2], "sampler": "grid"})


def test_unequal_budgets_are_refused(tmp_path, capsys):
    path = write(tmp_path, ia3_trials=4)
    with pytest.raises(suite.SuiteError, match=r"sweep\[1\]\.tune\.trials: 4 search trials, but sweep\[0\] point 0 has 6"):
        suite.load(path, check_models=False)
    assert main(["run", str(path), "--dry-run", "--results", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "same tuning budget" in err and "Traceback" not in err


def test_untuned_block_and_bad_space(tmp_path):
    """tune = false keeps a block untuned (its trials as before); a bad space names its key."""
    path = write(tmp_path)
    text = path.read_text().replace('tune = { trials = 6 }', 'tune = false')
    path.write_text(text)
    s = suite.load(path, check_models=False)
    assert [t.spec["method"]["name"] for t in s.trials] == ["ia3"] and len(s.studies) == 2
    assert "validation" not in s.trials[0].spec["data"] and s.trials[0].tune is None
    path.write_text(text.replace("log = [1e-5, 1e-1]", "log = [0, 1e-1]"))
    with pytest.raises(suite.SuiteError, match=r"tune\.space\.train\.lr\.log: a log range must be positive"):
        suite.load(path, check_models=False)
    # A table among the seeds (unhashable) is named, not a TypeError.
    with pytest.raises(tune.TuneError, match=r"at least 3 distinct whole numbers"):
        tune.parse({"space": {"train.lr": {"log": [1e-5, 1e-1]}}, "trials": 4, "seeds": [{"name": "x"}, 1, 2]})


def test_search_trials_render_the_validation_rows_for_lm_eval(tmp_path, monkeypatch):
    """What lm-eval scores a search trial on: the carved validation rows under their own task name,
    none of them an eval row; the eval rendering of the same task is untouched."""
    import json

    from bench.trial.evaluate import render_tasks

    monkeypatch.setenv("PEFTBENCH_CACHE", str(tmp_path))
    data = {"task": "sst2", "validation": 40}
    folder, names = render_tasks(["sst2"], data, "validation")
    assert names == {"sst2": "sst2_validation40"}
    assert "task: sst2_validation40" in (folder / "sst2_validation40.yaml").read_text()
    rows = [json.loads(line)["prompt"] for line in (folder / "sst2_validation40.jsonl").read_text().splitlines()]
    _, plain = render_tasks(["sst2"], data)
    evaluation = [json.loads(line)["prompt"] for line in (folder / "sst2.jsonl").read_text().splitlines()]
    assert plain == {"sst2": "sst2"} and len(rows) == 40 and len(evaluation) == PACKAGED["sst2"].size("eval")
    assert not set(rows) & set(evaluation)


def test_search_trials_run_as_ordinary_trials(tmp_path, capsys):
    """Through the real runner (one process per trial, tiny synthetic model): each search trial
    publishes its own result, tagged search, recording how many rows each split holds. A synthetic
    model gets no lm-eval score, so no configuration can be chosen and no final trial runs: the
    run says so rather than choosing on nothing."""
    path = tmp_path / "tiny.toml"
    path.write_text(textwrap.dedent("""
        name = "tiny"
        [model]
        name = "synthetic:llama-tiny"
        [data]
        task = "sst2"
        train_examples = 8
        max_length = 32
        [train]
        batch_size = 4
        [eval]
        tasks = ["sst2"]
        [tune]
        space = { "train.lr" = { log = [1e-4, 1e-2] } }
        trials = 2
        seeds = [0, 1, 2]
        validation = 16
        [[sweep]]
        method = "lora"
        config = { r = 2, alpha = 4 }
        """))
    report = runner.run(suite.load(path), tmp_path / "results", progress=False, save_adapters=False)
    assert len(report.ran) == 2 and set(report.statuses.values()) == {"success"}
    found = [results.read(results.path_for(tmp_path / "results" / "tiny", i)) for i in report.ran]
    assert [r["tune"]["role"] for r in found] == ["search", "search"] and [r["tune"]["index"] for r in found] == [0, 1]
    train_rows = PACKAGED["sst2"].size("train", 16)
    assert all(r["data"]["splits"] == {"train": train_rows, "validation": 16, "eval": PACKAGED["sst2"].size("eval")} for r in found)
    assert "no search trial scored on the validation rows" in capsys.readouterr().err
    again = runner.run(suite.load(path), tmp_path / "results", progress=False, save_adapters=False)
    assert again.ran == [] and sorted(again.skipped) == sorted(report.ran)  # resumed: the same trials, read back


def test_dry_run_estimates_every_planned_trial(tmp_path):
    """--dry-run's estimate covers a study's search and final trials (the search as the sampler would
    propose it on equal scores), and every tuned block shows the same number of search trials."""
    s = suite.load(write(tmp_path), check_models=False)
    rows = runner.estimate(s)
    assert len(rows) == 3 * (6 + 3)
    roles = [r["label"].split(" seed")[1].split()[1] for r in rows]
    assert roles.count("final") == 9 and sum(role.startswith("search") for role in roles) == 18
    assert all(r["steps"] == 4 and r["est_s"] > 0 for r in rows)


def test_report_ranks_the_final_trials_from_their_files(tmp_path):
    """The result files a tuned suite leaves are what reports/ranking.py reads: finals only, one row
    per tuned configuration, each with its seeds."""
    from reports import ranking
    from reports.results import frame

    run(write(tmp_path), tmp_path / "r", fake(1.0, []))
    df = frame(tmp_path / "r" / "tuned")
    assert len(df) == 3 * (6 + 3)
    ranked = ranking.rank(ranking.finals(df))
    assert len(ranked) == 3 and all(r.estimate.n == 3 and r.task == "sst2" for r in ranked)
    assert {r.method.split()[0] for r in ranked} == {"lora", "ia3"}  # the two lora ranks apart, by study
    assert ranking.section(df, {"methods": {}, "sources": {}}).has_data

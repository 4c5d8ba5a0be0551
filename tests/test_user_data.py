"""The user's own task, `[data] task = "file:<path>"` (bench/tasks/user.py): its rows, its split,
the lm-eval task written for it, bad files refused before any trial, and a suite end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.tasks import data
from bench.trial import evaluate
from bench.models import load
from bench.tasks import user
from test_bad_input import refused, suite_file
from test_evaluate import GoldLM

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "suites" / "examples"
MC = f"file:{EXAMPLES / 'capitals_mc.jsonl'}"
GEN = f"file:{EXAMPLES / 'arithmetic_gen.csv'}"
NUMBER = "(-?[0-9]+)"

SUITE = """
name = "{name}"
[model]
name = "synthetic:llama-tiny"
[data]
task = {task}
train_examples = 8
max_length = 48
{data}
[train]
lr = 1e-3
batch_size = 4
max_steps = 2
[eval]
tasks = [{task}]
forgetting = false
[run]
timeout = 120
threads = 1
[[sweep]]
method = "lora"
[[sweep]]
method = "prompt_tuning"
config = {{ n_tokens = 4, init = "text", init_text = "Answer the question." }}
"""


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTBENCH_CACHE", str(tmp_path / "cache"))
    user._resolve.cache_clear()  # a test's files may reuse another test's path


def spec(task: str, **settings) -> dict:
    return {"task": task, "train_examples": 8, "max_length": 48, **settings}


def write(tmp_path: Path, name: str, rows: list[dict] | str) -> Path:
    path = tmp_path / name
    path.write_text(rows if isinstance(rows, str) else "".join(json.dumps(r) + "\n" for r in rows))
    return path


MC_ROWS = [{"prompt": f"Q{i}: pick the number {i}.", "choices": [str(i), str(i + 1), str(i + 2)], "gold": 0} for i in range(10)]


# ---- rows and split --------------------------------------------------------------------------


def test_the_example_files_split_disjointly_and_reproducibly():
    for task, kind, n_eval in ((MC, "multiple_choice", 12), (GEN, "generation", 13)):
        t = data.text_task(task, spec(task))
        train, evaluation = t.rows("train"), t.rows("eval")
        assert t.info["kind"] == kind and len(evaluation) == n_eval and len(train) + len(evaluation) in (60, 64)
        assert not {e.prompt for e in train} & {e.prompt for e in evaluation}
        other = data.text_task(task, spec(task, split_seed=1))
        assert {e.prompt for e in other.rows("eval")} != {e.prompt for e in evaluation}  # the seed moves the split
    mc = data.examples(MC, "eval", spec=spec(MC))[0]
    assert mc.answer == mc.choices[mc.gold] and all(c.startswith(" ") for c in mc.choices)  # "Answer:" + " Paris"


def test_two_files_parquet_and_a_datasets_folder(tmp_path):
    import datasets
    import pyarrow
    import pyarrow.parquet

    train = write(tmp_path, "train.jsonl", MC_ROWS[:7])
    evaluation = write(tmp_path, "eval.jsonl", MC_ROWS[7:])
    t = data.text_task(f"file:{train}", spec(f"file:{train}", eval_file=str(evaluation)))
    assert (t.size("train"), t.size("eval")) == (7, 3)

    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(MC_ROWS), tmp_path / "rows.parquet")
    t = data.text_task(f"file:{tmp_path / 'rows.parquet'}")
    assert (t.size("train"), t.size("eval")) == (8, 2)

    datasets.DatasetDict({"train": datasets.Dataset.from_list(MC_ROWS[:6]),
                          "test": datasets.Dataset.from_list(MC_ROWS[6:])}).save_to_disk(str(tmp_path / "saved"))
    t = data.text_task(f"file:{tmp_path / 'saved'}")
    assert (t.size("train"), t.size("eval")) == (6, 4)


def test_prompt_format_is_the_prompt_then_one_space(tmp_path):
    path = write(tmp_path, "g.jsonl", [{"prompt": "2+2=", "answer": 4}, {"prompt": "Say hi:\n", "answer": "hi"},
                                       {"prompt": "3+3=", "answer": " 6"}, {"prompt": "x", "answer": "y"}])
    rows = {e.prompt: e.answer for e in data.text_task(f"file:{path}").rows("train") + data.text_task(f"file:{path}").rows("eval")}
    assert rows == {"2+2=": " 4", "Say hi:\n": "hi", "3+3=": " 6", "x": " y"}


# ---- the lm-eval task written for a file -------------------------------------------------------


def test_gold_answers_score_one_on_the_written_lm_eval_tasks():
    """The lm-eval task reads the very prompts and continuations training uses: a model answering
    with the gold continuation scores 1 (multiple choice: acc; generation: exact match, here after
    the extract regex, with the text a model might run on with)."""
    mc_spec = spec(MC)
    scores = evaluate.harness_scores(_Gold([(MC, mc_spec)]), [MC], limit=None, data=mc_spec)
    assert scores[MC]["acc"] == scores[MC]["acc_norm"] == 1.0
    gen_spec = spec(GEN, extract=NUMBER)
    scores = evaluate.harness_scores(_Gold([(GEN, gen_spec)], tail="\nQuestion: What is 1 + 1?"), [GEN], limit=None, data=gen_spec)
    assert scores[GEN]["exact_match"] == 1.0
    # Without the extractor the whole generated line must be the answer: the run-on text fails it.
    plain = spec(GEN)
    scores = evaluate.harness_scores(_Gold([(GEN, plain)], tail=" and more"), [GEN], limit=None, data=plain)
    assert scores[GEN]["exact_match"] == 0.0


class _Gold(GoldLM):
    def __init__(self, tasks: list[tuple[str, dict]], tail: str = "") -> None:
        super(GoldLM, self).__init__()
        self.gold = {e.prompt: e.answer for name, s in tasks for e in data.examples(name, "eval", spec=s)}
        self.tail = tail

    def generate_until(self, requests):
        return [self.gold[r.args[0]] + self.tail for r in requests]


def test_lm_eval_scores_a_file_task_on_a_synthetic_model():
    tiny = load({"name": "synthetic:llama-tiny"})
    gen_spec = spec(GEN, extract=NUMBER)
    scores = evaluate.lm_eval_scores(tiny.model, tiny.tokenizer, [MC, GEN], limit=3, data=gen_spec)
    assert 0 <= scores[MC]["acc"] <= 1 and 0 <= scores[GEN]["exact_match"] <= 1


# ---- bad files: one line naming file, row and field, exit 2, before any trial -----------------


def _suite(tmp_path: Path, path: Path | str, settings: str = "") -> Path:
    return suite_file(tmp_path, SUITE.format(name="u", task=json.dumps(f"file:{path}"), data=settings))


BAD = {
    "missing field": ("m.jsonl", MC_ROWS[:2] + [{"prompt": "Q", "choices": ["a", "b"]}] + MC_ROWS[2:], "row 3: missing field 'gold'"),
    "missing choices": ("n.jsonl", MC_ROWS[:1] + [{"prompt": "Q", "gold": 0}], "row 2: missing field 'choices'"),
    "empty row": ("e.jsonl", json.dumps(MC_ROWS[0]) + "\n\n" + "".join(json.dumps(r) + "\n" for r in MC_ROWS[1:]), "row 2: empty row"),
    "gold out of range": ("g.jsonl", MC_ROWS[:1] + [{**MC_ROWS[1], "gold": 3}] + MC_ROWS[2:],
                          "row 2: field 'gold' is 3, out of range for 3 choices"),
    "empty answer": ("a.csv", "prompt,answer\nQ1,1\nQ2,\nQ3,3\n", "row 2: field 'answer' is empty"),
    "repeated prompt": ("r.jsonl", MC_ROWS + [MC_ROWS[4]], "row 11: field 'prompt' repeats"),
    "jsonl holding csv": ("c.jsonl", "prompt,answer\nQ1,1\n", "row 1: not JSON"),
    "csv holding json": ("j.csv", "".join(json.dumps(r) + "\n" for r in MC_ROWS), "looks like JSON, not CSV"),
    "parquet holding text": ("p.parquet", "prompt,answer\nQ1,1\n", "not a Parquet file"),
    "unknown extension": ("x.txt", "prompt,answer\nQ1,1\n", "unknown format '.txt'"),
    "choices not a list": ("l.csv", 'prompt,choices,gold\nQ1,"a, b",0\nQ2,"[""a"", ""b""]",1\n',
                           "row 1: field 'choices' must be a JSON list"),
    "both kinds": ("b.jsonl", [{"prompt": "Q", "answer": "a", "choices": ["a", "b"], "gold": 0}], "has both 'answer' and 'choices'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_file_is_refused_naming_file_row_and_field(tmp_path, case):
    name, content, says = BAD[case]
    path = write(tmp_path, name, content)
    refused(tmp_path, "run", _suite(tmp_path, path), "--results", tmp_path / "results", named=path, says=says)


def test_not_utf8_and_missing_and_not_a_dataset_folder(tmp_path):
    binary = tmp_path / "b.csv"
    binary.write_bytes(b"prompt,answer\n\xff\xfe,1\n")
    refused(tmp_path, "run", _suite(tmp_path, binary), "--results", tmp_path / "results", named=binary, says="line 2: not UTF-8 text")
    refused(tmp_path, "run", _suite(tmp_path, tmp_path / "nope.jsonl"), "--results", tmp_path / "results",
            named=tmp_path / "nope.jsonl", says="file not found")
    (tmp_path / "folder").mkdir()
    refused(tmp_path, "run", _suite(tmp_path, tmp_path / "folder"), "--results", tmp_path / "results",
            named=tmp_path / "folder", says="not a datasets folder")


def test_a_scored_row_repeating_a_training_row_is_refused(tmp_path):
    train = write(tmp_path, "train.jsonl", MC_ROWS[:6])
    evaluation = write(tmp_path, "eval.jsonl", MC_ROWS[5:])
    err = refused(tmp_path, "run", _suite(tmp_path, train, f"eval_file = {json.dumps(str(evaluation))}"),
                  "--results", tmp_path / "results", named=train, says="row 6: field 'prompt' repeats")
    assert f"{evaluation}: row 1" in err and "both trained on and scored" in err


def test_extract_that_finds_nothing_or_does_not_apply(tmp_path):
    train = write(tmp_path, "train.csv", "prompt,answer\n" + "".join(f"Q{i},{i}\n" for i in range(6)))
    evaluation = write(tmp_path, "eval.csv", "prompt,answer\nE1,1\nE2,seven\n")
    settings = f'extract = "([0-9]+)"\neval_file = {json.dumps(str(evaluation))}'
    refused(tmp_path, "run", _suite(tmp_path, train, settings), "--results", tmp_path / "results", named=evaluation,
            says="row 2: field 'answer': the extract pattern")
    mc = write(tmp_path, "m.jsonl", MC_ROWS)
    refused(tmp_path, "run", _suite(tmp_path, mc, 'extract = "(x)"'), "--results", tmp_path / "results", named=mc,
            says="extract applies to generation tasks")


def test_an_edited_file_makes_new_trials(tmp_path):
    """The file's sha256 is part of the trial id: after an edit the runner reruns, it does not
    skip the trials as already successful."""
    from bench.run.suite import load

    path = write(tmp_path, "m.jsonl", MC_ROWS)
    before = [t.id for t in load(_suite(tmp_path, path), check_models=False).trials]
    assert before == [t.id for t in load(_suite(tmp_path, path), check_models=False).trials]
    write(tmp_path, "m.jsonl", MC_ROWS[:-1])
    after = [t.id for t in load(_suite(tmp_path, path), check_models=False).trials]
    assert len(after) == len(before) == 2 and not set(after) & set(before)


def test_a_relative_path_is_relative_to_the_suite_file_from_any_folder(tmp_path, monkeypatch):
    """file:data/m.jsonl next to the suite is found whatever folder peftbench runs in, and the trial
    ids (the path as written and the file's sha256, not the folder) are the same from each."""
    from bench.run.suite import load

    (tmp_path / "project" / "data").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    write(tmp_path / "project" / "data", "m.jsonl", MC_ROWS)
    path = suite_file(tmp_path / "project", SUITE.format(name="u", task='"file:data/m.jsonl"', data=""))
    runs = []
    for folder in (tmp_path / "elsewhere", ROOT):
        monkeypatch.chdir(folder)
        user._resolve.cache_clear()
        suite = load(Path("../project/s.toml") if folder.name == "elsewhere" else path)  # a relative suite path too
        trial = suite.trials[0]
        assert trial.spec["data"]["task"] == "file:data/m.jsonl"
        rows = data.text_task("file:data/m.jsonl", trial.spec["data"]).info
        runs.append(([t.id for t in suite.trials], rows["file"], rows["train_rows"] + rows["eval_rows"]))
    assert runs[0] == runs[1] and runs[0][1] == str(tmp_path / "project" / "data" / "m.jsonl") and runs[0][2] == len(MC_ROWS)
    # Moved elsewhere without its data, the suite says which path it looked for.
    moved = suite_file(tmp_path / "elsewhere", path.read_text())
    refused(tmp_path / "elsewhere", "run", moved, "--dry-run", named=moved,
            says=f"data/m.jsonl: file not found (looked for {tmp_path / 'elsewhere' / 'data' / 'm.jsonl'}")


def test_file_settings_on_a_packaged_task_are_refused(tmp_path):
    text = SUITE.format(name="u", task='"sst2"', data="eval_fraction = 0.3")
    path = suite_file(tmp_path, text)
    refused(tmp_path, "run", path, "--dry-run", named=path, says="data.eval_fraction (in sweep[0]): applies to file:<path> tasks only")


# ---- end to end --------------------------------------------------------------------------------


def test_a_suite_on_a_user_file_runs_end_to_end(tmp_path):
    """Both methods train on the file's rows (prompt_tuning's init text is tokenized with the
    trial's data at hand) and every result records which file and split it ran on."""
    path = _suite(tmp_path, EXAMPLES / "arithmetic_gen.csv", f"extract = {json.dumps(NUMBER)}")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PEFTBENCH_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-m", "bench.cli", "run", str(path), "--results", str(tmp_path / "results"), "--no-progress"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = [json.loads(p.read_text()) for p in (tmp_path / "results" / "u").glob("*.json")]
    assert len(results) == 2 and {r["status"] for r in results} == {"success"}
    for r in results:
        assert r["data"]["kind"] == "generation" and (r["data"]["train_rows"], r["data"]["eval_rows"]) == (51, 13)
        assert r["data"]["extract"] == NUMBER and r["train"]["steps"] == 2

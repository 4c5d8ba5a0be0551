"""Bad input never ends in a traceback: exit 0 (valid) or exit 2 with one line naming the file, and
nothing written. Property-based (hypothesis) over mutated copies of every committed suite and of
committed result files, driven through bench.cli.main in-process; plus one plain regression test
per case found by hand (issue 15, part 2)."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import tempfile
import tomllib
from pathlib import Path
from unittest import mock
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench import cli
from bench.run import runner
from bench.serving import serve_bench
from bench.run.suite import Suite
from methods.base import ConfigError
from test_suite import GOOD as SUITE

ROOT = Path(__file__).resolve().parents[1]
SUITES = sorted((ROOT / "suites").glob("*.toml"))
RESULTS = ROOT / "results" / "baselines" / "x86_64-2cpu-cpu" / "ci"
FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large])


def peftbench(*argv: str | Path) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of the CLI run in this process; any exception but SystemExit
    propagates, so a traceback fails the test."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main([str(a) for a in argv])
        except SystemExit as exc:  # argparse
            code = exc.code
    return code, out.getvalue(), err.getvalue()


def assert_clean(code: int, err: str, named: Path | str) -> None:
    """Exit 0, or exit 2 with exactly one line on stderr, an error naming `named`."""
    assert code in (0, 2), (code, err)
    if code == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and str(named) in lines[0], err


@contextlib.contextmanager
def scratch():
    """A fresh folder per generated case (pytest's tmp_path is one folder for all of them)."""
    with tempfile.TemporaryDirectory(prefix="fuzz-") as d:
        yield Path(d)


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.exists() else []


# ---- TOML out of a parsed suite (inline tables only, which tomllib reads back the same) ----------


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string takes JSON's escapes
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + " }"


def to_toml(doc: dict[str, Any]) -> str:
    return "".join(f"{json.dumps(k)} = {toml_value(v)}\n" for k, v in doc.items())


def test_toml_writer_round_trips_every_suite():
    for path in SUITES:
        doc = tomllib.loads(path.read_text())
        assert tomllib.loads(to_toml(doc)) == doc, path


# ---- mutations -------------------------------------------------------------------------------

NASTY = [0, -1, math.nan, math.inf, -math.inf, 1e30, -1e30, 2**63 - 1, -(2**63), 0.5, "", "x" * 100_000, "nan",
         True, [], {}, [[]], "synthetic:llama-tiny", "qv", "all-linear", "sst2", "piqa", "lora", "../../etc"]


def paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path (dict keys, list indices) in a parsed suite, innermost last."""
    out = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for k, v in items:
        out.append(prefix + (k,))
        out += paths(v, prefix + (k,))
    return out


def get(doc: Any, path: tuple) -> Any:
    for k in path:
        doc = doc[k]
    return doc


def mutate(doc: dict[str, Any], data: st.DataObject) -> dict[str, Any]:
    """One to three edits: delete a key, replace a value (nasty constants, numbers scaled),
    swap two values, or rename a key."""
    doc = json.loads(json.dumps(doc))  # a deep copy (no nan/inf in committed suites)
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        where = paths(doc)
        if not where:
            break
        path = data.draw(st.sampled_from(where), label="path")
        parent, key = get(doc, path[:-1]), path[-1]
        op = data.draw(st.sampled_from(["delete", "replace", "swap", "rename", "number"]), label="op")
        if op == "delete":
            del parent[key]
        elif op == "replace":
            # A copy: NASTY's [] and {} are shared, and a later edit writing into one would change what the
            # next example draws (hypothesis then calls the generation flaky).
            parent[key] = copy.deepcopy(data.draw(st.sampled_from(NASTY) | st.integers() | st.floats() | st.text(max_size=20),
                                                  label="value"))
        elif op == "swap":
            other = data.draw(st.sampled_from(where), label="other")
            try:
                value = get(doc, other)
            except (KeyError, IndexError, TypeError):
                continue
            parent[key] = json.loads(json.dumps(value))
        elif op == "rename" and isinstance(parent, dict):
            parent[data.draw(st.sampled_from(["name", "r", "lr", "model", "grid", "x", "train.lr", "method", ""]))] = parent.pop(key)
        elif op == "number":
            numbers = [p for p in where if isinstance(get(doc, p), (int, float)) and not isinstance(get(doc, p), bool)]
            if numbers:
                path = data.draw(st.sampled_from(numbers), label="number")
                get(doc, path[:-1])[path[-1]] = data.draw(st.sampled_from([0, -1, math.nan, math.inf, 1e30, 10**6]))
    return doc


def mutate_bytes(text: bytes, data: st.DataObject) -> bytes:
    """Bytes flipped, cut or spliced in: mostly invalid TOML or invalid UTF-8."""
    raw = bytearray(text)
    for _ in range(data.draw(st.integers(1, 4), label="byte edits")):
        at = data.draw(st.integers(0, max(len(raw) - 1, 0)), label="offset")
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]), label="byte op")
        if op == "flip" and raw:
            raw[at] ^= data.draw(st.integers(1, 255), label="mask")
        elif op == "cut":
            del raw[at:]
        else:
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=16), label="bytes")
    return bytes(raw)


# ---- suites: every committed one, mutated, through `peftbench run --dry-run` -------------------

RUN_SUITES = [p for p in SUITES if not p.stem.startswith("serving")]
SERVING_SUITES = [p for p in SUITES if p.stem.startswith("serving")]


def quick_estimate(s: Suite) -> list[dict[str, Any]]:
    """runner.estimate's rows without its work: the FLOP count and the memory forecast take about a
    second per trial, which 2,000 fuzzed suites cannot afford; they read a validated suite, and
    validation is what the fuzz is after (tests/test_runner.py runs the real dry run)."""
    return [{"trial_id": t.id, "label": t.label, "est_s": 0.0} for t in s.trials]


def dry_run(tmp_path: Path, name: str, content: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    results = tmp_path / "results"
    with mock.patch.object(runner, "estimate", quick_estimate):
        code, out, err = peftbench("run", path, "--dry-run", "--no-progress", "--results", results)
    assert_clean(code, err, path)
    assert not results.exists(), "a dry run wrote into the results folder"
    if code == 0:
        assert "trials, estimated" in out


@pytest.mark.parametrize("path", RUN_SUITES, ids=[p.stem for p in RUN_SUITES])
@settings(FUZZ, max_examples=120)
@given(data=st.data())
def test_fuzz_suite_values(path, data):
    doc = mutate(tomllib.loads(path.read_text()), data)
    with scratch() as tmp:
        dry_run(tmp, path.name, to_toml(doc).encode())


@pytest.mark.parametrize("path", SUITES, ids=[p.stem for p in SUITES])
@settings(FUZZ, max_examples=40)
@given(data=st.data())
def test_fuzz_suite_bytes(path, data):
    with scratch() as tmp:
        dry_run(tmp, path.name, mutate_bytes(path.read_bytes(), data))


@pytest.mark.parametrize("path", SERVING_SUITES, ids=[p.stem for p in SERVING_SUITES])
@settings(FUZZ, max_examples=100)
@given(data=st.data())
def test_fuzz_serving_suite(path, tmp_path, data):  # one file, rewritten each case
    """serve-bench has no dry run: its validation (load_suite, the step before it runs) is what
    must end in a ConfigError naming the file."""
    target = tmp_path / path.name
    doc = mutate(tomllib.loads(path.read_text()), data)
    target.write_bytes(mutate_bytes(to_toml(doc).encode(), data) if data.draw(st.booleans(), label="bytes too") else to_toml(doc).encode())
    try:
        serve_bench.load_suite(target)
    except ConfigError as exc:
        assert str(target) in str(exc) and "\n" not in str(exc).strip(), str(exc)


# ---- result folders: missing, empty, corrupt, foreign or mutated JSON through show, compare, report


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)
KINDS = ["missing", "a file", "empty file", "corrupt", "foreign", "foreign with header"]


def results_folder(tmp_path: Path, data: st.DataObject, kinds: list[str], meta: bool = False) -> Path:
    """A copy of committed results with one thing wrong (or, for "mutated", perhaps nothing);
    `meta`: the baseline metadata (.baseline.json) may be the file that is wrong."""
    folder = tmp_path / "fuzz" / "ci"
    kind = data.draw(st.sampled_from(kinds), label="kind")
    if kind == "missing":
        return folder
    folder.mkdir(parents=True)
    if kind == "a file":
        folder.rmdir()
        folder.write_bytes(data.draw(st.binary(max_size=64), label="content"))
        return folder
    if kind == "empty folder":
        return folder
    originals = sorted(RESULTS.glob("*.json"))  # with .baseline.json, which compare reads
    for p in originals:
        (folder / p.name).write_bytes(p.read_bytes())
    victims = originals if meta else [p for p in originals if not p.name.startswith(".")]
    victim = folder / data.draw(st.sampled_from(victims), label="file").name
    if kind == "empty file":
        victim.write_bytes(b"")
    elif kind == "corrupt":
        victim.write_bytes(mutate_bytes(victim.read_bytes(), data))
    elif kind == "foreign":
        victim.write_text(json.dumps(data.draw(JSON, label="json")))
    elif kind == "foreign with header":
        extra = data.draw(st.dictionaries(st.sampled_from(["trial_id", "label", "spec", "status", "memory", "runtime", "eval", "env", "x"]),
                                          JSON, max_size=4), label="keys")
        victim.write_text(json.dumps({"schema": 1, "status": "success", **extra}))
    else:  # mutated: keys deleted, values swapped or replaced in a real result
        victim.write_text(json.dumps(mutate(json.loads(victim.read_text()), data)))
    return folder


@settings(FUZZ, max_examples=300)
@given(data=st.data())
def test_fuzz_show(data):
    with scratch() as tmp:
        folder = results_folder(tmp, data, [*KINDS, "empty folder", "mutated", "mutated"])
        code, _, err = peftbench("show", folder)
        assert_clean(code, err, folder)


@settings(FUZZ, max_examples=300)
@given(data=st.data())
def test_fuzz_compare(data):
    with scratch() as tmp:
        folder = results_folder(tmp, data, [*KINDS, "empty folder", "mutated", "mutated"], meta=True)
        good = tmp / "good"
        good.mkdir()
        for p in RESULTS.glob("*.json"):
            (good / p.name).write_bytes(p.read_bytes())
        current, baseline = (folder, good) if data.draw(st.booleans(), label="bad side is current") else (good, folder)
        before = files_under(tmp)
        code, _, err = peftbench("compare", current, baseline)
        assert code in (0, 1, 2), err  # 1: a regression, which a mutated number may well be
        if code == 2:
            assert_clean(code, err, folder)
        assert files_under(tmp) == before


@settings(FUZZ, max_examples=250)
@given(data=st.data())
def test_fuzz_report(data):
    """Every folder here has something wrong, but is never empty (which renders a "No results"
    report) nor a mutated real result: rendering takes seconds. Exit 2 naming it and no HTML
    written, or (a foreign file that happens to have a result's shape) a report."""
    with scratch() as tmp:
        folder = results_folder(tmp, data, KINDS)
        out = tmp / "report.html"
        code, _, err = peftbench("report", folder, "-o", out)
        assert_clean(code, err, folder)
        if code == 2:
            assert not out.exists() and not list(tmp.glob(".report.html*"))


# ---- one plain regression test per case of issue 15 ---------------------------------------------

GOOD = SUITE.split("grid.rank")[0]
"""tests/test_suite.py's suite up to its first sweep's method: one LoRA trial on a tiny Llama."""


def refused(tmp_path: Path, *argv: str | Path, named: Path, says: str) -> str:
    """Run the CLI; it must exit 2 with one line naming `named` and saying `says`, writing nothing
    under tmp_path/results."""
    before = files_under(tmp_path)
    code, _, err = peftbench(*argv)
    assert code == 2, (code, err)
    assert_clean(code, err, named)
    assert says in err, err
    assert files_under(tmp_path) == before and not (tmp_path / "results").exists()
    return err.strip()


def suite_file(tmp_path: Path, text: str = GOOD, name: str = "s.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_suite_not_utf8(tmp_path):
    path = tmp_path / "s.toml"
    path.write_bytes(GOOD.encode() + bytes([0x80, 0xFF, 0x00, 0x9C]))
    err = refused(tmp_path, "run", path, "--dry-run", "--results", tmp_path / "results", named=path, says="not UTF-8 text")
    assert f"line {GOOD.count(chr(10)) + 1}:" in err  # the line the first bad byte sits on


def test_suite_path_is_a_folder(tmp_path):
    folder = tmp_path / "suites"
    folder.mkdir()
    refused(tmp_path, "run", folder, "--results", tmp_path / "results", named=folder, says="is a folder, not a suite file")


@pytest.mark.parametrize("inside", [False, True], ids=["is-a-file", "under-a-file"])
def test_results_is_a_file(tmp_path, inside):
    """Refused after validation and before any trial: no process started, the file untouched."""
    blocker = tmp_path / "results"
    blocker.write_text("not a folder")
    target = blocker / "deeper" if inside else blocker
    code, _, err = peftbench("run", suite_file(tmp_path), "--results", target, "--no-progress")
    assert code == 2 and str(blocker) in err and "is a file, not a folder" in err and len(err.strip().splitlines()) == 1, err
    assert blocker.read_text() == "not a folder"


def test_more_train_examples_than_the_task_has(tmp_path):
    path = suite_file(tmp_path, GOOD.replace("train_examples = 8", "train_examples = 100000"))
    refused(tmp_path, "run", path, "--dry-run", "--results", tmp_path / "results", named=path,
            says="data.train_examples: 100000 requested, task 'sst2' has 581 train rows")


@pytest.mark.parametrize("edit, key", [
    (("lr = 1e-3", "lr = nan"), "train.lr"),
    (("lr = 1e-3", "lr = inf"), "train.lr"),
    (("lr = 1e-3", "lr = 1e-3\nweight_decay = -inf"), "train.weight_decay"),
    (('method = "lora"', 'method = "lora"\nconfig = { alpha = nan }'), "sweep[0].alpha"),
    (('method = "lora"', 'method = "lora"\n[run]\ntimeout = inf'), "run.timeout"),
])
def test_non_finite_numbers(tmp_path, edit, key):
    path = suite_file(tmp_path, GOOD.replace(*edit))
    err = refused(tmp_path, "run", path, "--dry-run", "--results", tmp_path / "results", named=path, says="must be a finite number")
    assert key in err, err


def test_rank_beyond_a_layer(tmp_path):
    path = suite_file(tmp_path, GOOD.replace('method = "lora"', 'method = "lora"\nconfig = { r = 100000 }'))
    refused(tmp_path, "run", path, "--dry-run", "--results", tmp_path / "results", named=path,
            says="r: 100000 exceeds both dimensions of model.layers.0.self_attn.q_proj (64 in x 64 out)")


@pytest.mark.parametrize("method, config, key", [
    ("dora", "{ r = 65 }", "r: 65"), ("lora_fa", "{ r = 65 }", "r: 65"), ("tied_lora", "{ r = 65 }", "r: 65"),
    ("multilora", "{ r = 65 }", "r: 65"), ("multilora", "{ n = 9, r = 8 }", "n: 72"), ("relora", "{ r = 65 }", "r: 65"),
])
def test_rank_check_is_shared_by_the_lora_family(tmp_path, method, config, key):
    path = suite_file(tmp_path, GOOD.replace('method = "lora"', f'method = "{method}"\nconfig = {config}'))
    refused(tmp_path, "run", path, "--dry-run", "--results", tmp_path / "results", named=path, says=f"{key} exceeds both dimensions")


def test_rank_between_the_dimensions_is_accepted():
    """SmolLM2's grouped-query v_proj is 576 in x 192 out: lora_vs_qlora's r = 256 stays valid."""
    from bench.run import suite

    assert any(t.spec["method"]["config"]["r"] == 256 for t in suite.load(ROOT / "suites" / "lora_vs_qlora.toml").trials)


def test_show_empty_folder(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    refused(tmp_path, "show", folder, named=folder, says="no result files, nothing to show")


def test_show_and_report_non_utf8_result(tmp_path):
    folder = tmp_path / "r"
    folder.mkdir()
    bad = folder / "x.json"
    bad.write_bytes(b"\xff\xfe{\x00")
    refused(tmp_path, "show", folder, named=bad, says="unreadable result file")
    refused(tmp_path, "report", folder, "-o", tmp_path / "r.html", named=bad, says="unreadable result file")
    assert not (tmp_path / "r.html").exists()


def test_report_output_is_a_folder(tmp_path):
    refused(tmp_path, "report", RESULTS, "-o", tmp_path, named=tmp_path, says="is a folder; -o names the HTML file")


@pytest.mark.parametrize("key, value, says", [
    (("runtime", "calibration_s"), [0.01, 0.0, 0.01], "a list of positive, finite numbers of seconds"),
    (("trial_id",), 12345, "key 'trial_id' is int"),
    (("memory", "peak_bytes"), "2 GB", "expected a number or null"),
    (("status",), "done", "expected one of success"),
])
def test_result_with_wrong_shapes(tmp_path, key, value, says):
    """A result whose keys hold the wrong kind of value is refused by every reader, naming the key."""
    folder = tmp_path / "r"
    folder.mkdir()
    for p in RESULTS.glob("*.json"):
        (folder / p.name).write_bytes(p.read_bytes())
    victim = sorted(folder.glob("[!.]*.json"))[0]
    result = json.loads(victim.read_text())
    get(result, key[:-1])[key[-1]] = value
    victim.write_text(json.dumps(result))
    refused(tmp_path, "show", folder, named=victim, says=says)
    refused(tmp_path, "compare", folder, RESULTS, named=victim, says=says)


def test_serving_suite_not_utf8(tmp_path):
    path = tmp_path / "serving.toml"
    path.write_bytes(b"\x80\x81 = 1")
    refused(tmp_path, "serve-bench", path, "--out", tmp_path / "results", named=path, says="cannot read the suite")

"""The user's own task: `[data] task = "file:<path>"`, a JSONL, CSV or Parquet file, or a folder
that `datasets.Dataset.save_to_disk` wrote.

Each row is either generation, {prompt, answer}, scored by exact match of the generated text
(or of what the `extract` regex finds in it) with the answer; or multiple choice,
{prompt, choices, gold}, scored by lm-eval's log-likelihood accuracy (acc, acc_norm). Other
columns are ignored. In a CSV file `choices` is a JSON list (["Paris", "Rome"]).

The prompt format is the user's prompt, then the answer (or each choice) after one space, unless
the prompt already ends in whitespace. Training sees exactly this text, and the lm-eval task
written for the file (`yaml`) scores exactly this text.

A relative path (the file's, or eval_file's) is relative to the suite file's folder, which the
suite loader records as the trial's [data] suite_dir (absolute paths are used as given): a suite
moved with its data keeps working, from any folder peftbench runs in.

Eval rows come from `eval_file`, from a saved DatasetDict's eval/validation/test split, or else
from a seeded split of the rows (eval_fraction of them, shuffled by split_seed: the same for every
trial). Every row is checked before any trial runs; a problem is one TaskError naming the file,
the row (1-based) and the field.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.tasks.registry import Example, TaskError, register_prefix
from bench.tasks.text import TextTask

PREFIX = "file"
FORMATS = (".jsonl", ".csv", ".parquet")
EVAL_SPLITS = ("eval", "validation", "test")
"""A saved DatasetDict's split scored, the first one present (its train split is trained on)."""


@dataclass(frozen=True)
class Options:
    """The [data] settings of a file task (suite.DataSpec documents them)."""

    eval_file: str | None = None
    eval_fraction: float = 0.2
    split_seed: int = 0
    extract: str | None = None

    @classmethod
    def of(cls, spec: dict[str, Any]) -> Options:
        return cls(**{k: spec[k] for k in cls.__dataclass_fields__ if spec.get(k) is not None})


@dataclass(frozen=True)
class Row:
    where: str
    """file and row, for messages: "data.csv: row 7"."""
    example: Example


# ---- reading ---------------------------------------------------------------------------------


def _fail(where: str, message: str) -> TaskError:
    return TaskError(f"{where}: {message}")


def _read_jsonl(path: Path, text: str) -> list[tuple[int, dict[str, Any] | None]]:
    rows: list[tuple[int, dict[str, Any] | None]] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            rows.append((n, None))
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise _fail(f"{path}: row {n}", f"not JSON ({exc.msg}): a .jsonl file holds one JSON object per line") from None
        if not isinstance(value, dict):
            raise _fail(f"{path}: row {n}", f"a JSON {type(value).__name__}, not an object with prompt and answer or choices/gold")
        rows.append((n, value))
    return rows


def _read_csv(path: Path, text: str) -> list[tuple[int, dict[str, Any] | None]]:
    if text.lstrip().startswith(("{", "[")):
        raise _fail(str(path), "looks like JSON, not CSV: name it .jsonl, or write a header line (prompt,answer) and rows")
    try:
        records = list(csv.reader(io.StringIO(text)))
    except csv.Error as exc:
        raise _fail(str(path), f"not a CSV file ({exc})") from None
    if not records or not any(c.strip() for c in records[0]):
        raise _fail(str(path), "no header line: the first line names the columns (prompt,answer or prompt,choices,gold)")
    header = [c.strip() for c in records[0]]
    rows: list[tuple[int, dict[str, Any] | None]] = []
    for n, record in enumerate(records[1:], 1):
        if not any(c.strip() for c in record):
            rows.append((n, None))
        elif len(record) != len(header):
            raise _fail(f"{path}: row {n}", f"{len(record)} fields, the header has {len(header)} ({','.join(header)})")
        else:
            rows.append((n, dict(zip(header, record, strict=True))))
    return rows


def _read_parquet(path: Path) -> list[tuple[int, dict[str, Any] | None]]:
    import pyarrow
    import pyarrow.parquet

    try:
        table = pyarrow.parquet.read_table(path)
    except (pyarrow.ArrowInvalid, OSError) as exc:
        raise _fail(str(path), f"not a Parquet file ({str(exc).splitlines()[0][:120]})") from None
    return list(enumerate(table.to_pylist(), 1))


def _read_folder(path: Path) -> dict[str, list[tuple[int, dict[str, Any] | None]]]:
    """split -> rows of a datasets folder; one split named "all" when it holds a single Dataset."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise _fail(str(path), f"not a datasets folder: Dataset.save_to_disk writes one, or give a .jsonl, .csv or .parquet file "
                               f"({type(exc).__name__})") from None
    if isinstance(loaded, datasets.DatasetDict):
        return {split: list(enumerate(loaded[split].to_list(), 1)) for split in loaded}
    return {"all": list(enumerate(loaded.to_list(), 1))}


def located(written: str, suite_dir: str | None) -> Path:
    """The file a path in a suite stands for: relative to the suite file's folder, absolute as given."""
    path = Path(written).expanduser()
    return path if path.is_absolute() or suite_dir is None else Path(suite_dir) / path


def missing(written: str, path: Path) -> str:
    """The message for a file that is not there: the path as written and the one looked for."""
    where = "" if str(path) == written else f" (looked for {path}: a relative path is relative to the suite file's folder)"
    return f"{written}: file not found{where}"


def read(path: Path) -> dict[str, list[tuple[int, dict[str, Any] | None]]]:
    """split -> (row number, row or None for an empty row) of a user file or folder."""
    if not path.exists():
        raise TaskError(missing(str(path), path))
    if path.is_dir():
        return _read_folder(path)
    if path.suffix not in FORMATS:
        raise _fail(str(path), f"unknown format {path.suffix or '(no extension)'!r}: use .jsonl, .csv, .parquet or a datasets folder")
    if path.suffix == ".parquet":
        return {"all": _read_parquet(path)}
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise _fail(f"{path}: line {line}", f"not UTF-8 text (byte 0x{data[exc.start]:02x}): a {path.suffix} file is text") from None
    return {"all": (_read_jsonl if path.suffix == ".jsonl" else _read_csv)(path, text)}


# ---- rows into Examples --------------------------------------------------------------------------


def _text(where: str, row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    if value is None:
        raise _fail(where, f"missing field {key!r}")
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)  # {"answer": 42} means the text 42
    if not isinstance(value, str):
        raise _fail(where, f"field {key!r} must be text, got {type(value).__name__}")
    if not value.strip():
        raise _fail(where, f"field {key!r} is empty")
    return value


def _choices(where: str, row: dict[str, Any]) -> list[str]:
    value = row.get("choices")
    if value is None:
        raise _fail(where, "missing field 'choices'")
    if isinstance(value, str):  # CSV cells are text: a JSON list
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise _fail(where, f"field 'choices' must be a JSON list of texts, got {value[:60]!r}") from None
    if not isinstance(value, list) or len(value) < 2:
        raise _fail(where, f"field 'choices' must be a list of at least two texts, got {value!r:.80}")
    for i, choice in enumerate(value):
        if not isinstance(choice, str) or not choice.strip():
            raise _fail(where, f"field 'choices': choice {i} must be non-empty text, got {choice!r:.60}")
    if len(set(value)) != len(value):
        raise _fail(where, "field 'choices' repeats a choice: accuracy would be ambiguous")
    return value


def _gold(where: str, row: dict[str, Any], n_choices: int) -> int:
    value = row.get("gold")
    if value is None:
        raise _fail(where, "missing field 'gold' (the index of the right choice, from 0)")
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise _fail(where, f"field 'gold' must be a whole number (the index of the right choice), got {value!r:.40}")
    if not 0 <= value < n_choices:
        raise _fail(where, f"field 'gold' is {value}, out of range for {n_choices} choices (0 to {n_choices - 1})")
    return value


def _joined(prompt: str, continuation: str) -> str:
    # One space between prompt and continuation unless either side already has whitespace.
    return continuation if prompt[-1].isspace() or continuation[0].isspace() else " " + continuation


def example(where: str, row: dict[str, Any] | None, kind: str) -> Example:
    """A row as an Example of `kind` (generation or multiple_choice), or a TaskError naming its field."""
    if row is None:
        raise _fail(where, "empty row")
    prompt = _text(where, row, "prompt")
    if kind == "generation":
        return Example(prompt, _joined(prompt, _text(where, row, "answer")))
    choices = _choices(where, row)
    gold = _gold(where, row, len(choices))
    joined = [_joined(prompt, c) for c in choices]
    return Example(prompt, joined[gold], joined, gold)


def kind_of(path: Path, rows: list[tuple[int, dict[str, Any] | None]]) -> str:
    """generation or multiple_choice, from the first non-empty row's fields."""
    first = next((r for _, r in rows if r), None)
    if first is None:
        raise _fail(str(path), "no rows")
    if "choices" in first and "answer" in first:
        raise _fail(f"{path}: row 1", "has both 'answer' and 'choices': a task is generation (prompt, answer) "
                                      "or multiple choice (prompt, choices, gold), not both")
    if "choices" in first:
        return "multiple_choice"
    if "answer" in first:
        return "generation"
    raise _fail(f"{path}: row 1", f"needs prompt and answer (generation) or prompt, choices and gold (multiple choice); "
                                  f"has {', '.join(map(str, first))}")


def extracted(pattern: re.Pattern[str], text: str) -> str | None:
    """What lm-eval's regex filter keeps of `text` (the first match, its first non-empty group), or None."""
    found = pattern.findall(text)
    if not found:
        return None
    first = found[0]
    if isinstance(first, tuple):
        first = next((g for g in first if g), None)
        if first is None:
            return None
    return first.strip()


# ---- the task ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Split:
    """A user task's rows, checked: train and eval, disjoint by prompt."""

    kind: str
    train: tuple[Row, ...]
    eval: tuple[Row, ...]
    digest: str
    """sha256 of the files read, for the result and for cached tokenizations."""


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]:
        h.update(f.read_bytes())
    return h.hexdigest()


def digest(name: str, eval_file: str | None = None, suite_dir: str | None = None) -> str:
    """sha256 of a file task's file(s): part of its trials' ids (bench/run/suite.py DataSpec), with
    the paths as written, so an id is the same whatever folder peftbench runs in."""
    written = [name.removeprefix(f"{PREFIX}:")] + ([eval_file] if eval_file is not None else [])
    for w in written:
        if not located(w, suite_dir).exists():
            raise TaskError(missing(w, located(w, suite_dir)))
    return hashlib.sha256("".join(_digest(located(w, suite_dir)) for w in written).encode()).hexdigest()


def _rows(path: Path, rows: list[tuple[int, dict[str, Any] | None]], kind: str, label: str = "") -> list[Row]:
    return [Row(f"{path}: {label}row {n}", example(f"{path}: {label}row {n}", r, kind)) for n, r in rows]


def _disjoint(train: list[Row], evaluation: list[Row], why: str) -> None:
    seen = {r.example.prompt: r.where for r in evaluation}
    for r in train:
        if r.example.prompt in seen:
            raise _fail(r.where, f"field 'prompt' repeats {seen[r.example.prompt]}: {why}")


def split(path: Path, options: Options, suite_dir: str | None = None) -> Split:
    """Read, check and split a user task's file(s) (`path` already located; eval_file relative to
    suite_dir); TaskError at the first problem."""
    if not 0 < options.eval_fraction < 1:
        raise TaskError(f"{path}: eval_fraction must be between 0 and 1, got {options.eval_fraction}")
    parts = read(path)
    if options.eval_file is not None:
        eval_path = located(options.eval_file, suite_dir)
        if "all" not in parts:
            raise _fail(str(path), "is a DatasetDict with its own splits: eval_file applies to a single file")
        eval_parts = read(eval_path)
        if "all" not in eval_parts:
            raise _fail(str(eval_path), "eval_file must hold one split (a file, or a folder with a single Dataset)")
        kind = kind_of(path, parts["all"])
        if (eval_kind := kind_of(eval_path, eval_parts["all"])) != kind:
            raise _fail(str(eval_path), f"is {eval_kind.replace('_', ' ')}, the train file {path} is {kind.replace('_', ' ')}")
        train, evaluation = _rows(path, parts["all"], kind), _rows(eval_path, eval_parts["all"], kind)
        _disjoint(train, evaluation, "a row both trained on and scored")
    elif "all" in parts:
        kind = kind_of(path, parts["all"])
        rows = _rows(path, parts["all"], kind)
        # Any repeat could land on both sides of the split.
        first: dict[str, str] = {}
        for r in rows:
            if r.example.prompt in first:
                raise _fail(r.where, f"field 'prompt' repeats {first[r.example.prompt]}: the seeded split could train on "
                                     "one and score the other")
            first[r.example.prompt] = r.where
        order = list(range(len(rows)))
        random.Random(options.split_seed).shuffle(order)
        n_eval = max(1, round(options.eval_fraction * len(rows)))
        if len(rows) - n_eval < 1:
            raise _fail(str(path), f"{len(rows)} rows: too few to split into train and eval (eval_fraction {options.eval_fraction})")
        evaluation = [rows[i] for i in sorted(order[:n_eval])]
        train = [rows[i] for i in sorted(order[n_eval:])]
    else:
        scored = next((s for s in EVAL_SPLITS if s in parts), None)
        if "train" not in parts or scored is None:
            raise _fail(str(path), f"a DatasetDict needs a train split and one of {', '.join(EVAL_SPLITS)}; has {', '.join(parts)}")
        kind = kind_of(path, parts["train"])
        train, evaluation = _rows(path, parts["train"], kind, "train "), _rows(path, parts[scored], kind, f"{scored} ")
        _disjoint(train, evaluation, "a row both trained on and scored")
    if options.extract is not None:
        if kind != "generation":
            raise TaskError(f"{path}: extract applies to generation tasks (prompt, answer); this one is multiple choice")
        try:
            pattern = re.compile(options.extract)
        except re.error as exc:
            raise TaskError(f"{path}: extract: not a regular expression ({exc})") from None
        if pattern.groups > 1:
            raise TaskError(f"{path}: extract: at most one group (the part compared), found {pattern.groups}")
        for r in evaluation:
            if extracted(pattern, r.example.answer) is None:
                raise _fail(r.where, f"field 'answer': the extract pattern {options.extract!r} finds nothing in {r.example.answer!r:.60}")
    # Both paths are located already: digested as they are, not relative to suite_dir again.
    eval_located = None if options.eval_file is None else str(located(options.eval_file, suite_dir))
    return Split(kind, tuple(train), tuple(evaluation), digest(f"{PREFIX}:{path}", eval_located))


def _yaml(lm_name: str, kind: str, rows: tuple[Row, ...], options: Options, data_file: Path) -> str:
    """The lm-eval task of a user file: the packaged multiple-choice settings, or generation scored
    by exact match (after the extract regex, when there is one), both sides stripped."""
    head = f"# Written by bench.tasks.user for a user file.\ntask: {lm_name}\n"
    files = f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data_file))}\n"
    if kind == "multiple_choice":
        return f"{head}include: _multiple_choice_yaml\n{files}"
    answers = [r.example.answer for r in rows]
    # Stop at the first newline unless an answer spans lines; the budget is the longest answer's
    # bytes (a token is at least one byte) plus room for the end-of-text marker.
    until = ["\n\n"] if any("\n" in a.strip() for a in answers) else ["\n"]
    budget = max(len(a.encode()) for a in answers) + 8
    steps = [{"function": "regex", "regex_pattern": options.extract, "group_select": 0}] if options.extract else []
    steps.append({"function": "take_first"})
    config = {
        "dataset_path": "json", "test_split": "test", "output_type": "generate_until", "num_fewshot": 0,
        "doc_to_text": "prompt", "doc_to_target": "target", "target_delimiter": "",
        "generation_kwargs": {"until": until, "do_sample": False, "max_gen_toks": budget},
        "filter_list": [{"name": "extract" if options.extract else "whole", "filter": steps}],
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                         "ignore_case": False, "ignore_punctuation": False, "regexes_to_ignore": ["^\\s+", "\\s+$"]}],
        "metadata": {"version": 1},
    }
    # JSON is YAML: one line per key keeps the regexes exactly as given.
    return head + files + "".join(f"{k}: {json.dumps(v)}\n" for k, v in config.items())


def _doc(kind: str, pattern: re.Pattern[str] | None, e: Example) -> dict[str, Any]:
    doc = asdict(e)
    if kind == "generation":  # what exact match compares the (filtered) generation with
        doc["target"] = extracted(pattern, e.answer) if pattern else e.answer
    return doc


@functools.lru_cache(maxsize=64)
def _resolve(name: str, options: Options, suite_dir: str | None) -> TextTask:
    path = located(name.removeprefix(f"{PREFIX}:"), suite_dir)
    checked = split(path, options, suite_dir)
    ident = json.dumps([name, asdict(options)], sort_keys=True)
    stem = re.sub(r"\W", "_", path.stem)[:32]
    lm_name = f"user_{stem}_{hashlib.sha256(ident.encode()).hexdigest()[:8]}"
    pattern = re.compile(options.extract) if options.extract else None
    info = {"file": str(path), "kind": checked.kind, "sha256": checked.digest, "train_rows": len(checked.train),
            "eval_rows": len(checked.eval), **{k: v for k, v in asdict(options).items() if v is not None}}
    return TextTask(
        name,
        train=lambda: [r.example for r in checked.train],
        eval=lambda: [r.example for r in checked.eval],
        yaml=functools.partial(_yaml, lm_name, checked.kind, checked.eval, options),
        lm_name=lm_name,
        key=[checked.digest, asdict(options)],
        info=info,
        doc=functools.partial(_doc, checked.kind, pattern),
    )


def resolve(name: str, options: dict[str, Any]) -> TextTask:
    """The task of file:<path> with a trial's [data] settings (eval_file, eval_fraction, split_seed,
    extract) and suite_dir, the folder a relative path is relative to."""
    if name == f"{PREFIX}:":
        raise TaskError(f"{name!r}: give a path after {PREFIX}: (a .jsonl, .csv, .parquet file or a datasets folder)")
    return _resolve(name, Options.of(options), options.get("suite_dir"))


register_prefix(PREFIX, resolve)

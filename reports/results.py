"""Result files into a pandas DataFrame, one row per trial, nested keys flattened with dots."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from bench.records import results as bench_results  # stdlib only: the report needs no torch
from bench.records.results import ResultFileError  # one error class for every reader of results
from reports import stats

SCHEMA = bench_results.SCHEMA


def load_file(path: Path) -> dict:
    """A trial result with the keys every table here reads; else a ResultFileError naming the file."""
    result = bench_results.read(path)
    for key in ("trial_id", "label", "spec"):
        if key not in result:
            raise ResultFileError(f"{path}: key {key!r} missing: not a complete trial result")
    return result


BENCHMARK_KEY = "benchmark"
"""Benchmark scripts (benchmarks/*.py) tag their JSON output with this key and their name; such
files may sit beside trial results and are read by `benchmark_records`, not as trials."""


# Subfolders of a results folder that hold no trial results: saved adapters (their configs are
# JSON) and the trackers' copies (bench/records/track.py: each MLflow run keeps its result JSON).
NOT_RESULTS = ("adapters", "tracking")


def _json_files(dirs: Sequence[str | Path]) -> list[Path]:
    out: list[Path] = []
    for d in map(Path, dirs):
        if not d.exists():
            raise ResultFileError(f"{d}: no such results folder")
        if not d.is_dir():
            raise ResultFileError(f"{d}: is a file; pass the results folder that holds it")
        out += sorted(p for p in d.rglob("*.json")
                      if not p.name.startswith(".") and not set(p.relative_to(d).parts) & set(NOT_RESULTS))
    return out


def _is_benchmark(path: Path) -> bool:
    try:
        head = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return False  # a damaged trial file: load_file reports it
    return isinstance(head, dict) and isinstance(head.get(BENCHMARK_KEY), str)


def files(*dirs: str | Path) -> list[Path]:
    """Trial result files under the folders (benchmark outputs left out)."""
    return [p for p in _json_files(dirs) if not _is_benchmark(p)]


def benchmark_records(*dirs: str | Path) -> dict[str, list[dict[str, Any]]]:
    """Benchmark outputs under the folders, by benchmark name, each with its `path`."""
    out: dict[str, list[dict[str, Any]]] = {}
    for p in _json_files(dirs):
        if _is_benchmark(p):
            record = json.loads(p.read_text())
            out.setdefault(record[BENCHMARK_KEY], []).append({**record, "path": str(p)})
    return out


def frame(*dirs: str | Path, curves: bool = False) -> pd.DataFrame:
    """One row per result file. `curves` keeps train.loss_curve (a list per row) for plotting."""
    rows = []
    for path in files(*dirs):
        result = load_file(path)
        train = result.pop("train", None) or {}  # loss curves and step times stay in the files
        row = pd.json_normalize(result, sep=".").iloc[0].to_dict()
        row["path"] = str(path)
        if curves:
            row["train.loss_curve"] = list(train.get("loss_curve") or [])
        # The raw spec, for matching trials that differ in one setting only (reports/analysis).
        row["spec"] = result.get("spec") or {}
        rows.append(row)
    return pd.DataFrame(rows)


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """The terminal table: one line per trial with the headline numbers."""
    if df.empty:
        return df
    cols = ["trial_id", "label", "status", "params.trainable", "memory.peak_bytes", "runtime.train_s",
            "runtime.step_s_median", "eval.forgetting"]
    score_cols = sorted(c for c in df.columns if c.startswith("eval.lm_eval.") and c.endswith((".acc", ".exact_match")))
    out = df[[c for c in cols + score_cols if c in df.columns]].copy()
    if "memory.peak_bytes" in out:
        out["memory.peak_bytes"] = out["memory.peak_bytes"] / 2**20
    out = out.rename(columns={"trial_id": "id", "params.trainable": "trainable", "memory.peak_bytes": "peak_MiB",
                              "runtime.train_s": "train_s", "runtime.step_s_median": "step_s",
                              "eval.forgetting": "forgetting"})
    out = out.rename(columns={c: c.removeprefix("eval.lm_eval.") for c in score_cols})
    out["id"] = out["id"].str[:8]
    return out.sort_values("label").reset_index(drop=True)


# ---- Tidy columns and seed groups for the HTML report -------------------------------------

# Preferred lm-eval metric per task, in order; the score of a trial is their mean over its tasks.
SCORE_METRICS = ("acc", "exact_match", "f1", "mcc")
TEST_ACCURACY = "eval.accuracy.test"
ACCOUNTED = ("weights", "grads", "optimizer", "activations")
# The seed word of a label, wherever it stands (a tuned trial's label goes on: "seed1 final lr=3.65e-05").
_SEED_WORD = re.compile(r"\s*\bseed\d+\b")


def get_path(spec: dict, dotted: str) -> Any:
    node: Any = spec
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _without(spec: dict, dotted: Sequence[str]) -> dict:
    out = copy.deepcopy(spec)
    for path in dotted:
        *parents, leaf = path.split(".")
        node = out
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return out


def spec_key(spec: dict, drop: Sequence[str] = ()) -> str:
    """Canonical text of a spec minus some settings; trials with equal keys differ only there."""
    return json.dumps(_without(spec, ["train.seed", *drop]), sort_keys=True, default=str)


def _leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(node, dict):
        return {prefix: json.dumps(node, sort_keys=True, default=str)}
    out: dict[str, Any] = {}
    for k, v in node.items():
        out.update(_leaves(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


_PRIORITY = ["data.task", "model.name", "train.lr", "method.version", "model.dtype", "model.quant"]


def _distinct_labels(labels: pd.Series, configs: pd.Series, specs: pd.Series) -> pd.Series:
    """Labels that name every setting telling two configurations apart. A trial label leaves out the
    data task and the learning rate, so the surgical suite's 116 configurations (5 shifts x 3 learning
    rates x ...) would share 13 labels; those settings are appended where labels collide."""
    out = labels.copy()
    for _, idx in labels.groupby(labels, sort=False).groups.items():
        if configs.loc[idx].nunique() < 2:
            continue
        leaves = {i: _leaves(specs.loc[i]) for i in idx}
        paths = sorted({p for v in leaves.values() for p in v} - {"train.seed"})
        differ_all = [p for p in paths if len({leaves[i].get(p) for i in idx}) > 1]
        # The fewest settings that tell them apart, the telling ones first: task, model, learning rate, version.
        differ_all.sort(key=lambda p: (_PRIORITY.index(p) if p in _PRIORITY else len(_PRIORITY), p))
        differ: list[str] = []
        for p in differ_all:
            differ.append(p)
            if len({tuple(leaves[i].get(q) for q in differ) for i in idx}) == configs.loc[idx].nunique():
                break
        for i in idx:
            extra = " ".join(f"{_short(p)}={_plain(leaves[i].get(p))}" for p in differ)
            out.loc[i] = f"{labels.loc[i]} {extra}"
    return out


def _short(path: str) -> str:
    """model.name -> model, train.lr -> lr, data.task -> task."""
    parts = path.split(".")
    return parts[-2] if parts[-1] == "name" and len(parts) > 1 else parts[-1]


def _plain(text: str | None) -> str:
    if text is None:
        return "—"
    value = json.loads(text)
    return f"{value:g}" if isinstance(value, float) else str(value)


def _targets_text(value: Any) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else ",".join(map(str, value))


def _score(row: pd.Series, metrics: dict[str, str]) -> float:
    values = [row.get(f"eval.lm_eval.{task}.{metric}") for task, metric in metrics.items()]
    values = [float(v) for v in values if v is not None and not pd.isna(v)]
    return sum(values) / len(values) if values else float("nan")


def score_metrics(df: pd.DataFrame) -> dict[str, str]:
    """task -> the metric used as its score, chosen from the columns present."""
    found: dict[str, set[str]] = {}
    for col in df.columns:
        if col.startswith("eval.lm_eval.") and not col.endswith("_stderr"):
            task, _, metric = col.removeprefix("eval.lm_eval.").rpartition(".")
            found.setdefault(task, set()).add(metric)
    return {task: next(m for m in SCORE_METRICS if m in ms) for task, ms in sorted(found.items())
            if any(m in ms for m in SCORE_METRICS)}


def tidy(df: pd.DataFrame) -> pd.DataFrame:
    """Short columns for the settings the report compares, a score and a seed-free config key."""
    out = df.copy()
    if out.empty:
        return out
    specs = out["spec"]
    out["id"] = out["trial_id"].astype(str).str[:8]
    out["method"] = specs.map(lambda s: get_path(s, "method.name"))
    out["r"] = specs.map(lambda s: get_path(s, "method.config.r"))
    out["alpha"] = specs.map(lambda s: get_path(s, "method.config.alpha"))
    out["targets"] = specs.map(lambda s: _targets_text(get_path(s, "method.config.targets")))
    out["optimizer"] = specs.map(lambda s: get_path(s, "train.optimizer"))
    out["epochs"] = specs.map(lambda s: get_path(s, "train.epochs"))
    out["seed"] = specs.map(lambda s: get_path(s, "train.seed"))
    out["model"] = specs.map(lambda s: get_path(s, "model.name"))
    out["task"] = specs.map(lambda s: get_path(s, "data.task"))
    # nf4 with double quantization is its own base ("nf4-dq", LitGPT's name for it).
    out["quant"] = specs.map(lambda s: (get_path(s, "model.quant") or "none") + ("-dq" if get_path(s, "model.double_quant") else ""))
    out["dtype"] = specs.map(lambda s: get_path(s, "model.dtype") or "float32")
    # The base a trial tunes: its storage format, the quantization when there is one, else the dtype.
    out["base"] = out["quant"].where(out["quant"] != "none", out["dtype"])
    out["config"] = specs.map(spec_key)
    out["config_label"] = _distinct_labels(
        out.get("label", out["id"]).fillna(out["id"]).astype(str).str.replace(_SEED_WORD, "", regex=True), out["config"], specs)
    metrics = score_metrics(out)
    out["score"] = out.apply(_score, axis=1, metrics=metrics) if metrics else float("nan")
    out["score_name"] = ", ".join(f"{t} {m}" for t, m in metrics.items()) or None
    out.loc[out["score"].isna(), "score_name"] = None
    # Trials scored outside lm-eval (the surgical CNN: eval.accuracy.test) keep that accuracy as their score.
    if TEST_ACCURACY in out:
        own = out["score"].isna() & pd.to_numeric(out[TEST_ACCURACY], errors="coerce").notna()
        out.loc[own, "score"] = pd.to_numeric(out.loc[own, TEST_ACCURACY], errors="coerce")
        out.loc[own, "score_name"] = "test accuracy"
    for col in ("memory.peak_bytes", "runtime.train_s", "params.trainable", "params.total",
                *(f"memory.accounted.{k}" for k in ACCOUNTED)):
        if col not in out:
            out[col] = float("nan")
        out[col] = pd.to_numeric(out[col], errors="coerce")
    if "synthetic" not in out:
        out["synthetic"] = False
    return out


def seed_groups(df: pd.DataFrame) -> pd.DataFrame:
    """Successful trials grouped by config (same spec except train.seed): one row per config,
    the per-seed values kept as lists so that stats can compute intervals and tests."""
    ok = df[df["status"] == "success"]
    rows = []
    for _, g in ok.groupby("config", sort=False):
        first = g.iloc[0]
        row = {k: first[k] for k in ("config", "config_label", "method", "r", "alpha", "targets", "optimizer",
                                      "epochs", "model", "task", "quant", "dtype", "base", "suite", "synthetic", "spec", "params.trainable",
                                      "params.total", "memory.peak_source") if k in g}
        # A repeat of the same seed (a rerun, or the same trial in two suites) is not another sample:
        # repeats are averaged first, so n counts distinct seeds.
        by_seed = g.groupby("seed", dropna=False, sort=True)
        row["n"] = by_seed.ngroups
        row["seeds"] = sorted(g["seed"].dropna().unique().tolist())
        row["ids"] = g["id"].tolist()
        for col, name in [("score", "score"), ("memory.peak_bytes", "peak"), ("runtime.train_s", "train_s"),
                          *((f"memory.accounted.{k}", f"{k}_bytes") for k in ACCOUNTED)]:
            values = [float(v) for v in by_seed[col].mean() if not pd.isna(v)]
            row[f"{name}_values"] = values
            row[name] = stats.mean(values) if values else float("nan")  # the mean the intervals centre on
        if "eval.forgetting" in g:
            vals = pd.to_numeric(g["eval.forgetting"], errors="coerce").dropna()
            row["forgetting"] = float(vals.mean()) if len(vals) else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)

"""The table of every trial, last in the report: drop-down filters by method, rank, targets and
quantization, a CSV download of the visible rows, and per trial a drill-down (reports/templates)
with its full spec, how it differs from a reference configuration, its loss curve and its file."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pandas as pd

from reports.blocks import Section, Table, c_bytes, c_config, c_int, c_num, c_pct, c_text, missing, natural_key

FACETS = ("method", "r", "targets", "quant", "status")


def flatten(spec: Any, prefix: str = "") -> dict[str, Any]:
    """{'method': {'config': {'r': 8}}} -> {'method.config.r': 8}; lists stay values."""
    if not isinstance(spec, dict):
        return {prefix: spec}
    out: dict[str, Any] = {}
    for k, v in spec.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def references(trials: pd.DataFrame) -> dict[str, tuple[str, dict[str, Any]]]:
    """model spec (JSON) -> the configuration its trials are diffed against: the untuned (frozen)
    trial on the same base where there is one, else on the same model name, else the modal
    configuration (each setting's most common value over the trials)."""
    frozen = trials[trials["method"] == "frozen"]
    out: dict[str, tuple[str, dict[str, Any]]] = {}
    for model in dict.fromkeys(trials["spec"].map(_model_key)):
        same = frozen[frozen["spec"].map(_model_key) == model]
        name = json.loads(model).get("name")
        same = same if not same.empty else frozen[frozen["model"] == name]
        if not same.empty:
            row = same.iloc[0]
            out[model] = (f"the untuned model (frozen, trial {row['id']})", flatten(row["spec"]))
    if len(out) < trials["spec"].map(_model_key).nunique():
        flat = [flatten(s) for s in trials["spec"]]
        modal = {}
        for k in dict.fromkeys(k for f in flat for k in f):
            counts = Counter(json.dumps(f.get(k), sort_keys=True, default=str) for f in flat)
            modal[k] = json.loads(counts.most_common(1)[0][0])
        mode = ("the modal configuration (each setting's most common value over these trials)", modal)
        for model in trials["spec"].map(_model_key):
            out.setdefault(model, mode)
    return out


def _model_key(spec: dict) -> str:
    return json.dumps(spec.get("model") or {}, sort_keys=True, default=str)


def _text(v: Any) -> str:
    return "(unset)" if v is None else json.dumps(v, default=str) if isinstance(v, list | dict) else str(v)


def detail(row: pd.Series, ref: dict[str, Any]) -> dict[str, Any]:
    """What the drill-down shows for one trial; the template's script lays it out."""
    flat = flatten(row["spec"])
    diff = [[k, _text(flat.get(k)), _text(ref.get(k))] for k in sorted(dict.fromkeys([*flat, *ref]), key=natural_key)
            if k != "train.seed" and flat.get(k) != ref.get(k)]
    curve = row.get("train.loss_curve")
    curve = [float(v) for v in curve if v is not None] if isinstance(curve, list) else []
    return {"id": str(row["id"]), "label": str(row["config_label"]), "seed": _text(row.get("seed")), "path": str(row["path"]),
            "status": str(row["status"]), "error": "" if missing(row.get("error")) else str(row.get("error")),
            "spec": json.loads(json.dumps(row["spec"], sort_keys=True, default=str)), "diff": diff,
            "curve": [round(v, 5) for v in curve]}


def table(trials: pd.DataFrame) -> Table:
    order = sorted(trials.index, key=lambda i: natural_key(f"{trials.at[i, 'model']} {trials.at[i, 'config_label']} "
                                                          f"seed {trials.at[i, 'seed']}"))
    ordered = trials.loc[order]
    refs = references(trials)
    many_suites = trials["suite"].nunique() > 1
    rows, classes, details = [], [], []
    for _, r in ordered.iterrows():
        classes.append(f"status-{r['status']}")
        curve = r.get("train.loss_curve")
        final = curve[-1] if isinstance(curve, list) and curve else float("nan")
        quant = r.get("quant")
        rows.append([c_text(r["id"]), *([c_text(r.get("suite"))] if many_suites else []), c_text(r["method"]),
                     c_config(r["config_label"]), c_text(None if missing(r.get("r")) else int(r["r"])), c_text(r.get("targets")),
                     c_text(quant), c_text(r["seed"]), c_text(r["status"]), c_int(r["params.trainable"]),
                     c_bytes(r["memory.peak_bytes"]), c_num(r["runtime.train_s"], 1, " s"), c_pct(r["score"]),
                     c_num(r.get("eval.forgetting"), 3), c_num(final, 3)])
        ref_name, ref = refs[_model_key(r["spec"])]
        details.append({**detail(r, ref), "ref": ref_name})
    columns = ["id", *(["suite"] if many_suites else []), "method", "configuration", "r", "targets", "quant", "seed", "status",
               "trainable", "peak memory", "train time", "score", "forgetting", "final loss"]
    return Table(columns, rows, caption="Every trial. Click a header to sort, pick values or type to filter, click a row "
                                         "for its spec, its difference from a reference, its loss curve and its file. "
                                         "Forgetting: the held-out LM loss change against the base model.",
                 filterable=True, row_class=classes, facets=[f for f in FACETS if f in columns], details=details,
                 csv="trials.csv", collapsed=len(rows) > 12)


def section(trials: pd.DataFrame) -> Section:
    s = Section("trials", f"Every trial ({len(trials)})")
    if not trials.empty:
        s.table(table(trials))
    return s

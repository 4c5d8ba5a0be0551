"""The table of every trial, last in the report: drop-down filters by method, rank, targets and
quantization, a CSV download of the visible rows, and per trial a drill-down (reports/templates)
with its full spec, how it differs from a reference configuration, its loss curve and its file."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from typing import Any

import pandas as pd

from reports.blocks import Cell, Section, Table, c_bytes, c_config, c_int, c_num, c_pct, c_text, missing, natural_key
from reports.results import get_path

def flatten(spec: Any, prefix: str = "") -> dict[str, Any]:
    """{'method': {'config': {'r': 8}}} -> {'method.config.r': 8}; lists stay values."""
    if not isinstance(spec, dict):
        return {prefix: spec}
    out: dict[str, Any] = {}
    for k, v in spec.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def references(trials: pd.DataFrame) -> dict[str, tuple[str, dict[str, Any]]]:
    """base (model spec and task, as JSON) -> the configuration its trials are diffed against: the
    untuned (frozen) trial on the same base and task where there is one, else on the same base, else
    on the same model name, else the modal configuration (each setting's most common value)."""
    frozen = trials[trials["method"] == "frozen"]
    keys = trials["spec"].map(_base_key)
    out: dict[str, tuple[str, dict[str, Any]]] = {}
    for key in dict.fromkeys(keys):
        model, task = json.loads(key)
        for same in (frozen[frozen["spec"].map(_base_key) == key],
                     frozen[frozen["spec"].map(lambda sp: json.loads(_base_key(sp))[0] == model)],
                     frozen[frozen["model"] == model.get("name")]):
            if not same.empty:
                row = same.iloc[0]
                out[key] = (f"the untuned model (frozen, trial {row['id']})", flatten(row["spec"]))
                break
    if len(out) < keys.nunique():
        flat = [flatten(sp) for sp in trials["spec"]]
        modal = {}
        for k in dict.fromkeys(k for f in flat for k in f):
            counts = Counter(json.dumps(f.get(k), sort_keys=True, default=str) for f in flat)
            modal[k] = json.loads(counts.most_common(1)[0][0])
        for key in keys:
            out.setdefault(key, ("the modal configuration (each setting's most common value over these trials)", modal))
    return out


def _base_key(spec: dict) -> str:
    data = spec.get("data") if isinstance(spec.get("data"), dict) else {}
    return json.dumps([spec.get("model") or {}, data.get("task")], sort_keys=True, default=str)


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


def _final_loss(r: pd.Series) -> float:
    curve = r.get("train.loss_curve")
    return curve[-1] if isinstance(curve, list) and curve else float("nan")


def _opt_int(v: Any) -> Any:
    return None if missing(v) else int(v)


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) and not missing(v) else None


UTILIZATION = "runtime.utilization.fraction"
"""Counted training FLOPs per second over the machine's matmul peak (bench/trial/flops.py); older results lack it."""


def utilization_summary(trials: pd.DataFrame) -> str | None:
    """One sentence on the sweep's utilization: median, min and max fraction of peak over the trials that
    trained, and the peak(s) it was taken against; None where no result has the field."""
    if UTILIZATION not in trials or trials.empty:
        return None
    fractions = trials[UTILIZATION].map(_number)
    trained = trials[(trials["status"] == "success") & fractions.notna()]
    if trained.empty:
        return None
    values = fractions[trained.index].astype(float)
    peaks = []
    for _, r in trained.iterrows():
        rate, where = _number(r.get("runtime.utilization.peak_flops_per_s")), r.get("runtime.utilization.peak_source.machine_class")
        threads = r.get("runtime.utilization.peak_source.threads")
        if rate is not None:
            peaks.append(f"{rate / 1e9:,.1f} GFLOP/s ({where or 'unknown machine'}, {_opt_int(threads) or '?'} "
                         f"thread{'' if _opt_int(threads) == 1 else 's'})")
    return (f"Utilization: the {len(values)} trained trial{'' if len(values) == 1 else 's'} ran their counted training FLOPs "
            f"(matmuls: forward, backward to the inputs, weight gradients where parameters train) at a median "
            f"{100 * values.median():.1f}% of the machine's matmul peak (min {100 * values.min():.1f}%, "
            f"max {100 * values.max():.1f}%); peak {', '.join(dict.fromkeys(peaks)) or 'unknown'}, "
            "the best rate of square float32 matmuls measured once per machine class.")


# (header, cell of a trial row, shown always): the others only where they vary or have a value,
# so that a CNN suite shows its task and learning rate, not empty rank and target columns.
COLUMNS: list[tuple[str, Callable[[pd.Series], Cell], bool]] = [
    ("id", lambda r: c_text(r["id"]), True),
    ("suite", lambda r: c_text(r.get("suite")), False),
    ("model", lambda r: c_text(r.get("model")), False),
    ("task", lambda r: c_text(get_path(r["spec"], "data.task")), False),
    ("method", lambda r: c_text(r["method"]), True),
    ("configuration", lambda r: c_config(r["config_label"], TRIAL_LABEL), True),
    ("r", lambda r: c_text(_opt_int(r.get("r"))), False),
    ("targets", lambda r: c_text(r.get("targets")), False),
    ("quant", lambda r: c_text(r.get("quant")), False),
    ("lr", lambda r: c_text(get_path(r["spec"], "train.lr")), False),
    ("seed", lambda r: c_text(r["seed"]), True),
    ("status", lambda r: c_text(r["status"]), True),
    ("trainable", lambda r: c_int(r["params.trainable"]), True),
    ("peak memory", lambda r: c_bytes(r["memory.peak_bytes"]), True),
    ("train time", lambda r: c_num(r["runtime.train_s"], 1, " s"), True),
    ("utilization", lambda r: c_pct(_number(r.get(UTILIZATION))), False),
    ("score", lambda r: c_pct(r["score"]), False),
    ("forgetting", lambda r: c_num(r.get("eval.forgetting"), 3), False),
    ("final loss", lambda r: c_num(_final_loss(r), 3), False),
]
FACETS = ("model", "task", "method", "r", "targets", "quant", "lr", "status")
TRIAL_LABEL = 110  # characters: the trial table has the room to tell trials apart (lr at the end of a label)


def table(trials: pd.DataFrame) -> Table:
    order = sorted(trials.index, key=lambda i: natural_key(f"{trials.at[i, 'model']} {trials.at[i, 'config_label']} "
                                                          f"seed {trials.at[i, 'seed']}"))
    ordered = trials.loc[order]
    cells = {name: [make(r) for _, r in ordered.iterrows()] for name, make, _ in COLUMNS}
    # A column is worth its width where it always is, or where it has a value and the values differ.
    keep = [name for name, _, always in COLUMNS
            if always or (len({c.text for c in cells[name]}) > 1 and any(c.text != "—" for c in cells[name]))
            or (name == "score" and any(c.text != "—" for c in cells[name]))]
    refs = references(trials)
    details = []
    for _, r in ordered.iterrows():
        ref_name, ref = refs[_base_key(r["spec"])]
        details.append({**detail(r, ref), "ref": ref_name})
    rows = [[cells[name][i] for name in keep] for i in range(len(ordered))]
    return Table(keep, rows, caption="Every trial. Click a header to sort, pick values or type to filter, click a row "
                                     "for its spec, its difference from a reference, its loss curve and its file."
                                     + (" Forgetting: the held-out LM loss change against the base model."
                                        if "forgetting" in keep else ""),
                 filterable=True, row_class=[f"status-{s}" for s in ordered["status"]],
                 facets=[f for f in FACETS if f in keep], details=details, csv="trials.csv", collapsed=len(rows) > 12)


def section(trials: pd.DataFrame) -> Section:
    s = Section("trials", f"Every trial ({len(trials)})")
    if not trials.empty:
        s.table(table(trials))
    return s

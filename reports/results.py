"""Result files into a pandas DataFrame, one row per trial, nested keys flattened with dots."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

SCHEMA = 1


class ResultFileError(ValueError):
    pass


def load_file(path: Path) -> dict:
    try:
        result = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ResultFileError(f"{path}: unreadable result file ({exc})") from None
    if not isinstance(result, dict) or result.get("schema") != SCHEMA or "status" not in result:
        raise ResultFileError(f"{path}: not a peftbench result of schema {SCHEMA}")
    return result


def files(*dirs: str | Path) -> list[Path]:
    out: list[Path] = []
    for d in map(Path, dirs):
        if not d.exists():
            raise ResultFileError(f"{d}: no such results folder")
        out += sorted(p for p in d.rglob("*.json") if not p.name.startswith(".") and "adapters" not in p.parts)
    return out


def frame(*dirs: str | Path) -> pd.DataFrame:
    rows = []
    for path in files(*dirs):
        result = load_file(path)
        result.pop("train", None)  # loss curves and step times stay in the files
        row = pd.json_normalize(result, sep=".").iloc[0].to_dict()
        row["path"] = str(path)
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

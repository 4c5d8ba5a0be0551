"""`peftbench export RESULTS_DIR... -o FILE.csv|FILE.parquet`: one row per trial, every setting of
its spec and every measured value as a column, for pandas, a spreadsheet or a SQL engine.

The rows are the reports' own table (reports.results.frame), not a second reading of the files,
so an export and a report never disagree. Like the reports, this never imports torch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from reports import results as rr


class ExportError(ValueError):
    """The output cannot be written: an unknown extension, or parquet without pyarrow."""


def _parquet(df: pd.DataFrame, path: Path) -> None:
    import importlib.util

    if importlib.util.find_spec("pyarrow") is None:
        raise ExportError(f"{path}: writing parquet needs pyarrow, not installed; install it with: pip install pyarrow")
    df.to_parquet(path, index=False)


WRITERS: dict[str, Callable[[pd.DataFrame, Path], None]] = {
    ".csv": lambda df, path: df.to_csv(path, index=False),
    ".parquet": _parquet,
}


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _scalar(value: Any) -> Any:
    """Lists (targets, tasks, per-step calibration times) and dicts as JSON text: one cell each."""
    return json.dumps(value, sort_keys=True) if isinstance(value, (list, dict)) else value


def table(dirs: Sequence[str | Path]) -> pd.DataFrame:
    """reports.results.frame with a scalar in every cell: its raw `spec` column dropped (each
    setting is already a spec.* column), lists and dicts as JSON text, and a column that mixes
    numbers or flags with text (a method setting that is a number in one trial, a name in another)
    as text, which CSV and parquet both hold."""
    df = rr.frame(*dirs).drop(columns=["spec"], errors="ignore")
    for col in [c for c in df.columns if pd.api.types.is_object_dtype(df[c])]:
        df[col] = df[col].map(lambda v: None if _missing(v) else _scalar(v))  # one missing value: None
        kinds = {type(v) for v in df[col] if not _missing(v)}
        if len(kinds) > 1 and not kinds <= {int, float}:
            df[col] = df[col].map(lambda v: None if _missing(v) else str(v))
    return df


def export(dirs: Sequence[str | Path], output: str | Path) -> pd.DataFrame:
    """Write the table of the folders' trials to `output` (.csv or .parquet); returns it."""
    output = Path(output)
    writer = WRITERS.get(output.suffix.lower())
    if writer is None:
        raise ExportError(f"{output}: unknown output type {output.suffix or '(none)'!r}; use {' or '.join(WRITERS)}")
    df = table(dirs)
    if df.empty:
        raise ExportError(f"{', '.join(map(str, dirs))}: no trial results to export")
    output.parent.mkdir(parents=True, exist_ok=True)
    writer(df, output)
    return df

"""The memory forecast beside the measurement: per component and peak, with the error.

Each result stores its forecast (memory.forecast, bench/trial/forecast.py) computed at run time; this
section only reads the JSON, so the report never imports torch. Results from before the forecast
existed have none: `peftbench forecast RESULTS_DIR` computes theirs and prints the same comparison.
"""

from __future__ import annotations

import pandas as pd

from reports.blocks import Section, Table, c_bytes, c_change, c_text, missing

COMPONENTS = ("weights", "grads", "optimizer", "activations")


def section(trials: pd.DataFrame) -> Section:
    s = Section("forecast", "Memory forecast vs measurement")
    cols = [f"memory.forecast.{k}" for k in (*COMPONENTS, "peak")]
    have = trials[trials["status"] == "success"].dropna(subset=cols[:1]) if cols[0] in trials else trials.iloc[0:0]
    if have.empty:
        s.p("No result here stores a memory forecast (results written before bench/trial/forecast.py existed). "
            "`peftbench forecast RESULTS_DIR` forecasts each result's spec and prints this comparison.")
        return s
    rows, within, n = [], 0, 0
    for _, r in have.sort_values("label").iterrows():
        measured = [r.get(f"memory.accounted.{k}") for k in COMPONENTS]
        forecast = [r.get(c) for c in cols[:-1]]
        total = sum(v for v in measured if not missing(v))
        ftotal = sum(v for v in forecast if not missing(v))
        n += 1
        within += bool(total) and abs(ftotal / total - 1) <= 0.02
        row = [c_text(r["label"])]
        for f, m in zip(forecast, measured, strict=True):
            row += [c_bytes(f), c_change(f, m)]
        row += [c_bytes(ftotal), c_change(ftotal, total), c_bytes(r.get("memory.forecast.peak")),
                c_bytes(r.get("memory.peak_bytes")), c_change(r.get("memory.forecast.peak"), r.get("memory.peak_bytes")),
                c_text(r.get("memory.forecast.activations_from"))]
        rows.append(row)
    s.p(f"{within} of {n} trials have their accounted total forecast within 2%. The forecast runs the trial's "
        "first step on the meta device (no weights) and counts what autograd saves there exactly as the real step "
        "counts it; the peak adds what the process holds beyond the components (runtime, what loading freed, the "
        "loss's full-vocabulary buffers): bench/trial/forecast.py.")
    header = ["trial"] + [x for k in COMPONENTS for x in (f"{k} forecast", "error")]
    s.table(Table(header + ["accounted forecast", "error", "peak forecast", "peak measured", "error", "activations from"], rows,
                  caption="error = forecast / measured - 1; memory.forecast is stored in each result at run time", filterable=True))
    return s

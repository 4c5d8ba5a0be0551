"""The report's sections, built from the trials DataFrame and the published numbers.

Every number a section shows comes from a result file (through reports.results) or from
published.toml; where the data is missing a section says so instead of showing anything else.
A section is a title and a list of blocks (paragraphs, tables, figures) that the template lays out.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any

import pandas as pd

from reports import answer, figures, forecast, longlora_context, matched, ranking, reference, stats, utilization
from reports import trials as trial_table
from reports.blocks import (Cell, Section, Table, c_bytes, c_change, c_config, c_int, c_mem, c_num, c_score, c_signed,
                            c_text, cite, missing, natural_key, published_table)
from reports.results import ACCOUNTED, seed_groups, spec_key

SURGICAL_METHODS = ("surgical", "auto_rgn")  # names a surgical fine-tuning method will register under


# ---- Helpers ------------------------------------------------------------------------------------

def with_ci(groups: pd.DataFrame) -> pd.DataFrame:
    """score_lo / score_hi columns for the figures' error bars (NaN with a single seed)."""
    if groups.empty:
        return groups.assign(score_lo=[], score_hi=[])
    ests = groups["score_values"].map(stats.estimate)
    lo = ests.map(lambda e: e.lo if e is not None and e.has_ci else float("nan"))
    hi = ests.map(lambda e: e.hi if e is not None and e.has_ci else float("nan"))
    return groups.assign(score_lo=lo.astype(float), score_hi=hi.astype(float))


def setting(row: pd.Series, fields: tuple[str, ...]) -> str:
    """A short name for the settings a compared pair shares."""
    parts = []
    for f in fields:
        v = row.get(f)
        if missing(v):
            continue
        if f == "r":
            parts.append(f"r={int(v)}" + ("" if missing(row.get("alpha")) else f" α={row['alpha']:g}"))
        elif f == "epochs":
            parts.append(f"{int(v)} ep")
        elif f == "quant" and v == "none":
            continue
        elif f == "base":
            parts.append(f"{v} base")
        elif f != "alpha":
            parts.append(str(v))
    return ", ".join(parts) or "—"


# ---- Pairs: trials that differ in one setting only --------------------------------------------

@dataclass
class Pair:
    a: pd.Series  # seed group rows (see results.seed_groups)
    b: pd.Series
    setting: str


def pairs(groups: pd.DataFrame, column: str, path: str, a: Any, b: Any, fields: tuple[str, ...],
          ignore: tuple[str, ...] = ()) -> list[Pair]:
    """Seed groups whose specs are equal except at `path` (and the coupled `ignore` paths),
    with `column` equal to a on one side and b on the other."""
    if groups.empty:
        return []
    keys = groups["spec"].map(lambda s: spec_key(s, [path, *ignore]))
    out = []
    for _, g in groups.groupby(keys, sort=False):
        side_a, side_b = g[g[column] == a], g[g[column] == b]
        for (_, ra), (_, rb) in product(side_a.iterrows(), side_b.iterrows()):
            out.append(Pair(ra, rb, setting(ra, fields)))
    # Every axis that varies in the results is named: the model, and the base (dtype or quantization) unless compared here.
    fields_model = ("model", *fields) if groups["model"].nunique() > 1 else fields
    if "base" in groups and groups["base"].nunique() > 1 and column not in ("quant", "dtype", "base"):
        fields_model = (*fields_model, "base")
    for p in out:
        p.setting = setting(p.a, fields_model)
    return sorted(out, key=lambda p: (str(p.a.get("model")), _num(p.a.get("r")), p.setting))


def _num(v: Any) -> float:
    return float("inf") if missing(v) else float(v)


def verdict_cell(a: list[float], b: list[float]) -> Cell:
    v = stats.compare(a, b)
    return Cell(v.text, {True: 1, False: 0, None: -1}[v.real])


def pairs_frame(ps: list[Pair], column: str, cols: tuple[str, ...]) -> pd.DataFrame:
    """Long form for figures.paired_bars: one row per side of each pair."""
    rows = []
    for p in ps:
        for side in (p.a, p.b):
            rows.append({"setting": p.setting, column: str(side[column]), **{c: side.get(c) for c in cols}})
    return pd.DataFrame(rows)


# ---- Sections ----------------------------------------------------------------------------------

def overview(trials: pd.DataFrame, groups: pd.DataFrame, records: dict[str, list[dict]] | None = None) -> Section:
    s = Section("overview", "Overview")
    if trials.empty:
        s.p("No results: the folders hold no result files.")
        return s
    counts = trials["status"].value_counts()
    s.p(f"{len(trials)} trials from suite(s) {', '.join(sorted(map(str, trials['suite'].dropna().unique())))}; "
        + ", ".join(f"{n} {status}" for status, n in counts.items()) + ". "
        + f"{len(groups)} distinct successful configurations (trials that differ only in train.seed are one "
          "configuration; their scores are averaged with a 95% t-distribution confidence interval). "
          "Every trial, with filters, a CSV download and its details, is in the last section.")
    if line := utilization.headline(trials, records or {}):  # results older than the fields have none
        s.p(line)
    names = trials["score_name"].dropna().unique()
    s.p("Score: " + (", ".join(names) if len(names) else "none (no lm-eval results in these files)")
        + " (lm-eval; the mean over tasks when there are several). Peak memory is memory.peak_bytes "
        + f"(source: {', '.join(sorted(map(str, trials.get('memory.peak_source', pd.Series()).dropna().unique()))) or 'unknown'}).")
    scored = groups.dropna(subset=["score", "peak"]) if not groups.empty else groups
    if scored.empty:
        s.p("Pareto front: no results with both a score and a peak memory (synthetic models never report scores).")
        return s
    front = pareto_front(scored)
    s.figure(figures.pareto(scored, front), "Peak memory against score, one point per configuration (seed means; hover "
             "a point for its configuration); the line joins the Pareto front: no other configuration scores higher "
             "with less memory.")
    s.table(Table(["model", "configuration", "seeds", "score", "peak memory", "trainable"],
                  [[c_text(r["model"]), c_config(r["config_label"]), c_int(r["n"]), c_score(r["score_values"]),
                    c_mem(r["peak_values"]), c_int(r["params.trainable"])] for _, r in front.iterrows()],
                  caption="The Pareto front of peak memory against score"))
    return s


def pareto_front(scored: pd.DataFrame) -> pd.DataFrame:
    """Per model: configurations that no other beats on both score (higher) and peak memory (lower)."""
    keep = []
    for _, g in scored.groupby("model", sort=False):
        best = -math.inf
        for idx, row in g.sort_values(["peak", "score"], ascending=[True, False]).iterrows():
            if row["score"] > best:
                keep.append(idx)
                best = row["score"]
    return scored.loc[keep]


def rank_sweep(groups: pd.DataFrame, pub: dict) -> Section:
    s = Section("rank", "Rank sweep")
    claim = pub["rank"]
    s.note(f"Published: {claim['claim']} ({cite(pub, claim['source'])})")
    ranked = groups[groups["r"].notna()] if not groups.empty else groups
    if ranked.empty:
        s.p("No results: no successful trial has a rank (method.config.r).")
        return s
    ranked = with_ci(ranked)
    fields = ("model", "method", "targets", "optimizer", "epochs") if ranked["model"].nunique() > 1 else \
        ("method", "targets", "optimizer", "epochs")
    ranked = ranked.assign(variant=ranked.apply(lambda r: setting(r, fields), axis=1))
    # One row of panels per base (dtype or quantization), so that lines never average over bases.
    facet = ranked["base"].nunique() > 1 if "base" in ranked else False
    ranked = ranked.assign(facet=ranked["base"] if facet else "").sort_values(["facet", "variant", "r"])
    s.figure(figures.rank_sweep(ranked), "Score (left) and peak memory (right) against the rank r, one line per "
             "variant" + (", one row per base" if facet else "") + "; error bars are 95% t intervals over seeds where "
             "there is more than one seed.")
    rows = [[c_text(r["variant"] + (f", {r['facet']}" if facet else "")), c_int(r["r"]), c_num(r["alpha"], 0),
             c_num(r["alpha"] / r["r"], 2), c_int(r["n"]),
             c_score(r["score_values"]), c_mem(r["peak_values"]), c_int(r["params.trainable"])]
            for _, r in ranked.iterrows()]
    s.table(Table(["variant", "r", "alpha", "alpha / r", "seeds", "score", "peak memory", "trainable"], rows,
                  caption="Every rank and alpha tried"))
    best = ranked.dropna(subset=["score"]).sort_values("score", ascending=False)
    if not best.empty:
        top = best.iloc[0]
        s.p(f"Highest mean score: r={int(top['r'])}, alpha={top['alpha']:g} ({top['variant']}), "
            f"{c_score(top['score_values']).text}. Published best in one case: r={claim['best_r']}, "
            f"alpha={claim['best_alpha']}.")
    return s


def targets(groups: pd.DataFrame, pub: dict) -> Section:
    s = Section("targets", "Layer targets: qv against all-linear")
    t = pub["targets"]
    s.published(Table(["targets", "trainable (millions)", "memory (GB)"],
                      [[Cell("qv"), c_num(t["qv_trainable_m"], 2), c_num(t["qv_memory_gb"], 2)],
                       [Cell("all layers"), c_num(t["all_trainable_m"], 2), c_num(t["all_memory_gb"], 2)]]),
                cite(pub, t["source"]))
    s.note(f"Published: {t['claim']} Published ratios, all / qv: trainable "
           f"{t['all_trainable_m'] / t['qv_trainable_m']:.2f}×, memory {t['all_memory_gb'] / t['qv_memory_gb']:.2f}×.")
    ps = pairs(groups, "targets", "method.config.targets", "qv", "all-linear", ("method", "r", "optimizer", "epochs"))
    if not ps:
        s.p("No results: no pair of successful trials that differ only in targets qv / all-linear.")
        return s
    rows = []
    for p in ps:
        rows.append([Cell(p.setting), c_int(p.a["params.trainable"]), c_int(p.b["params.trainable"]),
                     c_num(p.b["params.trainable"] / p.a["params.trainable"] if p.a["params.trainable"] else None, 2, "×"),
                     c_mem(p.a["peak_values"]), c_mem(p.b["peak_values"]), c_change(p.b["peak"], p.a["peak"]),
                     c_score(p.a["score_values"]), c_score(p.b["score_values"]),
                     c_signed(100 * (p.b["score"] - p.a["score"]), " pts"),
                     verdict_cell(p.a["score_values"], p.b["score_values"])])
    s.table(Table(["setting", "trainable qv", "trainable all-linear", "ratio", "peak qv", "peak all-linear",
                   "memory change", "score qv", "score all-linear", "score difference", "is the score difference real?"],
                  rows, caption="Matched pairs: the same trial except for the layer targets"))
    data = pairs_frame(ps, "targets", ("params.trainable", "peak", "score"))
    data = data.rename(columns={"peak": "peak_bytes"}).assign(score=data["score"] * 100)
    s.figure(figures.paired_bars(data, "targets", [("params.trainable", "trainable parameters"),
                                                   ("peak_bytes", "peak memory"), ("score", "score (%)")]),
             "Trainable parameters, peak memory and score (seed means) for qv and all-linear")
    return s


def optimizer(groups: pd.DataFrame, pub: dict) -> Section:
    s = Section("optimizer", "Optimizer: AdamW against SGD")
    s.published(published_table(pub["optimizer"]["raschka"], {"r": "r", "adamw_memory_gb": "AdamW memory (GB)",
                                                             "sgd_memory_gb": "SGD memory (GB)"}),
                cite(pub, pub["optimizer"]["claim"]["source"]))
    s.note("Published: " + pub["optimizer"]["claim"]["text"] + " Published AdamW / SGD change: " + ", ".join(
        f"r={row['r']}: {100 * (row['adamw_memory_gb'] / row['sgd_memory_gb'] - 1):+.1f}%"
        for row in pub["optimizer"]["raschka"]) + ".")
    # The learning rate (and SGD's momentum) travel with the optimizer in a sweep: not a difference to hold fixed.
    ps = pairs(groups, "optimizer", "train.optimizer", "sgd", "adamw", ("method", "r", "targets", "epochs"),
               ignore=("train.lr", "train.momentum", "train.weight_decay"))
    if not ps:
        s.p("No results: no pair of successful trials that differ only in the optimizer (AdamW / SGD).")
        return s
    rows = []
    for p in ps:
        rows.append([Cell(p.setting), c_mem(p.b["peak_values"]), c_mem(p.a["peak_values"]),
                     c_change(p.b["peak"], p.a["peak"]), c_bytes(p.b["optimizer_bytes"]), c_bytes(p.a["optimizer_bytes"]),
                     c_bytes(p.b["activations_bytes"]), c_score(p.b["score_values"]), c_score(p.a["score_values"]),
                     verdict_cell(p.a["score_values"], p.b["score_values"])])
    s.table(Table(["setting", "peak AdamW", "peak SGD", "AdamW against SGD", "optimizer state AdamW",
                   "optimizer state SGD", "activations (AdamW)", "score AdamW", "score SGD",
                   "is the score difference real?"], rows, caption="Matched pairs: the same trial except for the optimizer "
                                                                   "and its learning rate"))
    ranked = [p for p in ps if not missing(p.a.get("r"))]
    if ranked:
        low, high = min(ranked, key=lambda p: p.a["r"]), max(ranked, key=lambda p: p.a["r"])
        ends = [("Lowest rank", low), ("Highest rank", high)] if low.a["r"] != high.a["r"] else [("Only rank", low)]
        for label, p in ends:
            s.p(f"{label} ({p.setting}): AdamW peak {c_bytes(p.b['peak']).text} against SGD {c_bytes(p.a['peak']).text} "
                f"({c_change(p.b['peak'], p.a['peak']).text}); AdamW's state is {c_bytes(p.b['optimizer_bytes']).text} against "
                f"{c_bytes(p.b['activations_bytes']).text} of activations saved for backward.")
        rows = []
        for p in ranked:
            for side in (p.a, p.b):
                rows.append({"r": side["r"], "optimizer": side["optimizer"], "variant": setting(side, ("targets", "epochs")),
                             "peak": side["peak"], "optimizer_state": side["optimizer_bytes"]})
        s.figure(figures.lines_by(pd.DataFrame(rows), "r", "optimizer", [("peak", "peak memory"),
                                                                          ("optimizer_state", "optimizer state")]),
                 "Peak memory and accounted optimizer state against r, AdamW and SGD")
    return s


def epochs(groups: pd.DataFrame, pub: dict) -> Section:
    s = Section("epochs", "Epochs: one against two")
    s.note(f"Published: {pub['epochs']['claim']} ({cite(pub, pub['epochs']['source'])})")
    ps = pairs(groups, "epochs", "train.epochs", 1, 2, ("method", "r", "targets", "optimizer"))
    if not ps:
        s.p("No results: no pair of successful trials that differ only in the number of epochs (1 / 2).")
        return s
    rows, worse, real_worse = [], 0, 0
    for p in ps:
        v = stats.compare(p.a["score_values"], p.b["score_values"])
        worse += p.b["score"] < p.a["score"]
        real_worse += bool(v.real) and p.b["score"] < p.a["score"]
        rows.append([Cell(p.setting), c_score(p.a["score_values"]), c_score(p.b["score_values"]),
                     c_signed(100 * (p.b["score"] - p.a["score"]), " pts"), verdict_cell(p.a["score_values"], p.b["score_values"]),
                     c_num(p.a["train_s"], 1, " s"), c_num(p.b["train_s"], 1, " s")])
    s.table(Table(["setting", "score 1 epoch", "score 2 epochs", "difference", "is the difference real?",
                   "train time 1 epoch", "train time 2 epochs"], rows,
                  caption="Matched pairs: the same trial except for the number of epochs"))
    scored = [p for p in ps if not (missing(p.a["score"]) or missing(p.b["score"]))]
    s.p(f"Two epochs scored lower than one in {worse} of {len(scored)} scored pairs; the statistics support a real "
        f"drop in {real_worse} of them.")
    return s


def methods_section(groups: pd.DataFrame, pub: dict) -> Section:
    s = Section("methods", "Method comparison")
    if groups.empty:
        s.p("No results: no successful trials.")
    else:
        g = with_ci(groups)
        best = (g.sort_values(["score", "peak"], ascending=[False, True], na_position="last")
                 .groupby(["model", "method"], sort=False).head(1))
        best = best.sort_values(["model", "score"], ascending=[True, False], na_position="last")
        rows = [[c_text(r["model"]), c_text(r["method"]), c_text(r["config_label"]), c_int(r["n"]),
                 c_score(r["score_values"]), c_mem(r["peak_values"]), c_num(r["train_s"], 1, " s"),
                 c_int(r["params.trainable"]),
                 c_num(100 * r["params.trainable"] / r["params.total"] if r["params.total"] else None, 3, "%"),
                 c_num(r.get("forgetting"), 3)] for _, r in best.iterrows()]
        s.table(Table(["model", "method", "best configuration", "seeds", "score", "peak memory", "train time",
                       "trainable", "trainable share", "forgetting"], rows,
                      caption="Each method's best configuration (highest mean score; lowest memory without scores)"))
        for model, bm in best.groupby("model", sort=False):
            scored = bm.dropna(subset=["score"])
            if len(scored) >= 2:
                first, second = scored.iloc[0], scored.iloc[1]
                v = stats.compare(second["score_values"], first["score_values"])
                s.p(f"{model}: best {first['method']} ({c_score(first['score_values']).text}) against runner-up "
                    f"{second['method']} ({c_score(second['score_values']).text}): {v.text}.")
        one = best[best["model"] == best["model"].iloc[0]]
        s.figure(figures.methods(one), f"Best configuration per method on {one['model'].iloc[0]}: score and peak memory")
        full, lora = one[one["method"] == "full"], one[one["method"] == "lora"]
        if len(full) and len(lora):
            published = {r["method"]: r for r in pub["methods"]["peft_comparison"]}
            ratio_pub = published["Full fine-tuning"]["memory_gib"] / published["LoRA r=32"]["memory_gib"]
            s.p(f"Peak memory, full fine-tuning against the best LoRA: {full['peak'].iloc[0] / lora['peak'].iloc[0]:.2f}× "
                f"here, {ratio_pub:.2f}× in the published comparison below (at this scale the frozen weights and the "
                f"process baseline take a larger share).")
    s.published(published_table(pub["methods"]["peft_comparison"], {
        "method": "method", "gsm8k_pct": "GSM8K (%)", "memory_gib": "peak memory (GiB)", "train_s": "train time (s)"}),
        cite(pub, "peft_comparison"))
    notes = pub["methods"]["peft_comparison_notes"]
    s.note(f"Published: {notes['lora_fa']} Prompt tuning depends heavily on its initialisation: "
           f"{notes['prompt_tuning_init_low_pct']}% against {notes['prompt_tuning_init_high_pct']}%. {notes['moved']}")
    s.published(Table(["claim", "published", "source"], [[Cell(r["claim"]), Cell(r["value"]),
                                                          Cell(pub["sources"][r["source"]]["cite"])]
                                                         for r in pub["methods"]["parameters"]]),
                "Published parameter counts, from each method's paper, at the scale of its paper (for orientation: "
                "they are not comparable with the counts measured here)")
    return s


def lora_vs_qlora(groups: pd.DataFrame, pub: dict) -> Section:
    s = Section("qlora", "LoRA against QLoRA")
    q = pub["lora_vs_qlora"]
    tol = q["tolerance"]
    quantized = groups[groups["quant"] != "none"] if not groups.empty else groups
    if quantized.empty:
        s.p("No results: no trial in these results has a quantized base model (spec.model.quant).")
        return s
    comps = [c for c in matched.comparisons(groups, [matched.AXES[0]]) if c.peak is not None]
    comps.sort(key=lambda c: _BASE_ORDER.index(c.b_name) if c.b_name in _BASE_ORDER else len(_BASE_ORDER))
    if not comps:
        s.p(f"Quantized results exist ({', '.join(sorted(quantized['quant'].unique()))}) but none has an unquantized "
            "LoRA trial with otherwise identical settings to compare against.")
        return s
    s.p("Headline, medians over matched pairs (the same LoRA on the unquantized base against each quantized one): "
        + "; ".join(f"{c.b_name} against {c.a_name}: peak memory {c.peak.median:+.1f}% (range {c.peak.lo:+.1f} to "
                    f"{c.peak.hi:+.1f}%), train time "
                    + ("—" if c.time is None else f"{c.time.median:+.0f}%") + f", {len(c.pairs)} pairs" for c in comps) + ".")
    for c in comps:
        if c.score is not None:
            s.p("Score: " + matched.score_sentence(c))
    fl = sorted(matched.floors(None, groups), key=lambda f: _BASE_ORDER.index(f.base) if f.base in _BASE_ORDER else 99)
    if len(fl) > 1:
        s.p("Untuned, on the same evaluation rows: " + ", ".join(f"{f.base} {100 * f.score:.1f}%" for f in fl)
            + ". A score gap between bases that is there before training comes from quantizing the base itself.")
    s.note(q["caveat"]["text"])
    _qlora_published(s, pub)  # after our findings: what the reader came for leads
    expected = _qlora_expected(q)
    rows, shown = [], []
    for c in comps:
        quant = c.b
        exp = expected.get(quant, {})
        for p in c.pairs:
            mem_change = 100 * (p.b["peak"] / p.a["peak"] - 1)
            time_change = 100 * (p.b["train_s"] / p.a["train_s"] - 1) if p.a["train_s"] else float("nan")
            rows.append([Cell(setting(p.a, ("method", "r", "targets", "optimizer", "epochs"))), Cell(c.a_name), Cell(c.b_name),
                         c_mem(p.a["peak_values"]), c_mem(p.b["peak_values"]),
                         c_signed(mem_change), _expected_cell(exp.get("memory")),
                         _agree(mem_change, exp.get("memory"), tol["memory_pct_points"]),
                         c_num(p.a["train_s"], 1, " s"), c_num(p.b["train_s"], 1, " s"), c_signed(time_change),
                         _expected_cell(exp.get("time")), _agree(time_change, exp.get("time"), tol["time_pct_points"]),
                         c_score(p.a["score_values"]), c_score(p.b["score_values"]),
                         c_signed(100 * (p.b["score"] - p.a["score"]), " pts")])
            shown += [p.a, p.b]
    s.p(_inversions_text([p for c in comps for p in c.pairs]))
    s.table(Table(["setting", "base", "quantized base", "peak LoRA", "peak QLoRA", "memory change", "expected", "verdict (memory)",
                   "time LoRA", "time QLoRA", "time change", "expected", "verdict (time)", "score LoRA", "score QLoRA",
                   "score change"], rows,
                  caption=f"Every matched pair. Expected: the published change at 7B; a change within "
                          f"±{tol['memory_pct_points']} points (memory) or ±{tol['time_pct_points']} points (time) of it "
                          "reproduces it. Scores are single seeds: the aggregate test is in the sentences above",
                  collapsed=True))
    unique = pd.DataFrame(shown).drop_duplicates("config")
    unique = unique.assign(_o=unique["base"].map(_BASE_ORDER.index)).sort_values(["r", "targets", "optimizer", "_o"])
    s.figure(figures.breakdown(unique.drop(columns="_o")),
             "Accounted memory of the compared LoRA and QLoRA configurations (grouped by rank, targets and optimizer, "
             "then base), with the measured peak")
    return s


# Bases from the widest storage to the narrowest: the order the QLoRA comparisons are listed in.
_BASE_ORDER = ["float32", "bfloat16", "float16", "int8", "nf4", "nf4-dq", "fp4"]


def _qlora_published(s: Section, pub: dict) -> None:
    """Raschka's and LitGPT's LoRA-vs-QLoRA figures, shown once per report (here, or in the GPU section)."""
    q = pub["lora_vs_qlora"]
    claims = q["claims"]
    s.published(published_table(q["raschka"], {"setting": "setting", "quant": "quantization", "memory_gb": "memory (GB)",
                                               "train_s": "train time (s)"}), cite(pub, claims["source"]))
    s.note(f"Published changes, NF4 QLoRA against bf16 LoRA: memory {claims['memory_change_pct']:+d}%, time "
           f"{claims['time_change_pct']:+d}% (FP4: time {claims['fp4_time_change_pct']:+d}%). {claims['note']}")
    s.published(published_table(q["litgpt"], {"quant": "quantization", "memory_gb": "memory (GB)"}), cite(pub, "litgpt"))
    s.note(f"Storage per parameter: NF4 {q['bits']['nf4_bits_per_param']} bits, NF4 with double quantization "
           f"{q['bits']['nf4_dq_bits_per_param']} bits ({cite(pub, q['bits']['source'])}).")


def _qlora_expected(q: dict) -> dict[str, dict[str, tuple[float, str]]]:
    """quant -> {"memory"|"time": (expected change in %, where it comes from)} from published.toml."""
    claims = q["claims"]
    out: dict[str, dict[str, tuple[float, str]]] = {
        "nf4": {"memory": (claims["memory_change_pct"], "Raschka"), "time": (claims["time_change_pct"], "Raschka")},
        "fp4": {"time": (claims["fp4_time_change_pct"], "Raschka")},
    }
    lit = {r["quant"]: r["memory_gb"] for r in q["litgpt"]}
    if "none" in lit:
        for quant, gb in lit.items():
            if quant != "none":
                out.setdefault(quant, {}).setdefault("memory", (100 * (gb / lit["none"] - 1), "LitGPT"))
    return out


def _expected_cell(exp: tuple[float, str] | None) -> Cell:
    return Cell("no published figure", "") if exp is None else Cell(f"{exp[0]:+.0f}% ({exp[1]})", exp[0])


def _agree(observed: float, exp: tuple[float, str] | None, tolerance: float) -> Cell:
    if exp is None or missing(observed):
        return Cell("—", "")
    gap = observed - exp[0]
    ok = abs(gap) <= tolerance
    return Cell(f"{'reproduces' if ok else 'does not reproduce'} ({gap:+.0f} pts)", abs(gap))


def _inversions_text(ps: list[Any]) -> str:
    """One statement for every pair whose quantized side peaks higher: how many, and what the breakdown says."""
    inv = [p for p in ps if p.b["peak"] > p.a["peak"]]
    if not inv:
        return f"QLoRA's peak is below its LoRA twin's in all {len(ps)} pairs."
    per_base: dict[str, list[int]] = {}
    for p in ps:
        per_base.setdefault(str(p.b["base"]), [0, 0])[0] += 1
        per_base[str(p.b["base"])][1] += p.b["peak"] > p.a["peak"]
    change: dict[str, list[float]] = {k: [] for k in ACCOUNTED}
    outside = []
    for p in inv:
        parts = {k: p.b[f"{k}_bytes"] - p.a[f"{k}_bytes"] for k in ACCOUNTED
                 if not (missing(p.a[f"{k}_bytes"]) or missing(p.b[f"{k}_bytes"]))}
        for k, v in parts.items():
            change[k].append(v)
        outside.append((p.b["peak"] - sum(p.b[f"{k}_bytes"] for k in parts)) - (p.a["peak"] - sum(p.a[f"{k}_bytes"] for k in parts)))
    med = {k: float(pd.Series(v).median()) for k, v in change.items() if v}
    grew = [f"{c_bytes(v).text} more {k}" for k, v in med.items() if v > 0]
    if outside and pd.Series(outside).median() > 0:
        grew.append(f"{c_bytes(pd.Series(outside).median()).text} more outside the accounted categories (temporary buffers, "
                    "allocator caches, the process itself)")
    saved = f"saved a median {c_bytes(-med['weights']).text} of weights" if med.get("weights", 0) < 0 else "saved no weights"
    return (f"Inversions: QLoRA's peak is above its LoRA twin's in {len(inv)} of {len(ps)} pairs ("
            + ", ".join(f"{b} {n_inv} of {n}" for b, (n, n_inv) in per_base.items()) + f"). In those pairs quantizing {saved}, "
            + ("while the medians show " + ", ".join(grew) if grew else "and no category grew in the median") + ". "
            "The likely reason: at this scale the frozen weights are a small part of the peak, while each 4-bit layer "
            "dequantizes its weight to the compute dtype in every forward and backward pass, and those buffers and the "
            "activations saved for backward do not shrink with the weights. At 7B the weights dominate and the published "
            "saving appears (see the GPU section where there is one).")


def surgical(trials: pd.DataFrame, groups: pd.DataFrame, pub: dict) -> Section:
    """The paper's table, shift types by tuned block (reports/surgical.py)."""
    from reports import surgical as table

    return table.section(trials, groups, pub, SURGICAL_METHODS)


MAX_BREAKDOWN = 40  # bars; past this, configurations that differ only in settings memory ignores are merged
_MEMORY_BLIND = re.compile(r"\s(task|lr)=\S+")


def _merge_memory_twins(have: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration up to its learning rate and data task: mean accounted bytes, highest peak."""
    keys = have["spec"].map(lambda sp: spec_key(sp, ["train.lr", "data"]))
    rows = []
    for _, g in have.groupby(keys, sort=False):
        row = g.iloc[0].copy()
        for k in ACCOUNTED:
            row[f"{k}_bytes"] = g[f"{k}_bytes"].mean()
        row["peak"] = g["peak"].max()
        row["config_label"] = _MEMORY_BLIND.sub("", str(row["config_label"])) + (f" ({len(g)} configurations)" if len(g) > 1 else "")
        rows.append(row)
    return pd.DataFrame(rows)


def memory_breakdown(groups: pd.DataFrame) -> Section:
    s = Section("memory", "Memory breakdown")
    cols = [f"{k}_bytes" for k in ACCOUNTED]
    have = groups.dropna(subset=cols, how="all") if not groups.empty else groups
    if have.empty:
        s.p("No results: no successful trial records memory.accounted.")
        return s
    merged = len(have) > MAX_BREAKDOWN
    if merged:
        have = _merge_memory_twins(have)
    have = have.assign(_k=have["config_label"].map(natural_key)).sort_values(["model", "method", "_k"]).drop(columns="_k")
    s.figure(figures.breakdown(have), "Accounted memory per configuration (seed means): weights, gradients, optimizer "
             "state and activations saved for backward, stacked; the black tick is the measured peak."
             + (" Configurations that differ only in the learning rate or the data task are one bar (their mean; the "
                "tick is their highest peak): memory does not depend on those settings." if merged else ""))
    rows = [[c_text(r["config_label"]), *(c_bytes(r[c]) for c in cols), c_bytes(sum(r[c] for c in cols if not missing(r[c]))),
             c_bytes(r["peak"]), c_text(r.get("memory.peak_source"))] for _, r in have.iterrows()]
    s.table(Table(["configuration", *ACCOUNTED, "accounted total", "measured peak", "peak source"], rows,
                  caption="memory.accounted and memory.peak_bytes (an RSS peak also counts the process itself: "
                          "interpreter, libraries, data)"))
    return s


def loss_curves(trials: pd.DataFrame) -> Section:
    s = Section("loss", "Loss curves")
    rows = []
    if "train.loss_curve" in trials:
        for _, r in trials.iterrows():
            curve = r["train.loss_curve"]
            if isinstance(curve, list):
                axes = {c: r.get(c) for c in figures.FAMILY_AXES if c != "method"}
                rows += [{"method": r["method"], **axes, "trial": f"{r['id']} {r['config_label']} seed{r['seed']}",
                          "step": i + 1, "loss": v} for i, v in enumerate(curve) if v is not None]
    if not rows:
        s.p("No results: no trial records train.loss_curve.")
        return s
    s.figure(figures.loss_curves(pd.DataFrame(rows)), "Training loss per optimizer step, as recorded (not smoothed); "
             "failed or diverged trials appear with the steps they completed.")
    return s


def failures(trials: pd.DataFrame) -> Section:
    s = Section("failures", "Failed, out-of-memory, diverged and timed-out trials")
    bad = trials[trials["status"] != "success"] if not trials.empty else trials
    if bad.empty:
        s.p("None: every trial succeeded." if not trials.empty else "No results.")
        return s
    rows = [[c_text(r["id"]), c_text(r.get("suite")), c_text(r["status"]), c_text(r["config_label"]),
             c_text(r["seed"]), Cell(str(r.get("error") or "(no error recorded)"), pre=True), c_text(r["path"])]
            for _, r in bad.sort_values(["status", "config_label"]).iterrows()]
    s.table(Table(["id", "suite", "status", "configuration", "seed", "error", "file"], rows,
                  caption=f"{len(bad)} trial(s) that did not succeed; they count in the overview and are never dropped"))
    return s


def provenance(trials: pd.DataFrame) -> Section:
    s = Section("provenance", "Provenance")
    if trials.empty:
        s.p("No results.")
        return s
    pkg_cols = sorted(c for c in trials.columns if c.startswith("env.packages."))
    cols = [c for c in ("env.git_sha", "env.git_dirty", "env.device", "env.host", "env.python", "env.cpus") if c in trials]
    # Text with "" for missing values, so that groupby treats missing as one value.
    env = trials[cols + pkg_cols].map(lambda v: "" if missing(v) else str(v))
    env["synthetic"] = trials["synthetic"].map(str)
    rows = []
    for _, g in env.groupby(list(env.columns), sort=False):
        first = g.iloc[0]
        packages = ", ".join(f"{c.removeprefix('env.packages.')} {first[c]}" for c in pkg_cols if first[c])
        sha = first.get("env.git_sha", "")
        rows.append([c_int(len(g)), c_text(", ".join(sorted(set(trials.loc[g.index, "suite"].map(str))))),
                     Cell(sha[:12] or "unknown"), c_text(first.get("env.git_dirty") or None),
                     c_text(first.get("env.device")), c_text(first.get("env.host")), c_text(first.get("env.python")),
                     c_text(first.get("env.cpus")), c_text(first["synthetic"]), Cell(packages)])
    s.table(Table(["trials", "suites", "git sha", "dirty", "device", "host", "python", "cpus", "synthetic", "packages"],
                  rows, caption="One row per distinct environment"))
    shas = trials.get("env.git_sha", pd.Series(dtype=object)).dropna().unique()
    if len(shas) > 1:
        s.note(f"These results come from {len(shas)} different commits: compare across them with care.")
    if trials.get("env.git_dirty", pd.Series(dtype=object)).fillna(False).astype(bool).any():
        s.note("Some trials ran from a working tree with uncommitted changes (dirty): their code is not exactly "
               "any commit.")
    n_syn = int(trials["synthetic"].fillna(False).astype(bool).sum())
    if n_syn:
        s.note(f"{n_syn} trial(s) used synthetic models (a real architecture with random weights): their memory and "
               "time are meaningful, their scores are not and are never reported.")
    return s


GB = 1e9  # the published GPU figures are in GB (10^9 bytes)


def _base_label(model: dict) -> str:
    quant = model.get("quant") or "none"
    if quant == "none":
        return str(model.get("dtype", "?"))
    return quant + ("+DQ" if model.get("double_quant") else "")


def _published_key(model: dict) -> str:
    """The key published.toml uses for a base: none, nf4, nf4-dq, fp4, int8."""
    quant = model.get("quant") or "none"
    return f"{quant}-dq" if quant != "none" and model.get("double_quant") else quant


def gpu(records: dict[str, list[dict]], pub: dict, groups: pd.DataFrame | None = None) -> Section:
    """benchmarks/gpu_7b.py records: LoRA against QLoRA on a synthetic Llama-2-7B on CUDA, beside
    Raschka's and LitGPT's figures, and every method's CUDA path on a small synthetic model."""
    s = Section("gpu", "On a GPU: LoRA against QLoRA at Llama-2-7B scale")
    runs = records.get("gpu_7b", [])
    if not runs:
        s.p("No GPU records in these folders: run benchmarks/gpu_7b.py on a CUDA machine (see benchmarks/README.md) "
            "and pass its output folder to the report.")
        return s
    q = pub["lora_vs_qlora"]
    raschka = {r["quant"]: r for r in q["raschka"]}
    litgpt = {r["quant"]: r["memory_gb"] for r in q["litgpt"]}
    claims, tol = q["claims"], q["tolerance"]
    # The fullest record first; a variant another record already showed (same name, same peak) is not repeated.
    runs = sorted(runs, key=lambda r: -len(r.get("variants") or []))
    seen: dict[str, int | None] = {}
    for run in runs:
        st, env = run["settings"], run["env"]
        fresh = [v for v in run["variants"] if seen.get(v["name"], -1) != (v.get("memory") or {}).get("peak_bytes")]
        for v in run["variants"]:
            seen.setdefault(v["name"], (v.get("memory") or {}).get("peak_bytes"))
        if not fresh:
            s.p(f"{run['path']}: its LoRA variants ({', '.join(v['name'] for v in run['variants'])}) repeat the record "
                "above with the same peak; its method runs are in the table of methods below.")
            continue
        ok = [v for v in run["variants"] if v.get("status") == "success"]
        s.p(f"{env.get('device')} ({run['path']}): {st['big']} (the real architecture with random weights: memory and "
            f"time do not depend on the values, scores are meaningless and not shown), micro-batch {st['micro_batch']}, "
            f"{st['steps']} steps, sequence length {st['seq']} unless stated; torch {env['packages'].get('torch')}, "
            f"bitsandbytes {env['packages'].get('bitsandbytes')}. Peak = torch's max allocated during training, "
            "weights included; GB = 10^9 bytes. Command: python benchmarks/gpu_7b.py --out DIR (benchmarks/README.md).")

        def reference(v: dict) -> dict | None:
            """The bf16 LoRA run this variant is compared against: same rank, targets, optimizer and length."""
            key = (v["method"]["config"].get("r"), v["method"]["config"].get("targets"), v["train_spec"]["optimizer"], v["seq"])
            for w in ok:
                if _published_key(w["model"]) == "none" and (w["method"]["config"].get("r"), w["method"]["config"].get("targets"),
                                                               w["train_spec"]["optimizer"], w["seq"]) == key:
                    return w
            return None

        def raschka_setting(v: dict) -> bool:
            c = v["method"]["config"]
            return c.get("r") == 8 and c.get("targets") == "qv" and v["train_spec"]["optimizer"] == "adamw" and v["seq"] == st["seq"]

        rows = []
        for v in fresh:
            m, c = v.get("memory") or {}, v["method"]["config"]
            key = _published_key(v["model"])
            pub_gb = raschka.get(key, {}).get("memory_gb") or litgpt.get(key) if raschka_setting(v) else None
            ref = reference(v)
            rows.append([Cell(v["name"]), Cell(_base_label(v["model"])), Cell(f"r={c.get('r')} {c.get('targets')}"),
                         Cell(v["train_spec"]["optimizer"]), c_int(v["seq"]), Cell(v["status"]),
                         c_int((v.get("params") or {}).get("trainable")),
                         c_num((m.get("accounted") or {}).get("weights", float("nan")) / GB, 2),
                         c_num(m.get("peak_bytes", float("nan")) / GB, 2), c_num(m.get("peak_reserved_bytes", float("nan")) / GB, 2),
                         c_num(pub_gb, 2) if pub_gb else Cell("—", ""),
                         c_change(m.get("peak_bytes", float("nan")) / GB, pub_gb) if pub_gb else Cell("—", ""),
                         c_num(v.get("step_s_median"), 3, " s"),
                         c_num(v["step_s_median"] / ref["step_s_median"], 2, "x") if ref and v.get("step_s_median") else Cell("—", "")])
        s.table(Table(["variant", "base", "adapter", "optimizer", "seq", "status", "trainable", "weights (GB)", "peak (GB)",
                       "reserved (GB)", "published (GB)", "ours vs published", "median step", "step vs bf16 LoRA"], rows,
                      caption="Every variant the script ran; published figures (Raschka, else LitGPT) only beside runs "
                              "with Raschka's adapter (r=8 on query and value, AdamW)"))
        by_key = {_published_key(v["model"]): v for v in ok if raschka_setting(v)}
        lora = by_key.get("none")
        if lora:
            crows = []
            for key, claim_mem, claim_time in [("nf4", claims["memory_change_pct"], claims["time_change_pct"]),
                                               ("nf4-dq", None, None), ("fp4", None, claims["fp4_time_change_pct"])]:
                v = by_key.get(key)
                if not v:
                    continue
                mem = 100 * (v["memory"]["peak_bytes"] / lora["memory"]["peak_bytes"] - 1)
                time = 100 * (v["step_s_median"] / lora["step_s_median"] - 1)
                exp_mem = (claim_mem, "Raschka") if claim_mem is not None else (
                    (100 * (litgpt[key] / litgpt["none"] - 1), "LitGPT") if key in litgpt and "none" in litgpt else None)
                exp_time = (claim_time, "Raschka") if claim_time is not None else None
                crows.append([Cell(key), c_signed(mem), _expected_cell(exp_mem), _agree(mem, exp_mem, tol["memory_pct_points"]),
                              c_signed(time), _expected_cell(exp_time), _agree(time, exp_time, tol["time_pct_points"])])
            if crows:
                s.table(Table(["QLoRA base", "memory change", "published", "verdict (memory)", "step-time change", "published",
                               "verdict (time)"], crows, caption="QLoRA against bf16 LoRA, both r=8 on query and value"))
            s.p(_gpu_memory_text(lora, [v for v in ok if v is not lora and raschka_setting({**v, "seq": st["seq"]})
                                        and _published_key(v["model"]) == "none"], raschka.get("none", {}).get("memory_gb")))
    _gpu_methods(s, runs)
    # The published figures appear once per report: here only when the LoRA-vs-QLoRA section has no data to show them.
    if groups is None or groups.empty or (groups["quant"] == "none").all():
        _qlora_published(s, pub)
    return s


def _gpu_methods(s: Section, runs: list[dict]) -> None:
    """Every method's CUDA path, one row per method and base over all records; where records disagree
    both outcomes are shown with their files, since neither record stores the commit it ran."""
    found: dict[tuple[str, str], list[tuple[str, dict]]] = {}
    small = {r["settings"].get("small") for r in runs if (r.get("methods") or [])}
    for run in runs:
        for m in run.get("methods") or []:
            found.setdefault((m["method_name"], m["base"]), []).append((Path(run["path"]).name, m))
    if not found:
        return
    rows, split = [], []
    for (name, base), seen in sorted(found.items()):
        statuses = {m["status"] for _, m in seen}
        ok = next((m for _, m in seen if m["status"] == "success"), seen[0][1])
        if len(statuses) > 1:
            split.append(f"{name} on {base}")
            status = "; ".join(f"{m['status']} in {f}" for f, m in seen)
            error = "; ".join(f"{f}: {str(m.get('error') or '')}" for f, m in seen if m["status"] != "success")
        else:
            status, error = ok["status"], str(ok.get("error") or "")
        rows.append([Cell(name), Cell(base), Cell(status), c_int((ok.get("params") or {}).get("trainable")),
                     c_num(ok.get("step_s_median"), 3, " s"), Cell(error, pre=True)])
    s.table(Table(["method", "base", "status", "trainable", "median step", "error"], rows,
                  caption=f"Every registered method's CUDA path: a few steps on {', '.join(sorted(map(str, small)))}, "
                          "over all records"))
    if split:
        s.note(f"The records disagree for {', '.join(split)}: on the same device and package versions, so the code differed "
               "between the runs (neither record stores its git commit). A success shows the path works with the code "
               "that ran it; rerunning benchmarks/gpu_7b.py with the committed code settles which state is current.")


def _gpu_memory_text(lora: dict, longer: list[dict], published_gb: float | None) -> str:
    """Why bf16 LoRA's peak differs from the published one, from the breakdown and the sequence-length runs."""
    m = lora["memory"]
    acc = m.get("accounted") or {}
    text = (f"bf16 LoRA's peak of {m['peak_bytes'] / GB:.2f} GB splits into weights {acc.get('weights', 0) / GB:.2f} GB, "
            f"activations saved for backward {acc.get('activations', 0) / GB:.2f} GB, gradients {acc.get('grads', 0) / GB:.3f} GB "
            f"and optimizer state {acc.get('optimizer', 0) / GB:.3f} GB. ")
    if published_gb is None:
        return text
    text += f"The published peak is {published_gb:.2f} GB ({100 * (m['peak_bytes'] / GB / published_gb - 1):+.0f}%). "
    longer = [v for v in longer if v["seq"] != lora["seq"]]
    if longer:
        v = max(longer, key=lambda v: v["seq"])
        per_token = (v["memory"]["peak_bytes"] - m["peak_bytes"]) / (v["seq"] - lora["seq"])
        if per_token > 0:
            at = lora["seq"] + (published_gb * GB - m["peak_bytes"]) / per_token
            text += (f"The weights are the same in every setting, so the difference is activations, which grow with the "
                     f"sequence length: our peak rises by {per_token * 512 / GB:.2f} GB per 512 tokens (seq {lora['seq']} "
                     f"-> {v['seq']}); at that rate the published peak corresponds to a longest sequence of about "
                     f"{at:,.0f} tokens (an extrapolation from two measured lengths, not a measurement). The published runs "
                     "trained on Alpaca, whose peak is set by its longest sample, so a fixed-length synthetic batch "
                     "matches it only at that length.")
    return text


# A lead section's subject: which trials it is about. It leads (comes right after the answer) only where those
# trials are at least half of the report's, i.e. where the suite is that comparison: one surgical trial among
# twenty other methods does not make a methods comparison a surgical report.
LEAD_SUBJECTS: dict[str, Callable[[pd.DataFrame], pd.Series]] = {
    "surgical": lambda t: t["method"].isin(SURGICAL_METHODS),
    "qlora": lambda t: t["quant"] != "none",
    "ranking": lambda t: t[ranking.ROLE].notna() if ranking.ROLE in t else pd.Series(False, index=t.index),
}


def leads(trials: pd.DataFrame, candidates: Sequence[Section]) -> list[Section]:
    """The candidates with data whose subject is at least half of the trials, in the given order."""
    return [sec for sec in candidates
            if sec.has_data and not trials.empty and LEAD_SUBJECTS[sec.id](trials).mean() >= 0.5]


def build(trials: pd.DataFrame, pub: dict, records: dict[str, list[dict]] | None = None,
          ref: reference.Reference | None = None) -> list[Section]:
    groups = pd.DataFrame() if trials.empty else seed_groups(trials)
    # A suite's own subject leads, right after the answer: a tuned suite's ranking, the shift x block table, the
    # LoRA-vs-QLoRA comparison.
    surg, qlora, ranked = surgical(trials, groups, pub), lora_vs_qlora(groups, pub), ranking.section(trials, pub)
    lead = leads(trials, (ranked, surg, qlora))
    # How close the run came to the machine and whether its scores repeat a reference run's: right after the overview.
    rest = [overview(trials, groups, records), utilization.section(trials, records or {}), reference.section(ref),
            matched.section(trials, groups),
            rank_sweep(groups, pub), targets(groups, pub), optimizer(groups, pub),
            epochs(groups, pub), methods_section(groups, pub), ranked, qlora, gpu(records or {}, pub, groups),
            longlora_context.section(records or {}),
            surg, memory_breakdown(groups), forecast.section(trials), loss_curves(trials), failures(trials),
            provenance(trials), trial_table.section(trials)]
    return [answer.section(trials, groups), *lead, *(sec for sec in rest if all(sec is not x for x in lead))]

"""The surgical fine-tuning section (Lee et al., ICLR 2023, arXiv 2210.11466) from result files.

The paper's table: one row per shift, one column per tuned block, accuracy mean ± std over
seeds, Auto-RGN and full fine-tuning beside them. For every (shift, choice) the learning rate is
the one with the best mean *validation* accuracy over seeds; the test accuracy of that learning
rate is what the table shows, so the test split never takes part in a choice.
"""

from __future__ import annotations

import statistics
from typing import Any

import pandas as pd

from reports import stats
from reports.blocks import Cell, Section, Table, c_int, c_text, cite, missing, published_table

ORDER = ["Block 1", "Block 2", "Block 3", "Block 4", "Head", "All", "Auto-RGN", "No tuning"]
SINGLE = ["Block 1", "Block 2", "Block 3", "Block 4", "Head"]
# What the paper predicts is best per kind of shift (section 4 of the paper).
PREDICTED = {"input": ("Block 1",), "feature": ("Block 2", "Block 3"), "output": ("Head",)}
LEVELS = ("input", "feature", "output")


def choice(spec: dict) -> str | None:
    """The column a trial belongs to: Block i (1-based, as the paper counts), Head, All, Auto-RGN, No tuning."""
    method = spec.get("method", {})
    name, cfg = method.get("name"), method.get("config", {})
    if name == "surgical":
        items = cfg.get("blocks")
        items = [items] if isinstance(items, str) else list(items or [])
        return " + ".join(f"Block {int(b) + 1}" if b.isdigit() else "Head" if b == "head" else b for b in items)
    return {"full": "All", "auto_rgn": "Auto-RGN", "frozen": "No tuning"}.get(name)


def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def selected(trials: pd.DataFrame) -> pd.DataFrame:
    """One row per (task, choice): the lr with the best mean validation accuracy, and the test
    accuracies of that lr, one per seed."""
    if trials.empty or "eval.accuracy.test" not in trials:
        return pd.DataFrame()
    ok = trials[(trials["status"] == "success") & trials["eval.accuracy.test"].notna()].copy()
    if ok.empty:
        return pd.DataFrame()
    ok["choice"] = ok["spec"].map(choice)
    ok = ok[ok["choice"].notna()]
    ok["task"] = ok["spec"].map(lambda s: s["data"]["task"])
    ok["lr"] = ok["spec"].map(lambda s: s["train"]["lr"])
    ok["val"] = ok["eval.accuracy.val"].map(_num)
    ok["test"] = ok["eval.accuracy.test"].map(_num)
    rows = []
    for (task, label), g in ok.groupby(["task", "choice"], sort=False):
        by_lr = g.groupby("lr")["val"].mean()
        best = by_lr.idxmax()  # validation only
        chosen = g[g["lr"] == best]
        first = chosen.iloc[0]
        rows.append(
            {
                "task": task,
                "choice": label,
                "level": first.get("data.shift"),
                "describe": first.get("data.describe"),
                "lr": best,
                "lrs": sorted(by_lr.index),
                "val": by_lr[best],
                "test_values": chosen.groupby("seed")["test"].mean().tolist(),
                "trainable": first.get("params.trainable"),
                "source": first.get("data.source"),
            }
        )
    return pd.DataFrame(rows)


def _mean_std(values: list[float]) -> Cell:
    if not values:
        return Cell("—", "")
    mean = statistics.fmean(values)
    if len(values) < 2:
        return Cell(f"{100 * mean:.1f} (1 seed)", mean)
    return Cell(f"{100 * mean:.1f} ± {100 * statistics.stdev(values):.1f}", mean)


def verdict(level: str, cells: dict[str, list[float]]) -> tuple[str, str]:
    """(best single choice, whether the paper's rule holds) for one row, from test means over seeds."""
    singles = {c: v for c, v in cells.items() if c in SINGLE and v}
    if not singles or level not in PREDICTED:
        return "—", "no data"
    best = max(singles, key=lambda c: statistics.fmean(singles[c]))
    predicted = [c for c in PREDICTED[level] if c in singles]
    if not predicted:
        return best, f"no result for {' / '.join(PREDICTED[level])}"
    if best in predicted:
        return best, "holds: the predicted block is best"
    top = max(predicted, key=lambda c: statistics.fmean(singles[c]))
    v = stats.compare(singles[top], singles[best])
    if v.real is False:
        return best, f"holds within seed noise: {top} is below {best} by a margin the seeds cannot separate ({v.text})"
    if v.real is None:
        return best, f"does not hold on the means ({top} below {best}); {v.text}"
    return best, f"does not hold: {best} beats {top} ({v.text})"


def section(trials: pd.DataFrame, groups: pd.DataFrame, pub: dict, methods: tuple[str, ...]) -> Section:
    s = Section("surgical", "Surgical fine-tuning")
    picked = selected(trials)
    found = not picked.empty
    if found:
        _vision(s, picked, trials, pub)
    lm = _language(s, groups[~groups["task"].isin(set(picked["task"]))] if found and "task" in groups else groups, methods)
    if not found and not lm:
        s.p(
            f"No results yet: no trial of a surgical fine-tuning method ({', '.join(methods)}) in these results "
            "(suites/surgical.toml runs them)."
        )
        return s
    # The published figures once, after our own table (the table leads: it is what the reader came for).
    rules = pub["surgical"]["rules"]
    s.published(
        published_table(pub["surgical"]["cifar10c"], {"setting": "tuned layers", "accuracy_pct": "accuracy (%)"}), cite(pub, "surgical")
    )
    s.note(f"Published rules: {rules['input_level']}; {rules['feature_level']}; {rules['output_level']}.")
    return s


# How a row's verdict is counted: the rule holds outright, holds only within seed noise, or does not hold.
HOLDS, WITHIN_NOISE = "holds:", "holds within seed noise"


def against(a: list[float], b: list[float]) -> str:
    """'beats', 'ties' or 'loses': b against a on test means, Welch's t-test at 5% (stats.compare)."""
    v = stats.compare(a, b)
    if v.real is None:
        return "cannot tell"
    if not v.real:
        return "ties"
    return "beats" if statistics.fmean(b) > statistics.fmean(a) else "loses"


def agreement(rows: list[dict[str, Any]], pub: dict) -> list[str]:
    """Where our table agrees and disagrees with the paper, one sentence per claim, counted over shifts."""
    n = len(rows)
    out = []
    strict = [r["task"] for r in rows if r["holds"].startswith(HOLDS)]
    noisy = [r for r in rows if r["holds"].startswith(WITHIN_NOISE)]
    failed = [r for r in rows if not r["holds"].startswith(("holds", "no "))]
    text = f"The paper's rule (which block to tune for which kind of shift) holds outright in {len(strict)} of {n} shifts"
    if noisy:
        text += (f"; in {len(noisy)} more only within seed noise (" + "; ".join(
            f"{r['task']}: {r['best']} is best, the predicted {' / '.join(PREDICTED[r['level']])} is below it by a margin "
            "the seeds cannot separate" for r in noisy) + ")")
    text += f"; it fails in {len(failed)}" + (f" ({', '.join(r['task'] for r in failed)})" if failed else "") + "."
    out.append(text)
    full = [(r, against(r["cells"]["All"], r["cells"][r["best"]])) for r in rows
            if r["cells"].get("All") and r["best"] in r["cells"]]
    if full:
        ties = [r["task"] for r, v in full if v == "ties"]
        wins = [r["task"] for r, v in full if v == "beats"]
        losses = [r["task"] for r, v in full if v == "loses"]
        pub_rows = {row["setting"]: row["accuracy_pct"] for row in pub["surgical"]["cifar10c"]}
        first = next((v for k, v in pub_rows.items() if k.lower().startswith("first")), None)
        whole = next((v for k, v in pub_rows.items() if k.lower().startswith("full")), None)
        gap = f" (CIFAR-10-C: {first:g}% against {whole:g}%)" if first is not None and whole is not None else ""
        text = (f"The paper's main claim, that tuning the right block beats tuning everything{gap}: the best single block "
                f"beats full fine-tuning in {len(wins)} of {len(full)} shifts" + (f" ({', '.join(wins)})" if wins else ""))
        text += f", ties it within seed noise in {len(ties)}" + (f" ({', '.join(ties)})" if ties else "")
        text += f" and loses in {len(losses)}" + (f" ({', '.join(losses)})" if losses else "") + "."
        if len(ties) > len(wins):
            text += (" Here the choice of block matters (the wrong block costs points), but tuning everything is as good as "
                     "the best block in most shifts: that part of the paper does not reproduce at this scale.")
        out.append(text)
    rgn = [(r, against(r["cells"][r["best"]], r["cells"]["Auto-RGN"])) for r in rows
           if r["cells"].get("Auto-RGN") and r["best"] in r["cells"]]
    if rgn:
        same = [r["task"] for r, v in rgn if v == "ties"]
        below = [r["task"] for r, v in rgn if v == "loses"]
        above = [r["task"] for r, v in rgn if v == "beats"]
        out.append(f"Auto-RGN (no block chosen by hand) ties the best single block in {len(same)} of {len(rgn)} shifts"
                   + (f", falls below it in {len(below)} ({', '.join(below)})" if below else "")
                   + (f", beats it in {len(above)} ({', '.join(above)})" if above else "") + ".")
    return out


def _vision(s: Section, picked: pd.DataFrame, trials: pd.DataFrame, pub: dict) -> None:
    sources = sorted(map(str, picked["source"].dropna().unique()))
    s.p(
        f"Image classification, a 4-stage ResNet-style CNN pretrained once on the source data ({', '.join(sources)}), "
        "then tuned on about 1,000 target images per shift. Cells: test accuracy (%), mean ± standard deviation over "
        "seeds, at the learning rate with the best mean validation accuracy for that cell (the test split is never "
        "used to choose). Block i is the i-th stage (stage 1 includes the stem convolution); Head is the linear "
        "classifier; All is full fine-tuning; No tuning is the source model as it is."
    )
    if "sklearn-digits" in sources:
        s.note(
            "Some results ran on scikit-learn's digits (Fashion-MNIST was missing on that machine): "
            "install the Debian package dataset-fashion-mnist to reproduce the reference run."
        )
    columns = [c for c in ORDER if c in set(picked["choice"])] + sorted(set(picked["choice"]) - set(ORDER))
    tasks = picked.drop_duplicates("task")
    tasks = tasks.assign(rank=tasks["level"].map(lambda v: LEVELS.index(v) if v in LEVELS else 9)).sort_values(["rank", "task"])
    rows, lr_rows, found = [], [], []
    for _, t in tasks.iterrows():
        mine = picked[picked["task"] == t["task"]].set_index("choice")
        cells = {c: mine.loc[c, "test_values"] if c in mine.index else [] for c in columns}
        best, holds = verdict(t["level"], cells)
        found.append({"task": t["task"], "level": t["level"], "best": best, "holds": holds, "cells": cells})
        rows.append(
            [
                c_text(f"{t['task']}: {t['level']}-level, {t['describe']}"),
                *(_mean_std(cells[c]) for c in columns),
                c_text(best),
                c_text(" / ".join(PREDICTED.get(t["level"], ("?",)))),
                Cell(holds),
            ]
        )
        lr_rows.append(
            [
                c_text(t["task"]),
                *(
                    Cell("—", "")
                    if c not in mine.index
                    else Cell(f"{mine.loc[c, 'lr']:g} (val {100 * mine.loc[c, 'val']:.1f})", mine.loc[c, "lr"])
                    for c in columns
                ),
            ]
        )
    s.table(
        Table(
            ["shift", *columns, "best single block", "paper predicts", "does the paper's rule hold?"],
            rows,
            caption="Test accuracy (%) by tuned block, mean ± std over seeds; the verdict compares single blocks "
            "only (Welch t-test at 5% where the predicted block is not the best)",
        )
    )
    for sentence in agreement(found, pub):
        s.p(sentence)
    s.table(
        Table(
            ["task", *columns],
            lr_rows,
            caption="The learning rate each cell uses, chosen by mean validation "
            f"accuracy over seeds among {', '.join(f'{x:g}' for x in picked['lrs'].iloc[0])}",
        )
    )
    _multipliers(s, trials)


def _multipliers(s: Section, trials: pd.DataFrame) -> None:
    """Auto-RGN's mean learning-rate multiplier per block, last epoch, averaged over its trials."""
    if "method_report.epochs" not in trials:
        return
    rows: dict[str, dict[str, list[float]]] = {}
    for _, r in trials[trials["status"] == "success"].iterrows():
        epochs = r["method_report.epochs"]
        if not isinstance(epochs, list) or not epochs or "eval.accuracy.test" not in r or missing(r["eval.accuracy.test"]):
            continue
        for block, value in epochs[-1].get("mean_by_block", {}).items():
            rows.setdefault(r["spec"]["data"]["task"], {}).setdefault(block, []).append(value)
    if not rows:
        return
    names = sorted({b for v in rows.values() for b in v}, key=lambda b: (b == "other", b))
    s.table(
        Table(
            ["task", *(f"Block {int(b.split()[1]) + 1}" if b.startswith("block ") else b for b in names)],
            [
                [c_text(task), *(Cell(f"{statistics.fmean(v[b]):.2f}", statistics.fmean(v[b])) if b in v else Cell("—", "") for b in names)]
                for task, v in rows.items()
            ],
            caption="Auto-RGN: mean learning-rate multiplier per block in the last epoch (1 = the full rate), "
            'averaged over its trials; "other": the tensors outside the blocks (here the head)',
        )
    )


def _language(s: Section, groups: pd.DataFrame, methods: tuple[str, ...]) -> bool:
    if groups.empty:
        return False
    lm = groups[groups["method"].isin([*methods, "full", "frozen"]) & groups["score"].notna()]
    lm = lm[lm["model"].isin(groups[groups["method"].isin(methods) & groups["score"].notna()]["model"])]
    if lm.empty:
        return False
    rows = [
        [
            c_text(r["model"]),
            c_text(choice(r["spec"])),
            c_text(r["spec"]["data"]["task"]),
            c_text(f"{r['spec']['train']['lr']:g}"),
            c_int(r["n"]),
            _mean_std(r["score_values"]),
            c_int(r["params.trainable"]),
        ]
        for _, r in lm.iterrows()
    ]
    s.table(
        Table(
            ["model", "tuned", "train task", "lr (fixed, not chosen)", "seeds", "score (%)", "trainable"],
            rows,
            caption="The language-model variant: tuning a third of the blocks (first-third, middle-third, "
            "last-third) against full fine-tuning and the untuned model; score: the lm-eval task's accuracy",
        )
    )
    return True

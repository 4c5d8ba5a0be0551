"""Figures as inline SVG strings. Each function takes report data and returns one <svg> element.

Figures are built on matplotlib Figure objects, never pyplot, so nothing global accumulates and
no GUI backend is touched. Text stays text (svg.fonttype none): smaller files, selectable labels.
"""

from __future__ import annotations

import io
import itertools
import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import matplotlib as mpl
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

GIB = 2**30
MIB = 2**20
ACCOUNTED = ("weights", "grads", "optimizer", "activations")
_ids = itertools.count()


@contextmanager
def _style() -> Iterator[None]:
    with mpl.rc_context({**sns.axes_style("whitegrid"), **sns.plotting_context("notebook", font_scale=0.85),
                         "svg.fonttype": "none", "font.family": "DejaVu Sans"}):
        yield


def _svg(fig: Figure) -> str:
    # A distinct salt per figure keeps clip-path ids unique when several SVGs share one page.
    buf = io.StringIO()
    with mpl.rc_context({"svg.hashsalt": f"peftbench-fig{next(_ids)}"}):
        fig.savefig(buf, format="svg", bbox_inches="tight",
                    metadata={"Creator": None, "Date": None, "Format": None, "Type": None})
    text = buf.getvalue()
    return _point_titles(text[text.index("<svg"):])  # drop the XML declaration and DOCTYPE: not allowed inline


POINT_URL = "#peftbench-point:"
_POINT = re.compile(r'<a xlink:href="' + re.escape(POINT_URL) + r'([^"]*)"[^>]*>(.*?)</a>', re.S)


def label_points(collection, labels: Sequence[str]) -> None:
    """Name each point of a scatter collection (e.g. ax.collections[0] after sns.scatterplot), in
    the order of its data: the SVG gets a <g class="point"><title>label</title>…</g> per point,
    which the browser and the report's tooltip show on hover. Matplotlib writes a point's url as an
    <a> around it; _svg turns that into the titled group (the label is already XML-escaped there)."""
    collection.set_urls([POINT_URL + str(label) for label in labels])


def _point_titles(svg: str) -> str:
    return _POINT.sub(r'<g class="point"><title>\1</title>\2</g>', svg)


def memory_unit(max_bytes: float) -> tuple[float, str]:
    return (GIB, "GiB") if max_bytes >= GIB else (MIB, "MiB")


def _legend_outside(ax) -> None:
    if ax.get_legend() is not None:
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1.02, 1), frameon=False)


def pareto(points: pd.DataFrame, front: pd.DataFrame) -> str:
    """Peak memory against score, one point per config; the front joined by a step line."""
    with _style():
        models = list(dict.fromkeys(points["model"]))
        fig = Figure(layout="constrained", figsize=(7.5, 3.6 * len(models)))
        axes = fig.subplots(len(models), 1, squeeze=False)[:, 0]
        for ax, model in zip(axes, models):
            pts, fr = points[points["model"] == model], front[front["model"] == model]
            div, unit = memory_unit(pts["peak"].max())
            data = pts.assign(mem=pts["peak"] / div, pct=pts["score"] * 100)
            sns.scatterplot(data=data, x="mem", y="pct", hue="method", style="method", s=60, ax=ax)
            label_points(ax.collections[0], [f"{lab}: {pct:.1f}%, {mem:.2f} {unit}"
                                             for lab, pct, mem in zip(data["config_label"], data["pct"], data["mem"])])
            fr = fr.sort_values("peak")
            ax.step(fr["peak"] / div, fr["score"] * 100, where="post", color="black", lw=1, label="Pareto front")
            ax.set(xlabel=f"peak memory ({unit})", ylabel="score (%)", title=str(model))
            ax.legend()
            _legend_outside(ax)
        return _svg(fig)


def _errorbars(ax, data: pd.DataFrame, x: str, y: str, lo: str, hi: str, scale: float) -> None:
    ok = data.dropna(subset=[lo, hi])
    if not ok.empty:
        ax.errorbar(ok[x], ok[y] * scale, yerr=[(ok[y] - ok[lo]) * scale, (ok[hi] - ok[y]) * scale],
                    fmt="none", ecolor="0.3", elinewidth=1, capsize=3)


def rank_sweep(data: pd.DataFrame) -> str:
    """Score and peak memory against the LoRA rank, one line per variant (targets, optimizer, epochs)."""
    with _style():
        fig = Figure(layout="constrained", figsize=(11, 3.8))
        ax_s, ax_m = fig.subplots(1, 2)
        div, unit = memory_unit(data["peak"].max())
        scored = data.dropna(subset=["score"])
        if scored.empty:
            ax_s.text(0.5, 0.5, "no scores", ha="center", va="center", transform=ax_s.transAxes)
        else:
            sns.lineplot(data=scored.assign(pct=scored["score"] * 100), x="r", y="pct", hue="variant",
                         marker="o", errorbar=None, ax=ax_s, legend=False)
            _errorbars(ax_s, scored, "r", "score", "score_lo", "score_hi", 100)
        sns.lineplot(data=data.assign(mem=data["peak"] / div), x="r", y="mem", hue="variant", marker="o",
                     errorbar=None, ax=ax_m)
        for ax in (ax_s, ax_m):
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted(data["r"].unique()), labels=[f"{int(r)}" for r in sorted(data["r"].unique())])
        ax_s.set(xlabel="rank r (alpha in the table)", ylabel="score (%), 95% CI where seeds > 1")
        ax_m.set(xlabel="rank r", ylabel=f"peak memory ({unit})")
        _legend_outside(ax_m)
        return _svg(fig)


def paired_bars(data: pd.DataFrame, hue: str, panels: list[tuple[str, str]]) -> str:
    """One bar panel per measure; x = the shared setting, hue = the compared setting.
    panels: (column, axis label); memory columns (ending in _bytes) are scaled to MiB/GiB."""
    with _style():
        fig = Figure(layout="constrained", figsize=(4.2 * len(panels), 3.8))
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        for i, (ax, (col, label)) in enumerate(zip(axes, panels)):
            d = data.dropna(subset=[col])
            if d.empty:
                ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
                ax.set(title=label)
                continue
            if col.endswith("_bytes"):
                div, unit = memory_unit(d[col].max())
                d = d.assign(**{col: d[col] / div})
                label = f"{label} ({unit})"
            sns.barplot(data=d, x="setting", y=col, hue=hue, errorbar=None, ax=ax, legend=i == len(panels) - 1)
            ax.set(xlabel="", ylabel="", title=label)
            ax.tick_params(axis="x", rotation=30)
            for lab in ax.get_xticklabels():
                lab.set_horizontalalignment("right")
        _legend_outside(axes[-1])
        return _svg(fig)


def lines_by(data: pd.DataFrame, x: str, hue: str, panels: list[tuple[str, str]]) -> str:
    """Line panels against x (log2 scale), one line per hue value; for optimizer memory against r."""
    with _style():
        fig = Figure(layout="constrained", figsize=(5.2 * len(panels), 3.8))
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        for i, (ax, (col, label)) in enumerate(zip(axes, panels)):
            div, unit = memory_unit(data[col].max())
            sns.lineplot(data=data.assign(v=data[col] / div), x=x, y="v", hue=hue, style="variant", marker="o",
                         errorbar=None, ax=ax, legend=i == len(panels) - 1)
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted(data[x].unique()), labels=[f"{int(v)}" for v in sorted(data[x].unique())])
            ax.set(xlabel=x, ylabel=f"{label} ({unit})")
        _legend_outside(axes[-1])
        return _svg(fig)


def methods(best: pd.DataFrame) -> str:
    """The best config of each method: score and peak memory side by side."""
    with _style():
        fig = Figure(layout="constrained", figsize=(10, 0.5 * len(best) + 1.6))
        ax_s, ax_m = fig.subplots(1, 2, sharey=True)
        div, unit = memory_unit(best["peak"].max())
        order = list(best["method"])
        palette = dict(zip(order, sns.color_palette(n_colors=len(order))))
        sns.barplot(data=best.assign(pct=best["score"] * 100), y="method", x="pct", hue="method", order=order,
                    palette=palette, errorbar=None, ax=ax_s, legend=False)
        _hbar_ci(ax_s, best, order)
        sns.barplot(data=best.assign(mem=best["peak"] / div), y="method", x="mem", hue="method", order=order,
                    palette=palette, errorbar=None, ax=ax_m, legend=False)
        ax_s.set(xlabel="score (%), 95% CI where seeds > 1", ylabel="")
        ax_m.set(xlabel=f"peak memory ({unit})", ylabel="")
        return _svg(fig)


def _hbar_ci(ax, best: pd.DataFrame, order: list[str]) -> None:
    for i, m in enumerate(order):
        row = best[best["method"] == m].iloc[0]
        if not (pd.isna(row["score_lo"]) or pd.isna(row["score"])):
            ax.errorbar(row["score"] * 100, i, xerr=[[(row["score"] - row["score_lo"]) * 100],
                                                      [(row["score_hi"] - row["score"]) * 100]],
                        fmt="none", ecolor="0.2", capsize=3)


def breakdown(groups: pd.DataFrame) -> str:
    """Accounted memory as stacked bars per config, with the measured peak as a marker."""
    with _style():
        labels = list(groups["config_label"])
        fig = Figure(layout="constrained", figsize=(10, 0.32 * len(labels) + 1.4))
        ax = fig.subplots()
        top = max(groups[[f"{k}_bytes" for k in ACCOUNTED]].sum(axis=1).max(), groups["peak"].max())
        div, unit = memory_unit(top)
        left = pd.Series(0.0, index=groups.index)
        for part, colour in zip(ACCOUNTED, sns.color_palette("deep", len(ACCOUNTED))):
            width = groups[f"{part}_bytes"].fillna(0) / div
            ax.barh(labels, width, left=left, color=colour, label=part)
            left = left + width
        ax.scatter(groups["peak"] / div, labels, marker="|", s=200, color="black", label="measured peak", zorder=3)
        ax.invert_yaxis()
        ax.set(xlabel=f"memory ({unit})", ylabel="")
        ax.tick_params(axis="y", labelsize=7)
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), frameon=False)
        return _svg(fig)


MAX_LEGEND = 12


def loss_curves(curves: pd.DataFrame) -> str:
    """Training loss per step, one panel per method, one line per trial (seeds as separate lines)."""
    with _style():
        groups = list(dict.fromkeys(curves["method"]))
        cols = min(2, len(groups))
        rows = math.ceil(len(groups) / cols)
        fig = Figure(layout="constrained", figsize=(6.2 * cols, 3.4 * rows))
        axes = fig.subplots(rows, cols, squeeze=False).ravel()
        for ax, method in zip(axes, groups):
            d = curves[curves["method"] == method]
            many = d["trial"].nunique() > MAX_LEGEND
            sns.lineplot(data=d, x="step", y="loss", hue="trial", estimator=None, lw=1, alpha=0.8, ax=ax,
                         legend=not many)
            ax.set(title=f"{method} ({d['trial'].nunique()} trials{', legend omitted' if many else ''})",
                   xlabel="step", ylabel="training loss")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if not many:
                ax.legend(fontsize=6, frameon=False)
        for ax in axes[len(groups):]:
            ax.set_visible(False)
        return _svg(fig)

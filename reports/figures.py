"""Figures as inline SVG strings. Each function takes report data and returns one <svg> element.

Figures are built on matplotlib Figure objects, never pyplot, so nothing global accumulates and
no GUI backend is touched. Text stays text (svg.fonttype none): smaller files, selectable labels.
"""

from __future__ import annotations

import io
import itertools
import math
import re
import textwrap
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import matplotlib as mpl
import pandas as pd
import seaborn as sns
from matplotlib.collections import Collection
from matplotlib.container import Container
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from reports import blocks  # a module reference: blocks imports this module too

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


def name_mark(artist, label: str) -> None:
    """Name one plotted artist as a whole (a line, a bar, an error bar, every point of a collection alike);
    the same <g class="point"><title> as label_points. A container (errorbar, bar) names each of its parts."""
    parts = artist.get_children() if isinstance(artist, Container) else [artist]
    for part in parts:
        if isinstance(part, Collection):
            part.set_urls([POINT_URL + label])  # matplotlib cycles the urls over the collection's elements
        else:
            part.set_url(POINT_URL + label)


def lines_with_points(ax, data: pd.DataFrame, x: str, y: str, lines: Sequence[str], palette: dict, point: Callable[[str, pd.Series], str],
                      styled: bool = False) -> None:
    """One line per value of the column `line` (in the order of `lines`), each named, with its points drawn as a scatter
    on top so that each point carries its own name, point(line name, row). With `styled`, each line also gets its own
    marker and dash pattern (lines then differ without colour)."""
    for k, name in enumerate(lines):
        d = data[data["line"] == name].sort_values(x)
        if d.empty:
            continue
        marker = MARKERS[k % len(MARKERS)] if styled else "o"
        (line,) = ax.plot(d[x], d[y], color=palette[name], lw=1.5, ls=_DASHES[k % len(_DASHES)] if styled else "-", label=name)
        name_mark(line, str(name))
        coll = ax.scatter(d[x], d[y], color=palette[name], marker=marker, s=30, zorder=3)
        label_points(coll, [point(str(name), row) for _, row in d.iterrows()])


_DASHES = ("-", "--", ":", "-.")


def _point_titles(svg: str) -> str:
    return _POINT.sub(r'<g class="point"><title>\1</title>\2</g>', svg)


def memory_unit(max_bytes: float) -> tuple[float, str]:
    return (GIB, "GiB") if max_bytes >= GIB else (MIB, "MiB")


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "p", "h", "*")
LABEL_PT = 9  # the smallest text a figure may use


def colours(n: int) -> list:
    """n colours that never repeat up to 40: tab20 (paired light/dark hues), then tab20b; beyond 40 they cycle,
    and callers pair them with MARKERS so that (colour, marker) still tells points apart."""
    base = sns.color_palette("tab10" if n <= 10 else "tab20", 10 if n <= 10 else 20)
    if n > 20:
        base += sns.color_palette("tab20b", 20)
    return [base[i % len(base)] for i in range(n)]


def _natural_key(v) -> tuple:
    return blocks.natural_key(str(v))


def _natural(values) -> list:
    """Values in natural order: numbers as numbers (r=4 < r=8 < r=16 < r=64), text after."""
    return sorted(dict.fromkeys(values), key=_natural_key)


def _legend_below(ax, ncol: int, title: str | None = None) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=ncol, frameon=False,
                  fontsize=LABEL_PT, title=title, title_fontsize=LABEL_PT)


# The configuration axes a point's colour names, in the order they are spelled out.
FAMILY_AXES = ("method", "base", "targets", "optimizer", "epochs")


def family(points: pd.DataFrame) -> pd.Series:
    """Each configuration's method plus the settings other than the rank that vary among the points."""
    varying = [c for c in FAMILY_AXES[1:] if c in points and points[c].nunique(dropna=True) > 1]

    def name(row) -> str:
        bits = [f"{row[c]:g} ep" if c == "epochs" and not pd.isna(row[c]) else str(row[c])
                for c in varying if not pd.isna(row.get(c))]
        return " ".join([str(row["method"]), *bits])
    return points.apply(name, axis=1)


def pareto(points: pd.DataFrame, front: pd.DataFrame) -> str:
    """Peak memory against score, one point per config; the front joined by a step line. Colour: the
    method and every setting but the rank that varies; marker: the rank where one family has several.
    `front` (the caller's, per model) is recomputed per panel: panels split a model by task where it has several."""
    with _style():
        # One panel per model, and per task where a model was tuned on several (the surgical shifts): scores
        # on different tasks do not share an axis. The front is drawn per panel.
        split = "task" in points and (points.groupby("model")["task"].nunique() > 1).any()
        panel = points["model"].astype(str) + (": " + points["task"].astype(str) if split else "")
        models = _natural(panel)
        fams = family(points)
        names = _natural(fams)
        by_rank = "r" in points and (points.assign(f=fams).dropna(subset=["r"]).groupby("f")["r"].nunique() > 1).any()
        ranks = _natural(points["r"].dropna()) if by_rank else []
        entries = len(names) + len(ranks)
        ncol = 2 if max(map(len, names)) > 28 else 3
        legend_in = 0.25 * math.ceil(entries / ncol) + 0.6
        grid_cols = 2 if len(models) > 2 else 1
        grid_rows = math.ceil(len(models) / grid_cols)
        fig = Figure(layout="constrained", figsize=(9 * grid_cols, (4.2 + legend_in) * grid_rows))
        axes = fig.subplots(grid_rows, grid_cols, squeeze=False).ravel()
        for ax in axes[len(models):]:
            ax.set_visible(False)
        cols = dict(zip(names, colours(len(names))))
        for ax, model in zip(axes, models):
            pts = points[panel == model]
            fr = _front(pts)
            div, unit = memory_unit(pts["peak"].max())
            data = pts.assign(mem=pts["peak"] / div, pct=pts["score"] * 100, fam=fams.loc[pts.index])
            for i, name in enumerate(names):
                d = data[data["fam"] == name]
                if d.empty:
                    continue
                if by_rank:
                    # One collection per marker: the marker says the rank, the colour the family.
                    for r, g in d.groupby(d["r"].fillna(-1), sort=True):
                        marker = MARKERS[ranks.index(r) % len(MARKERS)] if r in ranks else "o"
                        coll = ax.scatter(g["mem"], g["pct"], color=cols[name], marker=marker, s=55, edgecolor="white",
                                          linewidth=0.5, zorder=3)
                        _title_points(coll, g, unit)
                    ax.fill_between([], [], color=cols[name], label=name)  # a colour patch: markers mean ranks here
                else:
                    coll = ax.scatter(d["mem"], d["pct"], color=cols[name], marker=MARKERS[i % len(MARKERS)], s=55,
                                      edgecolor="white", linewidth=0.5, zorder=3, label=name)
                    _title_points(coll, d, unit)
            for r in ranks:
                ax.scatter([], [], color="0.35", marker=MARKERS[ranks.index(r) % len(MARKERS)], s=55, label=f"r={int(r)}")
            fr = fr.sort_values("peak")
            (step,) = ax.step(fr["peak"] / div, fr["score"] * 100, where="post", color="black", lw=1, label="Pareto front", zorder=2)
            name_mark(step, f"Pareto front of {model}: " + ", ".join(map(str, fr["config_label"])))
            ax.set(xlabel=f"peak memory ({unit})", ylabel="score (%)", title=str(model))
            _legend_below(ax, ncol)
        return _svg(fig)


def _front(pts: pd.DataFrame) -> pd.DataFrame:
    """Configurations that no other in the panel beats on both score (higher) and peak memory (lower)."""
    keep, best = [], -math.inf
    for idx, row in pts.sort_values(["peak", "score"], ascending=[True, False]).iterrows():
        if row["score"] > best:
            keep.append(idx)
            best = row["score"]
    return pts.loc[keep]


def _title_points(collection, d: pd.DataFrame, unit: str) -> None:
    label_points(collection, [f"{lab}: {pct:.1f}%, {mem:.2f} {unit}" for lab, pct, mem in zip(d["config_label"], d["pct"], d["mem"])])


def _errorbars(ax, data: pd.DataFrame, x: str, y: str, lo: str, hi: str, scale: float) -> None:
    """One named 95% interval per row with both ends (the row's `line` and x name it)."""
    for _, row in data.dropna(subset=[lo, hi]).iterrows():
        bar = ax.errorbar([row[x]], [row[y] * scale], yerr=[[(row[y] - row[lo]) * scale], [(row[hi] - row[y]) * scale]],
                          fmt="none", ecolor="0.3", elinewidth=1, capsize=3)
        name_mark(bar, f"{row['line']}, {x}={row[x]:g}: 95% CI {row[lo] * scale:.1f} to {row[hi] * scale:.1f}")


def rank_sweep(data: pd.DataFrame) -> str:
    """Score and peak memory against the LoRA rank, one line per variant (targets, optimizer, epochs);
    one row of panels per `facet` value (the base) when the data has that column with several values."""
    with _style():
        facets = _natural(data["facet"]) if "facet" in data else [""]
        variants = _natural(data["variant"])
        pal = dict(zip(variants, colours(len(variants))))
        fig = Figure(layout="constrained", figsize=(11, 3.4 * len(facets) + 0.3 * math.ceil(len(variants) / 2)))
        grid = fig.subplots(len(facets), 2, squeeze=False)
        div, unit = memory_unit(data["peak"].max())
        ticks = sorted(data["r"].unique())
        for row, facet in enumerate(facets):
            ax_s, ax_m = grid[row]
            d = data[data["facet"] == facet] if "facet" in data else data
            where = f"{facet}: " if facet else ""
            scored = d.dropna(subset=["score"])
            if scored.empty:
                ax_s.text(0.5, 0.5, "no scores", ha="center", va="center", transform=ax_s.transAxes)
            else:
                scored = scored.assign(pct=scored["score"] * 100, line=scored["variant"])
                lines_with_points(ax_s, scored, "r", "pct", variants, pal, lambda v, p: f"{where}{v}, r={p['r']:g}: score {p['pct']:.1f}%")
                _errorbars(ax_s, scored, "r", "score", "score_lo", "score_hi", 100)
            lines_with_points(ax_m, d.assign(mem=d["peak"] / div, line=d["variant"]), "r", "mem", variants, pal,
                              lambda v, p: f"{where}{v}, r={p['r']:g}: peak {p['mem']:.2f} {unit}")
            ax_m.set_ylim(bottom=0)  # memory from zero: no truncated axis exaggerates a few percent
            for ax in (ax_s, ax_m):
                ax.set_xscale("log", base=2)
                ax.set_xticks(ticks, labels=[f"{int(r)}" for r in ticks])
                ax.minorticks_off()
            ax_s.set(xlabel="rank r (alpha in the table)", ylabel="score (%), 95% CI if seeds > 1", title=f"{where}score")
            ax_m.set(xlabel="rank r", ylabel=f"peak memory ({unit})", title=f"{where}peak memory")
        handles, labels = grid[-1][1].get_legend_handles_labels()
        if handles:
            fig.legend(handles, labels, loc="outside lower center", ncol=2, frameon=False, fontsize=LABEL_PT)
        return _svg(fig)


def _lines(text: str, n: int) -> str:
    rows = text.split("\n")
    return text if len(rows) <= n else "\n".join(rows[: n - 1] + [rows[n - 1] + "…"])


def _wrap(text: str, width: int = 34) -> str:
    return "\n".join(textwrap.wrap(str(text), width)) or str(text)


def paired_bars(data: pd.DataFrame, hue: str, panels: list[tuple[str, str]]) -> str:
    """One panel per measure, the shared setting on the y axis (long labels stay readable), one point per
    side of the comparison (hue). Points, not bars: a score axis need not start at zero to be honest,
    and it shows 78-83% differences that bars from zero hide. Trainable parameters on a log axis;
    memory columns (ending in _bytes) are scaled to MiB/GiB and start at zero."""
    with _style():
        order = _natural(data["setting"])
        fig = Figure(layout="constrained", figsize=(4.3 * len(panels) + 1.5, 0.32 * len(order) + 1.6))
        axes = fig.subplots(1, len(panels), squeeze=False, sharey=True)[0]
        levels = _natural(data[hue].astype(str))
        pal = dict(zip(levels, colours(len(levels))))
        for i, (ax, (col, label)) in enumerate(zip(axes, panels)):
            d = data.dropna(subset=[col])
            # d's own column: assigning data's would align on the index and bring the dropped rows back
            d = d.assign(**{hue: d[hue].astype(str)})
            if d.empty:
                ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
                ax.set(title=label)
                continue
            if col.endswith("_bytes"):
                div, unit = memory_unit(d[col].max())
                d = d.assign(**{col: d[col] / div})
                label = f"{label} ({unit})"
            unit_text = f" {unit}" if col.endswith("_bytes") else ""
            for k, level in enumerate(levels):
                dd = d[d[hue] == level]
                coll = ax.scatter(dd[col], [order.index(v) for v in dd["setting"]], color=pal[level],
                                  marker=MARKERS[k % len(MARKERS)], s=40, label=level, zorder=3)
                label_points(coll, [f"{setting}, {hue} {level}: {label} {v:.3g}{unit_text}" for setting, v in zip(dd["setting"], dd[col])])
            if col.startswith("params."):
                ax.set_xscale("log")
                ax.margins(x=0.08)  # markers at the extremes stay whole inside the axes
            elif col.endswith("_bytes"):
                ax.set_xlim(left=0, right=d[col].max() * 1.08)
            ax.set(xlabel="", ylabel="", title=label)
            ax.set_yticks(range(len(order)), labels=[_wrap(o) for o in order])
            ax.set_ylim(len(order) - 0.5, -0.5)
            ax.tick_params(axis="y", labelsize=LABEL_PT)
            if i == len(panels) - 1:
                ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), frameon=False, fontsize=LABEL_PT, title=hue,
                          title_fontsize=LABEL_PT)
        return _svg(fig)


def lines_by(data: pd.DataFrame, x: str, hue: str, panels: list[tuple[str, str]]) -> str:
    """Line panels against x (log2 scale), one line per hue value; for optimizer memory against r."""
    with _style():
        fig = Figure(layout="constrained", figsize=(5.2 * len(panels) + 1.5, 3.8))
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        for ax, (col, label) in zip(axes, panels):
            div, unit = memory_unit(data[col].max())
            d = data.assign(v=data[col] / div, line=data[hue].astype(str) + ", " + data["variant"].astype(str))
            names = _natural(d["line"])
            lines_with_points(ax, d, x, "v", names, dict(zip(names, colours(len(names)))),
                              lambda n, p: f"{n}, {x}={p[x]:g}: {label} {p['v']:.2f} {unit}", styled=True)
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted(data[x].unique()), labels=[f"{int(v)}" for v in sorted(data[x].unique())])
            ax.minorticks_off()
            ax.set_ylim(bottom=0)
            ax.set(xlabel=x, ylabel=f"{label} ({unit})")
        axes[-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1), frameon=False, fontsize=LABEL_PT)
        return _svg(fig)


def methods(best: pd.DataFrame) -> str:
    """The best config of each method: score (a point with its 95% CI; the axis spans the scores, not
    zero to them) and peak memory (bars from zero) side by side."""
    with _style():
        fig = Figure(layout="constrained", figsize=(10, 0.36 * len(best) + 1.6))
        ax_s, ax_m = fig.subplots(1, 2, sharey=True)
        div, unit = memory_unit(best["peak"].max())
        order = list(best["method"])
        palette = dict(zip(order, colours(len(order))))
        ys = range(len(order))
        dots = ax_s.scatter(best["score"] * 100, ys, c=[palette[m] for m in order], s=45, zorder=3)
        label_points(dots, [f"{m}: best score {v * 100:.1f}%" for m, v in zip(order, best["score"])])
        _hbar_ci(ax_s, best, order)
        bars = ax_m.barh(list(ys), best["peak"] / div, color=[palette[m] for m in order])
        for bar, m, v in zip(bars, order, best["peak"] / div):
            name_mark(bar, f"{m}: peak memory {v:.2f} {unit}")
        ax_s.set_yticks(list(ys), labels=order)
        ax_s.set_ylim(len(order) - 0.5, -0.5)
        ax_s.tick_params(axis="y", labelsize=LABEL_PT)
        ax_s.set(xlabel="score (%), 95% CI where seeds > 1", ylabel="")
        ax_m.set(xlabel=f"peak memory ({unit})", ylabel="")
        return _svg(fig)


def _hbar_ci(ax, best: pd.DataFrame, order: list[str]) -> None:
    for i, m in enumerate(order):
        row = best[best["method"] == m].iloc[0]
        if not (pd.isna(row["score_lo"]) or pd.isna(row["score"])):
            bar = ax.errorbar(row["score"] * 100, i, xerr=[[(row["score"] - row["score_lo"]) * 100],
                                                            [(row["score_hi"] - row["score"]) * 100]],
                              fmt="none", ecolor="0.2", capsize=3)
            name_mark(bar, f"{m}: 95% CI {row['score_lo'] * 100:.1f} to {row['score_hi'] * 100:.1f}%")


def breakdown(groups: pd.DataFrame) -> str:
    """Accounted memory as stacked bars per config, with the measured peak as a marker; one panel per
    model, each in its own unit (a CNN's megabytes vanish on a language model's gigabyte axis). Labels
    are abbreviated (defaults dropped) and wrapped, at a readable size."""
    with _style():
        models = list(dict.fromkeys(groups["model"])) if "model" in groups else [None]
        parts = [groups[groups["model"] == m] if m is not None else groups for m in models]
        # At most three lines a label (the full one is in the table below the figure); bars are evenly spaced,
        # so each gets the room of the panel's tallest label and no two labels overlap.
        labels = [[_lines(_wrap(blocks.short_label(str(lab), limit=0), 64), 3) for lab in g["config_label"]] for g in parts]
        heights = [len(ls) * (0.19 * max(lab.count("\n") + 1 for lab in ls) + 0.14) + 0.9 for ls in labels]
        fig = Figure(layout="constrained", figsize=(12, sum(heights) + 0.5))
        axes = fig.subplots(len(parts), 1, squeeze=False, gridspec_kw={"height_ratios": heights})[:, 0]
        for ax, g, ls, model in zip(axes, parts, labels, models):
            top = max(g[[f"{k}_bytes" for k in ACCOUNTED]].sum(axis=1).max(), g["peak"].max())
            div, unit = memory_unit(top)
            ys = list(range(len(ls)))
            left = pd.Series(0.0, index=g.index)
            for part, colour in zip(ACCOUNTED, sns.color_palette("deep", len(ACCOUNTED))):
                width = g[f"{part}_bytes"].fillna(0) / div
                bars = ax.barh(ys, width, left=left, color=colour, label=part)
                for bar, config, w in zip(bars, g["config_label"], width):
                    name_mark(bar, f"{config}: {part} {w:.3g} {unit}")
                left = left + width
            peaks = ax.scatter(g["peak"] / div, ys, marker="|", s=200, color="black", label="measured peak", zorder=3)
            label_points(peaks, [f"{config}: measured peak {v:.3g} {unit}" for config, v in zip(g["config_label"], g["peak"] / div)])
            ax.set_yticks(ys, labels=ls)
            ax.set_ylim(len(ls) - 0.5, -0.5)
            ax.set_xlim(left=0, right=top / div * 1.04)
            ax.set(xlabel=f"memory ({unit})", ylabel="", title=str(model) if len(parts) > 1 else "")
            ax.tick_params(axis="y", labelsize=LABEL_PT)
        axes[0].legend(loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False, fontsize=LABEL_PT)
        return _svg(fig)


MAX_LEGEND = 12


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _trial_names(trials: list[str]) -> dict[str, str]:
    """Legend names for the trials of one panel: the id and only the settings that differ between them
    (what they share is in the panel's title), abbreviated."""
    tokens = {t: [x for x in re.split(r"[(),\s]+", blocks.short_label(t, limit=0)) if x] for t in trials}
    if len(trials) < 2:
        return {t: blocks.short_label(t, limit=0) for t in trials}
    common = set.intersection(*(set(v[1:]) for v in tokens.values()))
    return {t: _cut(" ".join([v[0], *(x for x in v[1:] if x not in common)]), 60) for t, v in tokens.items()}


MAX_PANELS = 8  # loss panels split by the varying settings only while there are at most this many


def loss_panels(curves: pd.DataFrame) -> pd.Series:
    """Each curve's panel: its method, then the varying settings (base, targets, optimizer, epochs) added in
    turn while the panels stay at most MAX_PANELS, so that a panel holds few enough trials to name them."""
    chosen: list[str] = []
    for col in FAMILY_AXES[1:]:
        if col not in curves or curves[col].nunique(dropna=True) < 2:
            continue
        trial = [*chosen, col]
        if curves.assign(_p=_panel_names(curves, trial))["_p"].nunique() > MAX_PANELS:
            break
        chosen = trial
    return _panel_names(curves, chosen)


def _panel_names(curves: pd.DataFrame, cols: list[str]) -> pd.Series:
    def name(row) -> str:
        bits = [f"{row[c]:g} ep" if c == "epochs" and not pd.isna(row[c]) else str(row[c]) for c in cols if not pd.isna(row.get(c))]
        return " ".join([str(row["method"]), *bits])
    return curves.apply(name, axis=1)


def loss_curves(curves: pd.DataFrame) -> str:
    """Training loss per step, one line per trial (seeds as separate lines), one panel per method and the
    settings that split it into nameable groups (loss_panels). A panel's legend sits under it, inside its
    own grid cell, so it never covers the neighbouring panel; single-trial panels need none (the title names it)."""
    with _style():
        curves = curves.assign(panel=loss_panels(curves))
        groups = _natural(curves["panel"])
        sizes = {g: curves.loc[curves["panel"] == g, "trial"].nunique() for g in groups}
        cols = 4 if max(sizes.values()) <= 1 and len(groups) > 4 else 3 if len(groups) > MAX_PANELS else min(2, len(groups))
        rows = math.ceil(len(groups) / cols)
        legend_rows = [max((min(sizes[g], MAX_LEGEND) for g in groups[i * cols:(i + 1) * cols]), default=0) for i in range(rows)]
        base_h = 2.6 if cols == 4 else 3.0
        heights = [base_h + (0.22 * n + 0.4 if n > 1 else 0) for n in legend_rows]
        fig = Figure(layout="constrained", figsize=(13 if cols > 1 else 6.4, sum(heights)))
        axes = fig.subplots(rows, cols, squeeze=False, gridspec_kw={"height_ratios": heights}).ravel()
        for ax, panel in zip(axes, groups):
            d = curves[curves["panel"] == panel]
            n = sizes[panel]
            many = n > MAX_LEGEND
            names = _trial_names(list(d["trial"].unique()))
            d = d.assign(trial=d["trial"].map(names))
            order = sorted(d["trial"].unique(), key=lambda t: _natural_key(t.split(" ", 1)[-1]))  # by configuration, not id
            for trial, colour in zip(order, colours(len(order))):
                t = d[d["trial"] == trial].sort_values("step")
                (line,) = ax.plot(t["step"], t["loss"], color=colour, lw=1, alpha=0.85, label=trial)
                name_mark(line, f"{panel}: {trial}, final loss {t['loss'].iloc[-1]:.3g}")
            width = 46 if cols > 2 else 80
            if n == 1:
                title = _wrap(_cut(f"{panel}: {order[0].split(' ', 1)[-1]}", 3 * width), width)
            else:
                title = f"{panel} ({n} trials{', legend omitted' if many else ''})"
            ax.set(title=title, xlabel="step", ylabel="training loss")
            ax.title.set_fontsize(LABEL_PT)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if 1 < n <= MAX_LEGEND:
                ax.legend(loc="upper left", bbox_to_anchor=(0, -0.22), fontsize=LABEL_PT, frameon=False, ncol=1)
        for ax in axes[len(groups):]:
            ax.set_visible(False)
        return _svg(fig)

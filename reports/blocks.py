"""Report building blocks: sections made of paragraphs, tables and figures, and the cell formatting
that turns measured values into text. Formatting lives here so that the template only lays out."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from reports import figures, stats


@dataclass
class Cell:
    text: str
    sort: float | str = ""
    pre: bool = False  # keep line breaks (error messages)
    title: str = ""  # shown on hover: the full text of an abbreviated cell


@dataclass
class Table:
    columns: list[str]
    rows: list[list[Cell]]
    caption: str = ""
    filterable: bool = False
    row_class: list[str] = field(default_factory=list)
    facets: list[str] = field(default_factory=list)  # columns that get a drop-down filter
    details: list[dict[str, Any]] = field(default_factory=list)  # per row: the drill-down (see trial_detail)
    csv: str = ""  # file name of the CSV download of the visible rows; "" for none
    collapsed: bool = False  # inside a <details> element, closed


@dataclass
class Block:
    kind: str  # "p", "note", "table", "figure", "published"
    text: str = ""
    table: Table | None = None
    svg: str = ""
    cite: str = ""


@dataclass
class Section:
    id: str
    title: str
    blocks: list[Block] = field(default_factory=list)

    def p(self, text: str) -> None:
        self.blocks.append(Block("p", text))

    def note(self, text: str) -> None:
        self.blocks.append(Block("note", text))

    def table(self, table: Table) -> None:
        self.blocks.append(Block("table", table=table))

    def figure(self, svg: str, caption: str) -> None:
        self.blocks.append(Block("figure", text=caption, svg=svg))

    def published(self, table: Table, cite: str) -> None:
        self.blocks.append(Block("published", table=table, cite=cite))

    @property
    def has_data(self) -> bool:
        """A table of results with rows, or a figure. Text and published tables alone do not count:
        a section without results of its own is left out of the page (the template closes it away)."""
        return any((b.kind == "table" and b.table is not None and b.table.rows) or b.kind == "figure" for b in self.blocks)


def missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def c_text(v: Any) -> Cell:
    return Cell("—", "") if missing(v) else Cell(str(v), v if isinstance(v, int | float) else str(v))


# A number inside text, decimals and exponents whole (lr=2.05e-06 is one number, not 2.05 then 6); the
# report script's NUMBER (templates/report.html.j2) is the same pattern.
NUMBER = re.compile(r"(\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)")
# Settings a label spells out that say nothing a reader needs (defaults, empty values).
_NOISE = re.compile(r"^(dropout=0(\.0)?|rslora=False|[a-z_]+=(None)?)$")
SHORT_LABEL = 64  # characters; the full label is on hover


def natural_key(text: str) -> tuple:
    """Sort key with numbers compared as numbers: r=4 < r=8 < r=16 < r=64, lr=2.05e-06 < lr=0.00274 < lr=0.0115."""
    return tuple((0, float(p), "") if i % 2 else (1, 0.0, p) for i, p in enumerate(NUMBER.split(text)) if p)


def short_label(label: str, limit: int = SHORT_LABEL) -> str:
    """A trial label without its default settings: 'lora(r=16,alpha=32,dropout=0.0,targets=qv,rslora=False) adamw ep2'
    reads 'lora(r=16, α=32, qv) adamw ep2'; cut at `limit` characters (0: never)."""
    head, paren, rest = label.partition("(")
    if paren and ")" in rest:
        inner, _, tail = rest.partition(")")
        parts = [p.strip() for p in inner.split(",")]
        parts = [p.removeprefix("targets=").replace("alpha=", "α=") for p in parts if p and not _NOISE.match(p)]
        label = f"{head}({', '.join(parts)}){tail}"
    return label if not limit or len(label) <= limit else label[: limit - 1] + "…"


def c_config(label: Any, limit: int = SHORT_LABEL) -> Cell:
    """A configuration label, abbreviated, the full label on hover; sorted with numbers as numbers."""
    if missing(label):
        return Cell("—", "")
    return Cell(short_label(str(label), limit), str(label), title=str(label))


def c_int(v: Any) -> Cell:
    return Cell("—", "") if missing(v) else Cell(f"{int(v):,}", float(v))


def c_bytes(v: Any) -> Cell:
    if missing(v):
        return Cell("—", "")
    div, unit = figures.memory_unit(v)
    return Cell(f"{v / div:,.2f} {unit}" if unit == "GiB" else f"{v / div:,.0f} {unit}", float(v))


def c_num(v: Any, digits: int = 1, unit: str = "") -> Cell:
    return Cell("—", "") if missing(v) else Cell(f"{v:,.{digits}f}{unit}", float(v))


def c_signed(v: Any, unit: str = "%") -> Cell:
    return Cell("—", "") if missing(v) else Cell(f"{v:+.1f}{unit}", float(v))


def c_pct(v: Any) -> Cell:
    """A fraction (0.859) as a percentage."""
    return Cell("—", "") if missing(v) else Cell(f"{100 * v:.1f}%", float(v))


def c_change(new: Any, old: Any) -> Cell:
    if missing(new) or missing(old) or not old:
        return Cell("—", "")
    change = 100 * (new / old - 1)
    return Cell(f"{change:+.1f}%", change)


def c_score(values: list[float]) -> Cell:
    """Mean score with a 95% t interval, or the plain statement that there is a single seed."""
    est = stats.estimate(values)
    if est is None:
        return Cell("no score", "")
    if not est.has_ci:
        return Cell(f"{100 * est.mean:.1f}% (single seed, no CI)", est.mean)
    half = 100 * (est.hi - est.mean)
    return Cell(f"{100 * est.mean:.1f} ± {half:.1f}% (n={est.n}, 95% CI)", est.mean)


def c_mem(values: list[float]) -> Cell:
    est = stats.estimate(values)
    if est is None:
        return Cell("—", "")
    cell = c_bytes(est.mean)
    if est.has_ci:
        div, unit = figures.memory_unit(est.mean)
        half = (est.hi - est.mean) / div
        cell.text += f" ± {half:.2f} (n={est.n})" if round(half, 2) else f" (n={est.n}, no spread)"
    return cell


def published_table(rows: list[dict[str, Any]], columns: dict[str, str]) -> Table:
    """Rows from published.toml; columns maps a key to a header."""
    out = []
    for row in rows:
        cells = []
        for key in columns:
            v = row.get(key)
            if isinstance(v, int | float):
                # As published: every digit kept (10,059.53 s, not 1.006e+04).
                cells.append(Cell(f"{v:,}", float(v)))
            else:
                cells.append(c_text(v))
        out.append(cells)
    return Table(list(columns.values()), out)


def cite(pub: dict, key: str) -> str:
    src = pub["sources"][key]
    return src["cite"] + (f" — {src['setup']}" if src.get("setup") else "")

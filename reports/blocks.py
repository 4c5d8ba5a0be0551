"""Report building blocks: sections made of paragraphs, tables and figures, and the cell formatting
that turns measured values into text. Formatting lives here so that the template only lays out."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from reports import figures, stats


@dataclass
class Cell:
    text: str
    sort: float | str = ""
    pre: bool = False  # keep line breaks (error messages)


@dataclass
class Table:
    columns: list[str]
    rows: list[list[Cell]]
    caption: str = ""
    filterable: bool = False
    row_class: list[str] = field(default_factory=list)


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


def missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def c_text(v: Any) -> Cell:
    return Cell("—", "") if missing(v) else Cell(str(v), v if isinstance(v, int | float) else str(v))


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
                cells.append(Cell(f"{v:,}" if isinstance(v, int) else f"{v:g}", float(v)))
            else:
                cells.append(c_text(v))
        out.append(cells)
    return Table(list(columns.values()), out)


def cite(pub: dict, key: str) -> str:
    src = pub["sources"][key]
    return src["cite"] + (f" — {src['setup']}" if src.get("setup") else "")

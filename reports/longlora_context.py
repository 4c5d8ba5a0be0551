"""benchmarks/longlora_context.py's records: LongLoRA's S²-Attn against full attention per context length,
as a report section and as the Markdown table the README shows (no torch here: reports never import it).

    python benchmarks/longlora_context.py --markdown results/reference/perf/longlora_context.json
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from reports.blocks import Cell, Section, Table, c_int, c_num
from reports.results import BENCHMARK_KEY, ResultFileError

NAME = "longlora_context"
"""The benchmark's tag in its JSON (reports.results.BENCHMARK_KEY)."""
SPARSE, FULL = "s2", "full"
COMMAND = "python benchmarks/longlora_context.py --json FILE"
MIB = 2**20

_REQUIRED: dict[str, tuple[str, ...]] = {
    "config": ("model", "device", "dtype", "rank", "group_size_ratio", "attn_implementation", "max_position_embeddings"),
    "env": ("device", "threads"),
    "text": ("source", "tokens_available", "repeated"),
}
_ROW = ("length", "group_size", "rope_factor", "reps", "variants")


def check(record: Any, source: str) -> dict[str, Any]:
    """The record if it has every key the table reads; else a ResultFileError naming the source and the key."""
    if not isinstance(record, dict) or record.get(BENCHMARK_KEY) != NAME:
        raise ResultFileError(f"{source}: not a {NAME} record (its {BENCHMARK_KEY!r} key is not {NAME!r})")
    for part, keys in _REQUIRED.items():
        if not isinstance(record.get(part), dict):
            raise ResultFileError(f"{source}: key {part!r} missing")
        for key in keys:
            if key not in record[part]:
                raise ResultFileError(f"{source}: key {part}.{key} missing")
    if not isinstance(record.get("rows"), list):
        raise ResultFileError(f"{source}: key 'rows' missing (a list, one entry per length)")
    for i, row in enumerate(record["rows"]):
        for key in _ROW:
            if not isinstance(row, dict) or key not in row:
                raise ResultFileError(f"{source}: key rows[{i}].{key} missing")
        for v in (SPARSE, FULL):
            variant = row["variants"].get(v)
            if not isinstance(variant, dict) or "status" not in variant:
                raise ResultFileError(f"{source}: key rows[{i}].variants.{v}.status missing")
            need = ("peak_delta_bytes", "saved_bytes", "step_s_median", "attention_kernels") if variant["status"] == "ok" else ()
            for key in need:
                if key not in variant:
                    raise ResultFileError(f"{source}: key rows[{i}].variants.{v}.{key} missing")
    return record


def read(path: str | Path) -> dict[str, Any]:
    """A recorded run from its JSON file; a ResultFileError names the file and what is wrong."""
    try:
        record = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ResultFileError(f"{path}: cannot read ({exc.strerror})") from None
    except ValueError as exc:
        raise ResultFileError(f"{path}: not JSON ({exc})") from None
    return check(record, str(path))


def _ratio(a: float | None, b: float | None) -> Cell:
    return c_num(a / b, 2, "x") if a is not None and b else Cell("—", "")


def _mib(v: float | None) -> Cell:
    return c_num(v / MIB, 0, " MiB") if v is not None else Cell("—", "")


def _kernels_match(row: dict[str, Any]) -> Cell:
    kernels = [row["variants"][v].get("attention_kernels") for v in (SPARSE, FULL)]
    if any(k is None for k in kernels):
        return Cell("—", "")
    return Cell("same") if kernels[0] == kernels[1] else Cell("differ: " + " vs ".join(", ".join(k) for k in kernels))


COLUMNS = ["length", "group", "S²-Attn step", "full step", "S²/full time", "S²-Attn peak", "full peak", "S²/full memory",
           "saved for backward (S² / full)", "attention kernel"]


def table_rows(record: dict[str, Any]) -> list[list[Cell]]:
    """One row per length: median step time, peak memory above the loaded model, their S²/full ratios,
    the bytes autograd saves for backward, and whether both variants called the same attention kernel."""
    rows = []
    for row in record["rows"]:
        s, f = row["variants"][SPARSE], row["variants"][FULL]

        def step(v: dict[str, Any]) -> Cell:
            return c_num(v["step_s_median"], 2, " s") if v["status"] == "ok" else Cell(v["status"])

        def ok(v: dict[str, Any], key: str) -> float | None:
            return v[key] if v["status"] == "ok" else None

        saved = (Cell(f"{_mib(ok(s, 'saved_bytes')).text} / {_mib(ok(f, 'saved_bytes')).text}", ok(s, "saved_bytes") or "")
                 if s["status"] == "ok" or f["status"] == "ok" else Cell("—", ""))
        rows.append([c_int(row["length"]), c_int(row["group_size"]), step(s), step(f),
                     _ratio(ok(s, "step_s_median"), ok(f, "step_s_median")),
                     _mib(ok(s, "peak_delta_bytes")), _mib(ok(f, "peak_delta_bytes")),
                     _ratio(ok(s, "peak_delta_bytes"), ok(f, "peak_delta_bytes")), saved, _kernels_match(row)])
    return rows


def describe(record: dict[str, Any]) -> str:
    """What was run, in one paragraph: model, adapter, device, repetitions, text, positions, kernels."""
    c, e, t = record["config"], record["env"], record["text"]
    reps = sorted({r["reps"] for r in record["rows"]})
    factors = {r["length"]: r["rope_factor"] for r in record["rows"] if r["rope_factor"] != 1.0}
    kernels = sorted({k for r in record["rows"] for v in r["variants"].values() for k in v.get("attention_kernels") or ()})
    positions = (f"lengths past max_position_embeddings {c['max_position_embeddings']:,} use LongLoRA's position interpolation "
                 f"(linear RoPE scaling: {', '.join(f'{n:,} tokens x1/{f:g}' for n, f in factors.items())})" if factors else
                 f"every length fits max_position_embeddings {c['max_position_embeddings']:,}: positions are not interpolated")
    text = (f"{t['source']}, {t['tokens_available']:,} tokens available"
            + (", repeated to reach the longest length" if t["repeated"] else ", no repetition"))
    return (f"{c['model']}, batch 1, LongLoRA r={c['rank']} on q, k, v, o plus embeddings and norms, AdamW; S²-Attn groups of "
            f"{c['group_size_ratio']:g} x the length, half the heads shifted; full = the same trainables with the model's "
            f"{c['attn_implementation']} attention. {e['device']} ({c['device']}), {c['dtype']}, {e['threads']} torch threads; "
            f"one untimed warm-up step then {'/'.join(map(str, reps))} timed step(s) per variant, interleaved; step = median. "
            f"Peak = memory above the loaded model over a step at the length with AdamW's state allocated, each variant in its "
            f"own process "
            f"({'torch.cuda.max_memory_allocated' if str(c['device']).startswith('cuda') else 'resident-set high-water mark'}). "
            f"Text: {text}; {positions}. Attention kernels called: {', '.join(kernels) or 'none recorded'}.")


def markdown(record: dict[str, Any]) -> str:
    """The table as Markdown, with the paragraph that says what was run under it."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell.text for cell in row) + " |" for row in table_rows(record)]
    return "\n".join(lines) + "\n\n" + describe(record)


def memory_line(length: int, variants: dict[str, dict[str, Any]]) -> str:
    """One length's peak memory per variant as the benchmark prints it before timing."""
    return f"  {length:>6,} tokens: peak " + ", ".join(
        f"{v} " + (f"+{m['peak_delta_bytes'] / MIB:,.0f} MiB" if m["status"] == "ok" else f"{m['status']} ({m.get('error', '')})")
        for v, m in variants.items())


def progress_line(row: dict[str, Any]) -> str:
    """One length's figures as the benchmark prints them while it runs."""
    parts = []
    for v in (SPARSE, FULL):
        m = row["variants"][v]
        if m["status"] != "ok":
            parts.append(f"{v} {m['status']}: {m.get('error', '')}")
        else:
            parts.append(f"{v} step {m['step_s_median']:.2f} s (min {m['step_s_min']:.2f}) peak +{m['peak_delta_bytes'] / MIB:,.0f} MiB")
    return f"  {row['length']:>6,} tokens (groups of {row['group_size']:,}): " + "; ".join(parts)


def section(records: dict[str, list[dict[str, Any]]]) -> Section:
    """Every longlora_context record in the folders, one table each."""
    s = Section("longlora-context", "LongLoRA at long context: S²-Attn against full attention")
    runs = records.get(NAME, [])
    if not runs:
        s.p(f"No LongLoRA context records in these folders: run {COMMAND} (benchmarks/README.md) and pass its folder to the report.")
        return s
    s.p("LongLoRA's point (Chen et al. 2023, arXiv 2309.12307) is training at long context: S²-Attn attends within groups of "
        "a quarter of the sequence, so it computes a quarter of full attention's scores; the projections, MLP, LM head and "
        "optimizer cost the same in both variants, so the step-time ratio falls towards that quarter only as attention's "
        "share of the step grows with the length.")
    for run in runs:
        try:
            check(run, run.get("path", NAME))
        except ResultFileError as exc:
            s.note(f"Not shown: {exc}")
            continue
        s.p(f"{run['path']}: {describe(run)}")
        s.table(Table(COLUMNS, table_rows(run), caption="Median step time and peak memory per context length, S²-Attn and "
                                                       "full attention side by side in one run (ratios below 1: S²-Attn cheaper)"))
    return s

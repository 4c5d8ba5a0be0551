"""Render result folders into one self-contained HTML file (inline SVG, CSS and script; no network).

    python -m reports.render RESULTS_DIR... [--reference REF_DIR] [--floor PATH...] [-o FILE.html]
    peftbench report RESULTS_DIR... [--reference REF_DIR] [--floor PATH...] [-o FILE.html]
    python -m reports.render --index [DIR]     # DIR/index.html linking every report in DIR (default reports)
"""

from __future__ import annotations

import argparse
import html as html_lib
import re
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path

import jinja2

from reports import reference as reference_run
from reports import results, sections, utilization

HERE = Path(__file__).resolve().parent
PUBLISHED = HERE / "published.toml"
TEMPLATE = "report.html.j2"


def published() -> dict:
    with open(PUBLISHED, "rb") as f:
        return tomllib.load(f)


def default_output(folders: Sequence[str | Path]) -> Path:
    """reports/<folder name>.html, relative to the working directory (the checkout under nox)."""
    return Path("reports") / ("+".join(Path(f).resolve().name for f in folders) + ".html")


def html(folders: Sequence[str | Path], reference: str | Path | None = None, floor: Sequence[str | Path] = ()) -> str:
    """reference: an earlier run of the same trials, whose scores the report compares with these; floor:
    benchmarks/lora_step.py outputs (files or folders), whose frozen floor's utilization it shows beside the trials'.
    Raises results.ResultFileError for a missing folder or an unreadable result or record file."""
    trials = results.tidy(results.frame(*folders, curves=True))
    records = results.benchmark_records(*folders)
    if floor:  # the floor's records only: a folder such as results/reference/perf holds other benchmarks' too
        records[utilization.FLOOR] = [*records.get(utilization.FLOOR, []), *utilization.floor_records(list(floor))]
    ref = reference_run.Reference.read(reference, list(folders)) if reference is not None else None
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    names = ", ".join(Path(f).name for f in folders)
    also = ([f"scores compared with {reference}"] if reference is not None else []) + (
        [f"the frozen floor from {', '.join(sorted({Path(r['path']).name for r in records[utilization.FLOOR]}))} "
         f"in {', '.join(dict.fromkeys(str(Path(r['path']).parent) for r in records[utilization.FLOOR]))}"] if floor else [])
    return env.get_template(TEMPLATE).render(
        title=f"peftbench report: {names}", folders=[str(f) for f in folders], n_files=len(trials), published="reports/published.toml",
        also="; ".join(also), sections=sections.build(trials, published(), records, ref))


def write(folders: Sequence[str | Path], output: str | Path | None = None, reference: str | Path | None = None,
          floor: Sequence[str | Path] = ()) -> Path:
    out = Path(output) if output else default_output(folders)
    if out.is_dir():
        raise results.ResultFileError(f"{out}: is a folder; -o names the HTML file to write")
    text = html(folders, reference, floor)
    tmp = out.with_name(f".{out.name}.tmp")
    try:  # written aside and renamed: a failed write leaves no partial report
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out)
    except OSError as exc:
        if tmp.parent.is_dir():
            tmp.unlink(missing_ok=True)
        raise results.ResultFileError(f"{out}: cannot write the report ({exc.strerror})") from None
    return out


INDEX = "index.html"
_TITLE = re.compile(r"<title>(.*?)</title>", re.S)
_META = re.compile(r'<p class="meta">(.*?)</p>', re.S)
_TAG = re.compile(r"<[^>]+>")


def index_html(folder: Path) -> str:
    """One page linking every report in the folder, each with its title and the results it reads."""
    items = []
    for page in sorted(p for p in folder.glob("*.html") if p.name != INDEX):
        text = page.read_text(encoding="utf-8", errors="replace")
        title = _TITLE.search(text)
        meta = _META.search(text)
        # Title and meta are already HTML-escaped in the report; the tags are dropped, not escaped.
        about = " ".join(_TAG.sub("", meta.group(1)).split()) if meta else ""
        about = about.split(" Every number")[0]  # what it reads; the rest is the same on every report
        items.append(f'<li><a href="{html_lib.escape(page.name)}">{html_lib.escape(page.name)}</a>: '
                     f'{title.group(1).strip() if title else ""}<br><span class="meta">{about}</span></li>')
    body = "\n".join(items) or "<li>No reports in this folder yet.</li>"
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>peftbench reports</title>\n"
            "<style>body { font-family: \"DejaVu Sans\", sans-serif; max-width: 60em; margin: 2em auto; padding: 0 1.5em; "
            "line-height: 1.5; } li { margin: .6em 0; } .meta { color: #555; font-size: 90%; }</style>\n</head>\n<body>\n"
            "<h1>peftbench reports</h1>\n<p>Each report is one self-contained file: it opens offline and reads nothing "
            "else. Regenerate them with the commands in README.md; this page with "
            "<code>python -m reports.render --index</code>.</p>\n"
            f"<ul>\n{body}\n</ul>\n</body>\n</html>\n")


def write_index(folder: str | Path = "reports") -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise results.ResultFileError(f"{folder}: no such folder of reports")
    out = folder / INDEX
    out.write_text(index_html(folder), encoding="utf-8")
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The report's options beside the folders (bench/cli.py repeats them, so that its parser loads no report package)."""
    parser.add_argument("-o", "--output", help="output file (default: reports/<folder name>.html)")
    parser.add_argument("--reference", metavar="REF_DIR",
                        help="an earlier run of the same trials: its scores against these, within its seed spread")
    parser.add_argument("--floor", nargs="+", default=[], metavar="PATH",
                        help="benchmarks/lora_step.py outputs (JSON files, or folders holding them): the frozen floor's "
                             "utilization beside the trials'")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="peftbench report", description="Render result folders into one HTML file.")
    parser.add_argument("results_dirs", nargs="*", metavar="RESULTS_DIR")
    add_arguments(parser)
    parser.add_argument("--index", nargs="?", const="reports", metavar="DIR",
                        help="write DIR/index.html linking every report in DIR (default: reports)")
    args = parser.parse_args(argv)
    if args.index is None and not args.results_dirs:
        parser.error("give RESULTS_DIR... or --index")
    status = run(args.results_dirs, args.output, args.reference, args.floor) if args.results_dirs else 0
    if args.index is not None and status == 0:
        try:
            print(write_index(args.index))
        except results.ResultFileError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    return status


def run(folders: Sequence[str], output: str | None, reference: str | None = None, floor: Sequence[str] = ()) -> int:
    try:
        out = write(folders, output, reference, floor)
    except results.ResultFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

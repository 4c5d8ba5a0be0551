"""Render result folders into one self-contained HTML file (inline SVG, CSS and script; no network).

    python -m reports.render RESULTS_DIR... [-o FILE.html]
    peftbench report RESULTS_DIR... [-o FILE.html]
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path

import jinja2

from reports import results, sections

HERE = Path(__file__).resolve().parent
PUBLISHED = HERE / "published.toml"
TEMPLATE = "report.html.j2"


def published() -> dict:
    with open(PUBLISHED, "rb") as f:
        return tomllib.load(f)


def default_output(folders: Sequence[str | Path]) -> Path:
    """reports/<folder name>.html, relative to the working directory (the checkout under nox)."""
    return Path("reports") / ("+".join(Path(f).resolve().name for f in folders) + ".html")


def html(folders: Sequence[str | Path]) -> str:
    """Raises results.ResultFileError for a missing folder or an unreadable result file."""
    trials = results.tidy(results.frame(*folders, curves=True))
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    names = ", ".join(Path(f).name for f in folders)
    return env.get_template(TEMPLATE).render(
        title=f"peftbench report: {names}", folders=[str(f) for f in folders], n_files=len(trials), published="reports/published.toml",
        sections=sections.build(trials, published(), results.benchmark_records(*folders)))


def write(folders: Sequence[str | Path], output: str | Path | None = None) -> Path:
    out = Path(output) if output else default_output(folders)
    if out.is_dir():
        raise results.ResultFileError(f"{out}: is a folder; -o names the HTML file to write")
    text = html(folders)
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="peftbench report", description="Render result folders into one HTML file.")
    parser.add_argument("results_dirs", nargs="+", metavar="RESULTS_DIR")
    parser.add_argument("-o", "--output", help="output file (default: reports/<folder name>.html)")
    args = parser.parse_args(argv)
    return run(args.results_dirs, args.output)


def run(folders: Sequence[str], output: str | None) -> int:
    try:
        out = write(folders, output)
    except results.ResultFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

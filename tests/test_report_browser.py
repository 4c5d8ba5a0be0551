"""Every committed report (reports/*.html) in a real Chromium at 1400 px: no page or console error,
nothing wider than the page, the answer box on the first screen, every plotted mark inside its
axes and named on hover, and the interaction (hover, filters, CSV download, drill-down) working offline.

The reports are regenerated from results/reference/ with the commands in README.md; this test reads
the committed files, so a report that was not regenerated after a change is tested as committed."""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import pytest

from reports import render
from reports.blocks import NUMBER  # what the page's sort takes for a number

ROOT = Path(__file__).resolve().parents[1]
REPORTS = sorted(p for p in (ROOT / "reports").glob("*.html") if p.name != render.INDEX)
CHROMIUM = Path("/usr/bin/chromium")
WIDTH, FIRST_SCREEN = 1400, 900
TOLERANCE = 6.0  # SVG units: a marker centred on the axes' edge pokes out by its radius

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium")

# Plotted marks (lines, markers, collections) that reach past their axes' clip box, and clipped
# paths with no data left at all (matplotlib drops segments wholly outside the canvas: a line
# drawn entirely out of view). Bars (patches) are left out: a bar may start below a cut axis.
OUTSIDE_AXES = r"""(tol) => {
  const bad = [];
  document.querySelectorAll("figure svg").forEach((svg, fi) => {
    const caption = (svg.closest("figure").querySelector("figcaption") || {}).textContent || "";
    const where = "figure " + fi + " (" + caption.slice(0, 60) + ")";
    const clips = {};
    svg.querySelectorAll("clipPath").forEach(cp => { const r = cp.querySelector("rect"); if (r) clips[cp.id] = r; });
    svg.querySelectorAll("[clip-path]").forEach(el => {
      if (el.closest('[id^="patch"]')) return;
      const m = /url\(#([^)]+)\)/.exec(el.getAttribute("clip-path"));
      if (!m || !clips[m[1]]) return;
      const id = (el.closest("[id]") || {}).id;
      if (el.tagName === "path" && !(el.getAttribute("d") || "").trim()) {
        bad.push(where + " " + id + ": every point lies outside the axes");
        return;
      }
      const r = clips[m[1]];
      const x = +r.getAttribute("x"), y = +r.getAttribute("y"), w = +r.getAttribute("width"), h = +r.getAttribute("height");
      const b = el.getBBox();
      if (b.width === 0 && b.height === 0 && el.tagName === "g" && !el.children.length) return;
      if (b.x < x - tol || b.y < y - tol || b.x + b.width > x + w + tol || b.y + b.height > y + h + tol)
        bad.push(where + " " + id + ": box " + [b.x, b.y, b.x + b.width, b.y + b.height].map(Math.round) +
                 " outside the axes " + [x, y, x + w, y + h].map(Math.round));
    });
  });
  return bad;
}"""

TOO_WIDE = """(limit) => Array.from(document.querySelectorAll("table, figure svg, pre"))
  .filter(e => e.getClientRects().length && e.getBoundingClientRect().right > limit + 0.5)
  .map(e => (e.closest("section") || {}).id + " " + e.tagName + " right edge at " + Math.round(e.getBoundingClientRect().right))"""


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        yield b
        b.close()


class Page:
    """One report open at 1400 px, with every error and request it caused."""

    def __init__(self, browser, path: Path) -> None:
        self.context = browser.new_context(viewport={"width": WIDTH, "height": FIRST_SCREEN}, accept_downloads=True)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.page.on("console", lambda msg: self.errors.append(msg.text) if msg.type == "error" else None)
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        self.page.on("request", lambda req: self.requests.append(req.url))
        self.page.goto(path.as_uri())

    def open_everything(self) -> None:
        self.page.evaluate("document.querySelectorAll('details').forEach(d => d.open = true)")


@pytest.fixture(params=REPORTS, ids=[p.name for p in REPORTS])
def report(request, browser):
    page = Page(browser, request.param)
    yield request.param, page
    page.context.close()
    assert page.errors == [], f"{request.param.name}: {page.errors}"
    assert all(url.startswith(("file:", "data:", "about:")) for url in page.requests), page.requests


def test_every_report_is_committed():
    names = {p.name for p in REPORTS}
    assert {"lora_sweep.html", "lora_vs_qlora.html", "methods_tuned.html", "methods_zoo.html", "surgical.html",
            "serving.html"} <= names
    index = (ROOT / "reports" / render.INDEX).read_text()
    for p in REPORTS:  # the index links every report
        assert f'href="{p.name}"' in index, p.name


def test_layout_fits_the_page_and_the_answer_comes_first(report):
    path, r = report
    page = r.page
    scored = page.evaluate("""() => { const t = document.querySelector('#trials table');
        if (!t) return false; const col = Array.from(t.tHead.rows[0].cells).findIndex(c => c.textContent === 'score');
        return col >= 0 && Array.from(t.tBodies[0].rows).some(r => r.cells[col].getAttribute('data-sort') !== ''); }""")
    answer = page.locator("section#answer")
    if scored:  # a report with scores answers the question first, on the first screen
        assert answer.count() == 1, f"{path.name}: scores but no answer box"
    if answer.count():
        box = answer.bounding_box()
        assert box["y"] + box["height"] <= FIRST_SCREEN, f"{path.name}: the answer box ends at {box['y'] + box['height']:.0f} px"
        assert answer.locator("tbody tr").count() >= 1
    r.open_everything()
    limit = page.evaluate("document.documentElement.clientWidth")
    assert page.evaluate(TOO_WIDE, limit) == [], path.name
    assert page.evaluate("document.documentElement.scrollWidth") <= limit, f"{path.name}: the page scrolls sideways"


def test_plotted_data_lies_inside_its_axes(report):
    path, r = report
    assert r.page.locator("figure svg").count() >= 1, f"{path.name}: no figure"
    assert r.page.evaluate(OUTSIDE_AXES, TOLERANCE) == [], path.name


def test_hover_names_the_point(report):
    path, r = report
    points = r.page.locator("section#overview figure svg g.point:has(use)")  # markers: a line's box centre is off its stroke
    if not r.page.locator("section#overview figure").count():
        pytest.skip(f"{path.name} has no Pareto plot")  # serving reports: lines, not configurations
    overview_points = r.page.locator("section#overview figure svg g.point")
    assert overview_points.count() >= 2, f"{path.name}: the Pareto points carry no labels"
    # Every scatter mark of the Pareto plot (legend swatches and marker definitions aside) is labelled.
    unlabelled = r.page.evaluate("""() => Array.from(document.querySelectorAll(
        '#overview figure svg [id^=PathCollection] use, #overview figure svg [id^=PathCollection] path'))
        .filter(m => !m.closest('[id^=legend]') && !m.closest('defs') && !m.closest('g.point')).length""")
    assert unlabelled == 0, f"{path.name}: {unlabelled} Pareto points without a label"
    tip = r.page.locator("#tip")
    for i in (0, points.count() - 1):
        point = points.nth(i)
        title = point.locator("title").text_content()
        assert title.strip()
        point.scroll_into_view_if_needed()
        point.hover(force=True)
        assert tip.is_visible() and tip.text_content() == title
        r.page.mouse.move(0, 0)
        assert not tip.is_visible()


# Every drawn data mark (a line, a marker, a bar, an error bar: a path or marker use inside an axes' clip
# box) of every figure, legends, tick and grid lines, and empty paths aside, that no <g class="point"> names.
UNTITLED_MARKS = r"""() => Array.from(document.querySelectorAll("figure svg path, figure svg use"))
  .filter(m => m.closest("[clip-path]") && !m.closest('[id^=legend], defs, clipPath, [id^="matplotlib.axis"]'))
  .filter(m => m.tagName !== "path" || (m.getAttribute("d") || "").trim())
  .filter(m => !m.closest("g.point") || !m.closest("g.point").querySelector("title").textContent.trim())
  .map(m => (m.closest("figure").querySelector("figcaption") || {}).textContent.slice(0, 60) + ": "
            + (m.closest("[id]") || {}).id + " " + m.tagName)"""


AIM = r"""(i) => {
  const fig = Array.from(document.querySelectorAll("figure")).filter(f => f.querySelector("svg g.point"))[i];
  // The largest mark: a sliver of a bar hides under a grid line.
  const area = e => { const b = e.getBoundingClientRect(); return b.width * b.height; };
  const marks = Array.from(fig.querySelectorAll("svg g.point use, svg [id^=patch] > g.point path"));
  const mark = marks.length ? marks.reduce((a, b) => area(b) > area(a) ? b : a) : fig.querySelector("svg g.point path");
  mark.scrollIntoView({block: "center"});
  if (mark.tagName === "use" || mark.closest("[id^=patch]")) {
    const b = mark.getBoundingClientRect();
    return [b.x + b.width / 2, b.y + b.height / 2];
  }
  const p = mark.getPointAtLength(mark.getTotalLength() / 2).matrixTransform(mark.getScreenCTM());
  return [p.x, p.y];
}"""


def test_every_plotted_mark_names_its_configuration(report):
    path, r = report
    page = r.page
    assert page.evaluate(UNTITLED_MARKS) == [], path.name
    # Hover one mark in every figure: the centre of a marker or bar, the middle of a line (where its stroke is).
    tip = page.locator("#tip")
    n = page.locator("figure:has(svg g.point)").count()
    assert n >= 1, f"{path.name}: no figure names its marks"
    r.open_everything()
    for i in range(n):
        x, y = page.evaluate(AIM, i)
        page.mouse.move(x, y)
        # The tooltip names the mark on top under the cursor (points of equal value overlap).
        on_top = page.evaluate("([x, y]) => { const g = document.elementFromPoint(x, y).closest('g.point');"
                               " return g ? g.querySelector('title').textContent : null; }", [x, y])
        assert on_top and tip.is_visible(), f"{path.name}, figure {i}: no tooltip"
        assert tip.text_content() == on_top, f"{path.name}, figure {i}"
        page.mouse.move(0, 0)
        assert not tip.is_visible()


def visible_column(page, table, name: str) -> list[str]:
    return table.evaluate("""(t, name) => { const col = Array.from(t.tHead.rows[0].cells).findIndex(c => c.textContent === name);
        return Array.from(t.tBodies[0].rows).filter(r => !r.classList.contains('drill') && r.style.display !== 'none')
                    .map(r => r.cells[col].getAttribute('title') || r.cells[col].textContent); }""", name)


def test_filter_csv_and_drill_down(report):
    path, r = report
    page = r.page
    table = page.locator("section#trials table.drillable")
    if not table.count():
        pytest.skip(f"{path.name} has no trial table")  # serving reports
    if page.locator("section#trials details").count():
        page.click("section#trials details > summary")
    total = table.locator("tbody tr").count()
    # Sorting a column of labels compares numbers as numbers: of two labels alike but for their
    # numbers (r=4 and r=16), the smaller numbers come first.
    table.locator("th", has_text="configuration").click()
    labels = visible_column(page, table, "configuration")
    by_shape: dict[str, list[list[float]]] = {}
    for label in labels:
        by_shape.setdefault(NUMBER.sub("#", label), []).append([float(x) for x in NUMBER.findall(label)])
    for shape, numbers in by_shape.items():
        assert numbers == sorted(numbers), shape
    # Filter on the method that the fewest trials use, so that the filter has something to remove.
    methods = visible_column(page, table, "method")
    rare = min(set(methods), key=methods.count)
    page.select_option("section#trials select.facet[data-column='%d']" % methods_index(page, table), rare)
    shown = visible_column(page, table, "method")
    assert shown and set(shown) == {rare} and len(shown) == methods.count(rare)
    assert page.locator("section#trials span.count").text_content() == f"{len(shown)} of {total} rows"

    with page.expect_download() as info:
        page.click("section#trials button.csv")
    download = info.value
    rows = list(csv.reader(io.StringIO(Path(download.path()).read_text(encoding="utf-8"))))
    header = table.locator("thead th").all_text_contents()
    assert rows[0] == header and len(rows) == len(shown) + 1
    col = header.index("configuration")
    assert sorted(r[col] for r in rows[1:]) == sorted(visible_column(page, table, "configuration"))

    first = table.locator("tbody tr:visible").first
    first.click()
    drill = table.locator("tr.drill")
    assert drill.count() == 1
    text = drill.text_content()
    file = re.search(r"file: (\S+\.json)", text)
    assert file and (ROOT / file.group(1)).is_file(), text[:200]
    assert "differ from" in text and ("this trial" in text or "this is the reference" in text)
    assert drill.locator("details summary", has_text="full spec").count() == 1
    curve = drill.locator("svg.loss-curve")
    assert curve.count() == 1 or "No loss curve recorded" in text
    if curve.count():  # the curve lies inside its frame
        inside = curve.evaluate("""svg => { const f = svg.querySelector('rect.frame').getBBox();
            const c = svg.querySelector('polyline, circle').getBBox();
            return c.x >= f.x - 1 && c.y >= f.y - 1 && c.x + c.width <= f.x + f.width + 1 && c.y + c.height <= f.y + f.height + 1; }""")
        assert inside, f"{path.name}: the drill-down's loss curve leaves its frame"
    first.click()
    assert table.locator("tr.drill").count() == 0


def methods_index(page, table) -> int:
    return table.evaluate("t => Array.from(t.tHead.rows[0].cells).findIndex(c => c.textContent === 'method')")


def test_lora_sweep_shows_its_run_against_its_files(browser):
    """The committed lora_sweep report: the overview's Run line (runner wall time and lanes, the trials' utilization,
    the frozen floor's) is shown and says what the result files and lora_step.py records its provenance line names
    say, recomputed here with json and statistics alone; the wall-time and utilization section is in the contents."""
    import json
    import statistics

    r = Page(browser, ROOT / "reports" / "lora_sweep.html")
    try:
        page = r.page
        meta = page.locator("p.meta").first.text_content()
        folder = ROOT / re.search(r"result file\(s\) from (\S+?)[;.]\s", meta).group(1)
        floor = re.search(r"the frozen floor from (.+?) in (\S+?)\.\s", meta)
        assert floor, f"lora_sweep.html names no lora_step.py records: {meta}"
        trials = [json.loads(p.read_text()) for p in sorted(folder.rglob("*.json"))
                  if not {"adapters", "tracking"} & set(p.relative_to(folder).parts)]
        trials = [t for t in trials if "benchmark" not in t]
        runtimes = [t["runtime"] for t in trials]
        wall = max(rt["process_ended_at"] for rt in runtimes) - min(rt["process_started_at"] for rt in runtimes)
        (lanes,) = {t["env"]["parallel"] for t in trials}
        threads = "/".join(map(str, sorted({t["env"]["torch_threads"] for t in trials})))
        fractions = [rt["utilization"]["fraction"] for t, rt in zip(trials, runtimes, strict=True)
                     if t["status"] == "success" and (rt.get("utilization") or {}).get("fraction") is not None]
        floors = [json.loads((ROOT / floor.group(2) / name).read_text())["utilization"]["floor"]["fraction"]
                  for name in floor.group(1).split(", ")]

        def pct(x: float) -> str:
            return f"{100 * x:.1f}%"

        expected = (f"Run: {wall:,.0f} s of runner wall time ({wall / 60:.1f} min) in {lanes} lanes of {threads} thread(s); "
                    f"the {len(fractions)} trained trials at a median {pct(statistics.median(fractions))} of the matmul peak "
                    f"(min {pct(min(fractions))}, max {pct(max(fractions))}); the frozen floor at a median "
                    f"{pct(statistics.median(floors))} (min {pct(min(floors))}, max {pct(max(floors))}) over {len(floors)} "
                    "benchmarks/lora_step.py runs (section Wall time and utilization).")
        line = page.locator("section#overview p", has_text="Run: ")
        assert line.count() == 1 and line.is_visible()
        assert line.text_content() == expected
        assert page.locator("nav a[href='#utilization']").is_visible()
        assert page.locator("section#utilization table").count() == 2  # by method; the floor's runs
    finally:
        r.context.close()
    assert r.errors == []

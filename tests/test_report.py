"""The HTML report: sections, statistics, published numbers, self-containment, bad input."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from itertools import product
from pathlib import Path

import pytest

from reports import render, results, sections

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
SECTION_IDS = ("overview", "rank", "targets", "optimizer", "epochs", "methods", "qlora", "gpu", "surgical", "memory", "loss",
               "failures", "provenance")
FAILED_ERROR = "RuntimeError: shape mismatch in block 7 (unique-error-3141)"


def write_result(folder: Path, *, method: str = "lora", r: int | None = 8, targets: str = "qv", optimizer: str = "adamw",
                 epochs: int = 1, seed: int = 0, quant: str | None = None, status: str = "success",
                 error: str | None = None, score: float | None = 0.8, peak: float = 2.0 * GIB,
                 accounted: tuple[float, float, float, float] = (0.5 * GIB, 0.01 * GIB, 0.02 * GIB, 0.6 * GIB),
                 train_s: float = 50.0, trainable: int = 100_000, model: str = "smollm2-135m",
                 curve: list[float] | None = None) -> Path:
    """One result file with every key of DESIGN.md section 4."""
    config = {"r": r, "alpha": 2 * r, "targets": targets} if r is not None else {}
    spec = {"model": {"name": model, "dtype": "float32", **({"quant": quant} if quant else {})},
            "data": {"task": "sst2", "train_examples": 256, "max_length": 128},
            "method": {"name": method, "version": "1", "config": config},
            "train": {"optimizer": optimizer, "lr": 1e-3 if optimizer == "adamw" else 5e-2, "epochs": epochs, "seed": seed},
            "eval": {"tasks": ["sst2"]}}
    trial_id = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    ok = status == "success"
    weights, grads, opt, acts = accounted
    cfg_text = ",".join(f"{k}={v}" for k, v in config.items())
    result = {
        "schema": 1, "trial_id": trial_id, "suite": folder.name, "status": status, "error": error,
        "label": f"{method}({cfg_text}) {optimizer} ep{epochs} seed{seed}",
        "spec": spec, "synthetic": False,
        "params": {"trainable": trainable if ok else None, "total": 135_000_000 if ok else None, "adapter_bytes": None},
        "memory": {"peak_bytes": peak if ok else None, "peak_source": "rss" if ok else None,
                   "accounted": ({"weights": weights, "grads": grads, "optimizer": opt, "activations": acts} if ok else
                                 {"weights": None, "grads": None, "optimizer": None, "activations": None})},
        "runtime": {"train_s": train_s if ok else None, "step_s_median": 1.5 if ok else None, "tokens_per_s": 100.0,
                    "eval_s": 20.0},
        "eval": {"lm_eval": {"sst2": {"acc": score, "acc_stderr": 0.02}} if ok and score is not None else {},
                 "forgetting": 0.1 if ok else None},
        "train": {"loss_curve": curve if curve is not None else [2.0, 1.2, 0.8, 0.6, 0.5 + 0.01 * seed], "steps": 5},
        "env": {"packages": {"torch": "2.13.0+cpu", "transformers": "5.24.0", "peftbench": "0.1.0"}, "python": "3.11.7",
                "device": "cpu: Test CPU", "git_sha": "0123456789abcdef0123", "git_dirty": False, "host": "testhost",
                "cpus": 2},
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{trial_id}.json"
    path.write_text(json.dumps(result, indent=1))
    return path


def make_sweep(folder: Path) -> Path:
    """Several methods and ranks, two seeds each, one single-seed config, a failed and an OOM trial."""
    for seed in (0, 1):
        noise = 0.004 * seed
        for r in (4, 16):
            for targets, base in (("qv", 0.70), ("all-linear", 0.85)):
                trainable = r * (1_000 if targets == "qv" else 5_000)
                acts = (0.60 if targets == "qv" else 0.65) * GIB
                for optimizer in ("adamw", "sgd"):
                    opt_state = (2 if optimizer == "adamw" else 0) * trainable * 4
                    write_result(folder, r=r, targets=targets, optimizer=optimizer, seed=seed, score=base + noise + r / 1000,
                                 trainable=trainable, peak=2.0 * GIB + acts - 0.6 * GIB + opt_state,
                                 accounted=(0.5 * GIB, trainable * 4, opt_state, acts))
        # Two epochs: a hair lower, within seed noise.
        write_result(folder, r=4, targets="qv", epochs=2, seed=seed, score=0.70 + 0.004 * (1 - seed) + 0.003,
                     trainable=4_000, peak=2.0 * GIB, train_s=100.0)
        write_result(folder, method="full", r=None, seed=seed, score=0.86 + noise, trainable=135_000_000, peak=3.2 * GIB,
                     accounted=(0.5 * GIB, 0.5 * GIB, 1.0 * GIB, 0.8 * GIB), train_s=110.0)
    write_result(folder, method="frozen", r=None, score=0.60, trainable=0, peak=0.45 * GIB, train_s=0.0,
                 accounted=(0.5 * GIB, 0, 0, 0), curve=[])
    write_result(folder, method="top_k", r=None, score=0.75, trainable=7_000_000, peak=2.4 * GIB)  # single seed
    write_result(folder, r=64, targets="all-linear", status="failed", error=FAILED_ERROR, curve=[2.0, 1.5])
    write_result(folder, r=64, targets="all-linear", optimizer="sgd", status="oom",
                 error="trial process killed by the kernel's OOM killer (cgroup oom_kill count rose)", curve=[])
    return folder


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, str]:
    folder = make_sweep(tmp_path_factory.mktemp("res") / "lora_sweep")
    out = render.write([folder], tmp_path_factory.mktemp("out") / "report.html")
    return folder, out.read_text()


def section_text(html: str, sid: str) -> str:
    match = re.search(rf'<section id="{sid}">(.*?)</section>', html, re.S)
    assert match, f"section {sid} missing"
    return match.group(1)


def test_every_section_is_there(report):
    _, html = report
    for sid in SECTION_IDS:
        section_text(html, sid)


def test_failed_trials_are_listed_with_their_error(report):
    _, html = report
    failures = section_text(html, "failures")
    assert "unique-error-3141" in failures and "OOM killer" in failures
    assert "oom" in failures and "failed" in failures
    every = section_text(html, "trials")
    assert "status-failed" in every and "status-oom" in every  # in the table of every trial, not dropped


def write_cnn_result(folder: Path, *, task: str, shift: str, choice: str, lr: float, seed: int, test: float,
                     val: float | None = None) -> Path:
    """A surgical fine-tuning trial on the CNN: scored by its own test accuracy, not lm-eval."""
    named = {"All": ("full", {}), "Auto-RGN": ("auto_rgn", {}), "No tuning": ("frozen", {})}
    method = named[choice] if choice in named else (
        "surgical", {"blocks": ["head" if choice == "Head" else str(int(choice.split()[1]) - 1)]})
    spec = {"model": {"name": "cnn4-fmnist"}, "data": {"task": task},
            "method": {"name": method[0], "version": "1", "config": method[1]},
            "train": {"optimizer": "adamw", "lr": lr, "epochs": 10, "seed": seed}, "eval": {}}
    trial_id = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    result = {"schema": 1, "trial_id": trial_id, "suite": folder.name, "status": "success", "error": None,
              "label": f"{method[0]}({','.join(f'{k}={v}' for k, v in method[1].items())}) adamw ep10 seed{seed}", "spec": spec,
              "data": {"shift": shift, "describe": f"{task} shift", "source": "fashion-mnist"},
              "params": {"trainable": 1000, "total": 10_000}, "memory": {"peak_bytes": 0.3 * GIB, "peak_source": "rss"},
              "runtime": {"train_s": 5.0}, "eval": {"accuracy": {"test": test, "val": test if val is None else val}},
              "train": {"loss_curve": [1.0, 0.5]}, "env": {"git_sha": "0123456789ab", "git_dirty": False}}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{trial_id}.json"
    path.write_text(json.dumps(result))
    return path


def make_cnn(folder: Path) -> Path:
    """One input-level shift, three seeds: Block 1 best, full fine-tuning within seed noise of it, Head far below."""
    for seed, noise in enumerate((0.0, 0.01, -0.01)):
        for choice, acc in (("Block 1", 0.83), ("Block 2", 0.80), ("Head", 0.70), ("All", 0.825), ("Auto-RGN", 0.82)):
            write_cnn_result(folder, task="blur", shift="input", choice=choice, lr=1e-3, seed=seed, test=acc + noise)
    return folder


def test_published_numbers_are_printed_once_and_come_from_the_data_file(tmp_path):
    folder = make_sweep(tmp_path / "q")
    for seed in (0, 1):
        write_result(folder, r=4, seed=seed, quant="nf4", score=0.69 + 0.01 * seed, peak=2.2 * GIB)  # a twin of the r=4 qv trials
    make_cnn(tmp_path / "cnn")
    html = render.html([folder, tmp_path / "cnn"])
    qlora, surgical = section_text(html, "qlora"), section_text(html, "surgical")
    # Raschka's table as published (his Lightning AI article), LitGPT's, and the summary's own words.
    for number in ("21.33", "14.18", "14.19", "6,685.75", "10,059.53", "9,334.45", "21.3", "14.14", "13.84", "-33%", "+50%",
                   "+39%", "39% increased runtime", "Insights from Hundreds of Experiments"):
        assert number in qlora, number
    for number in ("82.8", "79.9", "81.4", "2210.11466"):
        assert number in surgical, number
    # Each published box once: the GPU section (no records here) does not repeat the LoRA-vs-QLoRA figures.
    assert html.count(">10,059.53<") == 1 and html.count(">13.84<") == 1
    assert "Published figures from reports/published.toml" in html
    template = (ROOT / "reports" / "templates" / "report.html.j2").read_text()
    for number in ("21.33", "14.18", "82.8", "79.9", "13.84"):
        assert number not in template


def test_sections_without_data_are_dropped_with_their_published_boxes(report):
    folder, html = report
    trials = results.tidy(results.frame(folder, curves=True))
    built = {s.id: s for s in sections.build(trials, render.published(), {})}
    for sid in ("qlora", "gpu", "surgical"):
        assert not built[sid].has_data, sid
        assert not [b for b in built[sid].blocks if b.kind == "published"], sid
        assert "No results" in section_text(html, sid) or "No GPU records" in section_text(html, sid)
    assert built["matched"].has_data and built["overview"].has_data


def test_statistics_over_seeds(report):
    _, html = report
    targets = section_text(html, "targets")
    assert "95% CI" in targets and "real difference (Welch t-test" in targets  # qv 0.70 against all-linear 0.85
    assert "not distinguishable from seed noise" in section_text(html, "epochs")
    assert "single seed, no CI" in section_text(html, "methods")  # top_k ran once


def test_answer_box_pareto_and_trial_tables(report):
    _, html = report
    assert "best configuration per memory budget" in section_text(html, "answer")
    assert "Pareto front" in section_text(html, "overview")
    every = section_text(html, "trials")
    assert 'class="filter"' in every and 'class="sortable drillable"' in every


def test_self_contained_with_valid_svg(report):
    _, html = report
    assert not re.search(r'(src|href)\s*=\s*["\']?\s*(https?:)?//', html, re.I)
    assert "<link" not in html and "@import" not in html and "<script src" not in html
    svgs = re.findall(r"<svg\b.*?</svg>", html, re.S)
    # pareto, rank sweep, targets, optimizer, methods, memory breakdown, loss curves
    assert len(svgs) == html.count("<svg") == 7
    for svg in svgs:
        ET.fromstring(svg)


def test_report_never_imports_torch():
    code = "import reports.render, reports.sections, reports.figures; import sys; assert 'torch' not in sys.modules"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


def test_qlora_results_are_compared_and_an_inversion_explained(tmp_path):
    folder = tmp_path / "q"
    for seed in (0, 1):
        write_result(folder, seed=seed, score=0.80 + 0.01 * seed, peak=2.0 * GIB, train_s=50.0,
                     accounted=(0.5 * GIB, 0.01 * GIB, 0.02 * GIB, 0.6 * GIB))
        # At small scale the 4-bit base can use more: weights shrink, dequantization buffers grow.
        write_result(folder, seed=seed, quant="nf4", score=0.79 + 0.01 * seed, peak=2.2 * GIB, train_s=80.0,
                     accounted=(0.15 * GIB, 0.01 * GIB, 0.02 * GIB, 0.9 * GIB))
    trials = results.tidy(results.frame(folder, curves=True))
    section = sections.lora_vs_qlora(results.seed_groups(trials), render.published())
    text = " ".join(b.text for b in section.blocks)
    cells = " ".join(c.text for b in section.blocks if b.table for row in b.table.rows for c in row)
    assert "No results yet" not in text
    assert "+10.0%" in cells and "-33% (Raschka)" in cells and "does not reproduce" in cells
    assert "+60.0%" in cells and "+50% (Raschka)" in cells and "reproduces (+10 pts)" in cells
    assert "Inversions: QLoRA's peak is above its LoRA twin's in 1 of 1 pairs" in text
    assert "saved a median 358 MiB of weights" in text and "307 MiB more activations" in text
    assert any(b.kind == "figure" for b in section.blocks)


def test_corrupt_file_exits_2_naming_it(tmp_path, capsys):
    from bench import cli

    folder = tmp_path / "bad"
    write_result(folder)
    (folder / "broken.json").write_text('{"schema": 1, "status": "succ')
    assert cli.main(["report", str(folder), "-o", str(tmp_path / "x.html")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "broken.json" in err
    assert not (tmp_path / "x.html").exists()


def test_missing_folder_exits_2(tmp_path, capsys):
    assert render.main([str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nowhere" in err


def test_default_output_is_named_after_the_folder(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "results" / "reference" / "tiny_sweep"
    write_result(folder, method="frozen", r=None)
    monkeypatch.chdir(tmp_path)
    assert render.main([str(folder)]) == 0
    out = capsys.readouterr().out.strip()
    assert out == str(Path("reports") / "tiny_sweep.html")
    assert (tmp_path / "reports" / "tiny_sweep.html").exists()


def test_empty_folder_renders_no_results(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    html = render.html([folder])
    assert "No results" in section_text(html, "overview") and "<svg" not in html


def test_only_failed_trials_still_render(tmp_path):
    folder = tmp_path / "allbad"
    write_result(folder, status="timeout", error="trial ran past its timeout of 10 s and was killed", curve=[])
    html = render.html([folder])
    assert "past its timeout" in section_text(html, "failures")
    assert "No results" in section_text(html, "methods") and "No results" in section_text(html, "rank")


CHROMIUM = Path("/usr/bin/chromium")


def test_report_opens_in_a_browser_without_errors(report, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip("no /usr/bin/chromium")
    sync_api = pytest.importorskip("playwright.sync_api")
    folder, html = report
    page_file = tmp_path / "report.html"
    page_file.write_text(html)
    errors: list[str] = []
    requests: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page()
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("request", lambda req: requests.append(req.url))
            page.goto(page_file.as_uri())
            page.click("#trials details > summary")  # the table of every trial starts closed
            table = page.locator("#trials table.sortable").first
            seed_col = table.locator("th", has_text="trainable")
            nth = table.locator("th").all_text_contents().index("trainable") + 1
            seed_col.click()
            values = [float(v) for v in table.locator(f"tbody tr td:nth-child({nth})").evaluate_all(
                "cells => cells.map(c => c.getAttribute('data-sort'))") if v != ""]
            assert values == sorted(values)
            seed_col.click()
            values = [float(v) for v in table.locator(f"tbody tr td:nth-child({nth})").evaluate_all(
                "cells => cells.map(c => c.getAttribute('data-sort'))") if v != ""]
            assert values == sorted(values, reverse=True)
            page.fill("#trials input.filter", "unique-nonexistent-word")
            assert table.locator("tbody tr:visible").count() == 0
            page.fill("#trials input.filter", "oom")
            assert table.locator("tbody tr:visible").count() >= 1
        finally:
            browser.close()
    assert errors == []
    assert all(url.startswith(("file:", "data:", "about:")) for url in requests), requests


NOX = shutil.which("nox") or shutil.which("nox", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(NOX is None, reason="nox not installed")
def test_nox_has_a_report_session():
    proc = subprocess.run([NOX, "-l"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "report" in proc.stdout


def test_a_repeated_seed_is_not_a_second_sample(tmp_path):
    write_result(tmp_path / "a", seed=0, score=0.80)
    write_result(tmp_path / "b", seed=0, score=0.82)  # the same trial again, in another suite
    write_result(tmp_path / "b", seed=1, score=0.84)
    groups = results.seed_groups(results.tidy(results.frame(tmp_path / "a", tmp_path / "b")))
    assert len(groups) == 1
    row = groups.iloc[0]
    assert row["n"] == 2 and row["score_values"] == pytest.approx([0.81, 0.84])


def gpu_record(folder: Path) -> dict:
    """A gpu_7b benchmark record (the committed H200 run) beside the trial results."""
    record = json.loads((ROOT / "results" / "reference" / "gpu" / "gpu_7b.json").read_text())
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "gpu_7b.json").write_text(json.dumps(record))
    return record


def test_gpu_records_are_set_beside_the_published_figures(tmp_path):
    folder = make_sweep(tmp_path / "lora_sweep")
    record = gpu_record(tmp_path / "gpu")
    assert results.files(tmp_path) == results.files(folder)  # the benchmark file is not a trial
    out = render.write([folder, tmp_path / "gpu"], tmp_path / "r.html")
    gpu = section_text(out.read_text(), "gpu")
    variants = {v["name"]: v for v in record["variants"]}
    lora, nf4 = variants["lora-bf16-qv"], variants["qlora-nf4-qv"]
    mem = 100 * (nf4["memory"]["peak_bytes"] / lora["memory"]["peak_bytes"] - 1)
    time = 100 * (nf4["step_s_median"] / lora["step_s_median"] - 1)
    assert f"{mem:+.1f}%" in gpu and f"{time:+.1f}%" in gpu
    assert f"{lora['memory']['peak_bytes'] / 1e9:.2f}" in gpu and "21.33" in gpu and "14.18" in gpu
    assert record["env"]["device"] in gpu
    for m in record["methods"]:
        assert m["method_name"] in gpu


def test_gpu_section_without_records_says_how_to_get_them(report):
    _, html = report
    assert "benchmarks/gpu_7b.py" in section_text(html, "gpu")


# ---- Matched comparisons, numeric order, surgical and serving content ----------------------------

def test_paired_changes_get_the_exact_wilcoxon_test():
    from reports import matched

    # |d| ranks 3, 1, 2, 5, 4; the one positive change has rank 2, so W+ = 2. Subsets of {1..5} summing to <= 2:
    # {}, {1}, {2}: P(W+ <= 2) = 3/32, two-sided 6/32.
    x = matched.paired([-3.0, -1.0, 2.0, -5.0, -4.0])
    assert (x.n, x.lower, x.higher, x.ties) == (5, 4, 1, 0)
    assert x.median == -3.0 and (x.lo, x.hi) == (-5.0, 2.0)
    assert x.p == pytest.approx(6 / 32)
    assert x.min_p == pytest.approx(2 / 32) and not x.significant  # five pairs can never reach 5%
    tied = matched.paired([0.0, -1.0, -2.0])
    assert (tied.lower, tied.ties) == (2, 1) and tied.min_p == pytest.approx(2 / 4)
    assert matched.paired([0.0, 0.0]).p is None


def test_matched_pairs_state_the_quantization_cost_with_its_strength(tmp_path):
    from reports import matched

    folder = tmp_path / "q"
    drops = {}
    for i, (r, targets, optimizer) in enumerate(product((4, 8, 16, 64), ("qv", "all-linear"), ("adamw",))):
        base = 0.70 + 0.01 * i
        drops[(r, targets)] = 0.05 + 0.01 * i  # every nf4 twin lower, by a distinct amount
        write_result(folder, r=r, targets=targets, optimizer=optimizer, score=base, peak=2.0 * GIB)
        write_result(folder, r=r, targets=targets, optimizer=optimizer, quant="nf4", score=base - drops[(r, targets)],
                     peak=2.0 * GIB * (1.05 if i % 2 else 0.97))
    write_result(folder, method="frozen", r=None, score=0.72, trainable=0)
    trials = results.tidy(results.frame(folder))
    groups = results.seed_groups(trials)
    quant = [c for c in matched.comparisons(groups) if c.axis.name == "quantization"]
    assert len(quant) == 1 and len(quant[0].pairs) == 8  # the frozen model is the floor, not a pair
    c = quant[0]
    assert (c.a_name, c.b_name) == ("float32", "nf4")
    changes = sorted(-100 * d for d in drops.values())
    assert c.score.median == pytest.approx((changes[3] + changes[4]) / 2)
    assert c.score.lower == 8 and c.score.p == pytest.approx(2 / 2**8)
    assert c.peak.higher == 4 and c.peak.lower == 4
    sentence = matched.score_sentence(c)
    assert "nf4 scores lower than its float32 twin in 8 of 8 matched pairs" in sentence and "p = 0.0078" in sentence
    section = sections.lora_vs_qlora(groups, render.published())
    text = " ".join(b.text for b in section.blocks)
    assert sentence in text and "Inversions: QLoRA's peak is above its LoRA twin's in 4 of 8 pairs" in text
    assert text.count("likely reason") == 1
    # The targets comparison (qv -> all-linear) pairs within each base: 4 ranks x 2 bases.
    targets = next(c for c in matched.comparisons(groups) if c.axis.name == "layer targets")
    assert len(targets.pairs) == 8
    floor = matched.floors(trials, groups)
    assert len(floor) == 1 and (floor[0].tuned, floor[0].below) == (8, 2)  # 0.70 and 0.71 (float32) below 0.72
    assert floor[0].below_ci == 0  # neither by more than the frozen score's standard error (0.02)


def test_configurations_sort_numerically(report):
    from reports import figures

    assert figures._natural(["r=16", "r=4", "r=64", "r=8"]) == ["r=4", "r=8", "r=16", "r=64"]
    _, html = report
    memory = section_text(html, "memory")
    assert 0 < memory.index("lora(r=4,") < memory.index("lora(r=16,")  # text order would put r=16 first


def test_surgical_counts_the_rule_and_says_where_it_disagrees_with_the_paper(tmp_path):
    folder = make_cnn(tmp_path / "cnn")
    trials = results.tidy(results.frame(folder))
    assert trials["score"].notna().all() and set(trials["score_name"]) == {"test accuracy"}
    section = sections.surgical(trials, results.seed_groups(trials), render.published())
    first = next(b for b in section.blocks if b.kind == "table")
    assert first.table.rows[0][0].text.startswith("blur: input-level")  # the label names the shift
    assert section.blocks.index(first) < min(i for i, b in enumerate(section.blocks) if b.kind == "published")
    text = " ".join(b.text for b in section.blocks)
    assert "holds outright in 1 of 1 shifts" in text and "fails in 0" in text
    assert "beats full fine-tuning in 0 of 1 shifts" in text and "ties it within seed noise in 1 (blur)" in text


def test_serving_axes_show_every_line_and_the_gpu_headline_is_not_empty():
    from reports import serving

    folder = ROOT / "results" / "reference" / "serving" / "gpu"
    result = serving.load(folder)[0]
    df = serving.frame(result)
    svg = serving.throughput_figure(df)
    ticks = [float(t.replace(",", "")) for t in re.findall(r"<text[^>]*>\s*([0-9][0-9,.]*)\s*</text>", svg)]
    # The top tick sits within one tick step of the fastest line (a shared axis frozen by the slow panels stopped near a quarter of it).
    assert max(ticks) >= 0.9 * df["tokens_per_s"].max()
    sections_ = serving.sections(result)
    head = sections_[0]
    assert any(b.table is not None and b.table.rows for b in head.blocks)
    text = " ".join(b.text for s in sections_ for b in s.blocks)
    assert "agree with merge and switch" in text and "peft" not in text.split("agree with")[1].split(".")[0]
    assert "uncommitted changes" in text  # the run's provenance says dirty


def test_a_lead_section_leads_only_the_report_it_is_the_subject_of(tmp_path):
    make_cnn(tmp_path / "cnn")  # 15 trials, 12 of them surgical or Auto-RGN: a surgical report
    cnn = results.tidy(results.frame(tmp_path / "cnn"))
    assert [s.id for s in sections.build(cnn, render.published(), {})][:2] == ["answer", "surgical"]
    # One surgical trial beside a LoRA sweep: the surgical section has data but keeps its place after the sweep's own.
    folder = make_sweep(tmp_path / "sweep")
    write_cnn_result(folder, task="blur", shift="input", choice="Block 1", lr=1e-3, seed=0, test=0.83)
    mixed = results.tidy(results.frame(folder))
    built = sections.build(mixed, render.published(), {})
    ids = [s.id for s in built]
    assert next(s for s in built if s.id == "surgical").has_data
    assert ids[1] != "surgical" and ids.index("surgical") > ids.index("overview")


def test_each_serving_report_names_its_device_in_the_title():
    from reports import serving

    cpu, gpu = (serving.load(ROOT / "results" / "reference" / "serving" / sub) for sub in ("", "gpu"))
    titles = serving.title(cpu), serving.title(gpu)
    assert titles[0] != titles[1]
    assert "H200" in titles[1] and "cpu" in titles[0].lower()


def test_utilization_column_and_sweep_line(tmp_path):
    """runtime.utilization.fraction as a trial-table column and one line in the report (median, min, max over the
    trials that trained, and the peak); results without the field (older ones) show neither, and do not fail."""
    import html as html_lib

    from reports import trials as trial_table

    folder = tmp_path / "u"
    paths = [write_result(folder, r=r, seed=0) for r in (4, 8, 16)]
    write_result(folder, method="frozen", r=None, trainable=0, train_s=0.0, curve=[])
    old = render.html([folder])
    assert "Utilization:" not in old and "<th>utilization</th>" not in old  # no field: no column, no line
    peak = {"flops_per_s": 5e10, "source": "cached", "machine_class": "x86_64-2cpu-cpu", "device": "cpu", "threads": 1,
            "dtype": "float32", "measured_at": "2026-11-29T00:00:00Z"}
    for path, fraction in zip(paths, (0.2, 0.05, 0.4), strict=True):
        result = json.loads(path.read_text())
        result["runtime"]["utilization"] = {"train_flops": fraction * 5e10 * 50, "achieved_flops_per_s": fraction * 5e10,
                                            "peak_flops_per_s": 5e10, "fraction": fraction, "peak_source": peak}
        path.write_text(json.dumps(result))
    frame = results.tidy(results.frame(folder))
    line = trial_table.utilization_summary(frame)
    assert line is not None and "3 trained trials" in line
    assert "median 20.0%" in line and "min 5.0%" in line and "max 40.0%" in line and "50.0 GFLOP/s (x86_64-2cpu-cpu, 1 thread)" in line
    table = trial_table.table(frame)
    assert "utilization" in table.columns
    column = [row[table.columns.index("utilization")].text for row in table.rows]
    assert sorted(column) == sorted(["20.0%", "5.0%", "40.0%", "—"])
    new = render.html([folder])
    assert line in html_lib.unescape(new) and "<th>utilization</th>" in new


# ---- Wall time, utilization and the frozen floor; scores against a reference run -------------------------

PEAK_1T = {"flops_per_s": 6.4e10, "source": "cached", "machine_class": "x86_64-2cpu-cpu", "device": "cpu", "threads": 1,
           "dtype": "float32", "measured_at": "2026-11-29T00:00:00Z"}


def timed_sweep(folder: Path) -> list[Path]:
    """Four trained LoRA trials and a frozen one in two one-thread lanes, each with its process dates and utilization."""
    plan = [(4, "qv", 0.0, 100.0, 0.212), (8, "qv", 3.5, 120.0, 0.461), (16, "all-linear", 100.25, 61.0, 0.347),
            (64, "all-linear", 123.5, 50.0, 0.391)]
    paths = []
    for r, targets, start, process, fraction in plan:
        path = write_result(folder, r=r, targets=targets, train_s=0.7 * process)
        result = json.loads(path.read_text())
        result["runtime"].update(process_started_at=1.8e9 + start, process_ended_at=1.8e9 + start + process, process_s=process,
                                 utilization={"train_flops": fraction * 6.4e10 * 0.7 * process, "fraction": fraction,
                                              "achieved_flops_per_s": fraction * 6.4e10, "peak_flops_per_s": 6.4e10,
                                              "peak_source": PEAK_1T})
        result["env"].update(parallel=2, torch_threads=1)
        path.write_text(json.dumps(result))
        paths.append(path)
    frozen = write_result(folder, method="frozen", r=None, trainable=0, train_s=0.0, curve=[])
    result = json.loads(frozen.read_text())
    result["runtime"].update(process_started_at=1.8e9 + 180.0, process_ended_at=1.8e9 + 203.0, process_s=23.0)
    result["env"].update(parallel=2, torch_threads=1)
    frozen.write_text(json.dumps(result))
    return [*paths, frozen]


def floor_record(floor: float, ours: float, step: float) -> dict:
    """benchmarks/lora_step.py's JSON, with the keys the report reads."""
    peak = {**PEAK_1T, "flops_per_s": 1.2e11, "threads": 2}
    return {"benchmark": "lora_step", "config": {"reps": 8, "rank": 8, "batch": 4, "seq": 128, "threads": 2},
            "step_s_median": {"floor": step, "ours": 1.1 * step},
            "utilization": {"floor": {"step_flops": 2.9e11, "fraction": floor}, "ours": {"step_flops": 3e11, "fraction": ours},
                            "peak": peak}}


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def test_wall_time_utilization_and_floor(tmp_path):
    """The overview's Run line and the section "Wall time and utilization": the runner's span from the trials' process
    dates and its lanes, the trials' utilization (median, min, max) and the frozen floor's over the lora_step.py runs
    given with --floor (a folder gives its lora_step records only), each figure recomputed here from the fixture files."""
    import html as html_lib
    import statistics

    from reports import utilization

    folder = tmp_path / "sweep"
    written = [json.loads(p.read_text()) for p in timed_sweep(folder)]
    perf = tmp_path / "perf"
    perf.mkdir()
    (perf / "lora_step_a.json").write_text(json.dumps(floor_record(0.553, 0.501, 1.9)))
    (perf / "lora_step_b.json").write_text(json.dumps(floor_record(0.471, 0.442, 2.2)))
    (perf / "lora_step_c.json").write_text(json.dumps(floor_record(0.618, 0.557, 1.7)))
    (perf / "other.json").write_text(json.dumps({"benchmark": "longlora_context", "rows": []}))  # not a floor record

    starts = [r["runtime"]["process_started_at"] for r in written]
    ends = [r["runtime"]["process_ended_at"] for r in written]
    wall = max(ends) - min(starts)
    busy = sum(r["runtime"]["process_s"] for r in written) / (wall * 2)
    fractions = [r["runtime"]["utilization"]["fraction"] for r in written if "utilization" in r["runtime"]]
    floors = [json.loads(p.read_text())["utilization"]["floor"]["fraction"] for p in sorted(perf.glob("lora_step_*.json"))]
    assert len(utilization.floor_records([perf])) == len(floors)  # the longlora record is left out

    page = html_lib.unescape(render.html([folder], floor=[perf]))
    run_line = (f"Run: {wall:,.0f} s of runner wall time ({wall / 60:.1f} min) in 2 lanes of 1 thread(s); the {len(fractions)} "
                f"trained trials at a median {pct(statistics.median(fractions))} of the matmul peak (min {pct(min(fractions))}, "
                f"max {pct(max(fractions))}); the frozen floor at a median {pct(statistics.median(floors))} "
                f"(min {pct(min(floors))}, max {pct(max(floors))}) over {len(floors)} benchmarks/lora_step.py runs")
    assert run_line in page
    overview = page[page.index('<section id="overview">'):page.index('<section id="utilization">')]
    assert "Run: " in overview  # the headline is in the overview, before the Pareto plot
    assert f"Runner wall time: {wall:,.0f} s" in page and f"{len(written)} trials" in page and f"{100 * busy:.1f}% of span x lanes" in page
    assert f"lora_step_a.json, lora_step_b.json, lora_step_c.json in {perf}" in page  # the provenance line names the floor's files
    built = {s.id: s for s in sections.build(results.tidy(results.frame(folder)), render.published(),
                                             {"lora_step": utilization.floor_records([perf])})}
    section = built["utilization"]
    assert section.has_data
    by_method, floor_table = [b.table for b in section.blocks if b.kind == "table"]
    all_row = by_method.rows[0]
    assert [c.text for c in all_row[:5]] == ["all trained trials", str(len(fractions)), pct(statistics.median(fractions)),
                                             pct(min(fractions)), pct(max(fractions))]
    assert [row[by_method.columns.index("trials")].text for row in by_method.rows[1:]] == ["2", "2"]  # qv, all-linear
    assert [row[floor_table.columns.index("floor utilization")].text for row in floor_table.rows] == [pct(f) for f in floors]

    # Without --floor: the section says how to give one; results without process dates: no wall time, no failure.
    bare = {s.id: s for s in sections.build(results.tidy(results.frame(folder)), render.published(), {})}["utilization"]
    assert "no benchmarks/lora_step.py record given" in " ".join(b.text for b in bare.blocks)
    old = tmp_path / "old"
    write_result(old)
    assert "not recorded" in html_lib.unescape(render.html([old])) and "Run: " not in html_lib.unescape(render.html([old]))
    assert utilization.headline(results.tidy(results.frame(old)), {"lora_step": utilization.floor_records([perf])}) is None


def test_floor_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    from bench import cli

    folder = tmp_path / "sweep"
    timed_sweep(folder)
    good, bad = tmp_path / "lora_step.json", tmp_path / "lora_step_old.json"
    good.write_text(json.dumps(floor_record(0.5, 0.45, 2.0)))
    record = floor_record(0.5, 0.45, 2.0)
    del record["utilization"]["floor"]
    bad.write_text(json.dumps(record))
    out = tmp_path / "r.html"
    for args, named in [([str(bad)], "utilization.floor"), ([str(tmp_path / "missing.json")], "missing.json"),
                        ([str(tmp_path / "sweep")], "no benchmarks/lora_step.py output")]:
        assert render.main([str(folder), "-o", str(out), "--floor", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and named in err, err
        assert not out.exists()
    assert render.main([str(folder), "--reference", str(tmp_path / "nowhere"), "-o", str(out)]) == 2
    assert "nowhere" in capsys.readouterr().err and not out.exists()
    # peftbench report takes the same options.
    assert cli.main(["report", str(folder), "--floor", str(good), "-o", str(out)]) == 0
    assert "the frozen floor from lora_step.json" in out.read_text()


def test_scores_against_a_reference_run(tmp_path):
    """--reference: every score of each trial in both runs against the reference's seed spread, counted here from the
    fixture files (own seeds' spread where the configuration was replicated, else the suite's largest)."""
    import html as html_lib

    ref, run = tmp_path / "lora_sweep", tmp_path / "lora_sweep_parallel"
    ref_paths = [write_result(ref, seed=0, score=0.80), write_result(ref, seed=1, score=0.84), write_result(ref, r=16, score=0.70)]
    run_paths = [write_result(run, seed=0, score=0.80), write_result(run, seed=1, score=0.91), write_result(run, r=16, score=0.73)]
    refs = {r["trial_id"]: r for r in (json.loads(p.read_text()) for p in ref_paths)}
    ours = {r["trial_id"]: r for r in (json.loads(p.read_text()) for p in run_paths)}
    assert set(refs) == set(ours)
    acc = {i: r["eval"]["lm_eval"]["sst2"]["acc"] for i, r in refs.items()}
    seeds = [acc[i] for i, r in refs.items() if r["spec"]["method"]["config"]["r"] == 8]
    spread = max(seeds) - min(seeds)  # r=8's own seeds; r=16 has one seed, so it gets the suite's largest: the same
    outside = [i for i in ours if abs(ours[i]["eval"]["lm_eval"]["sst2"]["acc"] - acc[i]) > spread]
    identical_acc = [i for i in ours if ours[i]["eval"]["lm_eval"]["sst2"]["acc"] == acc[i]]
    n_scores = 2 * len(ours)  # acc and forgetting each; forgetting is the same everywhere
    page = html_lib.unescape(render.html([run], reference=ref))
    summary = f"{len(ours)} trials, {n_scores} scores, {len(outside)} outside spread, identical: {len(identical_acc) + len(ours)}"
    assert summary in page
    assert f"lm-eval scores identical to the reference's in {len(identical_acc)} of {len(ours)} trials" in page
    assert "Outside the spread: " + " ".join([outside[0][:8], ours[outside[0]]["label"]]) in page
    assert f"scores compared with {ref}" in page  # the provenance line
    # Without --reference the section has no data and says how to get it.
    built = {s.id: s for s in sections.build(results.tidy(results.frame(run)), render.published(), {})}
    assert not built["reference"].has_data and "--reference REF_DIR" in built["reference"].blocks[0].text

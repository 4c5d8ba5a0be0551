"""The answer box's rules, the label helpers, hover titles, sections without data and the index page."""

from __future__ import annotations

import json
import re

import pandas as pd
from matplotlib.figure import Figure

from reports import answer, figures, render
from reports.blocks import Section, Table, natural_key, short_label
from tests.test_report import GIB, section_text, write_result


def opt(config: str, mean: float, half: float, peak_gib: float, n: int = 3) -> answer.Option:
    return answer.Option(config, f"lora({config}) adamw ep1", n, mean, mean - half, mean + half, "ci", peak_gib * GIB)


def test_a_budget_gets_a_row_only_when_the_answer_changes():
    frozen = opt("frozen", 0.60, 0.0, 0.4, n=1)
    small = opt("small", 0.80, 0.01, 1.8)
    big = opt("big", 0.85, 0.01, 2.9)
    ans = answer.answers([frozen, small, big])
    assert [(a.budget_gib, a.best.config) for a in ans] == [(0.5, "frozen"), (2, "small"), (3, "big")]
    assert [a.fits for a in ans] == [1, 2, 3]


def test_runners_up_are_the_configurations_whose_interval_overlaps_the_best():
    best = opt("best", 0.85, 0.02, 1.0)
    close = opt("close", 0.84, 0.02, 0.9)  # 0.82-0.86 overlaps 0.83-0.87
    far = opt("far", 0.70, 0.02, 0.8)
    a = answer.answers([best, close, far])[-1]
    assert a.best.config == "best" and [o.config for o in a.close] == ["close"]
    assert "1 other is within noise" in answer.sentence(a, [])


def test_a_configuration_fits_on_its_worst_seed_not_its_mean(tmp_path):
    folder = tmp_path / "worst"
    # Mean peak 1.9 GiB, worst seed 2.2 GiB: over a 2 GiB budget, so at 2 GiB the answer stays r=4 (no row).
    for seed, peak in ((0, 1.6), (1, 2.2), (2, 1.9)):
        write_result(folder, r=16, seed=seed, score=0.90 + 0.001 * seed, peak=peak * GIB)
    for seed in range(3):
        write_result(folder, r=4, seed=seed, score=0.70 + 0.001 * seed, peak=1.5 * GIB)
    html = render.html([folder])
    box = section_text(html, "answer")
    rows = re.findall(r"<tr>(.*?)</tr>", box.split("<tbody>")[1], re.S)
    assert len(rows) == 2
    assert "≤ 1.5 GiB" in rows[0] and "r=4" in rows[0]
    assert "≤ 2.5 GiB" in rows[1] and "r=16" in rows[1] and "worst-seed peak 2.20 GiB" in rows[1]


def test_a_single_run_uses_lm_evals_standard_error(tmp_path):
    folder = tmp_path / "single"
    write_result(folder, r=8, score=0.80, peak=1.0 * GIB)  # acc_stderr 0.02 in write_result
    trials = render.results.tidy(render.results.frame(folder))
    (o,) = answer.options(trials, render.sections.seed_groups(trials))
    assert o.noise == "stderr" and abs((o.hi - o.mean) - answer.Z95 * 0.02) < 1e-9
    assert "±1.96 lm-eval stderr" in o.score_text()


def test_an_exact_tie_goes_to_the_lighter_configuration(tmp_path):
    """Both got 1049 of 1710 right over three seeds; summed in another order, the heavier one's mean
    is a last bit higher, which must not make it the best of the larger budget."""
    folder = tmp_path / "tie"
    for seed, (heavy, light) in enumerate(((364, 362), (341, 342), (344, 345))):
        write_result(folder, r=16, seed=seed, score=heavy / 570, peak=2.0 * GIB)
        write_result(folder, r=4, seed=seed, score=light / 570, peak=1.0 * GIB)
    trials = render.results.tidy(render.results.frame(folder))
    opts = answer.options(trials, render.sections.seed_groups(trials))
    assert len({o.mean for o in opts}) == 1
    (only,) = answer.answers(opts)  # one row: the larger budget does not change the answer
    assert only.budget_gib == 1 and "r=4" in only.best.label


def test_seeds_that_score_alike_draw_an_interval_of_no_width(tmp_path):
    """Two seeds, the same score (a hard prompt whose shots both seeds drew alike): the group's score
    is the mean its interval centres on, so the error bar's arms are not negative (matplotlib refused
    the methods figure of a partial methods_tuned run) and the figure draws."""
    folder = tmp_path / "alike"
    for seed in range(2):
        write_result(folder, r=8, seed=seed, score=323 / 570)
    groups = render.sections.with_ci(render.sections.seed_groups(render.results.tidy(render.results.frame(folder))))
    (g,) = groups.itertuples()
    assert g.score_lo <= g.score <= g.score_hi
    assert "<svg" in figures.methods(groups.assign(method=["lora"]))


def test_labels_drop_defaults_and_sort_numbers_as_numbers():
    assert short_label("lora(r=16,alpha=32,dropout=0.0,targets=all-linear,rslora=False) adamw ep2") == \
        "lora(r=16, α=32, all-linear) adamw ep2"
    assert len(short_label("x(" + "a=1," * 40 + ") adamw")) == 64
    assert sorted(["lora(r=16)", "lora(r=4)", "lora(r=64)", "lora(r=8)"], key=natural_key) == \
        ["lora(r=4)", "lora(r=8)", "lora(r=16)", "lora(r=64)"]
    # Decimals and exponents are whole numbers: digit runs read as integers would put 0.0115 before 0.00274.
    assert sorted(["ia3 lr=0.0115", "ia3 lr=3.65e-05", "ia3 lr=0.00274", "ia3 lr=2.05e-06"], key=natural_key) == \
        ["ia3 lr=2.05e-06", "ia3 lr=3.65e-05", "ia3 lr=0.00274", "ia3 lr=0.0115"]
    labels = ["lora(r=4) adamw ep10 lr=0.1", "lora(r=8) adamw ep10 lr=0.01"]
    common = answer.common_words(labels)
    assert common == ["adamw", "ep10"] and answer.name(labels[1], common) == "lora(r=8) lr=0.01"


def test_names_say_what_sets_a_configuration_apart():
    """Settings every configuration of a group shares are said once, so that a long label is not cut
    before the setting that tells two configurations apart."""
    labels = [f"longlora(r=8,alpha=16,targets=qv,group_size_ratio=0.25,shift=True,train_embeddings={e},train_norms={n}) adamw ep2"
              for e, n in (("True", "True"), ("False", "True"), ("False", "False"))]
    common = answer.common_words(labels)
    assert common == ["r=8", "α=16", "qv", "group_size_ratio=0.25", "shift=True", "adamw", "ep2"]
    assert answer.name(labels[2], common) == "longlora(train_embeddings=False, train_norms=False)"
    alone = answer.common_words(labels[:1])  # one configuration: nothing to tell apart, its name says it all
    assert alone == ["adamw", "ep2"] and answer.name(labels[0], alone).startswith("longlora(r=8, α=16, qv, group_size_ratio=0.25")
    assert answer.common_words([*labels, "frozen"]) == []  # a label without settings shares none


def test_labelled_points_carry_their_title_in_the_svg():
    fig = Figure()
    ax = fig.subplots()
    figures.label_points(ax.scatter([1, 2, 3], [3, 4, 5]), ["a<b", "second", "third & last"])
    svg = figures._svg(fig)
    assert re.findall(r'<g class="point"><title>(.*?)</title>', svg) == ["a&lt;b", "second", "third &amp; last"]
    assert "peftbench-point" not in svg


def test_a_section_without_data_is_closed_away(tmp_path):
    s = Section("x", "X")
    s.p("No results.")
    s.table(Table(["a"], []))
    assert not s.has_data
    s.figure("<svg></svg>", "a figure")
    assert s.has_data
    html = render.html([write_result(tmp_path / "one", score=0.8).parent])
    closed = html.split('<details id="no-data">')[1]
    assert '<section id="qlora">' in closed and '<section id="answer">' not in closed
    assert html.index('<section id="answer">') < html.index("<nav>")  # the answer first, the contents after


def test_index_links_every_report(tmp_path, capsys):
    for name in ("b.html", "a.html"):
        (tmp_path / name).write_text(f'<title>report {name}</title><p class="meta">from <b>somewhere</b></p>')
    assert render.main(["--index", str(tmp_path)]) == 0
    index = (tmp_path / "index.html").read_text()
    assert index.index('href="a.html"') < index.index('href="b.html"') and "from somewhere" in index
    assert render.main(["--index", str(tmp_path / "missing")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_answer_groups_per_model_task_and_device(tmp_path):
    folder = tmp_path / "two"
    write_result(folder, r=8, score=0.8, peak=1.0 * GIB)
    write_result(folder, r=8, score=0.7, peak=1.0 * GIB, model="other-model")
    trials = render.results.tidy(render.results.frame(folder))
    s = answer.section(trials, render.sections.seed_groups(trials))
    (block, _note) = s.blocks
    assert [row[0].text.split(",")[0] for row in block.table.rows] == ["other-model", "smollm2-135m"]
    assert isinstance(trials, pd.DataFrame)


def test_trials_on_two_cpu_models_share_one_answer_and_a_gpu_gets_its_own(tmp_path):
    """A suite resumed on another host (methods_tuned ran on an Intel and an AMD host) is one answer on
    CPU; a GPU's memory is another budget."""
    folder = tmp_path / "hosts"
    devices = {(4, 0): "cpu: Intel(R) Xeon(R) Processor", (4, 1): "cpu: AMD EPYC 9B14", (8, 0): "cpu: AMD EPYC 9B14",
               (8, 1): "cpu: AMD EPYC 9B14", (16, 0): "NVIDIA H200", (16, 1): "NVIDIA H200"}
    for (r, seed), device in devices.items():
        path = write_result(folder, r=r, seed=seed, score=0.7 + 0.01 * r + 0.001 * seed, peak=r / 8 * GIB)
        result = json.loads(path.read_text())
        result["env"]["device"] = device
        path.write_text(json.dumps(result))
    trials = render.results.tidy(render.results.frame(folder))
    (block, _note) = answer.section(trials, render.sections.seed_groups(trials)).blocks
    rows = [(row[0].text.split(", ")[2].split(" (all")[0], row[1].text, "r=" + row[2].text.split("r=")[1].split(",")[0])
            for row in block.table.rows]
    assert rows == [("CPU", "≤ 0.5 GiB", "r=4"), ("CPU", "≤ 1 GiB", "r=8"), ("NVIDIA H200", "≤ 2 GiB", "r=16")]
    assert answer.memory_of("cpu: AMD EPYC 9B14") == answer.memory_of("cpu: Intel(R) Xeon(R) Processor") == "CPU"


def test_the_best_is_chosen_on_validation_where_every_configuration_has_it():
    # "test" wins on the test score, "val" on validation: the choice follows validation.
    a = answer.Option("test", "a() ep1", 3, 0.86, 0.85, 0.87, "ci", 1.0 * GIB, val=0.80)
    b = answer.Option("val", "b() ep1", 3, 0.84, 0.83, 0.85, "ci", 1.0 * GIB, val=0.82)
    (ans,) = answer.answers([a, b])
    assert ans.best.config == "val" and "best validation score (82.0%)" in answer.sentence(ans, [])
    # One configuration without a validation score: the test score decides for all.
    c = answer.Option("none", "c() ep1", 3, 0.10, 0.09, 0.11, "ci", 1.0 * GIB)
    assert answer.answers([a, b, c])[0].best.config == "test"


def tuned(path, role: str, label: str, split: str | None = None) -> None:
    """Make write_result's trial a tuned study's (bench/run/tune.py's tags), scored on `split` rows."""
    result = json.loads(path.read_text())
    result["tune"] = {"role": role, "metric": "acc", "study": "0123456789abcdef", "budget": 8, "sampler": "lhs",
                      "sampler_seed": 0, "validation_rows": 64}
    result["label"] = label
    if split:
        result["spec"]["eval"]["split"] = split
    path.write_text(json.dumps(result))


def test_tuning_search_trials_stay_out_of_the_answer_and_the_seed_word_leaves_the_label(tmp_path):
    """A search trial is scored on validation rows: however high, it does not compete with the held-out
    scores of the chosen configuration's seeds, whose label ("seed1 final lr=...") names no one seed."""
    folder = tmp_path / "tuned"
    tuned(write_result(folder, seed=9, score=0.95, peak=1.0 * GIB), "search", "lora(r=8) adamw ep1 seed0 search2 lr=1e-03", "validation")
    for seed, score in enumerate([0.70, 0.72, 0.71]):
        tuned(write_result(folder, seed=seed, score=score, peak=1.0 * GIB), "final", f"lora(r=8) adamw ep1 seed{seed} final lr=1e-03")
    trials = render.results.tidy(render.results.frame(folder))
    s = answer.section(trials, render.sections.seed_groups(trials))
    table, note = s.blocks
    (row,) = table.table.rows
    assert "71.0 ± " in row[1].text and "(n=3, 95% CI)" in row[1].text and "95" not in row[1].text.split("GiB")[0].split("±")[0]
    assert row[1].title == "lora(r=8) adamw ep1 final lr=1e-03"
    assert "The 1 tuning search trial(s) are left out" in note.text


def test_a_tuned_suite_leads_with_its_ranking(tmp_path):
    folder = tmp_path / "tuned"
    for method, scores in {"lora": [0.80, 0.82, 0.81], "ia3": [0.70, 0.69, 0.71]}.items():
        for seed, score in enumerate(scores):
            tuned(write_result(folder, method=method, seed=seed, score=score), "final", f"{method}(r=8) adamw ep1 seed{seed} final")
    trials = render.results.tidy(render.results.frame(folder))
    assert [s.id for s in render.sections.build(trials, render.published(), {})][:2] == ["answer", "ranking"]

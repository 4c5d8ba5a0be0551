"""reports/ranking.py on a constructed frame: ranks, CIs, Holm-corrected significance, cost, and
the rank correlation with peft's published ordering."""

from __future__ import annotations

import statistics

import pandas as pd
import pytest

from reports import ranking
from reports.blocks import Table

SCORES = {"lora": [0.80, 0.81, 0.82], "ia3": [0.70, 0.71, 0.69], "dora": [0.795, 0.815, 0.805]}


def frame() -> pd.DataFrame:
    rows = []
    for method, scores in SCORES.items():
        for seed, score in enumerate(scores):
            rows.append({"tune.role": "final", "status": "success", "spec.data.task": "sst2", "tune.metric": "acc",
                         "eval.lm_eval.sst2.acc": score, "spec.method.name": method, "tune.study": f"{method}000000",
                         "spec.train.seed": seed, "memory.peak_bytes": 1e9 + seed, "runtime.step_s_median": 0.5,
                         "params.trainable": {"lora": 1000, "ia3": 10, "dora": 1100}[method], "tune.budget": 8,
                         "tune.sampler": "optuna.samplers.TPESampler", "tune.sampler_seed": 0, "tune.validation_rows": 64})
    # A search trial's score (validation rows) must not enter the ranking, however high.
    rows.append({**rows[3], "tune.role": "search", "eval.lm_eval.sst2.acc": 0.99})
    return pd.DataFrame(rows)


def with_frozen(score: float = 0.705) -> pd.DataFrame:
    """frame() plus the untuned frozen model, once on the held-out rows and once on a validation split
    (a reference scored on other rows must not enter), and a trained untuned trial (not a reference)."""
    frozen = {"tune.role": None, "status": "success", "spec.data.task": "sst2", "eval.lm_eval.sst2.acc": score,
              "spec.method.name": "frozen", "tune.study": None, "spec.train.seed": 0, "memory.peak_bytes": 5e8,
              "runtime.step_s_median": None, "params.trainable": 0, "spec.eval.split": None}
    return pd.concat([frame(), pd.DataFrame([frozen, {**frozen, "spec.eval.split": "validation", "eval.lm_eval.sst2.acc": 0.99},
                                             {**frozen, "spec.method.name": "lora", "params.trainable": 1000,
                                              "eval.lm_eval.sst2.acc": 0.2}])], ignore_index=True)


def test_holm_adjusts_step_down():
    assert ranking.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])


def test_rank_with_cis_significance_and_cost():
    ranked = ranking.rank(ranking.finals(frame()))
    assert [r.method for r in ranked] == ["lora", "dora", "ia3"] and [r.rank for r in ranked] == [1, 2, 3]
    lora, dora, ia3 = ranked
    assert lora.estimate.n == 3 and lora.estimate.lo < 0.81 < lora.estimate.hi
    assert ia3.scores == [0.70, 0.71, 0.69]  # the search trial's 0.99 is not a final score
    assert lora.above == ["ia3"] and dora.above == ["ia3"] and ia3.above == []  # lora vs dora: within seed noise
    assert lora.trainable == 1000 and lora.peak_bytes == pytest.approx(1e9 + 1)


def test_the_untrained_frozen_model_is_ranked_as_a_fixed_reference():
    """frozen trains nothing and draws nothing from its seed: one run is its score on every seed, so a
    method is tested against it by a one-sample t-test over the method's seeds (Welch needs two per side)."""
    ranked = ranking.rank(ranking.finals(with_frozen()))
    assert [r.method for r in ranked] == ["lora", "dora", "frozen (untrained)", "ia3"]
    lora, dora, frozen, ia3 = ranked
    assert frozen.scores == [0.705] and frozen.estimate.n == 1 and frozen.trainable == 0
    assert lora.scores == [0.80, 0.81, 0.82]  # the untuned trained lora trial (0.2) is no reference
    assert "frozen (untrained)" in lora.above and "frozen (untrained)" in dora.above
    # ia3 (0.70 +- 0.01 over 3 seeds) against 0.705: within seed noise, and the fixed reference beats nothing by itself.
    assert "frozen (untrained)" not in ia3.above and frozen.above == []
    assert ranking.pair_p([0.80, 0.81, 0.82], [0.705], fixed=True) < 0.01
    assert ranking.pair_p([0.80, 0.81, 0.82], [0.705]) is None  # not fixed: one run says nothing about its spread
    section = ranking.section(with_frozen(), {})
    assert any("(untrained)" in b.text and "one-sample t-test" in b.text for b in section.blocks if b.kind == "p")


def test_exactly_equal_means_share_a_rank_and_are_no_disagreement():
    """DoRA and LoRA both got 1049 of 1710 held-out answers right over three seeds; their float means
    differ in the last bit, which must not rank one above the other."""
    df = frame()
    df.loc[df["spec.method.name"] == "dora", "eval.lm_eval.sst2.acc"] = [364 / 570, 341 / 570, 344 / 570]
    df.loc[(df["spec.method.name"] == "lora") & (df["tune.role"] == "final"), "eval.lm_eval.sst2.acc"] = [362 / 570, 342 / 570, 345 / 570]
    ranked = ranking.rank(ranking.finals(df))
    assert [(r.method, r.rank) for r in ranked] == [("ia3", 1), ("dora", 2), ("lora", 2)]
    for published in ({"lora": 47.8, "dora": 46.9}, {"lora": 46.9, "dora": 47.8}):
        assert ranking.disagreements(ranked, published) == []


def test_finals_run_on_two_machines_say_whose_step_times_are_whose():
    """A suite resumed on another host: its step times compare only within one machine, and the
    section says which methods each machine ran."""
    df = with_frozen().assign(**{"env.device": "cpu: Intel(R) Xeon(R) Processor"})
    assert ranking.machines(ranking.finals(df)) is None
    df.loc[df["spec.method.name"] == "frozen", "env.device"] = "cpu: AMD EPYC 9B14"
    assert ranking.machines(ranking.finals(df)) == (
        "These trials ran on 2 machines: cpu: AMD EPYC 9B14: frozen (untrained); "
        "cpu: Intel(R) Xeon(R) Processor: dora, ia3, lora. A step time compares only with one measured on the same machine.")
    assert any(b.kind == "p" and "2 machines" in b.text for b in ranking.section(df, {}).blocks)


def test_spearman_against_the_published_ordering():
    rho, n = ranking.spearman({"lora": 0.81, "dora": 0.805, "ia3": 0.70, "ours_only": 0.9},
                              {"lora": 47.8, "dora": 46.9, "ia3": 31.1, "vera": 35.4})
    assert n == 3 and rho == pytest.approx(1.0)
    rho, _ = ranking.spearman({"lora": 0.70, "dora": 0.805, "ia3": 0.81}, {"lora": 47.8, "dora": 46.9, "ia3": 31.1})
    assert rho == pytest.approx(-1.0)
    assert ranking.spearman({"lora": 1.0}, {"lora": 2.0}) is None
    ranked = ranking.rank(ranking.finals(frame()))  # ours: lora > dora > ia3, lora-dora within noise
    assert ranking.disagreements(ranked, {"lora": 40.0, "dora": 46.9, "ia3": 50.0}) == [
        ("dora", "ia3", True), ("lora", "dora", False), ("lora", "ia3", True)]
    assert ranking.disagreements(ranked, {"lora": 47.8, "dora": 46.9, "ia3": 31.1}) == []


def test_section_tables_and_published_comparison():
    pub = {"methods": {"peft_ranking": [{"method": "lora", "config": "lora-r32", "gsm8k_pct": 47.8},
                                        {"method": "dora", "config": "dora", "gsm8k_pct": 46.9},
                                        {"method": "ia3", "config": "ia3", "gsm8k_pct": 31.1}]},
           "sources": {"peft_comparison": {"cite": "peft method_comparison", "setup": "Llama-3.2-3B"}}}
    s = ranking.section(frame(), pub)
    assert s.has_data
    tables = [b.table for b in s.blocks if b.kind == "table"]
    assert isinstance(tables[0], Table) and [row[1].text for row in tables[0].rows] == ["lora", "dora", "ia3"]
    assert any("Spearman's rank correlation 1.00 over the 3 methods" in b.text for b in s.blocks)
    assert not ranking.section(frame().assign(**{"tune.role": "search"}), pub).has_data


@pytest.mark.parametrize("n", [3, 5])
def test_least_marked_is_where_the_corrected_tests_start_to_mark(n):
    """least_marked's bounds against the tests rank() runs: seeds spread by exactly sd, shifted by 1%
    more than the bound, survive Holm's first step over the family; shifted by 1% less, they do not."""
    sd, tests = 0.02, 171
    spread = statistics.stdev(range(n))
    base = [0.6 + sd * (i - (n - 1) / 2) / spread for i in range(n)]
    assert statistics.stdev(base) == pytest.approx(sd)
    pair, fixed = ranking.least_marked(sd, n, tests)
    for bound, test in ((pair, lambda d: ranking.pair_p([x + d for x in base], base)),
                        (fixed, lambda d: ranking.pair_p([x + d for x in base], [0.6], fixed=True))):
        assert test(1.01 * bound) * tests < 0.05 < test(0.99 * bound) * tests
    assert ranking.least_marked(sd, n + 2, tests)[0] < pair  # more seeds, finer verdicts


def test_each_task_says_what_its_seeds_can_tell_apart():
    ranked = ranking.rank(ranking.finals(with_frozen()))
    text = ranking.power_note([r for r in ranked if r.task == "sst2"])
    sd = statistics.median(statistics.stdev(SCORES[m]) for m in SCORES)
    pair, fixed = ranking.least_marked(sd, 3, 6)  # 4 entries: 6 pairs, each testable
    assert "over its 6 tests" in text and f"{pair:.3f} or more" in text
    assert f"against frozen (untrained), which runs once, when it is {fixed:.3f} above it" in text and "With 5 seeds" in text
    assert ranking.power_note(ranked[:1]) is None
    # Without a single-run reference the note names none, and Holm's family is the 3 pairs of tuned methods.
    alone = ranking.power_note(ranking.rank(ranking.finals(frame())))
    assert "runs once" not in alone and f"{ranking.least_marked(sd, 3, 3)[0]:.3f} or more" in alone


def with_searches() -> pd.DataFrame:
    """frame() whose finals record their choice, and the search trials behind it: lora chose the middle of
    three rates outright; ia3 the lowest, on a tie with the next."""
    searched = {"lora": ([1e-5, 1e-4, 1e-3], [0.60, 0.70, 0.65], 1), "ia3": ([1e-5, 1e-4, 1e-3], [0.50, 0.50, 0.40], 0),
                "dora": ([1e-5, 1e-4, 1e-3], [0.60, 0.65, 0.70], 2)}
    df = frame()
    df = df[df["tune.role"] == "final"].copy()
    rows = []
    for method, (lrs, scores, best) in searched.items():
        is_method = df["spec.method.name"] == method
        df.loc[is_method, "tune.params.train.lr"] = lrs[best]
        df.loc[is_method, "tune.validation_score"] = scores[best]
        final = df[is_method].iloc[0].to_dict()
        rows += [{**final, "tune.role": "search", "tune.params.train.lr": lr, "eval.lm_eval.sst2.acc": score}
                 for lr, score in zip(lrs, scores, strict=True)]
    return pd.concat([df, pd.DataFrame(rows)], ignore_index=True)


def test_each_method_shows_its_choice_and_the_doubtful_ones_are_named():
    """The chosen setting and validation score beside each method; a choice at the edge of what was searched
    or won on a tie of validation scores is named, since the lowest-rate tie may train nothing."""
    df = with_searches()
    chosen = ranking.choices(df)
    lora, ia3, dora = (chosen[f"{m}000000"] for m in ("lora", "ia3", "dora"))
    assert lora == ranking.Choice({"train.lr": 1e-4}, 0.70, 1, ())
    assert ia3.ties == 2 and ia3.edges == ("train.lr lowest",) and dora.edges == ("train.lr highest",)
    ranked = ranking.rank(ranking.finals(df), chosen)
    assert {r.method: r.choice for r in ranked} == {"lora": lora, "ia3": ia3, "dora": dora}
    note = ranking.choice_note(ranked)
    assert "searched, where a wider range might find better: dora (train.lr highest), ia3 (train.lr lowest)." in note
    assert "ia3 (2 at 0.500)" in note and "lora (" not in note
    table = next(b.table for b in ranking.section(df, {}).blocks if b.kind == "table")
    column = table.columns.index("chosen (validation)")
    assert {row[1].text: row[column].text for row in table.rows}["lora"] == "lr 0.0001 (0.700)"
    # Without recorded choices (results from before they were recorded) nothing is claimed.
    assert ranking.choice_note(ranking.rank(ranking.finals(frame()), ranking.choices(frame()))) is None

"""Which method is best: the tuned methods ranked per task (bench/run/tune.py's final trials).

Each method's chosen configuration was retrained on several seeds and scored on the held-out rows;
its score is the mean over seeds with a 95% t interval. Every pair of methods on a task is tested
(Welch's t-test over seeds) and the p-values are Holm-corrected together, so "significantly above"
survives the number of comparisons made. Beside each score: the cost (peak memory, median step time,
trainable parameters). Then peft's published ordering (reports/published.toml, methods.peft_ranking)
against ours, by Spearman's rank correlation over the methods both have.

How many seeds a verdict needs: Holm's correction over every pair of a task is strict, and a t-test
over 3 seeds has few degrees of freedom, so each task says the difference of means that its seeds
can mark for sure (least_marked) and what more seeds would bring it to.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

import pandas as pd
from scipy import stats as sp

from reports import stats
from reports.blocks import Cell, Section, Table, c_bytes, c_int, c_num, cite, natural_key

ROLE = "tune.role"
PARAMS = "tune.params."


@dataclass(frozen=True)
class Choice:
    """What a method's search chose and what its search says about the choice."""

    params: dict[str, float | str]
    """The chosen setting of every searched key (train.lr, ...)."""
    validation: float
    """Its score on the validation rows: other rows than the held-out ones, and the best of its search, so it does not
    compare with the held-out score."""
    ties: int
    """How many search trials scored exactly that (the chosen one included): over 1, the lowest setting won a tie."""
    edges: tuple[str, ...] = ()
    """Searched keys whose chosen value is the lowest or highest the search tried ("train.lr lowest"): the range may
    have cut the search short."""

    def text(self) -> str:
        said = ", ".join(f"{k.removeprefix('train.')} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in self.params.items())
        return f"{said} ({self.validation:.3f})"


def choices(trials: pd.DataFrame) -> dict[str, Choice]:
    """study -> its Choice, read from its final trials (the chosen setting and validation score they record) and
    its search trials (the scores and settings the search saw)."""
    if trials.empty or ROLE not in trials.columns or "tune.validation_score" not in trials.columns:
        return {}
    ok = trials[trials["status"] == "success"]
    keys = [c for c in trials.columns if c.startswith(PARAMS)]
    out: dict[str, Choice] = {}
    for study, fin in ok[ok[ROLE] == "final"].groupby("tune.study"):
        first = fin.iloc[0]
        task, metric, chosen = first["spec.data.task"], first["tune.metric"], float(first["tune.validation_score"])
        search = trials[(trials[ROLE] == "search") & (trials["tune.study"] == study)]
        scores = pd.to_numeric(search.get(f"eval.lm_eval.{task}.{metric}"), errors="coerce")
        # pandas gives numpy scalars: is_number, not isinstance(int), tells a searched number (an int rank too); a flag stays a word.
        params = {k.removeprefix(PARAMS): float(v) if pd.api.types.is_number(v) and not pd.api.types.is_bool(v) else str(v)
                  for k in keys if pd.notna(v := first[k])}
        edges = []
        for key, value in params.items():
            tried = pd.to_numeric(search[PARAMS + key], errors="coerce").dropna()
            if isinstance(value, float) and len(tried) > 1:
                edges += [f"{key} lowest"] if value <= tried.min() else [f"{key} highest"] if value >= tried.max() else []
        out[study] = Choice(params, chosen, int((scores == chosen).sum()), tuple(edges))
    return out


@dataclass(frozen=True)
class Ranked:
    """One method on one task: its seeds' scores, estimate, rank and the methods it beats."""

    task: str
    method: str
    scores: list[float]
    estimate: stats.Estimate
    rank: int
    above: list[str] = field(default_factory=list)
    """Methods this one scores significantly above (Holm-corrected Welch t-tests over seeds)."""
    peak_bytes: float | None = None
    step_s: float | None = None
    trainable: float | None = None
    tests: int = 0
    """How many pairwise tests Holm's correction covered on this task (the pairs that could be tested)."""
    reference: bool = False
    """A single run of an untuned method that trains nothing (the frozen model): the others are tested against it
    with a one-sample t-test."""
    choice: Choice | None = None
    """What the method's search chose (None for an untuned reference)."""


def finals(trials: pd.DataFrame) -> pd.DataFrame:
    """The successful final trials: task, method, seed, score (the tuning metric on the eval rows) and cost;
    plus, as references, the untuned trials that train nothing (frozen, hard_prompt) on the same tasks and
    rows, scored with the same metric: the line a tuned method has to clear."""
    if trials.empty or ROLE not in trials.columns:
        return pd.DataFrame()
    ok = trials[trials["status"] == "success"]
    df = ok[ok[ROLE] == "final"]
    metric = {r["spec.data.task"]: r["tune.metric"] for _, r in df.iterrows()}
    untrained = ok[ok[ROLE].isna() & (pd.to_numeric(ok.get("params.trainable"), errors="coerce") == 0)
                   & ok["spec.data.task"].isin(metric)]
    if "spec.eval.split" in ok:  # a reference scored on other rows than the finals' would not compare
        untrained = untrained[untrained["spec.eval.split"].isna()]
    rows = []
    for _, r in pd.concat([df, untrained]).iterrows():
        task = r["spec.data.task"]
        score = r.get(f"eval.lm_eval.{task}.{metric[task]}")
        if score is None or pd.isna(score):
            continue
        tuned = r[ROLE] == "final"
        rows.append({"task": task, "method": r["spec.method.name"], "study": r["tune.study"] if tuned else "untuned",
                     "tuned": tuned, "seed": r["spec.train.seed"], "score": float(score), "peak": r.get("memory.peak_bytes"),
                     "step": r.get("runtime.step_s_median"), "trainable": r.get("params.trainable"),
                     "device": r.get("env.device")})
    out = pd.DataFrame(rows)
    if out.empty or not out["tuned"].any():
        return pd.DataFrame()
    # A method tuned at several grid points (two ranks, say) shows each point as its own entry.
    several = out.groupby(["task", "method"])["study"].transform("nunique") > 1
    out.loc[several, "method"] = out.loc[several, "method"] + " " + out.loc[several, "study"].str[:6]
    out.loc[~out["tuned"], "method"] = out.loc[~out["tuned"], "method"] + " (untrained)"
    return out


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input's order."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    adjusted = [0.0] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def pair_p(a: list[float], b: list[float], fixed: bool = False) -> float | None:
    """Two-sided p-value that a and b differ: Welch's t-test over seeds, or where b is `fixed` (one run of a
    method that trains nothing and draws nothing from its seed, so every seed would score the same) a
    one-sample t-test of a's seeds against it. None where it cannot be computed (too few seeds, no spread)."""
    if fixed:
        if len(a) < 2 or statistics.variance(a) == 0:
            return None
        return float(sp.ttest_1samp(a, b[0]).pvalue)
    if len(a) < 2 or len(b) < 2 or statistics.variance(a) + statistics.variance(b) == 0:
        return None
    return float(sp.ttest_ind(a, b, equal_var=False).pvalue)


def least_marked(sd: float, n: int, tests: int) -> tuple[float, float]:
    """The difference of means that Holm's correction over `tests` p-values marks whatever the others
    are (Holm's first step, Bonferroni's alpha / tests), for two methods of `n` seeds each with seed
    standard deviation `sd` (Welch's test, whose degrees of freedom are 2(n - 1) when the two spreads are
    equal), and for a method against a fixed reference (the one-sample test, n - 1)."""
    q = 1 - stats.ALPHA / (2 * tests)
    return (float(sp.t.ppf(q, 2 * (n - 1))) * sd * math.sqrt(2 / n), float(sp.t.ppf(q, n - 1)) * sd / math.sqrt(n))


def power_note(rows: list[Ranked], more: int = 5) -> str | None:
    """What the seeds of one task's tuned methods can tell apart (least_marked at their median seed
    standard deviation, over the task's Holm family), now and with `more` seeds; None without two methods
    of two seeds or more."""
    spreads = {r.method: statistics.stdev(r.scores) for r in rows if r.estimate.n >= 2}
    seeded = [r for r in rows if spreads.get(r.method, 0) > 0]
    if len(seeded) < 2:
        return None
    n = int(statistics.median_low(r.estimate.n for r in seeded))
    sd = statistics.median(spreads[r.method] for r in seeded)
    tests = rows[0].tests
    references = [r.method for r in rows if r.reference]
    pair, fixed = least_marked(sd, n, tests)
    against = (f", and a method against {_names(references)}, which runs once, when it is {fixed:.3f} above it"
               if references else "")
    text = (f"How much the seeds can tell apart on {rows[0].task}: with {n} seeds and the median seed standard deviation "
            f"{sd:.3f}, Holm's correction over its {tests} tests marks two methods for sure when their means differ by "
            f"{pair:.3f} or more{against}; smaller differences are marked only as Holm's later steps allow.")
    if more > n:
        pair_more, fixed_more = least_marked(sd, more, tests)
        text += f" With {more} seeds at the same spread: {pair_more:.3f}" + (f" ({fixed_more:.3f})." if references else ".")
    return text


def choice_note(rows: list[Ranked]) -> str | None:
    """The choices a reader should doubt: at the edge of what the search tried (the range may have cut it short),
    or won on a tie of validation scores (the lowest setting wins, whether or not it trains anything); None if none."""
    edge = [f"{r.method} ({', '.join(r.choice.edges)})" for r in rows if r.choice and r.choice.edges]
    tied = [f"{r.method} ({r.choice.ties} at {r.choice.validation:.3f})" for r in rows if r.choice and r.choice.ties > 1]
    if not edge and not tied:
        return None
    text = f"How the choices on {rows[0].task} were made: the chosen setting and its validation score sit beside each " \
           "method (other rows than the held-out ones, and the best of the search: it does not compare with the held-out score)."
    if edge:
        text += f" At the edge of the settings searched, where a wider range might find better: {', '.join(edge)}."
    if tied:
        text += (f" Chosen from equal validation scores, where the lowest setting wins (search trials at the chosen score): "
                 f"{', '.join(tied)}; a choice at a rate too low to move the model scores as the frozen model does.")
    return text


def _names(methods: list[str]) -> str:
    return methods[0] if len(methods) == 1 else ", ".join(methods[:-1]) + " or " + methods[-1]


def rank(df: pd.DataFrame, chosen: dict[str, Choice] | None = None) -> list[Ranked]:
    """Every task's methods, best mean first, with the pairs that differ after Holm's correction; `chosen`
    (choices()) says what each study's search chose."""
    out: list[Ranked] = []
    for task, rows in df.groupby("task", sort=True):
        scores = {m: list(g["score"]) for m, g in rows.groupby("method")}
        # A single untuned run (finals() admits only those that train nothing): frozen scores the same whatever the
        # seed (hard_prompt's shots vary: it runs per seed).
        fixed = {m for m, g in rows.groupby("method") if len(g) == 1 and not g["tuned"].any()}
        means = {m: stats.mean(v) for m, v in scores.items()}
        order = sorted(scores, key=lambda m: (-means[m], m))
        pairs = [(a, b) for i, a in enumerate(order) for b in order[i + 1:]]
        tested = [(a, b, p) for a, b in pairs if (p := _p(scores, fixed, a, b)) is not None]
        adjusted = holm([p for _, _, p in tested])
        beats: dict[str, list[str]] = {m: [] for m in order}
        for (a, b, _), q in zip(tested, adjusted, strict=True):
            if q < stats.ALPHA:  # a's mean is above b's (order), and the difference survives Holm
                beats[a].append(b)
        for m in order:
            g = rows[rows["method"] == m]
            tied_rank = 1 + sum(means[o] > means[m] for o in order)  # equal means share a rank (1, 1, 3)
            out.append(Ranked(task, m, scores[m], stats.estimate(scores[m]), tied_rank, beats[m],
                              g["peak"].median(), g["step"].median(), g["trainable"].median(), len(tested), m in fixed,
                              (chosen or {}).get(g["study"].iloc[0])))
    return out


def _p(scores: dict[str, list[float]], fixed: set[str], a: str, b: str) -> float | None:
    if a in fixed and b in fixed:
        return None
    if a in fixed:  # two-sided: the order of the pair does not matter
        a, b = b, a
    return pair_p(scores[a], scores[b], fixed=b in fixed)


def spearman(ours: dict[str, float], published: dict[str, float]) -> tuple[float, int] | None:
    """Spearman's rank correlation over the methods both have, and their number; None under 3."""
    common = sorted(set(ours) & set(published))
    if len(common) < 3:
        return None
    rho = sp.spearmanr([ours[m] for m in common], [published[m] for m in common]).statistic
    return float(rho), len(common)


def disagreements(ranked: list[Ranked], published: dict[str, float]) -> list[tuple[str, str, bool]]:
    """The pairs (ours above, ours below, whether our Holm-corrected test separates them) of methods
    that both orderings have and that they order the other way round."""
    ours = {r.method: r for r in ranked}
    common = sorted(m for m in ours if m in published)
    out = []
    for i, a in enumerate(common):
        for b in common[i + 1:]:
            if (ours[a].estimate.mean - ours[b].estimate.mean) * (published[a] - published[b]) < 0:
                hi, lo = (a, b) if ours[a].estimate.mean > ours[b].estimate.mean else (b, a)
                out.append((hi, lo, lo in ours[hi].above))
    return out


def machines(df: pd.DataFrame) -> str | None:
    """Which machine measured which method's step times, when the finals ran on more than one (a suite
    resumed over sessions on other hosts); None when one machine ran them all."""
    if "device" not in df:
        return None
    hosts = df.dropna(subset=["device"]).groupby("device")["method"].agg(lambda ms: sorted(set(ms), key=natural_key))
    if len(hosts) < 2:
        return None
    return (f"These trials ran on {len(hosts)} machines: " + "; ".join(f"{d}: {', '.join(ms)}" for d, ms in hosts.items())
            + ". A step time compares only with one measured on the same machine.")


def section(trials: pd.DataFrame, pub: dict) -> Section:
    s = Section("ranking", "Which method is best (tuned on an equal budget, seeds on held-out rows)")
    df = finals(trials)
    if df.empty:
        return s
    ranked = rank(df, choices(trials))
    tuned = trials[trials[ROLE].notna()]
    budget = sorted(set(tuned["tune.budget"].dropna().astype(int)))
    s.p(f"Each method's learning rate (and any other searched setting) was chosen by {tuned['tune.sampler'].iloc[0]} "
        f"(seed {int(tuned['tune.sampler_seed'].iloc[0])}) from {', '.join(map(str, budget))} search trials per method, "
        f"scored on {int(tuned['tune.validation_rows'].iloc[0])} validation rows carved from the training split; "
        "the choice was retrained per seed and scored on the held-out rows. 95% t intervals over seeds; "
        "'above' lists the methods a method beats after Holm's correction of every pairwise Welch t-test on its task."
        + (" Rows marked (untrained) are the references that train nothing, untuned, on the same rows: one run of the "
           "frozen model scores the same for every seed, so a method is tested against it with a one-sample t-test over "
           "its seeds." if (~df["tuned"]).any() else ""))
    for task in sorted({r.task for r in ranked}):
        rows = [r for r in ranked if r.task == task]
        s.table(Table(["rank", "method", "score (95% CI)", "seeds", "significantly above", "chosen (validation)", "peak memory",
                       "step (ms)", "trainable"], [[
            Cell(str(r.rank), r.rank), Cell(r.method),
            Cell(f"{r.estimate.mean:.3f}" + (f" [{r.estimate.lo:.3f}, {r.estimate.hi:.3f}]" if r.estimate.has_ci else ""), r.estimate.mean),
            Cell(str(r.estimate.n), r.estimate.n), Cell(", ".join(r.above) or "-", len(r.above)),
            Cell(r.choice.text(), r.choice.validation) if r.choice else Cell("-"),
            c_bytes(r.peak_bytes), c_num(None if r.step_s is None else 1000 * r.step_s), c_int(r.trainable)] for r in rows],
            caption=f"{task}: methods ranked by their tuned score over seeds"))
        if (power := power_note(rows)) is not None:
            s.p(power)
        if (said := choice_note(rows)) is not None:
            s.p(said)
    if (note := machines(df)) is not None:
        s.p(note)
    published = {r["method"]: r["gsm8k_pct"] for r in pub.get("methods", {}).get("peft_ranking", []) if r.get("method")}
    if published:
        for task in sorted({r.task for r in ranked}):
            ours = {r.method: r.estimate.mean for r in ranked if r.task == task}
            if (result := spearman(ours, published)) is not None:
                rho, n = result
                flips = disagreements([r for r in ranked if r.task == task], published)
                said = "; ".join(f"{hi} above {lo} ({'significant after Holm' if real else 'within seed noise'})"
                                 for hi, lo, real in flips)
                s.p(f"{task} against peft's published GSM8K ordering (Llama-3.2-3B, MetaMathQA): Spearman's rank "
                    f"correlation {rho:.2f} over the {n} methods both have." + (f" Where they disagree, ours puts {said}." if said else ""))
        s.published(Table(["method", "peft config", "GSM8K (%)"], [
            [Cell(r.get("method") or "-"), Cell(r["config"]), Cell(f"{r['gsm8k_pct']:.1f}", r["gsm8k_pct"])]
            for r in pub["methods"]["peft_ranking"]]), cite(pub, "peft_comparison"))
    return s

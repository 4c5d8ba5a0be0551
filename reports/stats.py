"""Seed statistics: means with t-distribution confidence intervals, and when a difference is real."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import stats

LEVEL = 0.95
ALPHA = 1 - LEVEL


@dataclass(frozen=True)
class Estimate:
    n: int
    mean: float
    lo: float | None  # None with a single seed: one value says nothing about the spread
    hi: float | None

    @property
    def has_ci(self) -> bool:
        return self.lo is not None


def clean(values: Sequence[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and not math.isnan(float(v))]


def mean(xs: Sequence[float]) -> float:
    """The mean over seeds, rounded so that equal sums of counts compare equal: 1049/1710 reached as
    (364 + 341 + 344) / 570 / 3 and as (362 + 342 + 345) / 570 / 3 differs in the last bit, and a tie
    must not read as one configuration above the other (a ranking, the answer box's best)."""
    return round(statistics.fmean(xs), 12)


def estimate(values: Sequence[float | None]) -> Estimate | None:
    xs = clean(values)
    if not xs:
        return None
    n = len(xs)
    mean_ = mean(xs)
    if n < 2:
        return Estimate(n, mean_, None, None)
    sd = statistics.stdev(xs)
    half = float(stats.t.ppf(1 - ALPHA / 2, n - 1)) * sd / math.sqrt(n)
    return Estimate(n, mean_, mean_ - half, mean_ + half)


@dataclass(frozen=True)
class Verdict:
    real: bool | None  # None: the data cannot say
    p: float | None
    text: str


def compare(a: Sequence[float | None], b: Sequence[float | None]) -> Verdict:
    """Is mean(b) - mean(a) real? Welch's t-test (unequal variances) at the 5% level."""
    xa, xb = clean(a), clean(b)
    if not xa or not xb:
        return Verdict(None, None, "no results")
    if len(xa) < 2 or len(xb) < 2:
        return Verdict(None, None, "single seed, no CI: cannot tell a real difference from seed noise")
    va, vb = statistics.variance(xa) / len(xa), statistics.variance(xb) / len(xb)
    if va + vb == 0:
        # Deterministic measurements (e.g. accounted bytes): any difference is exact.
        same = xa[0] == xb[0]
        return Verdict(not same, None, "identical in every seed" if same else "differs identically in every seed")
    t = (statistics.fmean(xb) - statistics.fmean(xa)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(xa) - 1) + vb**2 / (len(xb) - 1))  # Welch-Satterthwaite
    p = float(2 * stats.t.sf(abs(t), df))
    if p < ALPHA:
        return Verdict(True, p, f"real difference (Welch t-test p = {p:.3g})")
    return Verdict(False, p, f"not distinguishable from seed noise (Welch t-test p = {p:.3g})")

"""Intervals against textbook formulas (computed here with numpy and scipy.stats.t/norm) and every verdict branch."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from repro.report import verdicts as V


def t_interval(x):
    """Student-t 95% interval by the formula: mean +- t(0.975, n-1) * s / sqrt(n)."""
    x = np.asarray(x, float)
    half = stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return x.mean() - half, x.mean() + half


def test_mean_ci_matches_the_t_formula():
    x = [1.0, 2.5, 0.5, 1.75]
    iv = V.mean_ci(x)
    lo, hi = t_interval(x)
    assert iv.n == 4 and iv.mean == pytest.approx(1.4375)
    assert (iv.lo, iv.hi) == (pytest.approx(lo), pytest.approx(hi))
    # hand value: s = sqrt(2.296875 / 3) = 0.8750, t = 3.1824 -> half width 1.3923
    assert iv.hi - iv.mean == pytest.approx(1.3923, abs=1e-3)


def test_mean_ci_ignores_missing_values_and_one_value_has_no_interval():
    iv = V.mean_ci([2.0, float("nan"), None, 4.0])
    assert iv.n == 2 and iv.mean == 3.0
    assert (iv.lo, iv.hi) == (pytest.approx(3.0 - 12.7062 * 1.0), pytest.approx(3.0 + 12.7062 * 1.0))
    one = V.mean_ci([5.0])
    assert one.n == 1 and one.mean == 5.0 and math.isnan(one.lo) and math.isnan(one.hi)
    assert V.mean_ci([]).n == 0


def test_diff_is_paired_by_seed_when_seeds_are_shared():
    treat = pd.Series({0: 30.0, 1: 31.5, 2: 29.0, 3: 33.0})
    ctrl = pd.Series({0: 31.0, 1: 33.0, 2: 30.2, 4: 40.0})  # seed 3 and 4 have no partner
    iv, per_seed = V.diff_ci(treat, ctrl)
    d = [-1.0, -1.5, -1.2]
    assert per_seed == {0: -1.0, 1: -1.5, 2: pytest.approx(-1.2)}
    assert iv.paired and iv.n == 3 and iv.mean == pytest.approx(np.mean(d))
    ref = stats.ttest_rel([30.0, 31.5, 29.0], [31.0, 33.0, 30.2]).confidence_interval(0.95)
    assert (iv.lo, iv.hi) == (pytest.approx(ref.low), pytest.approx(ref.high))
    assert (iv.lo, iv.hi) == (pytest.approx(t_interval(d)[0]), pytest.approx(t_interval(d)[1]))


def test_diff_without_shared_seeds_is_welch():
    a, b = np.array([30.0, 31.0, 29.5]), np.array([32.0, 34.5, 33.0, 31.5])
    iv, per_seed = V.diff_ci(pd.Series(a, index=[0, 1, 2]), pd.Series(b, index=[10, 11, 12, 13]))
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))  # Welch-Satterthwaite
    half = stats.t.ppf(0.975, df) * math.sqrt(va + vb)
    assert not iv.paired and per_seed == {}
    assert iv.mean == pytest.approx(a.mean() - b.mean())
    assert (iv.lo, iv.hi) == (pytest.approx(a.mean() - b.mean() - half), pytest.approx(a.mean() - b.mean() + half))


def test_one_seed_each_gives_a_difference_but_no_interval():
    iv, _ = V.diff_ci(pd.Series({0: 30.0}), pd.Series({0: 32.0}))
    assert iv.mean == -2.0 and iv.n == 1 and math.isnan(iv.lo)
    assert V.signed_verdict(-1.4, iv) == ("inconclusive", "one seed only: no confidence interval")


@pytest.mark.parametrize("paper, lo, hi, n, expected", [
    (-1.4, math.nan, math.nan, 0, "not run"),
    (-1.4, math.nan, math.nan, 1, "inconclusive"),
    (-1.4, -2.0, 0.3, 3, "inconclusive"),            # spans zero
    (-1.4, -2.0, 0.0, 3, "inconclusive"),            # touching zero is not excluding it
    (-1.4, 0.2, 1.0, 3, "opposite"),
    (2.0, -3.0, -0.5, 3, "opposite"),
    (-1.4, -1.0, -0.2, 3, "reproduced"),             # reaches 1.0 >= 0.7
    (-1.4, -0.7, -0.1, 3, "reproduced"),             # exactly half the paper's magnitude
    (-1.4, -0.69, -0.1, 3, "same direction, smaller"),
    (2.0, 0.1, 0.5, 3, "same direction, smaller"),
    (2.0, 3.5, 5.0, 3, "reproduced"),                # larger than the paper is still reproduced
    (None, -3.0, -1.0, 3, "no paper number"),
])
def test_every_branch_of_the_signed_rule(paper, lo, hi, n, expected):
    mean = (lo + hi) / 2 if n > 1 else (0.5 if n else math.nan)
    verdict, reason = V.signed_verdict(paper, V.Interval(mean, lo, hi, n))
    assert verdict == expected and reason


def test_absolute_numbers_are_only_compared_at_full_scale():
    iv = V.Interval(41.2, 40.9, 41.5, 3)
    assert V.absolute_verdict(40.7, iv, "demo")[0] == "not comparable"
    assert V.absolute_verdict(40.7, iv, "full")[0] == "reproduced"        # 40.7 within 1 point of [40.9, 41.5]
    assert V.absolute_verdict(40.7, V.Interval(43.0, 42.8, 43.2, 3), "full")[0] == "not reproduced"
    assert V.absolute_verdict(40.7, V.Interval(), "full")[0] == "not run"


def test_speedup_is_judged_on_the_log_scale():
    ratios = pd.Series({0: 6.0, 1: 5.0, 2: 7.5})
    c = V.log_ratio_comparison("tanh / relu", "iters_to_target", 6.0, ratios)
    logs = np.log([6.0, 5.0, 7.5])
    lo, hi = t_interval(logs)
    assert c.measured.mean == pytest.approx(math.exp(logs.mean()))  # geometric mean
    assert (c.measured.lo, c.measured.hi) == (pytest.approx(math.exp(lo)), pytest.approx(math.exp(hi)))
    assert c.verdict == "reproduced"
    # a real but small speed-up: the interval's top (about 1.5x) stays below sqrt(6) = 2.45x
    small = V.log_ratio_comparison("r", "i", 6.0, pd.Series({0: 1.3, 1: 1.4, 2: 1.35}))
    assert small.verdict == "same direction, smaller"
    slower = V.log_ratio_comparison("r", "i", 6.0, pd.Series({0: 0.5, 1: 0.6, 2: 0.55}))
    assert slower.verdict == "opposite"


def test_proportion_against_chance_uses_the_wilson_interval():
    hits, total, chance = 30, 50, 0.1
    c = V.proportion_comparison("nn", hits, total, chance)
    p, z = hits / total, stats.norm.ppf(0.975)
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z / (1 + z * z / total) * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total))
    assert c.measured.mean == pytest.approx(100 * (p - chance))
    assert c.measured.lo == pytest.approx(100 * (centre - half - chance), abs=1e-6)
    assert c.measured.hi == pytest.approx(100 * (centre + half - chance), abs=1e-6)
    assert c.verdict == "reproduced"
    assert V.proportion_comparison("nn", 5, 50, 0.1).verdict == "inconclusive"
    assert V.proportion_comparison("nn", 0, 200, 0.3).verdict == "opposite"
    assert V.proportion_comparison("nn", 0, 0, 0.3).verdict == "not run"


def test_two_proportions_wald_interval():
    c = V.two_proportion_comparison("f - p", 80, 50, 100)
    se = math.sqrt(0.8 * 0.2 / 100 + 0.5 * 0.5 / 100)
    assert c.measured.mean == pytest.approx(30.0)
    assert c.measured.lo == pytest.approx(100 * (0.3 - 1.959964 * se), abs=1e-4)
    assert c.verdict == "reproduced"
    assert V.two_proportion_comparison("f - p", 50, 52, 100).verdict == "inconclusive"
    assert V.two_proportion_comparison("f - p", 10, 60, 100).verdict == "opposite"


@pytest.mark.parametrize("gaps, expected", [
    ({"a": 0.5, "b": 0.3}, "reproduced"),
    ({"a": 0.5, "b": 0.05}, "inconclusive"),
    ({"a": 0.02, "b": 0.05}, "opposite"),
    ({}, "not run"),
])
def test_filter_rule(gaps, expected):
    assert V.filter_comparison(gaps).verdict == expected


def test_scale_caveats():
    assert V.scale_caveat(["full"]) == ""
    assert "not comparable with ImageNet" in V.scale_caveat(["demo"])
    assert V.scale_caveat(["smoke", "subset"]).count("scale") >= 2

"""Intervals against textbook formulas (computed here with numpy and scipy.stats.t/norm) and every verdict branch."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from repro.claims import verdicts as V
from repro.claims.filters import gap_comparison


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
    assert V.signed_verdict(-1.4, iv, "full") == ("inconclusive", "one seed only: no confidence interval")


@pytest.mark.parametrize("paper, mean, lo, hi, n, expected", [
    (-1.4, math.nan, math.nan, math.nan, 0, "not run"),
    (-1.4, -1.0, math.nan, math.nan, 1, "inconclusive"),
    (-1.4, -0.8, -2.0, 0.3, 3, "inconclusive"),            # spans zero
    (-1.4, -1.0, -2.0, 0.0, 3, "inconclusive"),            # touching zero is not excluding it
    (-1.4, 0.6, 0.2, 1.0, 3, "opposite"),
    (2.0, -1.7, -3.0, -0.5, 3, "opposite"),
    (-1.4, -0.8, -1.0, -0.2, 3, "reproduced"),             # the estimate 0.8 reaches 0.7
    (-1.4, -0.7, -1.2, -0.2, 3, "reproduced"),             # exactly half the paper's magnitude
    (-1.4, -0.5, -1.2, -0.1, 3, "same direction, smaller"),  # the interval's end reaches 1.2, the estimate does not
    (2.0, 0.3, 0.1, 0.5, 3, "same direction, smaller"),
    (2.0, 4.0, 3.5, 4.5, 3, "reproduced"),                 # exactly twice the paper's magnitude
    (2.0, 4.2, 3.5, 5.0, 3, "same direction, larger"),     # more than twice: not the paper's effect
    (-1.4, -2.9, -3.5, -2.3, 3, "same direction, larger"),
    (None, -2.0, -3.0, -1.0, 3, "no paper number"),
])
def test_every_branch_of_the_signed_rule(paper, mean, lo, hi, n, expected):
    verdict, reason = V.signed_verdict(paper, V.Interval(mean, lo, hi, n), "subset")
    assert verdict == expected and reason
    assert V.signed_verdict(paper, V.Interval(mean, lo, hi, n), "full")[0] == expected


def test_a_noisy_estimate_is_not_reproduced_by_the_far_end_of_its_interval():
    # the demo ensemble of an earlier page: -0.75 [-1.41, -0.09] against the paper's -2.6
    assert V.signed_verdict(-2.6, V.Interval(-0.75, -1.41, -0.09, 5), "full")[0] == "same direction, smaller"


@pytest.mark.parametrize("scale", ["smoke", "demo"])
def test_small_scales_judge_the_direction_only(scale):
    assert V.signed_verdict(-1.4, V.Interval(-3.0, -4.0, -2.0, 5), scale)[0] == "same direction"
    assert V.signed_verdict(-1.4, V.Interval(-0.1, -0.2, -0.05, 5), scale)[0] == "same direction"
    assert V.signed_verdict(-1.4, V.Interval(0.5, 0.2, 0.8, 5), scale)[0] == "opposite"
    assert V.signed_verdict(-1.4, V.Interval(-0.5, -1.2, 0.2, 5), scale)[0] == "inconclusive"


def test_a_stated_direction_is_judged_on_its_sign():
    iv = V.Interval(-2.0, -3.0, -1.0, 5)
    assert V.signed_verdict(-1.0, iv, "demo", magnitude=False)[0] == "same direction"
    assert V.signed_verdict(-1.0, iv, "full", magnitude=False)[0] == "reproduced"
    assert V.signed_verdict(1.0, iv, "full", magnitude=False)[0] == "opposite"


def test_absolute_numbers_are_only_compared_at_full_scale_within_the_tolerance_given():
    iv = V.Interval(41.2, 40.9, 41.5, 3)
    assert V.absolute_verdict(40.7, iv, "demo", 1.0)[0] == "not comparable"
    assert V.absolute_verdict(40.7, iv, "full", 1.0)[0] == "reproduced"        # the mean is 0.5 from 40.7
    far = V.Interval(43.0, 42.8, 43.2, 3)
    assert V.absolute_verdict(40.7, far, "full", 1.0)[0] == "not reproduced"
    assert V.absolute_verdict(40.7, far, "full", 2.5)[0] == "reproduced"       # 43.0 - 40.7 = 2.3 <= 2.5
    assert V.absolute_verdict(40.7, V.Interval(), "full", 1.0)[0] == "not run"


@pytest.mark.parametrize("runs, expected", [([45.0, 46.0], "not reproduced"), ([41.0, 42.0], "reproduced")])
def test_absolute_error_is_judged_on_the_mean_not_the_far_end_of_its_interval(runs, expected):
    iv = V.mean_ci(runs)
    # two runs: the interval is mean +- 12.71 * 0.5, so 45.0 and 46.0 reach down to 39.1, past 40.7
    assert iv.lo == pytest.approx(np.mean(runs) - stats.t.ppf(0.975, 1) * 0.5)
    assert V.absolute_verdict(40.7, iv, "full", 2.0)[0] == expected


def test_speedup_is_judged_on_the_log_scale():
    ratios = pd.Series({0: 6.0, 1: 5.0, 2: 7.5})
    c = V.log_ratio_comparison("tanh / relu", "iters_to_target", 6.0, ratios, "full")
    logs = np.log([6.0, 5.0, 7.5])
    lo, hi = t_interval(logs)
    assert c.measured.mean == pytest.approx(math.exp(logs.mean()))  # geometric mean
    assert (c.measured.lo, c.measured.hi) == (pytest.approx(math.exp(lo)), pytest.approx(math.exp(hi)))
    assert c.verdict == "reproduced"
    # a real but small speed-up: the interval's top (about 1.5x) stays below sqrt(6) = 2.45x
    small = V.log_ratio_comparison("r", "i", 6.0, pd.Series({0: 1.3, 1: 1.4, 2: 1.35}), "full")
    assert small.verdict == "same direction, smaller"
    slower = V.log_ratio_comparison("r", "i", 6.0, pd.Series({0: 0.5, 1: 0.6, 2: 0.55}), "full")
    assert V.log_ratio_comparison("r", "i", 6.0, ratios, "demo").verdict == "same direction"
    assert slower.verdict == "opposite"
    # more than twice the paper's magnitude on the log scale: a geometric mean above 6^2 = 36x
    large = V.log_ratio_comparison("r", "i", 6.0, pd.Series({0: 40.0, 1: 38.0, 2: 42.0}), "full")
    assert large.verdict == "same direction, larger" and "36x" in large.reason
    below = V.log_ratio_comparison("r", "i", 6.0, pd.Series({0: 34.0, 1: 35.0, 2: 33.0}), "full")
    assert below.measured.mean < 36 and below.verdict == "reproduced"
    # the bound is on the log: 12x is twice 6x but well within 36x
    assert V.log_ratio_comparison("r", "i", 6.0, pd.Series({0: 12.0, 1: 13.0, 2: 11.0}), "full").verdict \
        == "reproduced"
    assert V.log_ratio_comparison("r", "i", 6.0, pd.Series({0: 40.0, 1: 38.0, 2: 42.0}), "demo").verdict \
        == "same direction"


def test_every_verdict_is_ranked_and_explained():
    assert {v for v, _ in V.RULES} == set(V.WEAKEST_FIRST)
    assert V.WEAKEST_FIRST.index("same direction, larger") < V.WEAKEST_FIRST.index("reproduced")
    assert "twice" in dict(V.RULES)["same direction, larger"]


@pytest.mark.parametrize("gaps, expected", [
    ({"a": 0.5, "b": 0.3}, "reproduced"),
    ({"a": 0.5, "b": 0.05}, "inconclusive"),
    ({"a": 0.02, "b": 0.05}, "opposite"),
    ({"a": 0.5}, "inconclusive"),   # one run says nothing about "on every run", either way
    ({"a": 0.02}, "inconclusive"),
    ({}, "not run"),
])
def test_filter_rule(gaps, expected):
    assert gap_comparison(gaps, "full").verdict == expected
    assert gap_comparison(gaps, "demo").verdict == ("same direction" if expected == "reproduced" else expected)


def test_caveats_name_the_data_from_its_manifest():
    grey = {"name": "Fashion-MNIST", "colour": False, "px": 28, "train": 60000, "classes": 10}
    assert V.data_caveat("full", grey) == ""
    demo = V.data_caveat("demo", grey)
    assert "Fashion-MNIST" in demo and "greyscale" in demo and "28 px" in demo and "direction" in demo
    assert "colour, 32 px" in V.data_caveat("subset", {**grey, "name": "x", "colour": True, "px": 32})


@pytest.mark.parametrize("lo, hi, unit, near", [
    (-0.69, -0.03, "points", True),    # the README's ten-crop: 0.03 from zero, half-width 0.33
    (-1.30, -0.13, "points", True),    # overlapping pooling on an AMD EPYC: 0.13 < 0.146
    (-0.87, +0.15, "points", False),   # the same on an Intel Xeon: 0.15 > 0.1275
    (-2.94, -1.08, "points", False),
    (1.05, 3.0, "x", True),            # log: 0.049 from zero, half-width 0.525
    (0.79, 1.38, "x", False),
])
def test_near_boundary_by_hand(lo, hi, unit, near):
    assert V.near_boundary(V.Interval(mean=(lo + hi) / 2, lo=lo, hi=hi, n=5), unit) is near
    assert not V.near_boundary(V.Interval(mean=lo, n=1), unit)  # no interval, no boundary to be near

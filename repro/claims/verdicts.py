"""Measured effect, 95% confidence interval and verdict, from per-seed (or per-query) values.

An effect is measured per seed and summarised as a mean with a Student-t 95% interval (scipy.stats.ttest_1samp /
ttest_ind ... .confidence_interval). Variants that share seeds are paired by seed (the interval is over the per-seed
differences); otherwise Welch's interval for the difference of means is used.

Verdict rule for a signed effect with the paper's number P, the mean m and the interval [lo, hi] (`signed_verdict`):
  no finished run                              -> "not run"
  one value (one seed): no interval            -> "inconclusive"
  lo <= 0 <= hi                                -> "inconclusive"          (the interval spans zero)
  the interval's sign differs from P's         -> "opposite"
  smoke and demo scale                         -> "same direction"        (only the direction is judged there)
  subset and full scale, |m| > 2 |P|           -> "same direction, larger"
  subset and full scale, |m| >= |P| / 2        -> "reproduced"            (the point estimate, not the interval's end)
  otherwise                                    -> "same direction, smaller"
A claim that states only a direction (`[judge.expect]`, e.g. dropout lowers the error) is "reproduced" at subset and
full scale once the interval excludes zero on the stated side (no bound on its size). Effects are in error points
(treatment - control; negative = the treatment lowers the error). Speed-ups are tested on the log of the per-seed
ratio r, so "zero" is a ratio of 1 and the bounds apply to log r: "reproduced" needs sqrt(P) <= geometric mean <= P^2
(for the paper's 6x: 2.45x to 36x), above P^2 is "same direction, larger". Absolute numbers (the baseline) are
compared at full scale only: "reproduced" when the mean over every finished run of the config lies within the claim's
tolerance (`[judge] tolerance` in its TOML) of the paper's value, else "not reproduced"; at smaller scales they are
"not comparable". `repro.claims.judge` makes top-5 comparisons on fewer than 100 classes "not judged" (context).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import stats

from repro.scales import find_scale

CONFIDENCE = 0.95
UNTESTABLE = "not testable on this data"
NOT_JUDGED = "not judged"
LARGER = "same direction, larger"
SMALLER = "same direction, smaller"
UPPER = 2.0  # an estimate above UPPER x the paper's magnitude is "larger"; below 1 / UPPER, "smaller"

# weakest first: a claim with several treatments (layer removal) shows the weakest verdict of its headline rows
WEAKEST_FIRST = ("not run", UNTESTABLE, "opposite", "inconclusive", "not reproduced", "not comparable",
                 SMALLER, LARGER, "same direction", "no paper number", NOT_JUDGED, "reproduced")
# verdicts that rest on a measured interval or mean: what the page counts as judgements made
JUDGED = ("opposite", "inconclusive", "not reproduced", SMALLER, LARGER, "same direction", "no paper number",
          "reproduced")

RULES = [
    ("not run", "no finished run (missing, failed, diverged, interrupted runs and runs that did not learn do not "
                "count)"),
    (UNTESTABLE, "the data cannot show the effect (colour claims on greyscale data); the reason is given"),
    ("inconclusive", "one seed only (no interval), or the 95% interval spans zero"),
    ("opposite", "the 95% interval excludes zero on the other side from the paper's effect"),
    ("same direction", "smoke and demo scale: the interval excludes zero on the paper's side; magnitudes are not "
                       "judged at these scales"),
    ("reproduced", "subset and full scale: the interval excludes zero on the paper's side and the point estimate "
                   "lies between half and twice the paper's magnitude (speed-ups on the log scale: for 6x, between "
                   "sqrt(6) = 2.45x and 6^2 = 36x); a claim that states only a direction needs the interval on its "
                   "side"),
    (SMALLER, "subset and full scale: the interval excludes zero on the paper's side, the point estimate stays below "
              "half its magnitude"),
    (LARGER, "subset and full scale: the interval excludes zero on the paper's side, the point estimate is more "
             "than twice its magnitude (speed-ups: above the square of the paper's ratio)"),
    ("not comparable", "an absolute error measured below full scale: a different dataset and task"),
    ("not reproduced", "an absolute error at full scale whose mean over every finished run of the config is "
                       "farther from the paper's than the claim's tolerance"),
    ("no paper number", "a comparison shown for context: the paper gives no number for it"),
    (NOT_JUDGED, "a top-5 comparison on data with fewer than 100 classes: shown for context only"),
]


@dataclass
class Interval:
    """Mean and 95% interval of n values (lo/hi are NaN when n < 2)."""

    mean: float = math.nan
    lo: float = math.nan
    hi: float = math.nan
    n: int = 0
    paired: bool = False
    method: str = "t interval over seeds"
    bound: str = ""  # ">" or "<": some values were censored, so the true mean lies beyond this one that way


@dataclass
class Comparison:
    """One measured quantity of a claim set against the paper's number."""

    label: str
    metric: str
    unit: str
    paper: float | None
    measured: Interval
    verdict: str
    reason: str = ""
    values: dict = field(default_factory=dict)  # seed -> per-seed value (effect, ratio, ...)
    context: bool = False  # shown beside the claim, not part of its verdict
    near: bool = False  # the verdict sits near its boundary (see `near_boundary`)


NEAR = 0.25  # an interval end within this share of the interval's half-width of zero is "near the boundary"


def near_boundary(iv: Interval, unit: str) -> bool:
    """Whether the interval's end nearer to "no effect" (0, or a ratio of 1 on the log scale) lies within NEAR of
    its half-width of it: a slightly different draw (another seed, another CPU type's floats) can move the verdict
    across a line. Measured: the same demo on an AMD EPYC and an Intel Xeon put overlapping pooling at -0.72
    [-1.30, -0.13] and -0.36 [-0.87, +0.15]."""
    lo, hi = iv.lo, iv.hi
    if iv.n < 2 or not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return False
    if unit == "x":
        if lo <= 0:
            return False
        lo, hi = math.log(lo), math.log(hi)
    return min(abs(lo), abs(hi)) < NEAR * (hi - lo) / 2


def finite_values(values) -> np.ndarray:
    a = np.asarray(pd.to_numeric(pd.Series(values, dtype=object), errors="coerce"), dtype=float)
    return a[np.isfinite(a)]


def mean_ci(values, confidence: float = CONFIDENCE) -> Interval:
    """Mean and Student-t interval of the finite values."""
    x = finite_values(values)
    if len(x) == 0:
        return Interval()
    if len(x) == 1:
        return Interval(float(x[0]), math.nan, math.nan, 1)
    if np.ptp(x) == 0:  # identical values: t is undefined, the interval collapses to the value
        return Interval(float(x[0]), float(x[0]), float(x[0]), len(x))
    ci = stats.ttest_1samp(x, 0.0).confidence_interval(confidence)
    return Interval(float(x.mean()), float(ci.low), float(ci.high), len(x))


def diff_ci(treatment: pd.Series, control: pd.Series, confidence: float = CONFIDENCE) -> tuple[Interval, dict]:
    """Interval of treatment - control, both Series indexed by seed.

    Paired by seed when at least two seeds have a value in both; otherwise Welch's unequal-variance interval.
    Returns the interval and the per-seed differences (empty when unpaired).
    """
    t = pd.to_numeric(treatment, errors="coerce").dropna()
    c = pd.to_numeric(control, errors="coerce").dropna()
    common = t.index.intersection(c.index)
    if len(common) >= 2 or (len(common) == 1 and len(t) == 1 and len(c) == 1):
        d = (t.loc[common] - c.loc[common]).sort_index()
        iv = mean_ci(d.to_numpy(), confidence)
        iv.paired, iv.method = True, "paired by seed"
        return iv, {k: float(v) for k, v in d.items()}
    if len(t) == 0 or len(c) == 0:
        return Interval(), {}
    mean, n, how = float(t.mean() - c.mean()), min(len(t), len(c)), "unpaired (Welch)"
    if len(t) < 2 or len(c) < 2:
        return Interval(mean, math.nan, math.nan, n, method=how), {}
    if np.ptp(t.to_numpy()) == 0 and np.ptp(c.to_numpy()) == 0:
        return Interval(mean, mean, mean, n, method=how), {}
    ci = stats.ttest_ind(t.to_numpy(), c.to_numpy(), equal_var=False).confidence_interval(confidence)
    return Interval(mean, float(ci.low), float(ci.high), n, method=how), {}


def signed_verdict(paper: float | None, iv: Interval, scale: str, magnitude: bool = True) -> tuple[str, str]:
    """The rule in the module docstring, for an effect whose 'no effect' value is 0.

    `magnitude=False`: `paper` is only a sign (a claim that states a direction, not a number).
    """
    if iv.n == 0:
        return "not run", "no finished run"
    if iv.n == 1 or math.isnan(iv.lo):
        return "inconclusive", "one seed only: no confidence interval"
    if iv.lo <= 0 <= iv.hi:
        return "inconclusive", "the 95% interval spans zero"
    if paper is None or not math.isfinite(paper) or paper == 0:
        return "no paper number", "the interval excludes zero; the paper gives no number to compare"
    side = "the paper's" if magnitude else "the claim's stated"
    if (iv.lo > 0) != (paper > 0):
        return "opposite", f"the interval excludes zero on the other side from {side} direction"
    if direction_only(scale):
        return "same direction", f"the interval excludes zero on {side} side; at {scale} scale only the direction " \
                                 "is judged"
    if not magnitude:
        return "reproduced", "the interval excludes zero on the claim's stated side"
    if abs(iv.mean) > UPPER * abs(paper):
        return LARGER, f"same sign as the paper, the estimate is more than {UPPER:g} times its magnitude"
    if abs(iv.mean) >= abs(paper) / UPPER:
        return "reproduced", f"same sign as the paper, the estimate lies between 1/{UPPER:g} and {UPPER:g} times " \
                             "its magnitude"
    return SMALLER, f"same sign as the paper, the estimate is below 1/{UPPER:g} of its magnitude"


def absolute_verdict(paper: float | None, iv: Interval, scale: str, tolerance: float) -> tuple[str, str]:
    """An absolute error against the paper's: only at full scale, the mean within `tolerance` points (the TOML's).

    The mean, not the interval's far end: a wide interval from few runs must not bring a distant mean within reach.
    """
    if iv.n == 0:
        return "not run", "no finished run"
    if paper is None:
        return "no paper number", ""
    if not absolute_comparable(scale):
        return "not comparable", f"measured at {scale} scale, not on ILSVRC-2012 at the paper's size"
    gap = abs(iv.mean - paper)
    if gap <= tolerance:
        return "reproduced", f"the mean is {gap:.2f} points from the paper's, within the tolerance of {tolerance:g}"
    return "not reproduced", f"the mean is {gap:.2f} points from the paper's, more than the tolerance of {tolerance:g}"


def log_ratio_comparison(label: str, metric: str, paper: float | None, ratios: pd.Series, scale: str,
                         note: str = "") -> Comparison:
    """A speed-up (or slow-down) judged on the log scale; `ratios` is indexed by seed."""
    r = pd.to_numeric(ratios, errors="coerce")
    r = r[np.isfinite(r) & (r > 0)]
    liv = mean_ci(np.log(r.to_numpy()))
    lpaper = math.log(paper) if paper and paper > 0 else None
    verdict, reason = signed_verdict(lpaper, liv, scale)
    if lpaper is not None and verdict in ("reproduced", SMALLER, LARGER):
        reason += f" on the log scale (reproduced from {paper ** (1 / UPPER):.2f}x to {paper ** UPPER:.3g}x)"
    # report the geometric mean and the interval back on the ratio scale
    iv = Interval(*(math.exp(v) if math.isfinite(v) else math.nan for v in (liv.mean, liv.lo, liv.hi)),
                  n=liv.n, paired=True, method="paired by seed, log scale")
    if note:
        reason = f"{reason}; {note}"
    return Comparison(label, metric, "x", paper, iv, verdict, reason, {k: float(v) for k, v in r.items()})


def direction_only(scale: str) -> bool:
    """Whether only the direction of an effect is judged at `scale` (its `judge` in _scales.toml)."""
    found = find_scale(scale)
    return found is not None and found.direction_only


def absolute_comparable(scale: str) -> bool:
    """Whether absolute errors at `scale` compare with the paper's (its `absolute` in _scales.toml)."""
    found = find_scale(scale)
    return found is not None and found.absolute


def data_caveat(scale: str, data: dict | None) -> str:
    """One plain sentence on what the scale and its data can show (its `caveat` in _scales.toml, with the data's
    facts); `data`: repro.claims.facts.data_facts."""
    found = find_scale(scale)
    if found is None or not found.caveat:
        return ""
    what = ""
    if data:
        colour = "colour" if data["colour"] else "greyscale"
        what = (f" ({data['name']}: {colour}, {data['px']} px, {data['train']:,} training images, "
                f"{data['classes']} classes)")
    return f"{scale.capitalize()} scale{what}: {found.caveat}"

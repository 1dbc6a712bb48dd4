"""Measured effect, 95% confidence interval and verdict for each claim, from the table of runs.

The effect of a claim is measured per seed and summarised as a mean with a Student-t 95% interval
(scipy.stats.ttest_1samp / ttest_ind ... .confidence_interval). Variants that share seeds are paired by seed
(the interval is over the per-seed differences); otherwise Welch's interval for the difference of means is used.

Verdict rule for a signed effect with the paper's number P and the interval [lo, hi] (`signed_verdict`):
  no finished run                              -> "not run"
  one value (one seed): no interval            -> "inconclusive"
  lo <= 0 <= hi                                -> "inconclusive"          (the interval spans zero)
  the interval's sign differs from P's         -> "opposite"
  the interval reaches |P| / 2 or further      -> "reproduced"            (max(|lo|, |hi|) >= |P| / 2)
  otherwise                                    -> "same direction, smaller"
Effects are in error points (treatment - control; negative = the treatment lowers the error). Speed-ups
(convergence) are tested on the log of the per-seed ratio, so "zero" is a ratio of 1 and half the paper's
magnitude is sqrt(P). Absolute numbers (the baseline) are only compared at full scale: "reproduced" when the
interval comes within ABS_TOLERANCE points of the paper's value, else "not reproduced"; at smaller scales they are
"not comparable". Qualitative claims use their analysis number: filters are "reproduced" when every analysed run has
a tower-to-tower colour-specificity gap of at least FILTER_GAP ("inconclusive" when only some do, "opposite" when
none do); retrieval compares how often the nearest training images in the last hidden layer share the query's
label with the same rate for nearest neighbours in pixel space (Wald interval of the difference) and with chance
(Wilson interval): "reproduced" when the interval lies above zero, "opposite" below, else "inconclusive".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import stats

CONFIDENCE = 0.95
ABS_TOLERANCE = 1.0  # points of error: how close a full-scale absolute number must come to the paper's
FILTER_GAP = 0.1  # colour-specificity gap (0-1 score) that counts as one tower being the colour-specific one

VERDICTS = ("reproduced", "same direction, smaller", "opposite", "inconclusive", "not run",
            "not comparable", "not reproduced", "no paper number")

RULES = [
    ("not run", "no finished run (missing, failed, diverged or interrupted runs do not count)"),
    ("inconclusive", "one seed only (no interval), or the 95% interval spans zero"),
    ("opposite", "the 95% interval excludes zero on the other side from the paper's effect"),
    ("reproduced", "the interval excludes zero on the paper's side and reaches at least half the paper's "
                   "magnitude (speed-ups: on the log scale, so half of 6x is 2.45x)"),
    ("same direction, smaller", "the interval excludes zero on the paper's side but stays below half its magnitude"),
    ("not comparable", "an absolute error measured below full scale: a different dataset and task"),
    ("not reproduced", f"an absolute error at full scale whose interval stays more than {ABS_TOLERANCE:g} point "
                       "from the paper's"),
    ("no paper number", "a comparison shown for context: the paper gives no number for it"),
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


def finite_values(values) -> np.ndarray:
    """The finite numbers among `values` (None, NaN and non-numbers dropped), as a float array."""
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


def signed_verdict(paper: float | None, iv: Interval) -> tuple[str, str]:
    """The rule in the module docstring, for an effect whose 'no effect' value is 0."""
    if iv.n == 0:
        return "not run", "no finished run"
    if iv.n == 1 or math.isnan(iv.lo):
        return "inconclusive", "one seed only: no confidence interval"
    if iv.lo <= 0 <= iv.hi:
        return "inconclusive", "the 95% interval spans zero"
    if paper is None or not math.isfinite(paper) or paper == 0:
        return "no paper number", "the interval excludes zero; the paper gives no number to compare"
    if (iv.lo > 0) != (paper > 0):
        return "opposite", "the interval excludes zero on the other side from the paper"
    reach = max(abs(iv.lo), abs(iv.hi))
    if reach >= abs(paper) / 2:
        return "reproduced", "same sign as the paper, interval reaches half its magnitude"
    return "same direction, smaller", "same sign as the paper, interval below half its magnitude"


def absolute_verdict(paper: float | None, iv: Interval, scale: str) -> tuple[str, str]:
    if iv.n == 0:
        return "not run", "no finished run"
    if paper is None:
        return "no paper number", ""
    if scale != "full":
        return "not comparable", f"measured at {scale} scale, not on ILSVRC-2012 at the paper's size"
    lo, hi = (iv.mean, iv.mean) if math.isnan(iv.lo) else (iv.lo, iv.hi)
    if lo - ABS_TOLERANCE <= paper <= hi + ABS_TOLERANCE:
        return "reproduced", f"within {ABS_TOLERANCE:g} point of the paper"
    return "not reproduced", f"more than {ABS_TOLERANCE:g} point from the paper"


def log_ratio_comparison(label: str, metric: str, paper: float | None, ratios: pd.Series,
                         note: str = "") -> Comparison:
    """A speed-up judged on the log scale; `ratios` is indexed by seed."""
    r = pd.to_numeric(ratios, errors="coerce")
    r = r[np.isfinite(r) & (r > 0)]
    liv = mean_ci(np.log(r.to_numpy()))
    lpaper = math.log(paper) if paper and paper > 0 else None
    verdict, reason = signed_verdict(lpaper, liv)
    # report the geometric mean and the interval back on the ratio scale
    iv = Interval(*(math.exp(v) if math.isfinite(v) else math.nan for v in (liv.mean, liv.lo, liv.hi)),
                  n=liv.n, paired=True, method="paired by seed, log scale")
    if note:
        reason = f"{reason}; {note}"
    return Comparison(label, metric, "x", paper, iv, verdict, reason, {k: float(v) for k, v in r.items()})


def _side_of_zero(iv: Interval, above: str, below: str, spans: str) -> tuple[str, str]:
    """Verdict and reason for a claim that the measured difference is positive."""
    if iv.lo > 0:
        return "reproduced", above
    if iv.hi < 0:
        return "opposite", below
    return "inconclusive", spans


def proportion_comparison(label: str, hits: int, total: int, chance: float) -> Comparison:
    """Label agreement of retrieved neighbours against chance, with a Wilson interval (scipy binomtest)."""
    if total <= 0:
        return Comparison(label, "label agreement - chance", "points", None, Interval(), "not run", "no queries")
    res = stats.binomtest(int(hits), int(total), p=min(max(chance, 1e-9), 1 - 1e-9))
    ci = res.proportion_ci(CONFIDENCE, method="wilson")
    iv = Interval(100 * (hits / total - chance), 100 * (ci.low - chance), 100 * (ci.high - chance), int(total),
                  method="binomial, Wilson interval")
    verdict, reason = _side_of_zero(iv, "neighbours share the query's label more often than chance",
                                    "neighbours share the query's label less often than chance",
                                    "the 95% interval includes chance")
    return Comparison(label, "label agreement - chance", "points", None, iv, verdict,
                      f"{reason} ({hits}/{total} neighbours, chance {100 * chance:.1f}%)")


def two_proportion_comparison(label: str, hits_a: int, hits_b: int, total: int) -> Comparison:
    """Difference of two agreement rates over the same `total` neighbours (Wald interval, scipy.stats.norm).

    The same queries are used for both, so the unpaired interval is conservative.
    """
    pa, pb = hits_a / total, hits_b / total
    se = math.sqrt(max(pa * (1 - pa) / total + pb * (1 - pb) / total, 0.0))
    z = stats.norm.ppf(0.5 + CONFIDENCE / 2)
    iv = Interval(100 * (pa - pb), 100 * (pa - pb - z * se), 100 * (pa - pb + z * se), int(total),
                  method="difference of proportions, Wald interval")
    verdict, reason = _side_of_zero(iv, "feature-space neighbours share the label more often than pixel-space ones",
                                    "pixel-space neighbours share the label more often",
                                    "the 95% interval spans zero")
    return Comparison(label, "label agreement difference", "points", None, iv, verdict,
                      f"{reason} ({100 * pa:.1f}% against {100 * pb:.1f}% of {total} neighbours)")


def filter_comparison(gaps: dict) -> Comparison:
    """Colour-specificity gap between the towers, one value per analysed run (`gaps`: run -> gap)."""
    vals = finite_values(list(gaps.values()))
    iv = mean_ci(vals)
    iv.method = "t interval over runs"
    if len(vals) == 0:
        verdict, reason = "not run", "no filter analysis"
    elif (vals >= FILTER_GAP).all():
        verdict, reason = "reproduced", f"every run ({len(vals)}) has one tower more colour-specific by >= {FILTER_GAP:g}"
    elif (vals >= FILTER_GAP).any():
        verdict, reason = "inconclusive", f"{int((vals >= FILTER_GAP).sum())} of {len(vals)} runs show the split"
    else:
        verdict, reason = "opposite", f"no run has a tower-to-tower gap of {FILTER_GAP:g} or more"
    return Comparison("tower colour-specificity gap", "|specificity tower 2 - tower 1|", "", None, iv,
                      verdict, reason, dict(gaps))


SCALE_CAVEATS = {
    "smoke": "Smoke scale: a few hundred tiny images and a tiny net, for testing the harness. The numbers say "
             "nothing about the paper's claim.",
    "demo": "Demo scale: Fashion-MNIST-sized images and a narrow net trained for minutes. Magnitudes are not "
            "comparable with ImageNet; only the direction of an effect carries over, and weakly.",
    "subset": "Subset scale: an ImageNet subset at reduced resolution. Magnitudes are indicative, not "
              "comparable one-to-one with the paper's ILSVRC numbers.",
}


def scale_caveat(scales) -> str:
    """One plain sentence per non-full scale the claim was measured at."""
    return " ".join(SCALE_CAVEATS.get(s, f"Scale {s!r}: not the paper's setting.")
                    for s in sorted({str(s) for s in scales if isinstance(s, str) and s and s != "full"}))

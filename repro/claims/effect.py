"""Kind `effect`: treatment minus control in error points, paired by seed (sections 3.2-4.2, 7).

`[paper]` holds the paper's effect per metric (`top1_err = -1.4`). A claim that states only a direction names it in
`[judge.expect]` (`top1_err = "lower"`, `gap = "lower"`: validation minus training error), judged on that sign.
`[judge] converge_train_err` adds the paper's second kind of evidence for dropout: the ratio of iterations to reach
that training error (first point of the run's training curve at or below it), treatment over control, against
`[paper] iters_ratio`. Variants outside control and treatments are shown beside the claim as context.
"""

from __future__ import annotations

import pandas as pd

from repro.claims import verdicts as V
from repro.claims.common import (ERROR_METRICS, best_variant, by_seed, groups_of, iters_below, judge_setting,
                                 paper_numbers, stack)
from repro.claims.convergence import iteration_ratios
from repro.claims.registry import Evidence, Kind, register_kind

SIGN = {"lower": -1.0, "higher": 1.0}


def _gap_rows(rows: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Validation minus training error per run (training error as logged during training)."""
    return rows.assign(gap=pd.to_numeric(rows.get(metric), errors="coerce")
                       - pd.to_numeric(rows.get("train_top1_err"), errors="coerce"))


def judge(exp, ev: Evidence) -> tuple[list[V.Comparison], dict]:
    rows, scale = ev.rows, ev.scale
    paper = paper_numbers(exp)
    expect = {m: SIGN[d] for m, d in (judge_setting(exp, "expect") or {}).items()}
    groups = groups_of(exp)
    metrics = [exp.metric] + [m for m in list(paper) + list(expect) if m != exp.metric and m in ERROR_METRICS]
    metrics = list(dict.fromkeys(metrics))
    best = {g: best_variant(rows, groups[g], exp.metric) for g in (exp.control, *exp.treatments)}
    gap = _gap_rows(rows, exp.metric) if "train_top1_err" in rows else None
    comps = []
    for t in exp.treatments:
        label = f"{t} - {exp.control}"
        for m in metrics:
            iv, per_seed = V.diff_ci(by_seed(rows, [best[t]], m), by_seed(rows, [best[exp.control]], m))
            if m in paper:
                verdict, reason = V.signed_verdict(paper[m], iv, scale)
            elif m in expect:
                verdict, reason = V.signed_verdict(expect[m], iv, scale, magnitude=False)
            else:
                verdict, reason = V.signed_verdict(None, iv, scale)
            comps.append(V.Comparison(label, m, "points", paper.get(m), iv, verdict, reason, per_seed))
        if gap is not None and (not paper or "gap" in expect):
            iv, per_seed = V.diff_ci(by_seed(gap, [best[t]], "gap"), by_seed(gap, [best[exp.control]], "gap"))
            if "gap" in expect:
                verdict, reason = V.signed_verdict(expect["gap"], iv, scale, magnitude=False)
            else:
                verdict, reason = V.signed_verdict(None, iv, scale)
            comps.append(V.Comparison(label, f"{exp.metric} - train_top1_err", "points", None, iv, verdict,
                                      "change in the gap between validation and training error (training error as "
                                      "logged during training); " + reason, per_seed, context="gap" not in expect))
    target = judge_setting(exp, "converge_train_err")
    if target is not None and ev.runs_dir is not None:
        curves = stack(rows[rows["status"] == "done"], ev.runs_dir, "curve")
        iters = {a: iters_below(curves, best[a], float(target), strict=False) for a in best}
        comps += iteration_ratios(exp, rows, best, iters, inverse=True, paper=paper.get("iters_ratio"),
                                  what=f"{float(target):g}% training error", metric="iters_to_converge", scale=scale,
                                  context=False)
    # variants outside control/treatments (two-gpu-split's one-full) are reported beside the claim
    for g in groups:
        if g in best:
            continue
        best[g] = best_variant(rows, groups[g], exp.metric)
        iv, per_seed = V.diff_ci(by_seed(rows, [best[g]], exp.metric), by_seed(rows, [best[exp.control]], exp.metric))
        verdict, reason = V.signed_verdict(None, iv, scale)
        comps.append(V.Comparison(f"{g} - {exp.control}", exp.metric, "points", None, iv, verdict,
                                  "context: " + reason, per_seed, context=True))
    return comps, best


KIND = register_kind(Kind("effect", judge, needs_arms=True, signed_paper=True, figure="learning-curves",
                          judge_keys=("expect", "converge_train_err")))

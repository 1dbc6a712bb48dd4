"""Kind `absolute`: an error rate against the paper's own (Table 2's single CNN), comparable at full scale only.

`[paper]` holds the paper's numbers under the metric they are (the paper's 40.7 / 18.2 are ten-crop:
`top1_err_10crop`); `[judge] tolerance` is how many points the interval may stay from them and still count as
reproduced. Centre-crop errors are shown beside them.
"""

from __future__ import annotations

from repro.claims import verdicts as V
from repro.claims.common import ERROR_METRICS, by_seed, judge_setting, paper_numbers
from repro.claims.registry import Evidence, Kind, register_kind


def judge(exp, ev: Evidence) -> tuple[list[V.Comparison], dict]:
    rows, scale = ev.rows, ev.scale
    paper = paper_numbers(exp)
    tolerance = float(judge_setting(exp, "tolerance"))
    variants = list(exp.variants)
    judged = [exp.metric] + [m for m in paper if m != exp.metric and m in ERROR_METRICS]
    shown = [m.replace("_10crop", "") for m in judged if m.endswith("_10crop")]
    n_done = int((rows["status"] == "done").sum()) if "status" in rows else 0
    comps = []
    for m in judged + [m for m in shown if m not in judged]:
        iv = V.mean_ci(by_seed(rows, variants, m).to_numpy())
        iv.method = "t interval over seeds"
        context = m not in judged
        verdict, reason = V.absolute_verdict(None if context else paper.get(m), iv, scale, tolerance)
        if context:
            reason = "centre crop, for comparison; the paper's numbers are ten-crop"
        elif iv.n == 0 and n_done:
            verdict = "not run" if V.absolute_comparable(scale) else "not comparable"
            reason = f"the runs were not scored on ten crops at {scale} scale (train.ten_crop = false)"
        comps.append(V.Comparison(", ".join(variants), m, "%", None if context else paper.get(m), iv, verdict,
                                  reason, context=context))
    return comps, {}


KIND = register_kind(Kind("absolute", judge, judge_keys=("tolerance",), figure="learning-curves"))

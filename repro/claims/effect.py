"""Kind `effect`: treatment minus control in error points, paired by seed (sections 3.2-4.2, 7).

`[paper]` holds the paper's effect per metric (`top1_err = -1.4`). A claim that states only a direction names it in
`[judge.expect]` (`top1_err = "lower"`, `gap = "lower"`: validation minus training error), judged on that sign.
`[judge] converge_train_err` adds the paper's second kind of evidence for dropout: the ratio of iterations to reach
that training error, treatment over control, against `[paper] iters_ratio`. Where the runs scored their training
error in evaluation mode (`train.score_train`: a fixed training sample, no dropout, no augmentation), the gap and
the iterations use it (the first scoring at or below the target); otherwise the training error as logged while
training, which dropout and augmentation raise and so narrow the gap by construction; the row says which. Variants outside control and treatments are shown beside the claim as context, against the
control; `[judge] contrasts = ["a - b"]` adds context rows between any two variants (groups), in every metric the
claim is judged on (ablation-lrn's "lrn - lrn-gain": LRN against its own fixed gain).
"""

from __future__ import annotations

import pandas as pd

from repro.claims import verdicts as V
from repro.claims.common import (ERROR_METRICS, best_variant, by_seed, groups_of, iters_below, judge_setting,
                                 paper_numbers, stack)
from repro.claims.convergence import iteration_ratios
from repro.claims.registry import Evidence, Kind, register_kind
from repro.errors import UserError

SIGN = {"lower": -1.0, "higher": 1.0}


EVAL_MODE = "train_eval_top1_err"  # training error in evaluation mode on a fixed sample (train.score_train)
MEASURES = {EVAL_MODE: "training error scored in evaluation mode on a fixed training sample",
            "train_top1_err": "training error as logged during training, with dropout and augmentation on"}


def _train_measure(rows: pd.DataFrame) -> str | None:
    """The training-error column the gap uses: evaluation mode where every finished run has it."""
    done = rows[rows["status"] == "done"] if "status" in rows else rows
    if EVAL_MODE in done and len(done) and pd.to_numeric(done[EVAL_MODE], errors="coerce").notna().all():
        return EVAL_MODE
    return "train_top1_err" if "train_top1_err" in rows else None


def _gap_rows(rows: pd.DataFrame, metric: str, measure: str) -> pd.DataFrame:
    """Validation minus training error per run, the training error being `measure`."""
    return rows.assign(gap=pd.to_numeric(rows.get(metric), errors="coerce")
                       - pd.to_numeric(rows.get(measure), errors="coerce"))


def _iterations_to(rows: pd.DataFrame, ev: Evidence, variant: str, target: float, measure: str) -> pd.Series:
    """Per seed of `variant`: the first iteration whose training error (`measure`) is at or below `target`; NaN
    when never. Evaluation-mode errors come from the per-epoch metrics, the logged ones from the training curve."""
    done = rows[rows["status"] == "done"]
    if measure == EVAL_MODE:
        points = stack(done, ev.runs_dir, "metrics")
        points = (points.drop(columns=["train_top1_err"], errors="ignore").rename(columns={EVAL_MODE: "train_top1_err"})
                  if EVAL_MODE in points else points.iloc[0:0])
        points = points.dropna(subset=["train_top1_err"]) if len(points) else points
    else:
        points = stack(done, ev.runs_dir, "curve")
    return iters_below(points, variant, target, strict=False)


def judge(exp, ev: Evidence) -> tuple[list[V.Comparison], dict]:
    rows, scale = ev.rows, ev.scale
    paper = paper_numbers(exp)
    expect = {m: SIGN[d] for m, d in (judge_setting(exp, "expect") or {}).items()}
    groups = groups_of(exp)
    metrics = [exp.metric] + [m for m in list(paper) + list(expect) if m != exp.metric and m in ERROR_METRICS]
    metrics = list(dict.fromkeys(metrics))
    best = {g: best_variant(rows, groups[g], exp.metric) for g in (exp.control, *exp.treatments)}
    measure = _train_measure(rows)
    gap = _gap_rows(rows, exp.metric, measure) if measure else None
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
            comps.append(V.Comparison(label, f"{exp.metric} - {measure}", "points", None, iv, verdict,
                                      f"change in the gap between validation and training error ({MEASURES[measure]}); "
                                      + reason, per_seed, context="gap" not in expect))
    target = judge_setting(exp, "converge_train_err")
    if target is not None and ev.runs_dir is not None and measure:
        iters = {a: _iterations_to(rows, ev, best[a], float(target), measure) for a in best}
        what = f"{float(target):g}% training error" + (" (evaluation mode)" if measure == EVAL_MODE else "")
        comps += iteration_ratios(exp, rows, best, iters, inverse=True, paper=paper.get("iters_ratio"),
                                  what=what, metric="iters_to_converge", scale=scale, context=False)
    comps += _context_rows(exp, rows, best, groups, metrics, scale)
    return comps, best


def _contrast(rows: pd.DataFrame, label: str, a: str, b: str, metric: str, scale: str) -> V.Comparison:
    """Variant a minus variant b in `metric`, paired by seed, shown beside the claim (no paper number)."""
    iv, per_seed = V.diff_ci(by_seed(rows, [a], metric), by_seed(rows, [b], metric))
    verdict, reason = V.signed_verdict(None, iv, scale)
    return V.Comparison(label, metric, "points", None, iv, verdict, "context: " + reason, per_seed, context=True)


def contrast_arms(exp, contrast: str, groups: dict) -> tuple[str, str]:
    """The two groups of a `[judge] contrasts` entry "a - b" (the schema has checked its form)."""
    arms = tuple(part.strip() for part in contrast.split(" - "))
    for arm in arms:
        if arm not in groups:
            raise UserError(f"{exp.file}: [judge] contrasts {contrast!r} names {arm!r}, which is not a "
                            f"[variants.<name>] table; variants: {', '.join(groups)}")
    return arms


def _context_rows(exp, rows, best: dict, groups: dict, metrics: list[str], scale: str) -> list[V.Comparison]:
    """Rows beside the claim: each variant outside control and treatments minus the control in the headline metric
    (two-gpu-split's one-full), then each contrast in every judged metric. Adds the groups it chose to `best`."""
    comps = []
    for g in groups:
        if g not in best:
            best[g] = best_variant(rows, groups[g], exp.metric)
            comps.append(_contrast(rows, f"{g} - {exp.control}", best[g], best[exp.control], exp.metric, scale))
    for contrast in judge_setting(exp, "contrasts") or ():
        a, b = contrast_arms(exp, contrast, groups)
        comps += [_contrast(rows, f"{a} - {b}", best[a], best[b], m, scale) for m in metrics]
    return comps


KIND = register_kind(Kind("effect", judge, needs_arms=True, signed_paper=True, figure="learning-curves",
                          judge_keys=("expect", "converge_train_err", "contrasts")))

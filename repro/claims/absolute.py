"""Kind `absolute`: an error rate against the paper's own (Table 2's single CNN), comparable at full scale only.

`[paper]` holds the paper's numbers under the metric they are (the paper's 40.7 / 18.2 are ten-crop:
`top1_err_10crop`); `[judge] tolerance` is how many points the mean may lie from them and still count as
reproduced. The evidence is every finished run of the claim's config at the scale, each run once
(`repro.claims.judge.pooled_rows`). Ten-crop errors come from the run's record, else from any analysis at that
scale that scored the run (the ten-crop claim's `runs/ten-crop/analysis-<scale>.json`, matched by config hash).
Centre-crop errors are shown beside them.
"""

from __future__ import annotations

import pandas as pd

from repro.claims import verdicts as V
from repro.claims.common import ERROR_METRICS, judge_setting, paper_numbers
from repro.claims.registry import Evidence, Kind, register_kind
from repro.runs import load_analyses

METHOD = "t interval over runs"


def analysed_scores(runs_dir, scale: str, hashes: set[str]) -> dict[str, dict]:
    """{config hash: scores} of the runs in `hashes` that an analysis at `scale` scored on ten crops."""
    out: dict[str, dict] = {}
    if runs_dir is None:
        return out
    for _, by_scale in sorted(load_analyses(runs_dir).items()):
        for r in (by_scale.get(scale) or {}).get("runs") or []:
            if isinstance(r, dict) and str(r.get("config_hash")) in hashes and r.get("top1_err_10crop") is not None:
                out.setdefault(str(r["config_hash"]), r)
    return out


def per_run(done: pd.DataFrame, metric: str, analysed: dict[str, dict]) -> tuple[pd.Series, int]:
    """`metric` per run (indexed by config hash): the run's own record, else an analysis's score of it; and how
    many came from an analysis."""
    own = pd.to_numeric(done[metric], errors="coerce") if metric in done else pd.Series(float("nan"), done.index)
    values, from_analysis = {}, 0
    for h, v in zip(done["config_hash"].astype(str), own):
        if pd.isna(v) and analysed.get(h, {}).get(metric) is not None:
            v, from_analysis = float(analysed[h][metric]), from_analysis + 1
        values[h] = v
    return pd.Series(values, dtype=float).dropna(), from_analysis


def _where(done: pd.DataFrame, from_analysis: int, n: int) -> str:
    """Which runs a mean is over, in words."""
    parts = [f"mean of {n} run(s) of this config"]
    if "linked_from" in done:
        linked = done["linked_from"].dropna()
        for name, k in sorted(linked.value_counts().items()):
            parts.append(f"{k} of them linked under {name} only")
    if from_analysis:
        parts.append(f"{from_analysis} scored on ten crops by the analysis after training")
    return "; ".join(parts)


def judge(exp, ev: Evidence) -> tuple[list[V.Comparison], dict]:
    rows, scale = ev.rows, ev.scale
    paper = paper_numbers(exp)
    tolerance = float(judge_setting(exp, "tolerance"))
    variants = list(exp.variants)
    judged = [exp.metric] + [m for m in paper if m != exp.metric and m in ERROR_METRICS]
    shown = [m.replace("_10crop", "") for m in judged if m.endswith("_10crop")]
    done = rows[rows["variant"].isin(variants) & (rows["status"] == "done")]
    if "config_hash" not in done:  # a bare run table (tests, old exports): each seed is one run
        done = done.assign(config_hash="seed" + done["seed"].astype(str))
    done = done.drop_duplicates("config_hash")
    analysed = analysed_scores(ev.runs_dir, scale, set(done["config_hash"].astype(str)))
    comps = []
    for m in judged + [m for m in shown if m not in judged]:
        values, from_analysis = per_run(done, m, analysed)
        iv = V.mean_ci(values.to_numpy())
        iv.method = METHOD
        context = m not in judged
        verdict, reason = V.absolute_verdict(None if context else paper.get(m), iv, scale, tolerance)
        where = _where(done, from_analysis, iv.n)
        if context:
            reason = f"centre crop, for comparison (the paper's numbers are ten-crop); {where}"
        elif iv.n == 0 and len(done):
            verdict = "not run" if V.absolute_comparable(scale) else "not comparable"
            reason = (f"no ten-crop score at {scale} scale: the runs were not scored on ten crops "
                      f"(train.ten_crop = false) and no analysis scored them (`repro run ten-crop --scale {scale}`)")
        elif iv.n:
            reason = f"{reason}; {where}"
        comps.append(V.Comparison(", ".join(variants), m, "%", None if context else paper.get(m), iv, verdict,
                                  reason, {h: float(v) for h, v in values.items()}, context=context))
    return comps, {}


KIND = register_kind(Kind("absolute", judge, judge_keys=("tolerance",), figure="learning-curves"))

"""Turn one registered claim plus its rows of the run table (and its analysis) into comparisons and a verdict.

Each kind measures something different (see repro.experiments for what `[paper]` holds per kind); the statistics
and verdict rules live in `verdicts.py`. A claim is judged at the largest scale that has a finished run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from repro.report import verdicts as V
from repro.report.gather import stack

SCALE_ORDER = ("full", "subset", "demo", "smoke")
ERROR_METRICS = ("top1_err", "top5_err", "top1_err_10crop", "top5_err_10crop", "best_val_top1_err",
                 "train_top1_err", "train_loss")


@dataclass
class ClaimResult:
    name: str
    title: str
    section: str
    claim: str
    kind: str
    scale: str                      # the scale judged ("" when nothing ran)
    comparisons: list[V.Comparison]
    verdict: str                    # of the headline comparison
    caveat: str = ""
    note: str = ""
    reproduced_if: str = ""
    runs: pd.DataFrame = field(default_factory=pd.DataFrame)   # every row of this claim, all scales
    status_counts: dict = field(default_factory=dict)          # at the judged scale
    best_variants: dict = field(default_factory=dict)          # group -> chosen variant (sweeps)
    headline: V.Comparison | None = None                       # the comparison the verdict comes from


def paper_numbers(exp) -> dict[str, float]:
    return {k: float(v) for k, v in (exp.paper or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def pick_scale(rows: pd.DataFrame) -> str:
    """The largest scale with a finished run, else the largest with any row, else ''."""
    if rows.empty or "scale" not in rows:
        return ""
    for require_done in (True, False):
        sub = rows[rows["status"] == "done"] if require_done else rows
        present = set(sub["scale"].dropna().astype(str))
        for s in SCALE_ORDER:
            if s in present:
                return s
        if present:
            return sorted(present)[0]
    return ""


def _by_seed(rows: pd.DataFrame, variants, metric: str) -> pd.Series:
    """Values of `metric` of finished runs of `variants`, indexed by seed (NaN when the column is absent)."""
    sub = rows[rows["variant"].isin(list(variants)) & (rows["status"] == "done")]
    if metric not in sub:
        return pd.Series(dtype=float)
    s = pd.to_numeric(sub[metric], errors="coerce")
    s.index = pd.to_numeric(sub["seed"], errors="coerce")
    return s.groupby(level=0).mean()


def _groups(exp) -> dict[str, tuple[str, ...]]:
    groups = getattr(exp, "groups", None) or {}
    return {g: tuple(v) for g, v in groups.items()} or {v: (v,) for v in exp.variants}


def _best_variant(rows: pd.DataFrame, members, metric: str) -> str:
    """Of a sweep group, the variant with the lowest median `metric` over finished runs (never-reached = worst)."""
    if len(members) == 1:
        return members[0]
    scores = {}
    for v in members:
        s = _by_seed(rows, [v], metric)
        scores[v] = float(s.fillna(np.inf).median()) if len(s) else math.inf
    return min(members, key=lambda v: (scores[v], members.index(v)))


def _effect(exp, rows, groups) -> tuple[list[V.Comparison], dict]:
    paper = paper_numbers(exp)
    metrics = [exp.metric] + [m for m in paper if m != exp.metric and m in ERROR_METRICS]
    best = {g: _best_variant(rows, groups[g], exp.metric) for g in (exp.control, *exp.treatments)}
    comps = []
    for t in exp.treatments:
        for m in metrics:
            iv, per_seed = V.diff_ci(_by_seed(rows, [best[t]], m), _by_seed(rows, [best[exp.control]], m))
            p = paper.get(m)
            verdict, reason = V.signed_verdict(p, iv)
            comps.append(V.Comparison(f"{t} - {exp.control}", m, "points", p, iv, verdict, reason, per_seed))
    if not paper and "train_top1_err" in rows:
        # a qualitative claim (dropout: "prevents substantial overfitting"): show the generalisation gap too
        gap = rows.assign(gap=pd.to_numeric(rows[exp.metric], errors="coerce")
                          - pd.to_numeric(rows["train_top1_err"], errors="coerce"))
        for t in exp.treatments:
            iv, per_seed = V.diff_ci(_by_seed(gap, [best[t]], "gap"), _by_seed(gap, [best[exp.control]], "gap"))
            verdict, reason = V.signed_verdict(None, iv)
            comps.append(V.Comparison(f"{t} - {exp.control}", f"{exp.metric} - train_top1_err", "points", None, iv,
                                      verdict, "context: change in the gap between validation and training error "
                                      "(training error as logged during training); " + reason, per_seed,
                                      context=True))
    # variants outside control/treatments (two-gpu-split's one-full) are reported beside the claim
    for g in groups:
        if g in best:
            continue
        best[g] = _best_variant(rows, groups[g], exp.metric)
        iv, per_seed = V.diff_ci(_by_seed(rows, [best[g]], exp.metric), _by_seed(rows, [best[exp.control]], exp.metric))
        verdict, reason = V.signed_verdict(None, iv)
        comps.append(V.Comparison(f"{g} - {exp.control}", exp.metric, "points", None, iv, verdict,
                                  "context: " + reason, per_seed, context=True))
    return comps, best


def _iters_below(curves: pd.DataFrame, variant: str, threshold: float) -> pd.Series:
    """Per seed: the first curve iteration whose training error is below `threshold` (NaN: never)."""
    out = {}
    sub = curves[curves["variant"] == variant] if len(curves) else curves
    for seed, c in (sub.groupby("seed") if len(sub) else []):
        hit = c[pd.to_numeric(c["train_top1_err"], errors="coerce") < threshold]
        out[seed] = float(hit["iteration"].iloc[0]) if len(hit) else math.nan
    return pd.Series(out, dtype=float)


def _speedups(exp, rows, best, iters: dict, inverse: bool, pnum, what: str, context: bool) -> list[V.Comparison]:
    """Per-seed ratio of iterations (`iters[arm]`: Series by seed), judged on the log scale."""
    comps = []
    for t in exp.treatments:
        notes, series, censored = [], {}, {}
        for arm in (exp.control, t):
            it = iters[arm]
            total = _by_seed(rows, [best[arm]], "iterations").reindex(it.index)
            missing = it.isna() & total.notna()
            if missing.any():
                notes.append(f"{arm} did not reach {what} in {int(missing.sum())} of {len(it)} runs "
                             "(counted at its total iterations, so the ratio is a bound)")
            series[arm] = it.fillna(total)
            censored[arm] = missing
        c, tr = series[exp.control], series[t]
        common = c.index.intersection(tr.index)
        # a seed where neither arm reached the threshold says nothing about the ratio
        neither = [k for k in common if censored[exp.control].get(k, False) and censored[t].get(k, False)]
        if neither:
            notes.append(f"neither reached {what} in {len(neither)} run(s), left out")
            common = common.difference(neither)
        ratio = (tr.loc[common] / c.loc[common]) if inverse else (c.loc[common] / tr.loc[common])
        label = (f"{t} / {exp.control}" if inverse else f"{exp.control} / {t}") + f" iterations to {what}"
        comp = V.log_ratio_comparison(label, "iters_to_target", pnum, ratio, "; ".join(notes))
        if comp.measured.n == 0 and neither:
            comp.verdict, comp.reason = "inconclusive", f"neither arm reached {what} in any run"
        comp.context = context
        comps.append(comp)
    return comps


def _convergence(exp, rows, groups, analysis: dict | None, curves: pd.DataFrame) -> tuple[list[V.Comparison], dict]:
    """Speed-up = control iterations / treatment iterations to the target training error, paired by seed.

    The best learning rate of each group is the analysis's choice (else the fastest median). A run that never
    reached the target counts with its total iterations, so its ratio is a bound; the reason says so.
    `iters_ratio` in [paper] is the inverse (treatment / control). When the analysis found a dataset-relative
    threshold (the best control run's final training error), the speed-up to it is judged too, and it is the
    headline when the paper's target was reached at the first logged point by every run (trivially reached).
    """
    paper = paper_numbers(exp)
    inverse = "speedup" not in paper and "iters_ratio" in paper
    pnum = paper.get("iters_ratio" if inverse else "speedup")
    chosen = (analysis or {}).get("best") or {}
    best = {g: chosen.get(g) if chosen.get(g) in groups.get(g, ()) else _best_variant(rows, groups[g], "iters_to_target")
            for g in (exp.control, *exp.treatments)}
    target = pd.to_numeric(rows.get("train.target_train_err", pd.Series(dtype=float)), errors="coerce").dropna()
    target = float(target.iloc[0]) if len(target) else 25.0
    at_target = {a: _by_seed(rows, [best[a]], "iters_to_target") for a in best}
    comps = _speedups(exp, rows, best, at_target, inverse, pnum, f"{target:g}%", False)
    relative = (analysis or {}).get("relative_train_err")
    if relative is not None and len(curves) and math.isfinite(float(relative)):
        at_rel = {a: _iters_below(curves, best[a], float(relative)) for a in best}
        rel = _speedups(exp, rows, best, at_rel, inverse, pnum, f"{float(relative):.1f}% (dataset-relative)", True)
        first = curves.groupby("variant")["iteration"].min() if len(curves) else pd.Series(dtype=float)
        trivial = all(len(s) and (s == first.get(best[a], math.nan)).all() for a, s in at_target.items())
        if trivial or all(c.measured.n == 0 for c in comps):
            why = (f"every run reached {target:g}% at its first logged point" if trivial
                   else f"no run pair reached {target:g}%")
            for c in comps:
                c.context, c.reason = True, f"{c.reason}; {why}, so the dataset-relative threshold is judged"
            for c in rel:
                c.context = False
        comps += rel
    return comps, best


def _absolute(exp, rows) -> list[V.Comparison]:
    paper = paper_numbers(exp)
    metrics = [exp.metric] + [m for m in paper if m != exp.metric and m in ERROR_METRICS]
    variants = list(exp.variants)
    scale = str(rows["scale"].iloc[0]) if len(rows) else ""
    comps = []
    for m in metrics:
        iv = V.mean_ci(_by_seed(rows, variants, m).to_numpy())
        verdict, reason = V.absolute_verdict(paper.get(m), iv, scale)
        comps.append(V.Comparison(", ".join(variants), m, "%", paper.get(m), iv, verdict, reason))
    return comps


def _ten_crop(exp, rows) -> list[V.Comparison]:
    """10-crop minus centre-crop error of the same finished runs: paired within each run."""
    paper = paper_numbers(exp)
    metric, compare = exp.metric, exp.compare or exp.metric.replace("_10crop", "")
    pairs = [(metric, compare)]
    if metric.startswith("top1") and "top5_err" in paper:
        pairs.append((metric.replace("top1", "top5"), compare.replace("top1", "top5")))
    comps = []
    for m, c in pairs:
        d = _by_seed(rows, list(exp.variants), m) - _by_seed(rows, list(exp.variants), c)
        iv = V.mean_ci(d.to_numpy())
        iv.paired, iv.method = True, "paired within each run"
        p = paper.get(m, paper.get(c))
        verdict, reason = V.signed_verdict(p, iv)
        comps.append(V.Comparison(f"{m} - {c}", c, "points", p, iv, verdict, reason, d.dropna().to_dict()))
    return comps


def _ensemble(exp, analysis: dict) -> list[V.Comparison]:
    """Ensemble error minus each member's error; the interval is over members (the ensemble is one number)."""
    paper = paper_numbers(exp)
    comps = []
    for m in [exp.metric] + [k for k in paper if k != exp.metric and k in ("top1_err", "top5_err")]:
        ens = ((analysis or {}).get("ensemble") or {}).get(m)
        members = (analysis or {}).get("members")
        members = [r.get(m) for r in members if isinstance(r, dict)] if isinstance(members, list) else []
        d = [ens - x for x in members if ens is not None and x is not None]
        iv = V.mean_ci(d)
        iv.paired, iv.method = True, "over members (ensemble fixed)"
        verdict, reason = V.signed_verdict(paper.get(m), iv)
        if not analysis:
            verdict, reason = "not run", "no ensemble analysis (runs/<experiment>/analysis.json)"
        elif "status" in analysis and not d:
            verdict, reason = "not run", f"ensemble analysis: {analysis['status']}"
        comps.append(V.Comparison(f"ensemble of {len(members)} - one member", m, "points", paper.get(m), iv,
                                  verdict, reason, {i: float(v) for i, v in enumerate(d)}))
    return comps


def _filters(analysis: dict) -> list[V.Comparison]:
    """Per analysed run, |tower 2 - tower 1| colour-specificity (which tower is the colour one is up to the seed)."""
    gaps = {}
    for i, r in enumerate((analysis or {}).get("runs", [])):
        towers = [t for t in (r.get("towers") or []) if t is not None]
        if len(towers) == 2:
            gaps[f"{r.get('variant', '?')}/seed{r.get('seed', i)}"] = abs(float(towers[1]) - float(towers[0]))
    comp = V.filter_comparison(gaps)
    if not gaps and (analysis or {}).get("runs"):
        comp.reason = "the analysed model has one tower: nothing to compare"
    elif not gaps and "status" in (analysis or {}):
        comp.reason = f"filter analysis: {analysis['status']}"
    return [comp]


def _retrieval(analysis: dict) -> list[V.Comparison]:
    """Label agreement of the k nearest training images in feature space, against chance and against pixels."""
    a = analysis or {}
    total = int(a.get("queries", 0)) * int(a.get("k", 0))
    if not total or a.get("feature_agreement") is None:
        reason = f"retrieval analysis: {a['status']}" if "status" in a else "no retrieval analysis"
        return [V.Comparison("nearest neighbours share the query's label", "label agreement - chance", "points",
                             None, V.Interval(), "not run", reason)]
    hits = int(round(float(a["feature_agreement"]) * total))
    comps = []
    if a.get("pixel_agreement") is not None:
        comps.append(V.two_proportion_comparison("feature neighbours - pixel neighbours", hits,
                                                 int(round(float(a["pixel_agreement"]) * total)), total))
    chance = float(a.get("chance_agreement") or 0.0)
    if chance > 0:
        comps.append(V.proportion_comparison("feature neighbours - chance", hits, total, chance))
    return comps


def evaluate(exp, df: pd.DataFrame, analysis: dict | None = None, runs_dir=None) -> ClaimResult:
    """Judge one claim from the run table `df` (all experiments) and its analysis.json; convergence claims also
    read the training curves of their runs under `runs_dir`."""
    all_rows = df[df["experiment"] == exp.name] if "experiment" in df else df.iloc[0:0]
    scale = pick_scale(all_rows)
    if not scale and analysis:
        scale = str(analysis.get("scale", ""))
    rows = all_rows[all_rows["scale"].astype(str) == scale] if scale and "scale" in all_rows else all_rows
    groups = _groups(exp)
    best = {}
    if exp.kind == "effect":
        comps, best = _effect(exp, rows, groups)
    elif exp.kind == "convergence":
        done = rows[rows["status"] == "done"]
        curves = stack(done, runs_dir, "curve.jsonl") if runs_dir is not None else pd.DataFrame()
        comps, best = _convergence(exp, rows, groups, analysis, curves)
    elif exp.kind == "absolute":
        comps = _absolute(exp, rows)
    elif exp.kind == "ten-crop":
        comps = _ten_crop(exp, rows)
    elif exp.kind == "ensemble":
        comps = _ensemble(exp, analysis)
    elif exp.kind == "filters":
        comps = _filters(analysis)
    elif exp.kind == "retrieval":
        comps = _retrieval(analysis)
    else:
        comps = []
    judged = [c for c in comps if not c.context]
    headline = [c for c in judged if c.metric in (exp.metric, "iters_to_target")] or judged
    headline = [c for c in headline if c.metric == headline[0].metric] if headline else []
    # several treatments (layer removal): the claim's verdict is the weakest of theirs on the headline metric
    order = ("not run", "opposite", "inconclusive", "not reproduced", "not comparable", "same direction, smaller",
             "no paper number", "reproduced")
    head = min(headline, key=lambda c: order.index(c.verdict) if c.verdict in order else 0) if headline else None
    verdict = head.verdict if head else "not run"
    counts = rows["status"].value_counts().to_dict() if "status" in rows else {}
    return ClaimResult(
        name=exp.name, title=exp.title, section=exp.section, claim=exp.claim, kind=exp.kind, scale=scale,
        comparisons=comps, verdict=verdict, caveat=V.scale_caveat([scale]) if scale else "",
        note=str((exp.paper or {}).get("note", "")), reproduced_if=getattr(exp, "reproduced_if", ""),
        runs=all_rows, status_counts={str(k): int(v) for k, v in counts.items()}, best_variants=best,
        headline=head)

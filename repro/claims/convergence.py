"""Kind `convergence`: iterations to a target training error, control over treatment (section 3.1, Fig. 1).

`[paper] speedup` = control iterations / treatment iterations (`iters_ratio` is the inverse). The target is the runs'
`train.target_train_err`, fixed per scale in the experiment file before any run (not chosen after seeing the
curves). A `[sweep]` of learning rates gives each activation several variants; the paper tuned the rate "separately
for each network", so the analysis keeps the fastest variant of each group, chosen on the first `[judge]
select_seeds` seeds only, and the claim is judged on the other seeds, which played no part in the choice. A chosen
rate at either end of its sweep is flagged: the sweep may not hold the best rate. A run that never reaches the
target counts as a bound (repro.claims.convergence.iteration_ratios).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from repro import runs as store
from repro.claims import verdicts as V
from repro.claims.common import best_variant, by_seed, first_below, groups_of, judge_setting, paper_numbers
from repro.claims.registry import Evidence, Kind, register_kind


def _variant_facts(exp, var: str, curves: dict, target: float, seeds: set[int]) -> dict[str, Any] | None:
    """Iterations to the target (mean over `seeds`; None when a run never reached it) and final training error."""
    runs = [(s, c) for (v, s), c in curves.items() if v == var and s in seeds]
    if not runs:
        return None
    its = [first_below(c, target) for _, c in runs]
    return {"lr": exp.variants[var].get("train.lr"), "seeds": [s for s, _ in runs],
            "iters_to_target": float(np.mean(its)) if all(math.isfinite(i) for i in its) else None,
            "final_train_err": float(np.mean([float(c.train_top1_err.iloc[-1]) for _, c in runs]))}


def _edge(exp, group: str, chosen: str | None) -> bool:
    """Whether the chosen variant's learning rate is the lowest or highest its group swept."""
    lrs = [exp.variants[v].get("train.lr") for v in exp.groups.get(group, ())]
    lrs = [x for x in lrs if x is not None]
    lr = exp.variants.get(chosen, {}).get("train.lr") if chosen else None
    return len(set(lrs)) > 1 and lr in (min(lrs), max(lrs))


def analyse(exp, done) -> tuple[dict[str, Any], dict]:
    """The fastest learning rate of each group on the selection seeds, and the speed-up on the judged seeds."""
    curves = {(r.variant, r.seed): store.load_curves(d) for r, d, _ in done}
    curves = {k: c for k, c in curves.items() if len(c)}
    target = done[0][0].cfg.train.target_train_err if done else 25.0
    seeds = sorted({s for _, s in curves})
    k = int(judge_setting(exp, "select_seeds", 0) or 0)
    select, judged = (set(seeds[:k]), set(seeds[k:])) if k else (set(seeds), set(seeds))
    group_of = {v: g for g, vs in exp.groups.items() for v in vs}
    on_select = {v: f for v in exp.variants if (f := _variant_facts(exp, v, curves, target, select))}
    for v, f in on_select.items():
        f["group"] = group_of[v]

    def fastest(group: str) -> str | None:
        cands = [v for v, f in on_select.items() if f["group"] == group]
        # never reaching the target ranks after every variant that did, then by final training error
        key = lambda v: (on_select[v]["iters_to_target"] is None, on_select[v]["iters_to_target"] or 0,  # noqa: E731
                         on_select[v]["final_train_err"])
        return min(cands, key=key) if cands else None

    chosen = {g: fastest(g) for g in exp.groups}
    out: dict[str, Any] = {"target_train_err": target, "select_seeds": sorted(select), "judged_seeds": sorted(judged),
                           "variants": on_select, "best": chosen,
                           "edge": {g: _edge(exp, g, v) for g, v in chosen.items()}}
    ctrl = _variant_facts(exp, chosen[exp.control], curves, target, judged) if chosen.get(exp.control) else None
    for t in exp.treatments:
        tr = _variant_facts(exp, chosen[t], curves, target, judged) if chosen.get(t) else None
        a, b = (ctrl or {}).get("iters_to_target"), (tr or {}).get("iters_to_target")
        out.setdefault("speedup", {})[t] = (a / b) if a and b else None
    return out, {}


def summary(d: dict[str, Any]) -> str:
    edges = [g for g, e in (d.get("edge") or {}).items() if e]
    flag = f"; at the sweep's edge: {', '.join(edges)}" if edges else ""
    return (f"best {d['best']} (chosen on seeds {d.get('select_seeds')}){flag}; speed-up to "
            f"{d['target_train_err']:g}% on seeds {d.get('judged_seeds')}: {d.get('speedup')}")


def iteration_ratios(exp, rows, best, iters: dict, *, inverse: bool, paper, what: str, metric: str, scale: str,
                     context: bool) -> list[V.Comparison]:
    """Per-seed ratio of iterations (`iters[arm]`: Series by seed), judged on the log scale.

    A run that never reached the threshold counts with its total iterations, so its ratio is a bound: the mean is
    shown as "> x" or "< x" (`Interval.bound`), and a verdict on its size only where the bound supports it; a seed
    where neither arm reached it says nothing and is left out.
    """
    comps = []
    for t in exp.treatments:
        notes, series, censored = [], {}, {}
        for arm in (exp.control, t):
            it = iters[arm]
            total = by_seed(rows, [best[arm]], "iterations").reindex(it.index)
            missing = it.isna() & total.notna()
            if missing.any():
                notes.append(f"{arm} did not reach {what} in {int(missing.sum())} of {len(it)} runs "
                             "(counted at its total iterations, so the ratio is a bound)")
            series[arm] = it.fillna(total)
            censored[arm] = missing
        c, tr = series[exp.control], series[t]
        common = c.index.intersection(tr.index)
        neither = [k for k in common if censored[exp.control].get(k, False) and censored[t].get(k, False)]
        if neither:
            notes.append(f"neither reached {what} in {len(neither)} run(s), left out")
            common = common.difference(neither)
        ratio = (tr.loc[common] / c.loc[common]) if inverse else (c.loc[common] / tr.loc[common])
        label = (f"{t} / {exp.control}" if inverse else f"{exp.control} / {t}") + f" iterations to {what}"
        comp = V.log_ratio_comparison(label, metric, paper, ratio, scale, "; ".join(notes))
        _as_bound(comp, censored[t].reindex(common, fill_value=False).any(),
                  censored[exp.control].reindex(common, fill_value=False).any(), inverse)
        if comp.measured.n == 0 and neither:
            comp.verdict, comp.reason = "inconclusive", f"neither arm reached {what} in any run"
        comp.context = context
        comps.append(comp)
    return comps


def _as_bound(comp: V.Comparison, treatment_censored: bool, control_censored: bool, inverse: bool) -> None:
    """Mark a ratio with censored runs as the bound it is, and keep only the verdicts that the bound can show.

    A censored arm counts at its total iterations, which are too few, so the true ratio lies beyond the measured one
    on one side. Beyond it towards the paper's side, the direction stands (and "larger"), not the size; away from the
    paper's side, only "opposite" stands: the true ratio may lie on either side of 1."""
    if not (treatment_censored or control_censored):
        return
    # counted at its total, a censored arm's iterations are too few: its side of the ratio is too small
    up = treatment_censored if inverse else control_censored       # the true ratio is larger
    down = control_censored if inverse else treatment_censored     # the true ratio is smaller
    if up and down:
        comp.verdict, comp.reason = "inconclusive", comp.reason + "; censored on both sides: bounded neither way"
        return
    comp.measured.bound = ">" if up else "<"
    kind = "lower" if up else "upper"
    if comp.paper is None or not comp.paper > 0 or comp.verdict in ("inconclusive", "not run", "no paper number"):
        return
    towards = up == (comp.paper > 1)
    if towards and comp.verdict in ("reproduced", V.SMALLER):
        comp.verdict = "same direction"
        comp.reason += f"; a {kind} bound, so its size is not judged"
    elif comp.verdict not in (("same direction", V.LARGER) if towards else ("opposite",)):
        comp.verdict = "inconclusive"
        comp.reason += (f"; a {kind} bound {'towards' if towards else 'away from'} the paper's side: the true ratio "
                        "may lie on either side of 1")


def judge(exp, ev: Evidence) -> tuple[list[V.Comparison], dict]:
    """Speed-up = control iterations / treatment iterations to the target training error, paired by seed, on the
    seeds that did not choose the learning rates (the analysis's choice; without one, the fastest median)."""
    rows, scale, analysis = ev.rows, ev.scale, ev.analysis or {}
    groups = groups_of(exp)
    paper = paper_numbers(exp)
    inverse = "speedup" not in paper and "iters_ratio" in paper
    pnum = paper.get("iters_ratio" if inverse else "speedup")
    chosen = analysis.get("best") or {}
    best = {g: chosen.get(g) if chosen.get(g) in groups.get(g, ()) else best_variant(rows, groups[g], "iters_to_target")
            for g in (exp.control, *exp.treatments)}
    select = set(analysis.get("select_seeds") or [])
    judged = rows
    if select and set(analysis.get("judged_seeds") or []) != select:
        judged = rows[~pd.to_numeric(rows["seed"], errors="coerce").isin(select)]
    target = pd.to_numeric(rows.get("train.target_train_err", pd.Series(dtype=float)), errors="coerce").dropna()
    target = float(target.iloc[0]) if len(target) else 25.0
    at_target = {a: by_seed(judged, [best[a]], "iters_to_target") for a in best}
    comps = iteration_ratios(exp, judged, best, at_target, inverse=inverse, paper=pnum, what=f"{target:g}%",
                             metric="iters_to_target", scale=scale, context=False)
    notes = []
    if select and judged is not rows:
        notes.append(f"learning rates chosen on seed(s) {', '.join(map(str, sorted(select)))}, not judged")
    elif len(set(exp.variants)) > len(groups):
        why = ("the analysis that sets selection seeds aside has not run: `repro run` makes it"
               if int(judge_setting(exp, "select_seeds", 0) or 0) else "no [judge] select_seeds")
        notes.append(f"learning rates chosen on the judged seeds themselves ({why})")
    edges = [g for g, e in (analysis.get("edge") or {}).items() if e]
    if edges:
        notes.append(f"the rate chosen for {', '.join(edges)} is at the edge of its sweep: a better one may lie "
                     "outside it")
    for c in comps:
        c.reason = "; ".join([c.reason, *notes]) if c.reason else "; ".join(notes)
    return comps, best


KIND = register_kind(Kind("convergence", judge, analyse=analyse, summary=summary, needs_arms=True,
                          judge_keys=("select_seeds",), figure="training-curves", headline_metrics=("iters_to_target",)))

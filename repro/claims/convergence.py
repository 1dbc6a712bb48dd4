"""Kind `convergence`: iterations to a target training error, control over treatment (section 3.1, Fig. 1).

`[paper] speedup` = control iterations / treatment iterations (`iters_ratio` is the inverse). A `[sweep]` of learning
rates gives each activation several variants; the analysis keeps the fastest of each group and also finds a
dataset-relative threshold (the training error the best control variant ends at, at its worst seed), judged where
the paper's 25% is reached at the first logged point (Fashion-MNIST).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from repro import runs as store
from repro.claims import verdicts as V
from repro.claims.common import best_variant, by_seed, first_below, groups_of, iters_below, paper_numbers, stack
from repro.claims.registry import Evidence, Kind, register_kind


def analyse(exp, done) -> tuple[dict[str, Any], dict]:
    """Best learning rate per group, iterations to the target and to the best final training error of the control."""
    curves = {(r.variant, r.seed): store.load_curves(d) for r, d, _ in done}
    curves = {k: c for k, c in curves.items() if len(c)}
    final = {k: float(c.train_top1_err.iloc[-1]) for k, c in curves.items()}
    target = done[0][0].cfg.train.target_train_err if done else 25.0
    group_of = {v: g for g, vs in exp.groups.items() for v in vs}
    # The dataset-relative threshold: the training error the best control variant (lowest mean final error)
    # ends at, taken at its worst seed so that every seed of that variant reaches it.
    ctrl = {var: [f for (v, _), f in final.items() if v == var] for var in exp.groups.get(exp.control, ())}
    ctrl = {var: fs for var, fs in ctrl.items() if fs}
    relative = float(max(ctrl[min(ctrl, key=lambda v: np.mean(ctrl[v]))])) if ctrl else None
    variants: dict[str, dict[str, Any]] = {}
    for var in exp.variants:
        seeds = [(s, c) for (v, s), c in curves.items() if v == var]
        if not seeds:
            continue

        def mean_iters(th, strict=True):
            its = [first_below(c, th, strict) for _, c in seeds] if th is not None else [math.nan]
            return float(np.mean(its)) if all(math.isfinite(i) for i in its) else None

        variants[var] = {"group": group_of[var], "lr": exp.variants[var].get("train.lr"),
                         "iters_to_target": mean_iters(target), "iters_to_relative": mean_iters(relative, strict=False),
                         "final_train_err": float(np.mean([final[(var, s)] for s, _ in seeds])), "seeds": len(seeds)}

    def best(group: str) -> str | None:
        cands = [v for v, m in variants.items() if m["group"] == group]
        # fastest to the relative threshold; never reaching it ranks by final training error
        key = lambda v: (variants[v]["iters_to_relative"] is None, variants[v]["iters_to_relative"] or 0,  # noqa: E731
                         variants[v]["final_train_err"])
        return min(cands, key=key) if cands else None

    chosen = {g: best(g) for g in exp.groups}
    out: dict[str, Any] = {"target_train_err": target, "relative_train_err": relative, "variants": variants,
                           "best": chosen}
    best_ctrl = chosen.get(exp.control)
    for t in exp.treatments:
        tr = chosen.get(t)
        for name, key in (("speedup", "iters_to_target"), ("speedup_relative", "iters_to_relative")):
            a = variants[best_ctrl][key] if best_ctrl else None
            b = variants[tr][key] if tr else None
            out.setdefault(name, {})[t] = (a / b) if a and b else None
    return out, {}


def summary(d: dict[str, Any]) -> str:
    f = lambda x: "n/a" if x is None else f"{x:.2f}"  # noqa: E731
    return (f"best {d['best']}; speed-up to {d['target_train_err']:g}% {d.get('speedup')}, "
            f"to {f(d['relative_train_err'])}% {d.get('speedup_relative')}")


def iteration_ratios(exp, rows, best, iters: dict, *, inverse: bool, paper, what: str, metric: str, scale: str,
                     context: bool) -> list[V.Comparison]:
    """Per-seed ratio of iterations (`iters[arm]`: Series by seed), judged on the log scale.

    A run that never reached the threshold counts with its total iterations, so its ratio is a bound (the reason
    says so); a seed where neither arm reached it says nothing and is left out.
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
        if comp.measured.n == 0 and neither:
            comp.verdict, comp.reason = "inconclusive", f"neither arm reached {what} in any run"
        comp.context = context
        comps.append(comp)
    return comps


def judge(exp, ev: Evidence) -> tuple[list[V.Comparison], dict]:
    """Speed-up = control iterations / treatment iterations to the target training error, paired by seed.

    The best learning rate of each group is the analysis's choice (else the fastest median). When the analysis found
    a dataset-relative threshold, the speed-up to it is judged too, and it is the headline when every run reached the
    paper's target at its first logged point (trivially reached) or no run pair reached it.
    """
    rows, scale, analysis = ev.rows, ev.scale, ev.analysis
    groups = groups_of(exp)
    paper = paper_numbers(exp)
    inverse = "speedup" not in paper and "iters_ratio" in paper
    pnum = paper.get("iters_ratio" if inverse else "speedup")
    chosen = (analysis or {}).get("best") or {}
    best = {g: chosen.get(g) if chosen.get(g) in groups.get(g, ()) else best_variant(rows, groups[g], "iters_to_target")
            for g in (exp.control, *exp.treatments)}
    target = pd.to_numeric(rows.get("train.target_train_err", pd.Series(dtype=float)), errors="coerce").dropna()
    target = float(target.iloc[0]) if len(target) else 25.0
    at_target = {a: by_seed(rows, [best[a]], "iters_to_target") for a in best}
    comps = iteration_ratios(exp, rows, best, at_target, inverse=inverse, paper=pnum, what=f"{target:g}%",
                             metric="iters_to_target", scale=scale, context=False)
    relative = (analysis or {}).get("relative_train_err")
    curves = stack(rows[rows["status"] == "done"], ev.runs_dir, "curve") if ev.runs_dir is not None \
        else pd.DataFrame()
    if relative is not None and len(curves) and math.isfinite(float(relative)):
        at_rel = {a: iters_below(curves, best[a], float(relative), strict=False) for a in best}  # as analyse
        rel = iteration_ratios(exp, rows, best, at_rel, inverse=inverse, paper=pnum,
                               what=f"{float(relative):.1f}% (dataset-relative)", metric="iters_to_target",
                               scale=scale, context=True)
        first = curves.groupby("variant")["iteration"].min()
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


KIND = register_kind(Kind("convergence", judge, analyse=analyse, summary=summary, needs_arms=True,
                          figure="training-curves", headline_metrics=("iters_to_target",)))

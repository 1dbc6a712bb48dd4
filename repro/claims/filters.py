"""Kind `filters`: conv1's two towers specialise, one colour-agnostic and one colour-specific (section 6.1, Fig. 3).

The analysis scores each finished run's conv1 kernels per tower (the fraction of kernel energy outside the grey,
channel-mean component) and keeps the first run's weights for the figure. The claim holds on a run when one tower
is more colour-specific than the other by at least FILTER_GAP; which tower is up to initialisation.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from repro.claims import verdicts as V
from repro.claims.registry import Evidence, Kind, register_kind

FILTER_GAP = 0.1  # colour-specificity gap (0-1 score) that counts as one tower being the colour-specific one


def colour_specificity(w) -> float:
    """Mean over kernels of the fraction of kernel energy not in its grey (channel-mean) component (torch tensor)."""
    w = w.detach().float()
    w = w - w.mean(dim=(1, 2, 3), keepdim=True)  # a constant offset carries no colour or pattern
    grey = w.mean(dim=1, keepdim=True)
    total = (w ** 2).sum(dim=(1, 2, 3)).clamp_min(1e-12)
    chroma = ((w - grey) ** 2).sum(dim=(1, 2, 3))
    return float((chroma / total).mean())


def analyse(exp, done) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Colour-specificity per tower on every done run; the first run's conv1 weights for figure 3."""
    # the engine (torch) loads only when an analysis runs: `repro list` imports every kind (start-up time)
    from repro.engine import load_model

    per_run, arrays = [], {}
    for r, d, _ in done:
        model, _ = load_model(d)
        towers = [t for t in model.conv1_weight() if t is not None]
        per_run.append({"variant": r.variant, "seed": r.seed, "config_hash": r.config_hash,
                        "towers": [colour_specificity(t) for t in towers]})
        if not arrays:
            arrays = {f"tower{i + 1}": t.detach().float().numpy() for i, t in enumerate(towers)}
    if not per_run:
        return {"status": "no done runs"}, {}
    scores = np.array([p["towers"] for p in per_run], dtype=float)
    out = {"runs": per_run, "mean_per_tower": scores.mean(0).tolist(), "n_runs": len(per_run)}
    if scores.shape[1] == 2:
        gap = np.abs(scores[:, 1] - scores[:, 0])
        out["tower_gap"] = {"mean": float(gap.mean()), "per_run": gap.tolist()}
    return out, arrays


def summary(d: dict[str, Any]) -> str:
    return f"colour specificity per tower {[round(x, 3) for x in d['mean_per_tower']]}"


def gap_comparison(gaps: dict, scale: str) -> V.Comparison:
    """Colour-specificity gap between the towers, one value per analysed run (`gaps`: run -> gap)."""
    vals = V.finite_values(list(gaps.values()))
    iv = V.mean_ci(vals)
    iv.method = "t interval over runs"
    if len(vals) == 0:
        verdict, reason = "not run", "no filter analysis"
    elif len(vals) == 1:  # as for effects: one run says nothing either way about "on every run"
        shows = "shows" if vals[0] >= FILTER_GAP else "does not show"
        verdict, reason = "inconclusive", f"one run only, which {shows} a tower gap of {FILTER_GAP:g} or more"
    elif (vals >= FILTER_GAP).all():
        verdict = "same direction" if V.direction_only(scale) else "reproduced"
        reason = f"every run ({len(vals)}) has one tower more colour-specific by >= {FILTER_GAP:g}"
    elif (vals >= FILTER_GAP).any():
        verdict, reason = "inconclusive", f"{int((vals >= FILTER_GAP).sum())} of {len(vals)} runs show the split"
    else:
        verdict, reason = "opposite", f"no run has a tower-to-tower gap of {FILTER_GAP:g} or more"
    return V.Comparison("tower colour-specificity gap", "|specificity tower 2 - tower 1|", "", None, iv,
                        verdict, reason, dict(gaps))


def judge(exp, ev: Evidence) -> tuple[list[V.Comparison], dict]:
    """Per analysed run, |tower 2 - tower 1| colour-specificity."""
    analysis = ev.analysis or {}
    gaps = {}
    for i, r in enumerate(analysis.get("runs", [])):
        towers = [t for t in (r.get("towers") or []) if t is not None]
        if len(towers) == 2:
            gaps[f"{r.get('variant', '?')}/seed{r.get('seed', i)}"] = abs(float(towers[1]) - float(towers[0]))
    comp = gap_comparison(gaps, ev.scale)
    if not gaps and analysis.get("runs"):
        comp.reason = "the analysed model has one tower: nothing to compare"
    elif not gaps and "status" in analysis:
        comp.reason = f"filter analysis: {analysis['status']}"
    elif not ev.analysis:
        comp.reason = "no filter analysis at this scale"
    return [comp], {}


KIND = register_kind(Kind("filters", judge, analyse=analyse, summary=summary, figure="filters"))

"""Kind `ensemble`: the averaged softmax of the seeds' runs against each member on its own (Table 2, section 6).

The analysis averages the members' stored validation logits (`RunDir.val_logits`); `[paper]` holds the ensemble
minus one CNN in points.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.special import softmax

from repro.claims import verdicts as V
from repro.claims.common import paper_numbers
from repro.claims.registry import Evidence, Kind, register_kind
from repro.rundir import RunDir


def val_labels(cfg) -> np.ndarray:
    """Labels of the validation set in the loaders' fixed sequential order (the order of the stored logits)."""
    # the loaders (torch, FFCV) load only when an analysis runs: `repro list` imports every kind (start-up time)
    import torch

    from repro.data import make_loaders

    loaders = make_loaders(cfg, device="cpu")
    # clone: FFCV reuses its batch buffers, so a kept reference would be overwritten by later batches
    return torch.cat([y.cpu().clone() for _, y in loaders.val]).numpy()


def _errors(probs: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    import torch  # start-up time, as above

    from repro.engine.scoring import topk_errors

    return topk_errors(torch.from_numpy(probs), torch.from_numpy(labels))


def analyse(exp, done, labels: np.ndarray | None = None) -> tuple[dict[str, Any], dict]:
    """Average the members' softmax (section 6) and score it against each member on its own."""
    if len(done) < 2:
        return {"status": "needs at least 2 done members", "members": len(done)}, {}
    labels = val_labels(done[0][0].cfg) if labels is None else labels
    probs, members = [], []
    for r, d, _ in done:
        p = softmax(np.load(RunDir(d).val_logits).astype(np.float64), axis=1)
        top1, top5 = _errors(p, labels)
        members.append({"variant": r.variant, "seed": r.seed, "config_hash": r.config_hash,
                        "top1_err": top1, "top5_err": top5})
        probs.append(p)
    e1, e5 = _errors(np.mean(probs, axis=0), labels)
    m1 = float(np.mean([m["top1_err"] for m in members]))
    m5 = float(np.mean([m["top5_err"] for m in members]))
    return {"members": members, "n_members": len(members), "ensemble": {"top1_err": e1, "top5_err": e5},
            "mean_member": {"top1_err": m1, "top5_err": m5},
            "effect": {"top1_err": e1 - m1, "top5_err": e5 - m5}}, {}


def summary(d: dict[str, Any]) -> str:
    return (f"ensemble of {d['n_members']}: top-1 err {d['ensemble']['top1_err']:.2f} vs "
            f"{d['mean_member']['top1_err']:.2f} for one (effect {d['effect']['top1_err']:.2f})")


def judge(exp, ev: Evidence) -> tuple[list[V.Comparison], dict]:
    """Ensemble error minus each member's error; the interval is over members (the ensemble is one number)."""
    analysis = ev.analysis
    paper = paper_numbers(exp)
    comps = []
    for m in [exp.metric] + [k for k in paper if k != exp.metric and k in ("top1_err", "top5_err")]:
        ens = ((analysis or {}).get("ensemble") or {}).get(m)
        members = (analysis or {}).get("members")
        members = [r.get(m) for r in members if isinstance(r, dict)] if isinstance(members, list) else []
        d = [ens - x for x in members if ens is not None and x is not None]
        iv = V.mean_ci(d)
        iv.paired, iv.method = True, "over members (ensemble fixed)"
        verdict, reason = V.signed_verdict(paper.get(m), iv, ev.scale)
        if not analysis:
            verdict, reason = "not run", "no ensemble analysis at this scale (`repro run ensemble` makes it once the runs are done)"
        elif "status" in analysis and not d:
            verdict, reason = "not run", f"ensemble analysis: {analysis['status']}"
        comps.append(V.Comparison(f"ensemble of {len(members)} - one member", m, "points", paper.get(m), iv,
                                  verdict, reason, {i: float(v) for i, v in enumerate(d)}))
    return comps, {}


KIND = register_kind(Kind("ensemble", judge, analyse=analyse, summary=summary, signed_paper=True,
                          figure="learning-curves"))

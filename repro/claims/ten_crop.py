"""Kind `ten-crop`: the same trained runs scored two ways, ten-crop averaging against the centre crop (4.1, 6).

The claim's runs are the baseline's (same config): the analysis loads each finished run's final weights and scores
the validation set with the centre crop and with ten crops (four corners and the centre, and their mirror
images, softmax averaged), so nothing is trained twice. A run that was already scored on ten crops at the end of
training (`train.ten_crop = true`) is read from its record instead. The effect is paired within each run.
`[paper]`: ten-crop minus centre crop, in points.
"""

from __future__ import annotations

from typing import Any

from repro.claims import verdicts as V
from repro.claims.common import paper_numbers
from repro.claims.registry import Evidence, Kind, register_kind

SCORES = ("top1_err", "top5_err", "top1_err_10crop", "top5_err_10crop")


def _score(run_dir) -> dict[str, float]:
    """Centre-crop and ten-crop errors of a run's final weights on the full validation set."""
    # the engine and the loaders (torch, FFCV) load only when an analysis runs: `repro list` imports every kind
    from repro.data import make_loaders
    from repro.data.augment import BatchTransform
    from repro.engine import load_model
    from repro.engine.scoring import evaluate

    model, cfg = load_model(run_dir)
    loaders = make_loaders(cfg, device="cpu")
    metrics, _ = evaluate(model, loaders.val, BatchTransform(loaders.manifest, cfg, train=False),
                          crop=cfg.model.input_size, ten_crop=True)
    return {k: float(metrics[k]) for k in SCORES}


def analyse(exp, done) -> tuple[dict[str, Any], dict]:
    runs = []
    for r, d, result in done:
        recorded = result.get("metrics") or {}
        scored_in_training = all(recorded.get(k) is not None for k in SCORES)
        scores = {k: float(recorded[k]) for k in SCORES} if scored_in_training else _score(d)
        runs.append({"variant": r.variant, "seed": r.seed, "config_hash": r.config_hash,
                     "scored": "at the end of training" if scored_in_training else "by the analysis", **scores})
    if not runs:
        return {"status": "no done runs"}, {}
    return {"runs": runs, "n_runs": len(runs)}, {}


def summary(d: dict[str, Any]) -> str:
    runs = d["runs"]
    delta = sum(r["top1_err_10crop"] - r["top1_err"] for r in runs) / len(runs)
    return f"ten-crop minus centre crop, top-1 err {delta:+.2f} points over {len(runs)} run(s)"


def judge(exp, ev: Evidence) -> tuple[list[V.Comparison], dict]:
    """10-crop minus centre-crop error of the same runs, paired within each run."""
    paper = paper_numbers(exp)
    metric, compare = exp.metric, exp.compare or exp.metric.replace("_10crop", "")
    pairs = [(metric, compare)]
    if metric.startswith("top1") and ("top5_err" in paper or "top5_err_10crop" in paper):
        pairs.append((metric.replace("top1", "top5"), compare.replace("top1", "top5")))
    runs = [r for r in (ev.analysis or {}).get("runs", []) if isinstance(r, dict)]
    comps = []
    for m, c in pairs:
        d = {f"{r.get('variant')}/seed{r.get('seed')}": float(r[m]) - float(r[c]) for r in runs
             if r.get(m) is not None and r.get(c) is not None}
        iv = V.mean_ci(list(d.values()))
        iv.paired, iv.method = True, "paired within each run"
        p = paper.get(m, paper.get(c))
        verdict, reason = V.signed_verdict(p, iv, ev.scale)
        if not ev.analysis:
            verdict, reason = "not run", "no ten-crop analysis at this scale (`repro run ten-crop` makes it once the runs are done)"
        elif "status" in ev.analysis and not d:
            verdict, reason = "not run", f"ten-crop analysis: {ev.analysis['status']}"
        comps.append(V.Comparison(f"{m} - {c}", c, "points", p, iv, verdict, reason, d))
    return comps, {}


KIND = register_kind(Kind("ten-crop", judge, analyse=analyse, summary=summary, signed_paper=True,
                          figure="learning-curves"))

"""Kind `ensemble`: the averaged softmax of the seeds' runs against each member on its own (Table 2, section 6).

Table 2's numbers are ten-crop. Where the runs score ten crops (`train.ten_crop`, on at full scale), the analysis
scores each member's kept weights on ten crops with the engine's evaluation path (each member's softmax averaged over
the 10 views, then over the members) and judges those (`crops` = "ten"); where they do not (demo), it judges the
centre crop and says so (`crops` = "centre", and a `note`). Centre-crop numbers, from the members' stored validation
logits (`RunDir.val_logits`), are kept either way under `top1_err` / `top5_err`; ten-crop ones carry the engine's
suffix (`top1_err_10crop`); `judged_keys` names the ones judged. `[paper]` holds the ensemble minus one CNN in points.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.special import softmax

from repro.claims import verdicts as V
from repro.claims.common import paper_numbers
from repro.claims.registry import Evidence, Kind, register_kind
from repro.rundir import RunDir

ANALYSIS_VERSION = 2  # 2: `crops`; ten-crop outputs where the runs score ten crops
TEN = "_10crop"       # the engine's suffix of ten-crop metrics
METRICS = ("top1_err", "top5_err")
NOTES = {
    "ten": "ten-crop, as in Table 2: each member's softmax averaged over its 10 views (4 corners and the centre, and "
           "their mirror images), then over the members",
    "centre": "centre crop only: this scale's runs do not score ten crops (train.ten_crop = false), while Table 2's "
              "numbers are ten-crop",
}


def val_labels(cfg) -> np.ndarray:
    """Labels of the validation set in the loaders' fixed sequential order (the order of the stored logits)."""
    # the loaders (torch, FFCV) load only when an analysis runs: `repro list` imports every kind (start-up time)
    import torch

    from repro.data import make_loaders

    loaders = make_loaders(cfg, device="cpu")
    # clone: FFCV reuses its batch buffers, so a kept reference would be overwritten by later batches
    return torch.cat([y.cpu().clone() for _, y in loaders.val]).numpy()


def ten_crop_probs(run_dir) -> tuple[np.ndarray, np.ndarray]:
    """(softmax averaged over each image's ten crops, labels) of a run's kept weights on the validation set, in the
    loaders' order, by the engine's own scoring (repro.engine.scoring.predict); on a GPU where there is one."""
    import torch  # start-up time, as above

    from repro.data import make_loaders
    from repro.data.augment import BatchTransform
    from repro.engine import load_model
    from repro.engine.scoring import predict

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, cfg = load_model(run_dir, device=device)
    loaders = make_loaders(cfg, device=device)
    probs, labels = predict(model, loaders.val, BatchTransform(loaders.manifest, cfg, train=False),
                            crop=cfg.model.input_size, ten_crop=True)
    return probs.double().numpy(), labels.numpy()


def _errors(probs: np.ndarray, labels: np.ndarray, suffix: str = "") -> dict[str, float]:
    import torch  # start-up time, as above

    from repro.engine.scoring import topk_errors

    top1, top5 = topk_errors(torch.from_numpy(probs), torch.from_numpy(labels))
    return {f"top1_err{suffix}": top1, f"top5_err{suffix}": top5}


def _outputs(d, crops: str, labels: np.ndarray, score) -> dict[str, np.ndarray]:
    """{metric suffix: (images, classes) probabilities} of one member: centre crop, and ten crops when scored."""
    out = {"": softmax(np.load(RunDir(d).val_logits).astype(np.float64), axis=1)}
    if crops == "ten":
        probs, ten_labels = score(d)
        if not np.array_equal(ten_labels, labels):
            raise ValueError(f"{d}: the ten-crop pass saw the validation images in another order than the stored "
                             "logits")
        out[TEN] = np.asarray(probs, dtype=np.float64)
    return out


def analyse(exp, done, labels: np.ndarray | None = None, score=None) -> tuple[dict[str, Any], dict]:
    """Average the members' softmax (section 6) and score it against each member on its own. `labels` and `score`
    (run dir -> (ten-crop probabilities, labels)) stand in for the loaders and the engine in tests."""
    if len(done) < 2:
        return {"status": "needs at least 2 done members", "members": len(done)}, {}
    crops = "ten" if all(r.cfg.train.ten_crop for r, _, _ in done) else "centre"
    labels = val_labels(done[0][0].cfg) if labels is None else labels
    sums: dict[str, np.ndarray] = {}  # running sums, not lists: 50,000 x 1,000 probabilities per member at full
    members = []
    for r, d, _ in done:
        member = {"variant": r.variant, "seed": r.seed, "config_hash": r.config_hash}
        for suffix, p in _outputs(d, crops, labels, score or ten_crop_probs).items():
            member.update(_errors(p, labels, suffix))
            sums[suffix] = p if suffix not in sums else sums[suffix] + p
        members.append(member)
    ensemble: dict[str, float] = {}
    for suffix, total in sums.items():
        ensemble.update(_errors(total / len(members), labels, suffix))
    mean_member = {k: float(np.mean([m[k] for m in members])) for k in ensemble}
    suffix = TEN if crops == "ten" else ""
    return {"version": ANALYSIS_VERSION, "crops": crops, "note": NOTES[crops],
            "judged_keys": {m: m + suffix for m in METRICS}, "members": members, "n_members": len(members),
            "ensemble": ensemble, "mean_member": mean_member,
            "effect": {k: ensemble[k] - mean_member[k] for k in ensemble}}, {}


def summary(d: dict[str, Any]) -> str:
    key = (d.get("judged_keys") or {}).get("top1_err", "top1_err")
    return (f"ensemble of {d['n_members']} ({d.get('crops', '?')} crop): top-1 err {d['ensemble'][key]:.2f} vs "
            f"{d['mean_member'][key]:.2f} for one (effect {d['effect'][key]:.2f})")


def _crops_said(analysis: dict | None, scale: str) -> tuple[str, str, str]:
    """(suffix of the judged metrics, words for the label, a note for the reason) of an analysis."""
    crops = (analysis or {}).get("crops")
    if crops == "ten":
        return TEN, ", ten-crop", ""
    if crops == "centre":
        return "", ", centre crop", f"; {NOTES['centre']}"
    if analysis and "status" not in analysis:  # written before the analysis said which crops it scored
        return "", "", (f"; centre crop (an analysis of an older format: `repro run ensemble --scale {scale}` "
                        "redoes it)")
    return "", "", ""


def judge(exp, ev: Evidence) -> tuple[list[V.Comparison], dict]:
    """Ensemble error minus each member's error; the interval is over members (the ensemble is one number)."""
    analysis = ev.analysis
    paper = paper_numbers(exp)
    suffix, words, note = _crops_said(analysis, ev.scale)
    comps = []
    for m in [exp.metric] + [k for k in paper if k != exp.metric and k in METRICS]:
        ens = ((analysis or {}).get("ensemble") or {}).get(m + suffix)
        members = (analysis or {}).get("members")
        members = [r.get(m + suffix) for r in members if isinstance(r, dict)] if isinstance(members, list) else []
        d = [ens - x for x in members if ens is not None and x is not None]
        iv = V.mean_ci(d)
        iv.paired, iv.method = True, "over members (ensemble fixed)"
        verdict, reason = V.signed_verdict(paper.get(m), iv, ev.scale)
        reason += note
        if not analysis:
            verdict, reason = "not run", "no ensemble analysis at this scale (`repro run ensemble` makes it once the runs are done)"
        elif "status" in analysis and not d:
            verdict, reason = "not run", f"ensemble analysis: {analysis['status']}"
        comps.append(V.Comparison(f"ensemble of {len(members)} - one member{words}", m, "points", paper.get(m), iv,
                                  verdict, reason, {i: float(v) for i, v in enumerate(d)}))
    return comps, {}


KIND = register_kind(Kind("ensemble", judge, analyse=analyse, summary=summary, signed_paper=True,
                          figure="learning-curves"))

"""Post-training analyses that turn trained runs into the numbers of the qualitative claims.

Run by `repro run` after training, one per experiment kind that needs one; each writes
`runs/<experiment>/analysis.json` (numbers) and, for figures, `analysis.npz` (arrays):
  ensemble     averaged softmax of the members' stored val logits against each member (Table 2).
  convergence  best learning rate per activation and iterations to 25% and to a dataset-relative training error
               (section 3.1, Fig. 1).
  filters      a colour-specificity score per conv1 tower, and the weights (section 6.1, Fig. 3).
  retrieval    how often the nearest training images in the last hidden layer share the query's label, against
               nearest neighbours in pixel space (section 6.1, Fig. 4), and a few thumbnails.
An analysis is skipped when its inputs (the runs' config hashes and finish times) have not changed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from repro import io
from repro import runs as store
from repro.experiments import Experiment, PlannedRun

RETRIEVAL_QUERIES = 500      # validation images used as queries
RETRIEVAL_DATABASE = 10000   # training images searched
RETRIEVAL_K = 5
THUMB_QUERIES = 8
THUMB_SIDE = 64


def _done(runs: list[PlannedRun], runs_dir: Path) -> list[tuple[PlannedRun, Path, dict]]:
    out = []
    for r in runs:
        d = store.store_dir(runs_dir, r.config_hash)
        record = store.read_result(d)
        if record is not None and record.finished:
            out.append((r, d, record.to_dict()))
    return out


def _inputs(done) -> dict[str, str]:
    return {f"{r.variant}/seed{r.seed}": f"{r.config_hash}@{res.get('provenance', {}).get('finished')}"
            for r, _, res in done}


def softmax_np(logits: np.ndarray) -> np.ndarray:
    return torch.softmax(torch.from_numpy(logits.astype(np.float32)), dim=1).numpy()


def topk_err(probs: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Top-1 and top-5 error in percent."""
    k = min(5, probs.shape[1])
    top = np.argsort(-probs, axis=1)[:, :k]
    hit = top == labels[:, None]
    return 100.0 * (1 - hit[:, 0].mean()), 100.0 * (1 - hit.any(1).mean())


def val_labels(cfg) -> np.ndarray:
    """Labels of the validation set in the loaders' fixed sequential order (the order of val_logits.npy)."""
    from repro.data import make_loaders

    loaders = make_loaders(cfg, device="cpu")
    # clone: FFCV reuses its batch buffers, so a kept reference would be overwritten by later batches
    return torch.cat([y.cpu().clone() for _, y in loaders.val]).numpy()


def ensemble(done, labels: np.ndarray | None = None) -> dict[str, Any]:
    """Average the members' softmax (section 6) and score it against each member on its own."""
    if len(done) < 2:
        return {"status": "needs at least 2 done members", "members": len(done)}
    labels = val_labels(done[0][0].cfg) if labels is None else labels
    probs, members = [], []
    for r, d, _ in done:
        p = softmax_np(np.load(d / "val_logits.npy"))
        top1, top5 = topk_err(p, labels)
        members.append({"variant": r.variant, "seed": r.seed, "config_hash": r.config_hash,
                        "top1_err": top1, "top5_err": top5})
        probs.append(p)
    e1, e5 = topk_err(np.mean(probs, axis=0), labels)
    m1 = float(np.mean([m["top1_err"] for m in members]))
    m5 = float(np.mean([m["top5_err"] for m in members]))
    return {"members": members, "n_members": len(members), "ensemble": {"top1_err": e1, "top5_err": e5},
            "mean_member": {"top1_err": m1, "top5_err": m5},
            "effect": {"top1_err": e1 - m1, "top5_err": e5 - m5}}


def first_reach(curve, threshold: float, strict: bool = True) -> float | None:
    """First curve iteration whose training error is below (or, not strict, at) `threshold`, or None."""
    err = curve.train_top1_err
    hit = curve[err < threshold] if strict else curve[err <= threshold]
    return float(hit.iteration.iloc[0]) if len(hit) else None


def convergence(exp: Experiment, done) -> dict[str, Any]:
    """Best learning rate per group, iterations to 25% and to the best final training error of the control."""
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
            its = [first_reach(c, th, strict) for _, c in seeds] if th is not None else [None]
            return float(np.mean(its)) if all(i is not None for i in its) else None
        variants[var] = {"group": group_of[var], "lr": exp.variants[var].get("train.lr"),
                         "iters_to_target": mean_iters(target), "iters_to_relative": mean_iters(relative, strict=False),
                         "final_train_err": float(np.mean([final[(var, s)] for s, _ in seeds])), "seeds": len(seeds)}

    def best(group: str) -> str | None:
        cands = [v for v, m in variants.items() if m["group"] == group]
        # fastest to the relative threshold; never reaching it ranks by final training error
        key = lambda v: (variants[v]["iters_to_relative"] is None, variants[v]["iters_to_relative"] or 0,
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
    return out


def colour_specificity(w: torch.Tensor) -> float:
    """Mean over kernels of the fraction of kernel energy not in its grey (channel-mean) component."""
    w = w.detach().float()
    w = w - w.mean(dim=(1, 2, 3), keepdim=True)  # a constant offset carries no colour or pattern
    grey = w.mean(dim=1, keepdim=True)
    total = (w ** 2).sum(dim=(1, 2, 3)).clamp_min(1e-12)
    chroma = ((w - grey) ** 2).sum(dim=(1, 2, 3))
    return float((chroma / total).mean())


def filters(done) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Colour-specificity per tower on every done run; the first run's conv1 weights for figure 3."""
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
        # which tower is colour-specific is up to initialisation; the claim is that the two towers differ
        gap = np.abs(scores[:, 1] - scores[:, 0])
        out["tower_gap"] = {"mean": float(gap.mean()), "per_run": gap.tolist()}
    return out, arrays


def _thumbs(images: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW -> uint8 NHWC at most THUMB_SIDE px, for the figure only."""
    if images.shape[-1] > THUMB_SIDE:
        images = F.interpolate(images.float(), size=THUMB_SIDE, mode="area").round().clamp(0, 255).byte()
    return images.permute(0, 2, 3, 1).contiguous()


@torch.no_grad()
def _embed(model, loader, transform, crop: int, limit: int, mean_image: torch.Tensor | None = None):
    """`mean_image`: what the loader subtracted ("mean-image"), added back for the thumbnails only (pixel
    distances do not change when every image loses the same image)."""
    from repro.data.augment import center_crop

    feats, pixels, labels, thumbs, n = [], [], [], [], 0
    for images, y in loader:
        images = images[: limit - n].cpu().clone()  # FFCV reuses its batch buffers
        x = center_crop(images, crop)
        feats.append(model.forward_features(transform(x)).float())
        pixels.append(x.float().flatten(1))
        labels.append(y[: len(images)].cpu().clone())
        shown = x if mean_image is None else (x + center_crop(mean_image.cpu(), crop)).round().clamp(0, 255).byte()
        thumbs.append(_thumbs(shown))
        n += len(images)
        if n >= limit:
            break
    return torch.cat(feats), torch.cat(pixels), torch.cat(labels), torch.cat(thumbs)


def neighbour_agreement(q: torch.Tensor, db: torch.Tensor, q_labels: torch.Tensor, db_labels: torch.Tensor,
                        k: int) -> tuple[float, torch.Tensor]:
    """Fraction of each query's k Euclidean nearest neighbours sharing its label (mean), and their indices."""
    idx = torch.cdist(q, db).topk(k, dim=1, largest=False).indices
    return float((db_labels[idx] == q_labels[:, None]).float().mean()), idx


def retrieval(done) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Nearest training images to validation queries in the last hidden layer, against raw pixels."""
    from repro.data import make_loaders
    from repro.data.augment import BatchTransform
    from repro.engine import load_model

    if not done:
        return {"status": "no done runs"}, {}
    r, d, _ = done[0]
    model, cfg = load_model(d)
    loaders = make_loaders(cfg, device="cpu")
    transform = BatchTransform(loaders.manifest, cfg, train=False)
    crop = cfg.model.input_size
    qf, qp, ql, qt = _embed(model, loaders.val, transform, crop, RETRIEVAL_QUERIES, loaders.mean_image)
    df, dp, dl, dt = _embed(model, loaders.train_eval, transform, crop, RETRIEVAL_DATABASE, loaders.mean_image)
    k = min(RETRIEVAL_K, len(dl))
    feat_score, idx = neighbour_agreement(qf, df, ql, dl, k)
    pix_score, _ = neighbour_agreement(qp, dp, ql, dl, k)
    counts = torch.bincount(dl).double()
    chance = float(((counts / counts.sum()) ** 2).sum())  # a random neighbour shares the label this often
    out = {"run": {"variant": r.variant, "seed": r.seed, "config_hash": r.config_hash}, "k": k,
           "queries": len(ql), "database": len(dl), "feature_agreement": feat_score,
           "pixel_agreement": pix_score, "chance_agreement": chance, "features_dim": int(qf.shape[1])}
    n = min(THUMB_QUERIES, len(ql))
    arrays = {"query_images": qt[:n].numpy(), "neighbour_images": dt[idx[:n]].numpy(),
              "query_labels": ql[:n].numpy(), "neighbour_labels": dl[idx[:n]].numpy()}
    return out, arrays


def _write(exp_dir: Path, data: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    exp_dir.mkdir(parents=True, exist_ok=True)
    if arrays:
        with io.atomic_path(exp_dir / "analysis.npz") as tmp, open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
        data["npz"] = "analysis.npz"
    io.write_json(exp_dir / "analysis.json", data)


def analyse(exp: Experiment, runs: list[PlannedRun], runs_dir: Path) -> str | None:
    """Run the analysis of `exp` (if its kind has one) under a lock; returns a one-line summary or None."""
    if exp.kind not in ("ensemble", "convergence", "filters", "retrieval"):
        return None
    exp_dir = Path(runs_dir) / exp.name
    exp_dir.mkdir(parents=True, exist_ok=True)
    done = _done(runs, Path(runs_dir))
    inputs = _inputs(done)
    with store.run_lock(exp_dir, wait=True):  # two processes never write one analysis
        old = io.read_json(exp_dir / "analysis.json") or {}
        if old.get("inputs") == inputs and old.get("kind") == exp.kind:
            return None
        arrays: dict[str, np.ndarray] = {}
        if exp.kind == "ensemble":
            data = ensemble(done)
        elif exp.kind == "convergence":
            data = convergence(exp, done)
        elif exp.kind == "filters":
            data, arrays = filters(done)
        else:
            data, arrays = retrieval(done)
        data.update({"kind": exp.kind, "experiment": exp.name, "inputs": inputs,
                     "scale": runs[0].scale if runs else None})
        _write(exp_dir, data, arrays)
    return summary_line(exp.kind, data)


def summary_line(kind: str, d: dict[str, Any]) -> str:
    f = lambda x: "n/a" if x is None else f"{x:.2f}"
    if "status" in d:
        return str(d["status"])
    if kind == "ensemble":
        return (f"ensemble of {d['n_members']}: top-1 err {f(d['ensemble']['top1_err'])} vs "
                f"{f(d['mean_member']['top1_err'])} for one (effect {f(d['effect']['top1_err'])})")
    if kind == "convergence":
        return (f"best {d['best']}; speed-up to {d['target_train_err']:g}% {d.get('speedup')}, "
                f"to {f(d['relative_train_err'])}% {d.get('speedup_relative')}")
    if kind == "filters":
        return f"colour specificity per tower {[round(x, 3) for x in d['mean_per_tower']]}"
    return (f"{d['k']}-NN label agreement {f(d['feature_agreement'])} in features vs "
            f"{f(d['pixel_agreement'])} in pixels (chance {f(d['chance_agreement'])})")

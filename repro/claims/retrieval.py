"""Kind `retrieval`: nearest training images in the last hidden layer share the query's class (6.1, Fig. 4).

The analysis embeds validation queries and training images with the first finished run, and records per query
image the fraction of its k Euclidean nearest neighbours that share its label, in feature space and in pixel space.
The judgement pairs the two per query (one observation per query image: one query's neighbours are not independent
of each other) with a t interval over queries.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from repro.claims import verdicts as V
from repro.claims.registry import Evidence, Kind, register_kind

RETRIEVAL_QUERIES = 500      # validation images used as queries
RETRIEVAL_DATABASE = 10000   # training images searched
RETRIEVAL_K = 5
THUMB_QUERIES = 8
THUMB_SIDE = 64


def _thumbs(images):
    """uint8 NCHW -> uint8 NHWC at most THUMB_SIDE px, for the figure only."""
    import torch.nn.functional as F  # start-up time: see analyse

    if images.shape[-1] > THUMB_SIDE:
        images = F.interpolate(images.float(), size=THUMB_SIDE, mode="area").round().clamp(0, 255).byte()
    return images.permute(0, 2, 3, 1).contiguous()


def _embed(model, loader, transform, crop: int, limit: int, mean_image=None):
    """`mean_image`: what the loader subtracted ("mean-image"), added back for the thumbnails only (pixel
    distances are the same either way: the same mean image is subtracted from every image)."""
    import torch  # start-up time: see analyse

    from repro.data.augment import center_crop

    feats, pixels, labels, thumbs, n = [], [], [], [], 0
    with torch.no_grad():
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


def neighbour_agreement(q, db, q_labels, db_labels, k: int):
    """Per query, the fraction of its k Euclidean nearest neighbours sharing its label, and their indices."""
    import torch  # start-up time: see analyse

    idx = torch.cdist(q, db).topk(k, dim=1, largest=False).indices
    return (db_labels[idx] == q_labels[:, None]).double().mean(dim=1), idx


def analyse(exp, done) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Nearest training images to validation queries in the last hidden layer, against raw pixels."""
    # torch, the loaders and the engine load only when an analysis runs: `repro list` and `repro report` import
    # every kind (start-up time)
    import torch

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
    feat, idx = neighbour_agreement(qf, df, ql, dl, k)
    pix, _ = neighbour_agreement(qp, dp, ql, dl, k)
    counts = torch.bincount(dl).double()
    chance = float(((counts / counts.sum()) ** 2).sum())  # a random neighbour shares the label this often
    out = {"run": {"variant": r.variant, "seed": r.seed, "config_hash": r.config_hash}, "k": k,
           "queries": len(ql), "database": len(dl), "feature_agreement": float(feat.mean()),
           "pixel_agreement": float(pix.mean()), "chance_agreement": chance, "features_dim": int(qf.shape[1]),
           # per query: how many of its k neighbours share its label
           "per_query": {"feature_hits": [int(round(x * k)) for x in feat.tolist()],
                         "pixel_hits": [int(round(x * k)) for x in pix.tolist()]}}
    n = min(THUMB_QUERIES, len(ql))
    arrays = {"query_images": qt[:n].numpy(), "neighbour_images": dt[idx[:n]].numpy(),
              "query_labels": ql[:n].numpy(), "neighbour_labels": dl[idx[:n]].numpy()}
    return out, arrays


def summary(d: dict[str, Any]) -> str:
    return (f"{d['k']}-NN label agreement {d['feature_agreement']:.2f} in features vs "
            f"{d['pixel_agreement']:.2f} in pixels (chance {d['chance_agreement']:.2f})")


def judge(exp, ev: Evidence) -> tuple[list[V.Comparison], dict]:
    """Per query: feature-space agreement minus pixel-space agreement (judged) and minus chance (context)."""
    a = ev.analysis or {}
    per_query = a.get("per_query") or {}
    k = int(a.get("k") or 0)
    feat, pix = per_query.get("feature_hits"), per_query.get("pixel_hits")
    if not k or not feat or not pix or len(feat) != len(pix):
        reason = f"retrieval analysis: {a['status']}" if "status" in a else "no per-query retrieval analysis " \
                 f"at this scale (run `repro run retrieval --scale {ev.scale}` again)"
        return [V.Comparison("feature neighbours - pixel neighbours", "label agreement difference", "points",
                             None, V.Interval(), "not run", reason)], {}
    feat = 100.0 * np.asarray(feat, dtype=float) / k
    pix = 100.0 * np.asarray(pix, dtype=float) / k
    comps = [V.paired_over_queries("feature neighbours - pixel neighbours", "label agreement difference",
                                   feat - pix, ev.scale, f"{feat.mean():.1f}% against {pix.mean():.1f}% of "
                                   f"{k} neighbours share the query's label")]
    chance = float(a.get("chance_agreement") or 0.0)
    if chance > 0:
        c = V.paired_over_queries("feature neighbours - chance", "label agreement - chance", feat - 100 * chance,
                                  ev.scale, f"chance {100 * chance:.1f}%")
        c.context = True
        comps.append(c)
    return comps, {}


KIND = register_kind(Kind("retrieval", judge, analyse=analyse, summary=summary, figure="retrieval"))

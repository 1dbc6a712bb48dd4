"""Kind `retrieval`: nearest training images in the last hidden layer share the query's class (6.1, Fig. 4).

The queries are a seeded sample of the validation images stratified over classes (the same number per class, as far
as the class sizes allow), and the searched images a seeded stratified sample of the training images, so that
class-ordered data (ImageNet's validation set is sorted by class) is covered evenly. Every finished run's model
embeds them; per query the analysis records how many of its k Euclidean nearest neighbours share its label in each
model's feature space (and their mean over the models) and in pixel space. The judgement pairs features against
pixels per query and treats the queries of one class as correlated: its interval is a t interval over the
per-class means of those differences, so n is the number of classes.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from repro.claims import verdicts as V
from repro.claims.registry import Evidence, Kind, register_kind

ANALYSIS_VERSION = 2         # 2: stratified seeded samples, every run's model, classes as the unit of the interval
RETRIEVAL_QUERIES = 500      # validation images used as queries, spread evenly over the classes (one each at least)
RETRIEVAL_DATABASE = 10000   # training images searched, spread the same way
RETRIEVAL_K = 5
SAMPLE_SEED = 0              # numpy's generator draws both samples from it: the same images for every run
THUMB_QUERIES = 8
THUMB_SIDE = 64
INTERVAL = "t interval over classes: per-class means of the per-query differences (a class's queries are correlated)"


def stratified_sample(labels: np.ndarray, total: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """Sorted positions of ceil(total / classes) items of every class in `labels` (every item of a smaller class),
    drawn without replacement by `rng`; and that number per class."""
    classes = np.unique(labels)
    per_class = max(1, math.ceil(total / max(len(classes), 1)))
    picks = [rng.choice(np.flatnonzero(labels == c), size=min(per_class, int(np.sum(labels == c))), replace=False)
             for c in classes]
    return (np.sort(np.concatenate(picks)) if picks else np.zeros(0, dtype=np.int64)), per_class


def _split(cfg, manifest: dict, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(stored ids, labels) of the images of `split` the runs use (the loaders' fixed subset, data.*_limit)."""
    from repro.data import subset_indices
    from repro.data.beton import BetonReader
    from repro.data.manifest import beton_path

    limit = cfg.data.train_limit if split == "train" else cfg.data.val_limit
    ids = subset_indices(int(manifest["splits"][split]["count"]), limit)
    return ids, BetonReader(beton_path(cfg.data.dir, manifest, split)).labels[ids.astype(np.int64)]


def _loader(cfg, manifest: dict, split: str, ids: np.ndarray, mean_image):
    """Evaluation batches (full stored images, stored order) of the sampled ids only: a sample spread over a whole
    split cannot be read by stopping early, and reading all of ImageNet's training set to keep a few images would
    decode it all. The torch backend reads the same betons (and pixels) as the others, without FFCV or a GPU; in this
    process (no workers), as forking after a training run's loader threads may break the children's threads."""
    import torch

    from repro.data.manifest import beton_path
    from repro.data.torch_loader import make_torch_batches

    return make_torch_batches(
        beton_path(cfg.data.dir, manifest, split), indices=ids, batch_size=cfg.train.batch_size, train=False,
        crop=cfg.model.input_size, res=int(manifest["settings"].get("res") or manifest["image"]["height"]),
        fixed_size=bool(manifest["image"].get("fixed_size", True)), flip=False, seed=0,
        workers=0, device=torch.device("cpu"), distributed=False,
        mean_image=mean_image)


def _thumbs(images):
    """uint8 NCHW -> uint8 NHWC at most THUMB_SIDE px, for the figure only."""
    import torch.nn.functional as F  # start-up time: see analyse

    if images.shape[-1] > THUMB_SIDE:
        images = F.interpolate(images.float(), size=THUMB_SIDE, mode="area").round().clamp(0, 255).byte()
    return images.permute(0, 2, 3, 1).contiguous()


def _embed(models, transforms, loader, crop: int, mean_image=None):
    """Per model the last hidden layer of every image; the centre crops as uint8 pixels; the labels.
    `mean_image`: what the loader subtracted ("mean-image"), added back, so that pixel distances are the images'
    (the same mean image is subtracted from every image, so the distances are the same either way)."""
    import torch  # start-up time: see analyse

    from repro.data.augment import center_crop

    feats, pixels, labels = [[] for _ in models], [], []
    mean = None if mean_image is None else center_crop(mean_image.cpu(), crop)
    with torch.no_grad():
        for images, y in loader:
            x = center_crop(images.cpu(), crop)
            for out, model, transform in zip(feats, models, transforms):
                out.append(model.forward_features(transform(x)).float())
            pixels.append(x.clone() if mean is None else (x + mean).round().clamp(0, 255).byte())
            labels.append(y.cpu().clone())
    return [torch.cat(f) for f in feats], torch.cat(pixels), torch.cat(labels)


def nearest(q, db, k: int, chunk: int = 2048):
    """(Q, k) indices of the k Euclidean nearest rows of `db` to each row of `q`, nearest first. `db` is read
    `chunk` rows at a time, so uint8 pixels widen to float32 a chunk at a time."""
    import torch  # start-up time: see analyse

    q = q.flatten(1).float()
    best_d, best_i = torch.empty(len(q), 0), torch.empty(len(q), 0, dtype=torch.long)
    for start in range(0, len(db), chunk):
        part = db[start:start + chunk].flatten(1).float()
        d = torch.cat([best_d, torch.cdist(q, part)], dim=1)
        i = torch.cat([best_i, torch.arange(start, start + len(part)).expand(len(q), -1)], dim=1)
        best_d, pos = d.topk(min(k, d.shape[1]), dim=1, largest=False)
        best_i = i.gather(1, pos)
    return best_i


def neighbour_agreement(q, db, q_labels, db_labels, k: int):
    """Per query, the fraction of its k Euclidean nearest neighbours sharing its label, and their indices."""
    idx = nearest(q, db, k)
    return (db_labels[idx] == q_labels[:, None]).double().mean(dim=1), idx


def _figure_queries(labels: np.ndarray, n: int) -> np.ndarray:
    """Positions of n queries of as many different classes as there are (each class's first, then its second...)."""
    rank = np.zeros(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        where = np.flatnonzero(labels == c)
        rank[where] = np.arange(len(where))
    return np.lexsort((labels, rank))[:n]


def _samples(cfg, manifest: dict) -> tuple[np.ndarray, np.ndarray, dict]:
    """The query ids (validation) and database ids (training), both stratified over classes, and how they were
    drawn."""
    q_pool, q_labels = _split(cfg, manifest, "val")
    d_pool, d_labels = _split(cfg, manifest, "train")
    rng = np.random.default_rng(SAMPLE_SEED)
    q_pos, q_per_class = stratified_sample(q_labels, RETRIEVAL_QUERIES, rng)
    d_pos, d_per_class = stratified_sample(d_labels, RETRIEVAL_DATABASE, rng)
    how = {"method": "stratified by class, drawn without replacement", "generator": "numpy default_rng",
           "seed": SAMPLE_SEED, "queries_per_class": q_per_class, "database_per_class": d_per_class,
           "query_pool": len(q_pool), "database_pool": len(d_pool)}
    return q_pool[q_pos], d_pool[d_pos], how


def analyse(exp, done) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Nearest training images to the sampled validation queries in every run's last hidden layer, and in pixels."""
    # torch, the loaders and the engine load only when an analysis runs: `repro list` and `repro report` import
    # every kind (start-up time)
    import torch

    from repro.data import read_manifest
    from repro.data.augment import BatchTransform
    from repro.data.manifest import read_mean_image
    from repro.engine import load_model

    if not done:
        return {"status": "no done runs"}, {}
    loaded = [load_model(d) for _, d, _ in done]
    cfg = loaded[0][1]  # the runs differ only in their seed: one data set, one input size
    manifest = read_manifest(cfg.data.dir)
    mean_image = (torch.from_numpy(read_mean_image(cfg.data.dir, manifest)).permute(2, 0, 1).contiguous()
                  if cfg.data.normalize == "mean-image" else None)
    q_ids, d_ids, how = _samples(cfg, manifest)
    models = [m for m, _ in loaded]
    transforms = [BatchTransform(manifest, c, train=False) for _, c in loaded]
    crop = cfg.model.input_size
    qf, qp, ql = _embed(models, transforms, _loader(cfg, manifest, "val", q_ids, mean_image), crop, mean_image)
    df, dp, dl = _embed(models, transforms, _loader(cfg, manifest, "train", d_ids, mean_image), crop, mean_image)
    out, idx = _agreements(done, qf, df, qp, dp, ql, dl)
    out.update(sample=how, features_dim=int(qf[0].shape[1]))
    out["per_query"]["index"] = q_ids.astype(np.int64).tolist()
    n = _figure_queries(ql.numpy(), THUMB_QUERIES)
    neighbours = _thumbs(dp[idx[n].flatten()])
    arrays = {"query_images": _thumbs(qp[n]).numpy(),
              "neighbour_images": neighbours.reshape(len(n), out["k"], *neighbours.shape[1:]).numpy(),
              "query_labels": ql[n].numpy(), "neighbour_labels": dl[idx[n]].numpy()}
    return out, arrays


def _agreements(done, qf, df, qp, dp, ql, dl) -> tuple[dict[str, Any], Any]:
    """The numbers of the analysis from the embeddings, and the first model's neighbour indices (for the figure)."""
    import torch

    k = min(RETRIEVAL_K, len(dl))
    by_model, first = [], None
    for q, d in zip(qf, df):
        agree, idx = neighbour_agreement(q, d, ql, dl, k)
        by_model.append((agree * k).round().long())
        first = idx if first is None else first
    hits = torch.stack(by_model).double()                  # (models, queries)
    pix, _ = neighbour_agreement(qp, dp, ql, dl, k)
    share = torch.bincount(dl, minlength=int(ql.max()) + 1).double() / len(dl)
    chance = share[ql]  # how often a neighbour drawn at random shares the query's label
    models = [{"variant": r.variant, "seed": r.seed, "config_hash": r.config_hash,
               "feature_agreement": float(h.mean() / k)} for (r, _, _), h in zip(done, hits)]
    out = {"version": ANALYSIS_VERSION, "k": k, "queries": len(ql), "query_classes": int(ql.unique().numel()),
           "database": len(dl), "database_classes": int(dl.unique().numel()), "n_models": len(models),
           "models": models, "figure_run": {key: models[0][key] for key in ("variant", "seed", "config_hash")},
           "feature_agreement": float(hits.mean() / k), "pixel_agreement": float(pix.mean()),
           "chance_agreement": float(chance.mean()), "interval": INTERVAL,
           "per_query": {"label": ql.tolist(), "feature_hits": hits.mean(0).tolist(),  # mean over the models
                         "feature_hits_by_model": hits.long().tolist(),
                         "pixel_hits": (pix * k).round().long().tolist(), "chance": chance.tolist()}}
    return out, first


def class_means(values: np.ndarray, labels: np.ndarray) -> dict[int, float]:
    """{class: mean of `values` over that class's queries}."""
    classes, inverse = np.unique(labels, return_inverse=True)
    means = np.bincount(inverse, weights=values) / np.bincount(inverse)
    return {int(c): float(m) for c, m in zip(classes, means)}


def _per_query(a: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int] | None:
    """(feature, pixel, chance agreement in percent, labels, k) per query, or None without them."""
    pq, k = a.get("per_query") or {}, int(a.get("k") or 0)
    cols = [pq.get(c) for c in ("feature_hits", "pixel_hits", "chance", "label")]
    if a.get("version") != ANALYSIS_VERSION or not k or any(not c for c in cols) or len({len(c) for c in cols}) != 1:
        return None
    feat, pix = (100.0 * np.asarray(c, dtype=float) / k for c in cols[:2])
    return feat, pix, 100.0 * np.asarray(cols[2], dtype=float), np.asarray(cols[3]), k


def summary(d: dict[str, Any]) -> str:
    return (f"{d['k']}-NN label agreement {d['feature_agreement']:.2f} in features ({d.get('n_models', 1)} model(s)) "
            f"vs {d['pixel_agreement']:.2f} in pixels (chance {d['chance_agreement']:.2f}); {d['queries']} queries "
            f"over {d.get('query_classes', '?')} classes")


def _over_classes(label: str, metric: str, diffs, labels, scale: str, what: str) -> V.Comparison:
    """A per-query difference (points) the claim says is positive, judged with a t interval over class means."""
    by_class = class_means(diffs, labels)
    iv = V.mean_ci(list(by_class.values()))
    iv.paired, iv.method = True, INTERVAL
    verdict, reason = V.signed_verdict(1.0, iv, scale, magnitude=False)
    return V.Comparison(label, metric, "points", None, iv, verdict,
                        f"{reason} ({what}; {len(labels)} queries in {iv.n} classes)",
                        {f"class {c}": v for c, v in by_class.items()})


def judge(exp, ev: Evidence) -> tuple[list[V.Comparison], dict]:
    """Per query: feature-space agreement minus pixel-space agreement (judged) and minus chance (context)."""
    a = ev.analysis or {}
    parsed = _per_query(a)
    if parsed is None:
        again = f"run `repro run retrieval --scale {ev.scale}` again"
        reason = (f"retrieval analysis: {a['status']}" if "status" in a else
                  f"the retrieval analysis at this scale is of an older format ({again})" if a.get("per_query") else
                  f"no per-query retrieval analysis at this scale ({again})")
        return [V.Comparison("feature neighbours - pixel neighbours", "label agreement difference", "points",
                             None, V.Interval(), "not run", reason)], {}
    feat, pix, chance, labels, k = parsed
    models = int(a.get("n_models") or 1)
    comps = [_over_classes("feature neighbours - pixel neighbours", "label agreement difference", feat - pix, labels,
                           ev.scale, f"{feat.mean():.1f}% against {pix.mean():.1f}% of {k} neighbours share the "
                                     f"query's label, features of {models} model(s) averaged per query")]
    c = _over_classes("feature neighbours - chance", "label agreement - chance", feat - chance, labels, ev.scale,
                      f"chance {chance.mean():.1f}%")
    c.context = True
    comps.append(c)
    return comps, {}


KIND = register_kind(Kind("retrieval", judge, analyse=analyse, summary=summary, figure="retrieval"))

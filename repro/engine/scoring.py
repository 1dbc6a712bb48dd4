"""Scoring a model: top-1/top-5 error (percent) on a centre crop and on the ten-crop softmax average (section 4.1),
plus logits and last-hidden-layer features for the later analyses (ensembles, retrieval), and how strongly its
LRN layers normalise."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from repro.config import RunConfig, from_dict
from repro.data.augment import center_crop, ten_crop as ten_crops
from repro.engine import checkpoint
from repro.rundir import RunDir
from repro.engine.parallel import gather_in_order, unwrap
from repro.errors import UserError
from repro.models import build_model
from repro.models.layers import LRN


def _autocast(images: torch.Tensor, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(images.device.type, dtype=dtype)


def _merged(loader, merge: int):
    """`loader`'s (images, labels) batches, `merge` at a time concatenated into one (the last group may be short).
    Each batch is copied as it arrives: FFCV writes later batches into the buffers of earlier ones."""
    if merge == 1:
        yield from loader
        return
    group: list = []
    for images, labels in loader:
        group.append((images.clone(), labels.clone()))
        if len(group) == merge:
            yield torch.cat([x for x, _ in group]), torch.cat([y for _, y in group])
            group = []
    if group:
        yield torch.cat([x for x, _ in group]), torch.cat([y for _, y in group])


@torch.no_grad()
def _passes(model, loader, transform, *, crop: int, ten_crop: bool, features: bool, dtype,
            count: int | None = None, merge: int = 1) -> dict[str, torch.Tensor]:
    """One pass over `loader`: centre-crop outputs, and (ten_crop) the softmax averaged over ten crops (whose
    fifth view is the centre crop, so ten_crop costs ten forward passes, not eleven; not with `features`).
    `count`: the split's size, when the loader is sharded over processes (distributed runs). `merge` loader batches
    go through the model at a time (outputs do not depend on the batch). Outputs stay on the device until the pass
    is over: one transfer to the host, not one per batch."""
    if ten_crop and features:
        raise ValueError("features come from the centre crop only")
    was_training = model.training
    model.eval()
    fwd = unwrap(model).forward_features if features else model
    centre, avg, labels = [], [], []
    try:
        for images, y in _merged(loader, merge):
            with _autocast(images, dtype):
                if ten_crop:
                    crops = ten_crops(images, crop)  # (10, N, C, crop, crop); view 4 is the centre crop
                    n = images.shape[0]
                    out = model(transform(crops.reshape(10 * n, *crops.shape[2:]))).float().reshape(10, n, -1)
                    centre.append(out[4])
                    avg.append(F.softmax(out, dim=2).mean(0))
                else:
                    centre.append(fwd(transform(center_crop(images, crop))).float())
            labels.append(y.clone())  # FFCV reuses its batch buffers: keep a copy
    finally:
        model.train(was_training)
    out = {"centre": torch.cat(centre), "labels": torch.cat(labels)}
    if ten_crop:
        out["ten_crop"] = torch.cat(avg)
    if count is not None:  # each process scored its shard: put the whole split back together, in order
        out = {k: gather_in_order(v, count) for k, v in out.items()}
    return {k: v.cpu() for k, v in out.items()}


def topk_errors(scores: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Top-1 and top-5 error in percent (top-5 is 0 when there are 5 classes or fewer)."""
    k = min(5, scores.shape[1])
    top = scores.topk(k, dim=1).indices
    hit = top == labels[:, None]
    return 100.0 * (1 - hit[:, 0].float().mean().item()), 100.0 * (1 - hit.any(1).float().mean().item())


def evaluate(model, loader, transform, *, crop: int, ten_crop: bool = False, dtype=None,
             count: int | None = None, merge: int = 1) -> tuple[dict, torch.Tensor]:
    """(metrics, centre-crop logits (N, classes) float32 in loader order). Metrics: `top1_err`, `top5_err`,
    `loss` and, with ten_crop, `top1_err_10crop`, `top5_err_10crop` (argmax of the mean softmax of 10 views).
    `merge`: loader batches per forward pass."""
    out = _passes(model, loader, transform, crop=crop, ten_crop=ten_crop, features=False, dtype=dtype, count=count,
                  merge=merge)
    logits, labels = out["centre"], out["labels"]
    top1, top5 = topk_errors(logits, labels)
    metrics = {"top1_err": top1, "top5_err": top5, "loss": F.cross_entropy(logits, labels).item()}
    if ten_crop:
        metrics["top1_err_10crop"], metrics["top5_err_10crop"] = topk_errors(out["ten_crop"], labels)
    return metrics, logits


def predict(model, loader, transform, *, crop: int, ten_crop: bool = False, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(outputs, labels) over `loader` in order: centre-crop logits, or with ten_crop the ten-crop mean softmax."""
    out = _passes(model, loader, transform, crop=crop, ten_crop=ten_crop, features=False, dtype=dtype)
    return (out["ten_crop"] if ten_crop else out["centre"]), out["labels"]


def extract_features(model, loader, transform, *, crop: int, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, features_dim), labels): the last hidden layer on the centre crop (section 6.1, figure 4)."""
    out = _passes(model, loader, transform, crop=crop, ten_crop=False, features=True, dtype=dtype)
    return out["centre"], out["labels"]


@torch.no_grad()
def lrn_strength(model: torch.nn.Module, images: torch.Tensor, *, alpha_mode: str) -> dict[str, Any] | None:
    """How strongly each LRN layer normalises on `images` (model input): the mean and 99th percentile over every
    activation of alpha' * sum_j a_j^2 / k, the term LRN adds to k before the power -beta (section 3.3). Near 0 the
    layer is a fixed gain of k^-beta; near 1 or above it normalises. Keyed by the conv the LRN follows ("conv1",
    ...); None when the model has no LRN."""
    model = unwrap(model)
    found, convs, terms, hooks = [], 0, {}, []
    for module in model.modules():
        convs += isinstance(module, torch.nn.Conv2d)
        if isinstance(module, LRN):
            found.append((f"conv{convs}", module))
    if not found:
        return None

    def hook(name, lrn):
        def keep(module, inputs):
            x = inputs[0].float()
            terms[name] = F.conv2d(x * x, lrn.band(x.shape[1], x)) / lrn.k  # band holds alpha'
        return keep

    for name, lrn in found:
        hooks.append(lrn.register_forward_pre_hook(hook(name, lrn)))
    was_training = model.training
    try:
        model.eval()
        model(images)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    out: dict[str, Any] = {}
    for name, term in terms.items():
        values = term.double().flatten().cpu().numpy()
        out[name] = {"mean": float(values.mean()), "p99": float(np.percentile(values, 99))}
    out["alpha_mode"] = alpha_mode
    return out


def load_model(run_dir: Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, RunConfig]:
    """The trained model of a run (eval mode, latest checkpoint) and its config."""
    run_dir = RunDir(run_dir)
    cfg_path = run_dir.config
    try:
        cfg = from_dict(json.loads(cfg_path.read_text())["config"], source=str(cfg_path))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{cfg_path}: cannot read the run's config ({type(e).__name__}); is {run_dir} a run folder?") from None
    state = checkpoint.load(run_dir)
    if state is None:
        raise UserError(f"{run_dir} has no checkpoint; train the run first (repro run)")
    model = build_model(cfg.model)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), cfg

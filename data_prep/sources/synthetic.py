"""Generated images with learnable class structure, for tests and for trying the tool without any dataset.

Each class has its own background colour and an oriented stripe pattern; every image draws a random phase,
contrast, brightness and pixel noise, so a small conv net has something real (colour and orientation) to learn.
Deterministic from the seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data_prep.sources.base import Source, SourceData, Split, register_source
from repro.errors import UserError

DEFAULT_CLASSES, DEFAULT_TRAIN, DEFAULT_VAL, DEFAULT_RES = 10, 100, 20, 32


def class_count(classes: str | None) -> int:
    if classes is None:
        return DEFAULT_CLASSES
    if not classes.isdigit() or not 2 <= int(classes) <= 1000:
        raise UserError(f"--classes {classes!r}: synthetic data needs a class count between 2 and 1000")
    return int(classes)


def generate(num_classes: int, per_class: int, res: int, rng: np.random.Generator) -> Split:
    # Class prototypes come from a fixed generator so train and val (and every seed) share the same classes.
    proto = np.random.default_rng(12345)
    colours = proto.uniform(40, 215, size=(num_classes, 3))
    angles = np.arange(num_classes) * np.pi / num_classes + proto.uniform(0, 0.1, num_classes)
    freqs = proto.uniform(1.5, 4.0, num_classes) * 2 * np.pi / res * 2

    labels = np.repeat(np.arange(num_classes), per_class)
    n = len(labels)
    yy, xx = np.mgrid[0:res, 0:res].astype(np.float32)
    images = np.empty((n, res, res, 3), dtype=np.uint8)
    phase = rng.uniform(0, 2 * np.pi, n)
    contrast = rng.uniform(25, 60, n)
    brightness = rng.uniform(-20, 20, n)
    for i, c in enumerate(labels):  # one image at a time keeps memory at one float image
        along = np.cos(angles[c]) * xx + np.sin(angles[c]) * yy
        stripes = contrast[i] * np.sin(freqs[c] * along + phase[i])
        img = colours[c] + brightness[i] + stripes[..., None] + rng.normal(0, 12, (res, res, 3))
        images[i] = np.clip(img, 0, 255).astype(np.uint8)
    return Split(labels=labels.astype(np.int64), images=images)


def load(root: Path | None, opts) -> SourceData:
    k = class_count(opts.classes)
    res = opts.res or DEFAULT_RES
    train = generate(k, opts.train_per_class or DEFAULT_TRAIN, res, np.random.default_rng([opts.seed, 0]))
    val = generate(k, opts.val_per_class or DEFAULT_VAL, res, np.random.default_rng([opts.seed, 1]))
    ids = [str(i) for i in range(k)]
    return SourceData(ids, [f"class {i}" for i in ids], train, val)


def settings(opts) -> dict:
    """The class and per-class counts are what it generates, not caps on a dataset: recorded as such."""
    return {"classes": str(class_count(opts.classes)), "train_per_class": opts.train_per_class or DEFAULT_TRAIN,
            "val_per_class": opts.val_per_class or DEFAULT_VAL}


register_source(Source("synthetic", load, default_res=DEFAULT_RES, display_name="synthetic images",
                       needs_root=False, settings=settings,
                       help="generated coloured stripes, for trying the tool without a dataset (needs no --root)"))

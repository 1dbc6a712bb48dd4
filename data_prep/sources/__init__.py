"""What every source hands to the writer: class ids and names, and per split either images in memory or files.

A source module exposes `load(root, opts) -> SourceData`; `load_source` picks it by name and knows each
source's default root and native resolution.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from repro.errors import UserError


@dataclass
class Split:
    """One split: `labels[i]` belongs to `images[i]` (uint8, NxHxW grey or NxHxWx3) or to `paths[i]`."""

    labels: np.ndarray
    images: np.ndarray | None = None
    paths: list[str] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray, labels: np.ndarray | None = None) -> "Split":
        return Split(labels=self.labels[index] if labels is None else labels,
                     images=None if self.images is None else self.images[index],
                     paths=None if self.paths is None else [self.paths[i] for i in index])


@dataclass
class SourceData:
    class_ids: list[str]
    class_names: list[str]
    train: Split
    val: Split
    skipped: list[dict] = field(default_factory=list)  # {"path", "reason"} found while listing


DEFAULT_ROOTS = {"fashion-mnist": "/usr/share/datasets/fashion-mnist"}
# Stored side when --res is not given: native for the small sets, the paper's 256 for photos.
DEFAULT_RES = {"fashion-mnist": 28, "cifar10": 32, "synthetic": 32, "imagefolder": 256, "imagenet": 256}


def load_source(name: str, root: Path | None, opts) -> SourceData:
    if name == "fashion-mnist":
        from data_prep.sources.fashion_mnist import load
    elif name == "cifar10":
        from data_prep.sources.cifar10 import load
    elif name == "imagefolder":
        from data_prep.sources.imagefolder import load
    elif name == "imagenet":
        from data_prep.sources.imagenet import load
    elif name == "synthetic":
        from data_prep.sources.synthetic import load
    else:
        raise UserError(f"unknown source {name!r}; use fashion-mnist, cifar10, imagefolder, imagenet or synthetic")
    return load(root, opts)

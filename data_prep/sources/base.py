"""The source registry: what every source hands to the writer, and the `Source` entry each source module registers.

A source module reads one on-disk format and ends with `register_source(Source(...))`, stating its own facts (its
default resolution and root, whether it reads a folder at all, its name in prose, its `--help` line);
`data_prep.sources` imports every module of the package, so adding a source is one module there. This module
imports no source, so the sources import `Split` and `SourceData` from it without a cycle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

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


@dataclass(frozen=True)
class Source:
    """One source: `load(root, opts) -> SourceData` and the facts the CLI, the hints and the report need.

    default_res: the stored side when --res is not given (native for the small sets, the paper's 256 for photos).
    needs_root: it reads a dataset folder (--root), which `default_root` names when the folder has a usual place.
    settings(opts) -> the manifest settings the source decides itself (synthetic: what it generates).
    imagenet100: whether `--classes 100` takes CMC's ImageNet-100 list (`data_prep.classes`): "always" (the class
    ids are ImageNet WNIDs), "when-present" (when all 100 are among the class ids) or "never".
    """

    name: str
    load: Callable[[Path | None, Any], SourceData]
    default_res: int
    display_name: str  # in prose: "Fashion-MNIST: greyscale, 28 px"
    help: str  # one line for `repro prepare-data --help`
    needs_root: bool = True
    default_root: str | None = None
    settings: Callable[[Any], dict] | None = None
    imagenet100: str = "never"

    @property
    def root_required(self) -> bool:
        """Whether `repro prepare-data` must be given --root."""
        return self.needs_root and self.default_root is None


SOURCES: dict[str, Source] = {}


def register_source(source: Source) -> Source:
    if source.name in SOURCES:
        raise ValueError(f"data source {source.name!r} is registered twice")
    if source.default_root is not None and not source.needs_root:
        raise ValueError(f"data source {source.name!r} has a default root but reads no folder")
    if source.imagenet100 not in ("always", "when-present", "never"):
        raise ValueError(f"data source {source.name!r}: imagenet100 must be always, when-present or never")
    SOURCES[source.name] = source
    return source


def source_names() -> tuple[str, ...]:
    """The registered sources, alphabetically (the CLI's choices)."""
    return tuple(sorted(SOURCES))


def get_source(name: str) -> Source:
    if name not in SOURCES:
        raise UserError(f"unknown source {name!r}; use one of {', '.join(source_names())}")
    return SOURCES[name]


def load_source(name: str, root: Path | None, opts) -> SourceData:
    return get_source(name).load(root, opts)

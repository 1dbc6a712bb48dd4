"""Which classes `repro prepare-data` keeps: all of them, a count N (CMC's ImageNet-100 or a seeded sample), or a file.

`--classes N` on a source whose class ids are ImageNet WNIDs takes, for N = 100, the ImageNet-100 list most papers
use (CMC's, shipped in `class_lists/`); any other N, or a source with other ids, keeps a random sample of N ids drawn
from `--seed`. `--class-list FILE` keeps the ids a file lists, in the file's order. The manifest records the ids kept
and how they were chosen (`chosen_by`).
"""

from __future__ import annotations

import functools
import os
from importlib import resources
from pathlib import Path

import numpy as np

from data_prep.sources import SourceData, get_source
from repro.errors import UserError

IMAGENET100_FILE = "imagenet100-cmc.txt"
IMAGENET100 = "CMC ImageNet-100 list (HobbitLong/CMC imagenet100.txt)"  # the manifest's chosen_by
ALL = "all"
CLASS_STREAM = 3  # the class sample's own random stream: the per-class image caps draw from the plain seed


def read_class_file(path: Path) -> list[str]:
    """The class ids in a class-list file: the first word of each line; blank lines and # comments skipped."""
    lines = (s.strip() for s in Path(path).read_text().splitlines())
    return [s.split()[0] for s in lines if s and not s.startswith("#")]


@functools.cache
def imagenet100() -> tuple[str, ...]:
    """CMC's ImageNet-100 WNIDs, in the order of its file."""
    text = resources.files("data_prep").joinpath("class_lists", IMAGENET100_FILE).read_text()
    return tuple(s.split()[0] for s in text.splitlines() if s.strip() and not s.startswith("#"))


def check_options(source: str, classes: str | None, class_list: str | None) -> None:
    """Refuse bad --classes / --class-list before anything is read or written."""
    if classes is not None and class_list is not None:
        raise UserError(f"--classes {classes} and --class-list {class_list} both choose classes; pass one of them")
    if classes is not None and not classes.isdigit():
        raise UserError(f"--classes {classes}: expected a number of classes; to keep the classes listed in a file, "
                        f"pass --class-list {classes}")
    if classes is not None and int(classes) < 1:
        raise UserError(f"--classes {classes}: keep at least 1 class")
    if class_list is None:
        return
    if not get_source(source).needs_root:
        raise UserError(f"--class-list: {source} generates its classes; pass --classes N for how many")
    try:
        wanted = read_class_file(Path(class_list))
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--class-list {class_list}: not a readable text file of class ids ({e}); "
                        f"pass a file with one class id per line") from None
    if not wanted:
        raise UserError(f"--class-list {class_list}: no class ids in it; list one class id per line")
    if len(set(wanted)) != len(wanted):
        twice = next(c for c in wanted if wanted.count(c) > 1)
        raise UserError(f"--class-list {class_list}: class id {twice!r} is listed twice; list each once")


def recorded(classes: str | None, class_list: str | None) -> str | None:
    """The manifest's `settings.classes`: the count, or the list file's absolute path (never all digits, so the
    rebuild hint tells the two apart). One key, as before --class-list existed: a second key would change the
    settings, and so the data hash, of every folder prepared before."""
    return os.path.abspath(class_list) if class_list is not None else classes


def _from_file(ids: list[str], path: str) -> list[int]:
    wanted = read_class_file(Path(path))
    index = {c: i for i, c in enumerate(ids)}
    unknown = [c for c in wanted if c not in index]
    if unknown:
        raise UserError(f"--class-list {path}: class id {unknown[0]!r} is not in the source; list one id per line "
                        f"from: {', '.join(ids[:5])}, ...")
    return [index[c] for c in wanted]


def _imagenet100(ids: list[str], rule: str) -> list[int] | None:
    """Indices of CMC's classes in sorted WNID order (the labels torchvision's ImageFolder gave CMC's training), or
    None where the list does not apply."""
    index = {c: i for i, c in enumerate(ids)}
    missing = [w for w in imagenet100() if w not in index]
    if missing and rule == "always":
        raise UserError(f"--classes 100 keeps CMC's ImageNet-100 classes, but {len(missing)} of them have no class "
                        f"folder here (first: {missing[0]}); use the full ILSVRC-2012 train set, or choose classes "
                        f"with --class-list FILE")
    return None if missing else [index[w] for w in sorted(imagenet100())]


def select(data: SourceData, source: str, classes: str | None, class_list: str | None,
           seed: int) -> tuple[list[int], str]:
    """Indices into data.class_ids to keep (their order gives the labels), and how they were chosen."""
    ids = data.class_ids
    if class_list is not None:
        return _from_file(ids, class_list), f"file {os.path.abspath(class_list)}"
    if classes is None:
        return list(range(len(ids))), ALL
    n = int(classes)
    rule = get_source(source).imagenet100
    if n == len(imagenet100()) and rule != "never" and (keep := _imagenet100(ids, rule)) is not None:
        return keep, IMAGENET100
    if n > len(ids):
        raise UserError(f"--classes {n}: the source has {len(ids)} classes; pass 1..{len(ids)}, or --class-list FILE")
    if n == len(ids):
        return list(range(n)), ALL
    # Sorted, so that the labels follow the class ids' order whatever order the draw came in.
    keep = np.sort(np.random.default_rng([seed, CLASS_STREAM]).choice(len(ids), n, replace=False))
    return keep.tolist(), f"seeded random sample of {n} of {len(ids)} classes (seed {seed})"

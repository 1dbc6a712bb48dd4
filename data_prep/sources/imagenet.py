"""ILSVRC-2012 as people keep it: `train/<wnid>/*.JPEG`; `val/` in class folders or flat with its labels.

Flat val images are labelled either by the devkit (`ILSVRC2012_validation_ground_truth.txt`, one ILSVRC2012_ID
per line in file-name order, plus `meta.mat` mapping ILSVRC2012_ID -> WNID) or by Kaggle's `LOC_val_solution.csv`
(`ImageId,PredictionString`, the first token of the prediction string being the WNID). Kaggle's tree
`ILSVRC/Data/CLS-LOC/{train,val}` under the root is found as well.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from data_prep.sources.base import Source, SourceData, Split, register_source
from data_prep.sources.folders import class_folders, list_classes, list_files
from repro.errors import UserError

GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
KAGGLE_CSV = "LOC_val_solution.csv"
DEVKIT_DIRS = [".", "ILSVRC2012_devkit_t12/data", "devkit/data", "ILSVRC2012_devkit_t12", "devkit"]


def read_meta(path: Path) -> tuple[dict[int, str], dict[str, str]]:
    """meta.mat -> ({ILSVRC2012_ID: WNID}, {WNID: words}) for the leaf synsets (the 1000 classes)."""
    import scipy.io  # scipy loads only for the devkit's meta.mat, not for every source

    try:
        synsets = scipy.io.loadmat(str(path), squeeze_me=True)["synsets"]
        ids = [int(x) for x in np.atleast_1d(synsets["ILSVRC2012_ID"])]
        wnids = [str(x) for x in np.atleast_1d(synsets["WNID"])]
        words = [str(x) for x in np.atleast_1d(synsets["words"])]
    except Exception as e:  # scipy raises many types for a broken .mat
        raise UserError(f"{path} is not the devkit's meta.mat with a 'synsets' table ({e}); re-extract the devkit") from None
    return dict(zip(ids, wnids)), dict(zip(wnids, words))


def _devkit_labels(val_files: list[str], gt: Path, meta: Path) -> tuple[list[str], dict[str, str]]:
    id_to_wnid, words = read_meta(meta)
    lines = [s.strip() for s in gt.read_text().splitlines() if s.strip()]
    if len(lines) != len(val_files):
        raise UserError(f"{gt} has {len(lines)} labels but the flat val folder holds {len(val_files)} files; "
                        f"they must match one to one (file-name order); remove stray files or use the right devkit")
    wnids = []
    for n, s in enumerate(lines, 1):
        if not s.isdigit() or int(s) not in id_to_wnid:
            raise UserError(f"{gt} line {n}: {s!r} is not an ILSVRC2012_ID listed in {meta}; re-extract the devkit")
        wnids.append(id_to_wnid[int(s)])
    return wnids, words


def _kaggle_labels(val_files: list[str], csv_path: Path) -> list[str]:
    with open(csv_path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or [c.strip() for c in rows[0][:2]] != ["ImageId", "PredictionString"]:
        raise UserError(f"{csv_path} must start with the header ImageId,PredictionString; use Kaggle's file")
    by_id = {}
    for n, row in enumerate(rows[1:], 2):
        if len(row) < 2 or not row[1].split():
            raise UserError(f"{csv_path} line {n}: expected ImageId,PredictionString; fix or re-download the file")
        by_id[row[0].strip()] = row[1].split()[0]
    stems = [Path(p).stem for p in val_files]
    missing = [s for s in stems if s not in by_id]
    if missing or len(by_id) != len(stems):
        what = f"has no row for {missing[0]}" if missing else f"labels {len(by_id)} images, val/ holds {len(stems)}"
        raise UserError(f"{csv_path} {what}; the csv and the flat val folder must match one to one")
    return [by_id[s] for s in stems]


def _synset_words(root: Path) -> dict[str, str]:
    mapping = root / "LOC_synset_mapping.txt"  # Kaggle: "n01440764 tench, Tinca tinca"
    if not mapping.is_file():
        return {}
    return dict(line.split(" ", 1) for line in mapping.read_text().splitlines() if " " in line)


def load(root: Path | None, opts) -> SourceData:
    if root is None:
        raise UserError("imagenet needs --root: the folder holding train/<wnid>/ and val/")
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"ImageNet root {root} does not exist; pass --root holding train/<wnid>/ and val/")
    data = root / "ILSVRC" / "Data" / "CLS-LOC" if (root / "ILSVRC" / "Data" / "CLS-LOC").is_dir() else root
    for split in ("train", "val"):
        if not (data / split).is_dir():
            raise UserError(f"{data} has no {split}/ folder; expected {data}/train/<wnid>/*.JPEG and {data}/val/")
    wnids = class_folders(data / "train")
    train_paths, train_labels = list_classes(data / "train", wnids)
    words = _synset_words(root)

    val_dir = data / "val"
    val_classes = [d.name for d in val_dir.iterdir() if d.is_dir() and not d.name.startswith(".")]
    if val_classes:  # val sorted into class folders
        unknown = sorted(set(val_classes) - set(wnids))
        if unknown:
            raise UserError(f"{val_dir / unknown[0]} is not a train class; val class folders must be train wnids")
        val_paths, val_labels = list_classes(val_dir, wnids, allow_missing=True)
    else:  # flat val: labels from the devkit or Kaggle's csv
        val_files = list_files(val_dir)
        if not val_files:
            raise UserError(f"{val_dir} is empty; put the 50,000 validation images there")
        devkit = [root / d for d in DEVKIT_DIRS if (root / d / GROUND_TRUTH).is_file() and (root / d / "meta.mat").is_file()]
        if devkit:
            val_wnids, meta_words = _devkit_labels(val_files, devkit[0] / GROUND_TRUTH, devkit[0] / "meta.mat")
            words = {**meta_words, **words}
            label_file = devkit[0] / GROUND_TRUTH
        elif (root / KAGGLE_CSV).is_file():
            val_wnids, label_file = _kaggle_labels(val_files, root / KAGGLE_CSV), root / KAGGLE_CSV
        else:
            raise UserError(f"{val_dir} is flat but no labels were found: put the devkit's {GROUND_TRUTH} and "
                            f"meta.mat in {root / 'ILSVRC2012_devkit_t12/data'}, or {KAGGLE_CSV} in {root}")
        index = {w: i for i, w in enumerate(wnids)}
        bad = [w for w in val_wnids if w not in index]
        if bad:
            raise UserError(f"{label_file} labels a val image {bad[0]}, which has no train/{bad[0]}/ folder; "
                            f"use the matching train set")
        val_paths, val_labels = val_files, np.asarray([index[w] for w in val_wnids], dtype=np.int64)
    names = [words.get(w, w).strip() for w in wnids]
    return SourceData(wnids, names, Split(train_labels, paths=train_paths), Split(val_labels, paths=val_paths))


register_source(Source("imagenet", load, default_res=256, imagenet100="always", display_name="ImageNet",
                       help="ILSVRC-2012: train/<wnid>/, val/ in class folders or flat with the devkit's or "
                            "Kaggle's labels"))

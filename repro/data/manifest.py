"""Read `manifest.json` from a prepared data folder and check the betons against it before anything trains.

Sizes are always checked (cheap); sha256 content hashes only with `verify=True` (reads every byte).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from data_prep.manifest import sha256_file  # the writer's own hash, so both sides agree
from repro.errors import UserError
from repro.hints import prepare_command

MANIFEST_FORMAT = 1
REQUIRED = ("source", "settings", "image", "classes", "splits", "mean", "std", "pca", "hash")


def _prepare_hint(folder: Path, manifest: dict | None = None, force: bool = False) -> str:
    return f"run `{prepare_command(folder, manifest, force=force)}`"


def read_manifest(folder: str | Path, verify: bool = False) -> dict:
    """The manifest of a data folder, after checking that both betons exist and match it.

    Raises UserError (one line: the file and the fix) when the folder, the manifest or a beton is missing, the JSON
    is corrupt or of another format, a beton's size differs from the manifest, or (verify) its sha256 does.
    """
    folder = Path(folder)
    path = folder / "manifest.json"
    if not folder.is_dir():
        raise UserError(f"data folder {folder} not found; {_prepare_hint(folder)} or pass the right --data")
    if not path.is_file():
        raise UserError(f"{path} not found; {_prepare_hint(folder)}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); {_prepare_hint(folder, force=True)}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise UserError(f"{path} has format {found!r}, this version reads format {MANIFEST_FORMAT}; "
                        f"{_prepare_hint(folder, manifest if isinstance(manifest, dict) else None, force=True)}")
    missing = [key for key in REQUIRED if key not in manifest]
    splits = manifest.get("splits", {})
    missing += [f"splits.{s}" for s in ("train", "val") if not isinstance(splits, dict) or s not in splits]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}; {_prepare_hint(folder, manifest, force=True)}")
    for name in ("train", "val"):
        split = splits[name]
        beton = folder / split.get("file", f"{name}.beton")
        if not beton.is_file():
            raise UserError(f"{beton} not found; {_prepare_hint(folder, manifest, force=True)}")
        size = beton.stat().st_size
        if "bytes" in split and size != split["bytes"]:
            raise UserError(f"{beton} has {size} bytes but its manifest says {split['bytes']}; "
                            f"{_prepare_hint(folder, manifest, force=True)}")
        if verify and sha256_file(beton) != split.get("sha256"):
            raise UserError(f"{beton} does not match its manifest (sha256); "
                            f"{_prepare_hint(folder, manifest, force=True)}")
    return manifest


def beton_path(folder: str | Path, manifest: dict, split: str) -> Path:
    return Path(folder) / manifest["splits"][split].get("file", f"{split}.beton")


def read_mean_image(folder: str | Path, manifest: dict) -> np.ndarray:
    """The training set's mean image, float32 (H, W, 3) on 0..255, as recorded in the manifest."""
    folder = Path(folder)
    info = manifest.get("mean_image")
    if not isinstance(info, dict) or "file" not in info:
        raise UserError(f"{folder / 'manifest.json'} has no mean image (needed by data.normalize = 'mean-image', "
                        f"the default); rebuild with `{prepare_command(folder, manifest, force=True)}`, "
                        f"or set data.normalize = 'mean'")
    path = folder / info["file"]
    try:
        mean_image = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read the mean image ({e}); "
                        f"re-run `{prepare_command(folder, manifest, force=True)}`") from None
    if list(mean_image.shape) != list(info.get("shape", mean_image.shape)) or mean_image.ndim != 3:
        raise UserError(f"{path} has shape {list(mean_image.shape)}, its manifest says {info.get('shape')}; "
                        f"re-run `{prepare_command(folder, manifest, force=True)}`")
    return mean_image.astype(np.float32, copy=False)

"""The manifest's numbers: pixel statistics and RGB PCA from summed pixels, beton hashes, and the file itself."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

FORMAT = 1


def pixel_stats(sums: np.ndarray) -> dict:
    """mean/std (0..255) and the eigen-decomposition of the RGB covariance in [0, 1] units (paper section 4.1)
    from summed pixels: sums[:3] = sum of RGB, sums[3:12] = sum of x x^T (3x3), sums[12] = pixel count."""
    n = sums[12]
    mean = sums[:3] / n
    cov = sums[3:12].reshape(3, 3) / n - np.outer(mean, mean)  # population covariance, 0..255 units
    eigval, eigvec = np.linalg.eigh(cov / 255.0**2)
    eigval = np.clip(eigval, 0, None)  # rounding can make a zero eigenvalue (grey images) slightly negative
    order = np.argsort(eigval)[::-1]  # descending, as AlexNet's lighting noise lists them
    return {"mean": mean.tolist(), "std": np.sqrt(np.diag(cov)).tolist(),
            "pca": {"eigval": eigval[order].tolist(), "eigvec": eigvec[:, order].tolist()}}


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def content_hash(split_hashes: list[str], settings: dict) -> str:
    h = hashlib.sha256()
    for s in split_hashes:
        h.update(s.encode())
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()[:16]


def read_existing(out: Path) -> dict | None:
    """The manifest in `out` if it is readable and its betons are present with the recorded sizes, else None."""
    try:
        manifest = json.loads((out / "manifest.json").read_text())
        for split in manifest["splits"].values():
            if (out / split["file"]).stat().st_size != split["bytes"]:
                return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return manifest if manifest.get("format") == FORMAT else None

"""Fashion-MNIST from its IDX files (`train-images-idx3-ubyte.gz` ...), as Debian's dataset-fashion-mnist ships them."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from data_prep.sources.base import Source, SourceData, Split, register_source
from repro.errors import UserError

CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049  # IDX: 0x0803 = ubyte, 3 dims; 0x0801 = ubyte, 1 dim


def _find(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    raise UserError(f"{root / (stem + '.gz')} not found; point --root at the folder holding the Fashion-MNIST "
                    f"IDX files (Debian: apt install dataset-fashion-mnist)")


def read_idx(path: Path, magic: int) -> np.ndarray:
    """An IDX array of unsigned bytes; the header is big-endian int32 magic then one int32 per dimension."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise UserError(f"cannot read {path}: {e}; re-download the file") from None
    ndim = magic & 0xFF
    if len(data) < 4 + 4 * ndim or int.from_bytes(data[:4], "big") != magic:
        raise UserError(f"{path} is not an IDX file of {ndim}-d unsigned bytes (bad magic number); re-download it")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise UserError(f"{path} holds {body.size} bytes of data but its header says {shape}; re-download it")
    return body.reshape(shape)


def load(root: Path | None, opts) -> SourceData:
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"Fashion-MNIST folder {root} does not exist; pass --root or apt install dataset-fashion-mnist")
    splits = {}
    for split, (images_stem, labels_stem) in FILES.items():
        images = read_idx(_find(root, images_stem), IMAGES_MAGIC)
        labels = read_idx(_find(root, labels_stem), LABELS_MAGIC).astype(np.int64)
        if len(images) != len(labels):
            raise UserError(f"{root}: {images_stem} has {len(images)} images but {labels_stem} has {len(labels)} "
                            f"labels; re-download the pair")
        if labels.size and labels.max() >= len(CLASS_NAMES):
            raise UserError(f"{root / labels_stem}: label {labels.max()} out of range 0..9; re-download it")
        splits[split] = Split(labels=labels, images=images)  # grey NxHxW, expanded to RGB when written
    return SourceData([str(i) for i in range(10)], list(CLASS_NAMES), splits["train"], splits["val"])


register_source(Source("fashion-mnist", load, default_res=28, display_name="Fashion-MNIST",
                       default_root="/usr/share/datasets/fashion-mnist",
                       help="Fashion-MNIST's IDX files (default --root: Debian's dataset-fashion-mnist)"))

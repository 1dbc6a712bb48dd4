"""Tiny datasets in their real on-disk formats, and a plain reader of written betons, for the prepare-data tests.

Imported by the test modules (`from conftest_data import ...`); every maker writes under a folder it is given.
"""

from __future__ import annotations

import gzip
import io
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

from data_prep.prepare import PrepareOptions

FM_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def opts(**kw) -> PrepareOptions:
    kw.setdefault("workers", 1)
    return PrepareOptions(**{"res": None, "max_side": False, "classes": None, "train_per_class": None,
                             "val_per_class": None, **kw})


def write_idx(path: Path, array: np.ndarray) -> None:
    """IDX as LeCun's and Zalando's files: magic 0x00 0x00 0x08 ndim, big-endian int32 sizes, then bytes."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def make_fashion(root: Path, n_train: int = 40, n_val: int = 20, seed: int = 0) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    data = {}
    for split, prefix, n in (("train", "train", n_train), ("val", "t10k", n_val)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
        data[split] = (images, labels)
    return data


def make_cifar(root: Path, per_batch: int = 6, numpy1_names: bool = False, seed: int = 0) -> dict:
    """cifar-10-batches-py: dicts with bytes keys, 'data' uint8 Nx3072 channel-planar, 'labels' a list."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = {"train": [], "val": []}

    def dump(obj, path):
        raw = pickle.dumps(obj, protocol=3)
        if numpy1_names:  # what the real files (numpy 1.x, Python 2) name numpy's reconstruct function
            raw = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
        path.write_bytes(raw)

    dump({b"label_names": [n.encode() for n in ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                                                  "horse", "ship", "truck"]], b"num_cases_per_batch": per_batch},
         root / "batches.meta")
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(0, 10, per_batch)]
        dump({b"batch_label": name.encode(), b"labels": labels, b"data": data,
              b"filenames": [f"{name}_{i}.png".encode() for i in range(per_batch)]}, root / name)
        out["val" if name == "test_batch" else "train"].append((data, labels))
    return {k: (np.concatenate([d for d, _ in v]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1),
                np.concatenate([lab for _, lab in v])) for k, v in out.items()}


def class_image(label: int, size=(40, 30), mode="RGB") -> Image.Image:
    """A photo stand-in whose colour says its class."""
    rng = np.random.default_rng(label)
    colour = tuple(int(c) for c in rng.integers(30, 225, 3))
    return Image.new("RGB", size, colour).convert(mode)


def make_tree(root: Path, classes: list[str], per_class: int, ext: str = ".JPEG") -> dict[str, list[Path]]:
    files = {}
    for k, cid in enumerate(classes):
        folder = root / cid
        folder.mkdir(parents=True, exist_ok=True)
        files[cid] = []
        for i in range(per_class):
            path = folder / f"{cid}_{i}{ext}"
            class_image(k, (40 + i, 30)).save(path, format="PNG" if ext == ".png" else "JPEG", quality=95)
            files[cid].append(path)
    return files


def make_imagenet(root: Path, wnids: list[str], per_class: int = 3, val: str = "devkit") -> list[str]:
    """train/<wnid>/*.JPEG and a val/ folder: 'folders', flat + 'devkit' (ground truth + meta.mat) or 'kaggle'.
    Returns the wnid of every val image in file-name order."""
    import scipy.io

    make_tree(root / "train", wnids, per_class)
    labels = [wnids[i % len(wnids)] for i in range(2 * len(wnids))][::-1]  # not sorted by class on purpose
    if val == "folders":
        make_tree(root / "val", wnids, 2)
        return sorted(labels)
    (root / "val").mkdir(parents=True)
    for n, wnid in enumerate(labels, 1):
        class_image(wnids.index(wnid)).save(root / "val" / f"ILSVRC2012_val_{n:08d}.JPEG", quality=95)
    if val == "devkit":
        data = root / "ILSVRC2012_devkit_t12" / "data"
        data.mkdir(parents=True)
        # meta.mat lists synsets with ILSVRC2012_IDs in an order unrelated to sorted wnids, like the real one
        ids = {w: 10 + 7 * k for k, w in enumerate(reversed(wnids))}
        synsets = np.array([(ids[w], w, f"words of {w}", 0) for w in wnids],
                           dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")])
        scipy.io.savemat(str(data / "meta.mat"), {"synsets": synsets})
        (data / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{ids[w]}\n" for w in labels))
    elif val == "kaggle":
        rows = [f"ILSVRC2012_val_{n:08d},{w} 1 2 30 40 {w} 5 6 7 8" for n, w in enumerate(labels, 1)]
        rows = rows[1::2] + rows[::2]  # Kaggle's csv is not in file-name order
        (root / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    return labels


def read_beton(path: Path) -> tuple[list[np.ndarray], np.ndarray]:
    """Every (image, label) of a beton, read with FFCV's Reader and decoded with PIL (no Loader, no numba)."""
    from ffcv.reader import Reader

    reader = Reader(str(path))
    meta = reader.metadata
    image_field, label_field = (reader.field_names.index(n) for n in ("image", "label"))
    ptr_to_size = dict(zip(reader.alloc_table["ptr"], reader.alloc_table["size"]))
    raw = np.fromfile(path, dtype=np.uint8)
    images = []
    for row in meta[f"f{image_field}"]:
        data = raw[row["data_ptr"]: row["data_ptr"] + ptr_to_size[row["data_ptr"]]]
        if row["mode"] == 1:  # raw
            images.append(data[: row["height"] * row["width"] * 3].reshape(row["height"], row["width"], 3))
        else:
            images.append(np.asarray(Image.open(io.BytesIO(data.tobytes())).convert("RGB")))
    return images, np.asarray(meta[f"f{label_field}"], dtype=np.int64)

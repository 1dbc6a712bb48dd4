"""CIFAR-10 from `cifar-10-batches-py`: pickled dicts read by an unpickler that cannot run code.

Python's pickle executes whatever callable a file names; the CIFAR batches only need dicts, lists, bytes, str,
ints and numpy's array reconstruction, so `SafeUnpickler` admits exactly those globals and refuses the rest.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from data_prep.sources.base import Source, SourceData, Split, register_source
from repro.errors import UserError

TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
VAL_FILES = ["test_batch"]

# (module, name) pairs a numpy array pickle refers to; numpy 1.x writes numpy.core, numpy 2.x numpy._core.
_reconstruct = np.zeros(1).__reduce__()[0]  # numpy's own array-rebuilding function, whatever its module path
ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class SafeUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path):
        super().__init__(file, encoding="bytes")  # the batches were written by Python 2: str keys are bytes
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) in ALLOWED:
            return ALLOWED[(module, name)]
        raise UserError(f"{self.path} refers to {module}.{name}, which a CIFAR-10 batch never does; refusing to "
                        f"load it (it may run code). Replace it with the original cifar-10-python.tar.gz contents")


def load_batch(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = SafeUnpickler(f, path).load()
    except UserError:
        raise
    except FileNotFoundError:
        raise UserError(f"{path} not found; point --root at the extracted cifar-10-batches-py folder") from None
    except Exception as e:  # any malformed pickle: EOF, bad opcode, wrong reduce arguments
        raise UserError(f"{path} is not a readable CIFAR-10 batch ({type(e).__name__}: {e}); re-extract it") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} holds a {type(obj).__name__}, not a CIFAR-10 batch dict; re-extract it")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _read_split(root: Path, names: list[str]) -> Split:
    images, labels = [], []
    for name in names:
        batch = load_batch(root / name)
        data, lab = batch.get("data"), batch.get("labels")
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 \
                or not isinstance(lab, list) or len(lab) != len(data):
            raise UserError(f"{root / name}: expected 'data' uint8 Nx3072 and N 'labels'; re-extract it")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # stored channel-planar, rows of 32
        labels.append(np.asarray(lab, dtype=np.int64))
    return Split(labels=np.concatenate(labels), images=np.ascontiguousarray(np.concatenate(images)))


def load(root: Path | None, opts) -> SourceData:
    root = Path(root)
    if root.is_dir() and not (root / "batches.meta").exists() and (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    if not root.is_dir():
        raise UserError(f"CIFAR-10 folder {root} does not exist; pass --root pointing at cifar-10-batches-py")
    if not (root / "batches.meta").is_file():
        raise UserError(f"{root} has no batches.meta; --root must be the extracted cifar-10-batches-py folder")
    meta = load_batch(root / "batches.meta")
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta.get("label_names", [])]
    if len(names) != 10:
        raise UserError(f"{root / 'batches.meta'}: expected 10 label_names, found {len(names)}; re-extract it")
    train, val = _read_split(root, TRAIN_FILES), _read_split(root, VAL_FILES)
    for split, data in (("train", train), ("val", val)):
        if data.labels.min() < 0 or data.labels.max() > 9:
            raise UserError(f"{root}: {split} labels outside 0..9; re-extract the batches")
    return SourceData([str(i) for i in range(10)], names, train, val)


register_source(Source("cifar10", load, default_res=32, display_name="CIFAR-10",
                       help="CIFAR-10's python batches (--root: cifar-10-batches-py or the folder holding it)"))

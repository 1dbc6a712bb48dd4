"""repro.data: manifest checks, the beton reader, both loader backends on tiny betons written here."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from repro.config import RunConfig, apply_overrides
from repro.data import make_loaders, read_manifest, subset_indices
from repro.data.beton import BetonReader
from repro.errors import UserError

ffcv = pytest.importorskip("ffcv")
from ffcv.fields import IntField, RGBImageField  # noqa: E402
from ffcv.writer import DatasetWriter  # noqa: E402

RES, CROP, N_TRAIN, N_VAL, CLASSES = 16, 12, 40, 24, 4


class _Arrays:
    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])



def epoch_permutation(seed: int, epoch: int, ids: np.ndarray) -> np.ndarray:
    """The training order every backend must use, written from its definition: numpy's generator on
    SeedSequence([1, seed, epoch]) (1: the order's stream; the crops draw from another)."""
    return np.random.default_rng(np.random.SeedSequence([1, seed, epoch])).permutation(ids)

def write_dataset(folder: Path, mode: str, seed: int = 0) -> dict:
    """Write train/val betons of random images plus a format-1 manifest (mean, std, PCA by numpy)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    splits, arrays = {}, {}
    for name, n in (("train", N_TRAIN), ("val", N_VAL)):
        images = rng.integers(0, 256, (n, RES, RES, 3), dtype=np.uint8)
        if mode == "jpg":  # smooth (4x4 blocks of one colour): noise is JPEG's worst case
            images = np.kron(images[:, :RES // 4, :RES // 4], np.ones((1, 4, 4, 1), dtype=np.uint8))
        labels = rng.integers(0, CLASSES, n)
        path = folder / f"{name}.beton"
        writer = DatasetWriter(str(path), {"image": RGBImageField(write_mode=mode, jpeg_quality=90),
                                           "label": IntField()}, num_workers=1)
        writer.from_indexed_dataset(_Arrays(images, labels))
        splits[name] = {"file": path.name, "count": n, "per_class": np.bincount(labels, minlength=CLASSES).tolist(),
                        "sha256": __import__("hashlib").sha256(path.read_bytes()).hexdigest(),
                        "bytes": path.stat().st_size}
        arrays[name] = (images, labels)
    pixels = arrays["train"][0].reshape(-1, 3).astype(np.float64)
    eigval, eigvec = np.linalg.eigh(np.cov(pixels / 255.0, rowvar=False))
    manifest = {"format": 1, "source": "synthetic", "root": None,
                "settings": {"res": RES, "max_side": False, "write_mode": mode, "jpeg_quality": 90, "seed": seed},
                "image": {"height": RES, "width": RES, "fixed_size": True},
                "classes": {"ids": [str(c) for c in range(CLASSES)], "names": [f"c{c}" for c in range(CLASSES)]},
                "splits": splits, "mean": pixels.mean(0).tolist(), "std": pixels.std(0).tolist(),
                "pca": {"eigval": eigval[::-1].tolist(), "eigvec": eigvec[:, ::-1].tolist()},
                "skipped": [], "hash": "0" * 16}
    write_mean_image(folder, manifest, arrays["train"][0].mean(0, dtype=np.float64).astype(np.float32))
    return arrays


def write_mean_image(folder: Path, manifest: dict, mean_image: np.ndarray) -> None:
    """Save `mean_image` as the folder's mean image and write the manifest that records it."""
    np.save(folder / "mean_image.npy", mean_image)
    manifest = manifest | {"mean_image": {"file": "mean_image.npy", "shape": list(mean_image.shape)}}
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def raw_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("raw")
    return folder, write_dataset(folder, "raw")


@pytest.fixture(scope="module")
def jpg_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("jpg")
    return folder, write_dataset(folder, "jpg", seed=1)


def config(folder, **overrides) -> RunConfig:
    base = {"data.dir": str(folder), "model.input_size": CROP, "train.batch_size": 8, "data.workers": 1,
            "data.normalize": "mean"}  # uint8 batches: the pixels as stored
    return apply_overrides(RunConfig(), {**base, **overrides})


def collect(batches):
    xs, ys = zip(*[(x.clone(), y.clone()) for x, y in batches])
    return torch.cat(xs), torch.cat(ys)


def nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2)


# ---------------------------------------------------------------- manifest


def test_manifest_reads_and_verifies(raw_data):
    folder, _ = raw_data
    manifest = read_manifest(folder, verify=True)
    assert manifest["splits"]["train"]["count"] == N_TRAIN


def _copy(folder: Path, dest: Path) -> Path:
    dest.mkdir()
    for name in ("train.beton", "val.beton", "manifest.json", "mean_image.npy"):
        (dest / name).write_bytes((folder / name).read_bytes())
    return dest


def test_manifest_errors(raw_data, tmp_path):
    folder, _ = raw_data
    with pytest.raises(UserError, match=r"not found.*repro prepare-data"):
        read_manifest(tmp_path / "nowhere")
    empty = tmp_path / "fashion-mnist"
    empty.mkdir()
    with pytest.raises(UserError, match=r"manifest.json not found; run `repro prepare-data fashion-mnist --out"):
        read_manifest(empty)

    bad = _copy(folder, tmp_path / "bad")
    (bad / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match=r"manifest.json is not valid JSON"):
        read_manifest(bad)
    old = json.loads((folder / "manifest.json").read_text()) | {"format": 0}
    (bad / "manifest.json").write_text(json.dumps(old))
    with pytest.raises(UserError, match=r"format 0.*--force"):
        read_manifest(bad)

    gone = _copy(folder, tmp_path / "gone")
    (gone / "val.beton").unlink()
    with pytest.raises(UserError, match=r"val.beton not found"):
        read_manifest(gone)

    short = _copy(folder, tmp_path / "short")
    with open(short / "train.beton", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(UserError, match=r"train.beton has 1000 bytes but its manifest says"):
        read_manifest(short)

    flipped = _copy(folder, tmp_path / "flipped")
    blob = bytearray((flipped / "val.beton").read_bytes())
    blob[-1] ^= 0xFF  # same size, different content
    (flipped / "val.beton").write_bytes(bytes(blob))
    read_manifest(flipped)  # sizes agree: only verify=True reads the content
    with pytest.raises(UserError, match=r"val.beton does not match its manifest.*--force"):
        read_manifest(flipped, verify=True)


# ---------------------------------------------------------------- the numpy beton reader


def test_beton_reader_raw(raw_data):
    folder, arrays = raw_data
    reader = BetonReader(folder / "val.beton")
    images, labels = arrays["val"]
    assert len(reader) == N_VAL
    np.testing.assert_array_equal(reader.labels, labels)
    for i in (0, 5, N_VAL - 1):
        assert torch.equal(reader.image(i), nchw(images[i:i + 1])[0])


def test_beton_reader_jpg_close_to_source(jpg_data):
    folder, arrays = jpg_data
    reader = BetonReader(folder / "train.beton")
    images, labels = arrays["train"]
    np.testing.assert_array_equal(reader.labels, labels)
    decoded = torch.stack([reader.image(i) for i in range(N_TRAIN)]).int()
    # PIL decodes the same bytes with the accurate DCT; FFCV's (and our) fast DCT differs by a few levels at most
    pil = nchw(np.stack([np.asarray(Image.open(io.BytesIO(reader.raw_bytes(i).tobytes())).convert("RGB"))
                         for i in range(N_TRAIN)])).int()
    assert (decoded - pil).abs().max() <= 8 and (decoded - pil).abs().float().mean() < 2.5
    assert ((decoded - nchw(images).int()).abs().float().mean() < 20)  # and it is the image that was written


def test_beton_reader_rejects_other_files(tmp_path):
    junk = tmp_path / "junk.beton"
    junk.write_bytes(b"\x07" * 3000)
    with pytest.raises(UserError, match=r"junk.beton: not a readable .beton file"):
        BetonReader(junk)


# ---------------------------------------------------------------- loaders


def test_subset_indices_fixed_and_sorted():
    ids = subset_indices(100, 10)
    expected = np.sort(np.random.default_rng(0).choice(100, 10, replace=False))
    np.testing.assert_array_equal(ids, expected)
    np.testing.assert_array_equal(subset_indices(100, 0), np.arange(100))
    np.testing.assert_array_equal(subset_indices(100, 500), np.arange(100))


def find_window(crop: torch.Tensor, source: torch.Tensor) -> list[tuple[int, int, bool]]:
    """Every (top, left, flipped) at which `crop` is a window of `source` (C, H, W), by brute force."""
    hits = []
    for flipped in (False, True):
        target = crop.flip(-1) if flipped else crop
        for top in range(source.shape[1] - crop.shape[1] + 1):
            for left in range(source.shape[2] - crop.shape[2] + 1):
                if torch.equal(source[:, top:top + crop.shape[1], left:left + crop.shape[2]], target):
                    hits.append((top, left, flipped))
    return hits


@pytest.mark.parametrize("backend", ["ffcv", "torch"])
def test_loaders_on_raw_beton(raw_data, backend):
    folder, arrays = raw_data
    cfg = config(folder, **{"data.backend": backend, "train.seed": 3})
    loaders = make_loaders(cfg, device="cpu")
    assert loaders.backend == backend
    assert (loaders.num_train, loaders.num_val) == (N_TRAIN, N_VAL)
    assert loaders.batches_per_epoch == len(loaders.train) == N_TRAIN // 8

    # val and train_eval: every stored image, in stored order, pixel for pixel
    x, y = collect(loaders.val)
    assert x.dtype == torch.uint8 and y.dtype == torch.int64 and y.shape == (N_VAL,)
    assert torch.equal(x, nchw(arrays["val"][0]))
    assert torch.equal(y, torch.from_numpy(arrays["val"][1]))
    x, y = collect(loaders.train_eval)
    assert torch.equal(x, nchw(arrays["train"][0]))

    # train: order = a permutation from SeedSequence([1, seed, epoch]); each image a true CROP x CROP sub-window,
    # some flipped
    loaders.set_epoch(0)
    x, y = collect(loaders.train)
    assert x.shape == (N_TRAIN, 3, CROP, CROP)
    order = epoch_permutation(3, 0, np.arange(N_TRAIN))
    np.testing.assert_array_equal(y.numpy(), arrays["train"][1][order])
    sources = nchw(arrays["train"][0])
    hits = [find_window(x[i], sources[order[i]]) for i in range(N_TRAIN)]
    assert all(len(h) == 1 for h in hits)
    tops_lefts = {h[0][:2] for h in hits}
    flips = [h[0][2] for h in hits]
    assert len(tops_lefts) > 10 and 5 < sum(flips) < N_TRAIN - 5

    # the same epoch again gives the same batches; the next epoch another order and other crops
    loaders.set_epoch(0)
    x_again, _ = collect(loaders.train)
    assert torch.equal(x, x_again)
    x1, y1 = collect(loaders.train)  # epoch 1 follows
    np.testing.assert_array_equal(y1.numpy(), arrays["train"][1][epoch_permutation(3, 1, np.arange(N_TRAIN))])


def test_flip_off_and_limits(raw_data):
    folder, arrays = raw_data
    a = make_loaders(config(folder, **{"data.flip": False, "data.train_limit": 16, "data.val_limit": 10,
                                       "train.seed": 0}), device="cpu")
    b = make_loaders(config(folder, **{"data.flip": False, "data.train_limit": 16, "data.val_limit": 10,
                                       "train.seed": 7}), device="cpu")
    val_ids = np.sort(np.random.default_rng(0).choice(N_VAL, 10, replace=False))
    train_ids = np.sort(np.random.default_rng(0).choice(N_TRAIN, 16, replace=False))
    for loaders in (a, b):  # the subset does not depend on train.seed
        assert (loaders.num_train, loaders.num_val, loaders.batches_per_epoch) == (16, 10, 2)
        x, y = collect(loaders.val)
        assert torch.equal(x, nchw(arrays["val"][0][val_ids]))
        _, y = collect(loaders.train_eval)
        np.testing.assert_array_equal(y.numpy(), arrays["train"][1][train_ids])
    xa, ya = collect(a.train)
    xb, yb = collect(b.train)
    sources = nchw(arrays["train"][0])
    for seed, x in ((0, xa), (7, xb)):
        order = epoch_permutation(seed, 0, train_ids)
        hits = [find_window(x[i], sources[order[i]]) for i in range(16)]
        assert all(len(h) == 1 and not h[0][2] for h in hits)  # found, and never flipped
    assert not torch.equal(xa, xb)


def test_backends_agree_on_jpg(jpg_data):
    folder, _ = jpg_data
    out = {}
    for backend in ("ffcv", "torch"):
        loaders = make_loaders(config(folder, **{"data.backend": backend}), device="cpu")
        out[backend] = (collect(loaders.val), collect(loaders.train))
    (vx_f, vy_f), (tx_f, ty_f) = out["ffcv"]
    (vx_t, vy_t), (tx_t, ty_t) = out["torch"]
    assert torch.equal(vx_f, vx_t) and torch.equal(vy_f, vy_t)
    assert torch.equal(tx_f, tx_t) and torch.equal(ty_f, ty_t)


def test_bad_settings(raw_data):
    folder, _ = raw_data
    with pytest.raises(UserError, match=rf"model.input_size = {RES + 1} is larger than the {RES}px images"):
        make_loaders(config(folder, **{"model.input_size": RES + 1}), device="cpu")
    with pytest.raises(UserError, match=r"train.batch_size = 64 is larger than the 40 training images"):
        make_loaders(config(folder, **{"train.batch_size": 64}), device="cpu")


def test_fallback_runs_without_ffcv(raw_data):
    folder, arrays = raw_data
    code = (  # a process where ffcv cannot be imported nor found: backend "auto" must pick the fallback
        "import sys, importlib.util\n"
        "sys.modules['ffcv'] = None\n"
        "_find = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda name, *a: None if name == 'ffcv' else _find(name, *a)\n"
        "import torch\n"
        "from repro.config import RunConfig, apply_overrides\n"
        "from repro.data import make_loaders\n"
        f"cfg = apply_overrides(RunConfig(), {{'data.dir': {str(folder)!r}, 'model.input_size': {CROP},"
        " 'train.batch_size': 8, 'data.workers': 1, 'data.normalize': 'mean'})\n"
        "loaders = make_loaders(cfg, device='cpu')\n"
        "x = torch.cat([b[0] for b in loaders.val])\n"
        "print(loaders.backend, int(x.long().sum()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["torch", str(int(arrays["val"][0].astype(np.int64).sum()))]


def test_crop_draws_cover_every_position_evenly():
    from scipy.stats import chisquare

    from repro.data.crops import crop_window, draw_words, flip_bit

    key = np.array([0x1234, 0xABCD], dtype=np.uint64)
    words = draw_words(np.arange(20000, dtype=np.uint64), key)
    windows = np.array([crop_window(w, 32, 32, 27, 32) for w in words])
    assert (windows[:, 2] == 27).all()
    for column in (0, 1):  # tops and lefts: all 6 positions 0..5, uniformly
        counts = np.bincount(windows[:, column], minlength=6)
        assert len(counts) == 6 and chisquare(counts).pvalue > 1e-3
    flips = np.array([flip_bit(w) for w in words])
    assert abs(flips.mean() - 0.5) < 0.02
    # a sample's draw does not depend on its batch or its place in it; another epoch's key draws other crops
    again = draw_words(np.arange(20000, dtype=np.uint64)[::-1].copy(), key)
    np.testing.assert_array_equal(again[::-1], words)
    other = draw_words(np.arange(20000, dtype=np.uint64), key + np.uint64(1))
    assert (other != words).any(axis=1).mean() > 0.99


def test_variable_size_images(tmp_path):
    """--max-side data: train crops come from the centre square scaled to res; val is that square at res."""
    rng = np.random.default_rng(2)
    shapes = [(16, 24), (24, 16), (20, 20), (32, 16)] * 3
    images = [np.kron(rng.integers(0, 256, (h // 4, w // 4, 3), dtype=np.uint8), np.ones((4, 4, 1), np.uint8))
              for h, w in shapes]
    labels = np.arange(len(images)) % CLASSES
    splits = {}
    for name in ("train", "val"):
        path = tmp_path / f"{name}.beton"
        DatasetWriter(str(path), {"image": RGBImageField(write_mode="raw"), "label": IntField()},
                      num_workers=1).from_indexed_dataset(_Arrays(images, labels))
        splits[name] = {"file": path.name, "count": len(images), "bytes": path.stat().st_size}
    manifest = {"format": 1, "source": "synthetic", "settings": {"res": RES, "max_side": True},
                "image": {"height": 32, "width": 24, "fixed_size": False}, "classes": {}, "splits": splits,
                "mean": [0, 0, 0], "std": [1, 1, 1], "pca": {"eigval": [0, 0, 0], "eigvec": np.eye(3).tolist()},
                "hash": "0" * 16}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    out = {}
    for backend in ("ffcv", "torch"):
        loaders = make_loaders(config(tmp_path, **{"data.backend": backend, "train.batch_size": 4}), device="cpu")
        out[backend] = collect(loaders.train), collect(loaders.val)
        (tx, ty), (vx, vy) = out[backend]
        assert tx.shape == (12, 3, CROP, CROP) and vx.shape == (12, 3, RES, RES)
        np.testing.assert_array_equal(vy.numpy(), labels)
        # the 20x20 images: the val image is the whole image scaled by 16/20, so its mean colour is kept
        for i in range(2, 12, 4):
            np.testing.assert_allclose(vx[i].float().mean((1, 2)).numpy(), images[i].mean((0, 1)), atol=3)
    # OpenCV (FFCV) and torchvision resize the window slightly differently; the windows are the same
    for k in range(2):
        diff = (out["ffcv"][k][0].float() - out["torch"][k][0].float()).abs()
        assert diff.mean() < 2


# ---------------------------------------------------------------- the mean image (section 2)


def ramp_mean_image(size: int) -> np.ndarray:
    """A mean image whose every value says where it is: 1000 * row + 10 * column + channel."""
    rows, cols, chans = np.meshgrid(np.arange(size), np.arange(size), np.arange(3), indexing="ij")
    return (1000 * rows + 10 * cols + chans).astype(np.float32)


@pytest.mark.parametrize("backend", ["ffcv", "torch"])
def test_mean_image_is_cut_and_flipped_as_each_crop(raw_data, tmp_path, backend):
    """Loader batches with "mean-image" = the stored-pixel crops minus the mean image's window at the crop's
    place, mirrored where the crop is: read the window back from the ramp and check it against numpy slicing."""
    folder = _copy(raw_data[0], tmp_path / "ramp")
    mean = ramp_mean_image(RES)
    write_mean_image(folder, json.loads((folder / "manifest.json").read_text()), mean)
    plain = make_loaders(config(folder, **{"data.backend": backend}), device="cpu")
    minus = make_loaders(config(folder, **{"data.backend": backend, "data.normalize": "mean-image"}), device="cpu")
    (px, py), (mx, my) = collect(plain.train), collect(minus.train)
    assert mx.dtype == torch.float32 and torch.equal(py, my)
    sources = nchw(raw_data[1]["train"][0])
    order = epoch_permutation(0, 0, np.arange(N_TRAIN))  # seed 0, epoch 0: the images behind px, in order
    flips = 0
    for i in range(len(px)):
        window = (px[i].float() - mx[i]).permute(1, 2, 0).numpy()  # (CROP, CROP, 3) values of the ramp
        top, left = int(window[:, :, 0].min()) // 1000, int(window[:, :, 0].min()) % 1000 // 10
        (image_top, image_left, flipped), = find_window(px[i], sources[order[i]])
        assert (top, left) == (image_top, image_left)
        want = mean[top:top + CROP, left:left + CROP]
        np.testing.assert_array_equal(window, want[:, ::-1] if flipped else want)
        flips += flipped
    assert 0 < flips < len(px)
    # whole stored images (val, train_eval) lose the whole mean image
    (vx, _), (ux, _) = collect(plain.val), collect(minus.val)
    np.testing.assert_array_equal((vx.float() - ux).permute(0, 2, 3, 1).numpy(), np.broadcast_to(mean, (N_VAL,
                                                                                                        *mean.shape)))


def test_mean_image_missing_names_the_manifest_and_the_command(raw_data, tmp_path):
    folder = _copy(raw_data[0], tmp_path / "old")
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["mean_image"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=rf"{folder}/manifest.json has no mean image .*`repro prepare-data "
                                        rf"synthetic --res {RES} --write-mode raw --out {folder} --force`"):
        make_loaders(config(folder, **{"data.normalize": "mean-image"}), device="cpu")
    make_loaders(config(folder), device="cpu")  # the per-channel mean needs no mean image

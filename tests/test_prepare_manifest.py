"""Manifest fields against independent numpy/hashlib computations; up-to-date, --force and interrupted runs."""

from __future__ import annotations

import functools
import hashlib
import json

import numpy as np
import pytest
from conftest_data import make_cifar, make_fashion, make_tree, opts, read_beton

import data_prep.prepare as prep
from data_prep.prepare import prepare


@pytest.fixture(scope="module")
def cifar_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cifar")
    data = make_cifar(tmp / "c", per_batch=5, seed=4)
    summary = prepare("cifar10", tmp / "c", tmp / "out", opts(), progress=False)
    return data, tmp / "out", json.loads((tmp / "out" / "manifest.json").read_text()), summary


def test_mean_std_and_pca_match_numpy(cifar_run):
    data, _, m, _ = cifar_run
    pixels = data["train"][0].reshape(-1, 3).astype(np.float64)
    assert np.allclose(m["mean"], pixels.mean(0), atol=1e-9)
    assert np.allclose(m["std"], pixels.std(0), atol=1e-9)
    cov = np.cov((pixels / 255.0).T, bias=True)
    want_val, want_vec = np.linalg.eigh(cov)
    want_val, want_vec = want_val[::-1], want_vec[:, ::-1]
    eigval, eigvec = np.array(m["pca"]["eigval"]), np.array(m["pca"]["eigvec"])
    assert np.allclose(eigval, want_val, rtol=1e-8) and np.all(np.diff(eigval) <= 0)
    for i in range(3):  # column i is the eigenvector of eigval i, up to sign
        assert abs(abs(eigvec[:, i] @ want_vec[:, i]) - 1) < 1e-8
        assert np.allclose(cov @ eigvec[:, i], eigval[i] * eigvec[:, i], atol=1e-10)
    assert m["stats_from"] == {"images": 25, "of": 25, "sampled": False}


def test_manifest_counts_hashes_and_settings(cifar_run):
    data, out, m, summary = cifar_run
    for split in ("train", "val"):
        beton = out / f"{split}.beton"
        info = m["splits"][split]
        assert info["sha256"] == hashlib.sha256(beton.read_bytes()).hexdigest()
        assert info["bytes"] == beton.stat().st_size and info["file"] == f"{split}.beton"
        assert info["per_class"] == np.bincount(data[split][1], minlength=10).tolist()
        assert info["count"] == len(data[split][1])
    assert m["format"] == 1 and m["source"] == "cifar10" and m["root"].endswith("/c")
    assert m["settings"] == {"res": 32, "max_side": False, "classes": None, "train_per_class": None,
                             "val_per_class": None, "jpeg_quality": 90, "write_mode": "raw", "seed": 0}
    assert m["image"] == {"height": 32, "width": 32, "fixed_size": True}
    assert m["skipped"] == [] and m["tool_version"] and m["seconds"] > 0 and m["created"].endswith("Z")
    assert len(m["hash"]) == 16 and "25 train + 5 val" in summary and "skipped 0" in summary


def test_up_to_date_then_force(tmp_path):
    make_fashion(tmp_path / "fm", n_train=20, n_val=10)
    out = tmp_path / "out"
    prepare("fashion-mnist", tmp_path / "fm", out, opts(), progress=False)
    stamp = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert "up to date" in prepare("fashion-mnist", tmp_path / "fm", out, opts(), progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamp  # nothing touched
    # a changed setting rebuilds, and so does --force with the same settings
    assert "up to date" not in prepare("fashion-mnist", tmp_path / "fm", out, opts(classes="2"), progress=False)
    assert json.loads((out / "manifest.json").read_text())["splits"]["train"]["count"] == 4
    summary = prepare("fashion-mnist", tmp_path / "fm", out, opts(classes="2", force=True), progress=False)
    assert "up to date" not in summary and json.loads((out / "manifest.json").read_text())["settings"]["classes"] == "2"
    # a beton that no longer matches its manifest is rebuilt rather than trusted
    with open(out / "val.beton", "ab") as f:
        f.write(b"x")
    assert "up to date" not in prepare("fashion-mnist", tmp_path / "fm", out, opts(classes="2"), progress=False)


def test_interrupted_run_leaves_old_output_and_no_temporaries(tmp_path, monkeypatch):
    make_fashion(tmp_path / "fm", n_train=20, n_val=10)
    out = tmp_path / "out"
    prepare("fashion-mnist", tmp_path / "fm", out, opts(), progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    import data_prep.writer as writer

    real = writer.write_split
    calls = []

    def interrupted(*args, **kw):
        calls.append(1)
        if len(calls) == 2:  # train written, Ctrl-C while writing val
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(writer, "write_split", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare("fashion-mnist", tmp_path / "fm", out, opts(force=True), progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_two_runs_into_one_folder_keep_to_their_own_temporaries(tmp_path, monkeypatch):
    """Another process's run in progress in the same folder: this run, finished or failed, neither writes over nor
    removes its temporaries."""
    import os

    import data_prep.writer as writer

    make_fashion(tmp_path / "fm", n_train=20, n_val=10)
    out = tmp_path / "out"
    out.mkdir()
    real, names = writer.write_split, {"other": [], "own": []}

    def recording(who, stop_at=None):
        def write_split(path, *args, **kw):
            names[who].append(str(path))
            if len(names[who]) == stop_at:
                raise KeyboardInterrupt
            return real(path, *args, **kw)
        return write_split

    other_pid = os.getpid() + 1
    with monkeypatch.context() as m:  # the other process: stopped before writing; its file is then left mid-write
        m.setattr(os, "getpid", lambda: other_pid)
        m.setattr(writer, "write_split", recording("other", stop_at=1))
        with pytest.raises(KeyboardInterrupt):
            prepare("fashion-mnist", tmp_path / "fm", out, opts(), progress=False)
    other_tmp = out / os.path.basename(names["other"][0])
    other_tmp.write_bytes(b"the other run's half-written beton")

    monkeypatch.setattr(writer, "write_split", recording("own"))
    prepare("fashion-mnist", tmp_path / "fm", out, opts(), progress=False)
    assert names["other"][0] not in names["own"]
    assert other_tmp.read_bytes() == b"the other run's half-written beton"
    assert sorted(p.name for p in out.glob("*.tmp")) == [other_tmp.name]
    assert len(read_beton(out / "val.beton")[1]) == 10
    assert json.loads((out / "manifest.json").read_text())["splits"]["train"]["count"] == 20

    monkeypatch.setattr(writer, "write_split", recording("own", stop_at=len(names["own"]) + 2))  # fails on val
    with pytest.raises(KeyboardInterrupt):
        prepare("fashion-mnist", tmp_path / "fm", out, opts(force=True), progress=False)
    assert other_tmp.read_bytes() == b"the other run's half-written beton"
    assert sorted(p.name for p in out.glob("*.tmp")) == [other_tmp.name]


def test_max_side_keeps_aspect(tmp_path):
    from conftest_data import make_tree

    make_tree(tmp_path / "d" / "train", ["a"], per_class=2)  # 40x30 and 41x30
    make_tree(tmp_path / "d" / "val", ["a"], per_class=1)
    prepare("imagefolder", tmp_path / "d", tmp_path / "out", opts(res=20, max_side=True), progress=False)
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["image"]["fixed_size"] is False and m["settings"]["max_side"] is True
    images, _ = read_beton(tmp_path / "out" / "val.beton")
    assert images[0].shape == (15, 20, 3)  # 40x30 -> longer side 20, aspect kept


def test_settings_default_resolution_per_source():
    assert prep.resolve_settings("imagenet", opts())["res"] == 256
    assert prep.resolve_settings("imagenet", opts())["write_mode"] == "jpg"
    assert prep.resolve_settings("fashion-mnist", opts())["res"] == 28


def test_edited_classes_file_rebuilds(tmp_path):
    make_fashion(tmp_path / "fm", n_train=20, n_val=10)
    ids = tmp_path / "ids.txt"
    ids.write_text("0\n1\n")
    o = opts(class_list=str(ids))
    prepare("fashion-mnist", tmp_path / "fm", tmp_path / "out", o, progress=False)
    assert "up to date" in prepare("fashion-mnist", tmp_path / "fm", tmp_path / "out", o, progress=False)
    ids.write_text("0\n2\n")
    assert "up to date" not in prepare("fashion-mnist", tmp_path / "fm", tmp_path / "out", o, progress=False)
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["classes"]["ids"] == ["0", "2"]


def test_progress_bar_only_when_asked(tmp_path, capfd):
    o = opts(classes="2", train_per_class=5, val_per_class=2, res=8)
    prepare("synthetic", None, tmp_path / "quiet", o, progress=False)
    assert capfd.readouterr() == ("", "")  # silent: the caller prints the summary line
    prepare("synthetic", None, tmp_path / "loud", o, progress=True)
    err = capfd.readouterr().err
    assert "synthetic train" in err and "img/s" in err and "10/10" in err


def test_write_mode_raw_stores_large_images_uncompressed_and_switching_rebuilds(tmp_path):
    make_tree(tmp_path / "d" / "train", ["a", "b"], per_class=2)
    make_tree(tmp_path / "d" / "val", ["a", "b"], per_class=1)
    out = tmp_path / "out"
    prepare("imagefolder", tmp_path / "d", out, opts(res=80), progress=False)
    jpg_images, _ = read_beton(out / "val.beton")
    assert stored_modes(out / "train.beton") == {"jpg"}
    assert json.loads((out / "manifest.json").read_text())["settings"]["write_mode"] == "jpg"
    summary = prepare("imagefolder", tmp_path / "d", out, opts(res=80, write_mode="raw"), progress=False)
    assert "up to date" not in summary
    assert json.loads((out / "manifest.json").read_text())["settings"]["write_mode"] == "raw"
    raw_images, _ = read_beton(out / "val.beton")
    assert raw_images[0].shape == jpg_images[0].shape == (80, 80, 3)
    assert stored_modes(out / "train.beton") == {"raw"}


def stored_modes(path) -> set[str]:
    from ffcv.fields.rgb_image import IMAGE_MODES
    from ffcv.reader import Reader

    names = {code: name for name, code in IMAGE_MODES.items()}
    return {names[int(m)] for m in Reader(str(path)).metadata["f0"]["mode"]}


def test_mean_image_matches_numpy(cifar_run):
    """Section 2's mean image: the per-pixel mean of the stored training images, float32 HxWx3, hashed."""
    data, out, m, _ = cifar_run
    mean_image = np.load(out / "mean_image.npy")
    assert mean_image.dtype == np.float32 and mean_image.shape == (32, 32, 3)
    assert np.allclose(mean_image, data["train"][0].astype(np.float64).mean(0), atol=1e-4)
    info = m["mean_image"]
    assert info["file"] == "mean_image.npy" and info["shape"] == [32, 32, 3] and info["dtype"] == "float32"
    assert info["sha256"] == hashlib.sha256((out / "mean_image.npy").read_bytes()).hexdigest()
    assert np.allclose(mean_image.reshape(-1, 3).mean(0), m["mean"], atol=1e-3)
    assert not list(out.glob("*.tmp"))


def test_mean_image_of_aspect_kept_images_is_over_their_centre_squares(tmp_path):
    import cv2

    make_tree(tmp_path / "d" / "train", ["a", "b"], per_class=2)  # 40x30 and 41x30 images
    make_tree(tmp_path / "d" / "val", ["a"], per_class=1)
    prepare("imagefolder", tmp_path / "d", tmp_path / "out", opts(res=20, max_side=True, write_mode="raw"),
            progress=False)
    images, _ = read_beton(tmp_path / "out" / "train.beton")
    squares = []
    for img in images:  # stored 15 x 20: its centre square is columns 2..16, shown at 20 x 20
        h, w = img.shape[:2]
        left = (w - h) // 2
        squares.append(cv2.resize(img[:, left:left + h], (20, 20), interpolation=cv2.INTER_AREA))
    want = np.mean(np.stack(squares).astype(np.float64), axis=0)
    # the sums are resized, not each square: within rounding of the mean of the uint8 squares the loaders show
    assert np.allclose(np.load(tmp_path / "out" / "mean_image.npy"), want, atol=0.5)


def test_centre_square_mean_equals_resizing_each_image(monkeypatch):
    """Summing squares by side and resizing each sum once gives the mean of each image's own resized centre
    square (the resize is linear), also when sums are resized early to stay under the memory bound."""
    import cv2

    import data_prep.writer as writer

    rng = np.random.default_rng(5)
    shapes = [(12, 16), (16, 9), (16, 16), (10, 16), (12, 16), (16, 12), (7, 16), (16, 16), (10, 16)]
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]
    exact, shown = [], []
    for img in images:
        h, w = img.shape[:2]
        side = min(h, w)
        square = img[(h - side) // 2:(h - side) // 2 + side, (w - side) // 2:(w - side) // 2 + side]
        exact.append(cv2.resize(square.astype(np.float64), (16, 16), interpolation=cv2.INTER_AREA))
        shown.append(cv2.resize(square, (16, 16), interpolation=cv2.INTER_AREA))
    for limit in (64 << 20, 16 * 16 * 12):  # room for every side; room for one sum at a time
        monkeypatch.setattr(writer, "SQUARE_BYTES", limit)
        mean = writer.CentreSquareMean(16)
        for img in images:
            mean.add(img)
        if limit < 1000:
            assert len(mean.squares) == 1
        got = mean.finish() / len(images)
        assert np.allclose(got, np.mean(exact, axis=0), atol=1e-9)
        assert np.abs(got - np.mean(np.stack(shown).astype(np.float64), axis=0)).max() <= 0.5
    assert writer.CentreSquareMean(16).finish() is None


@pytest.mark.parametrize("mode", ["jpg", "raw"])
def test_stored_image_encoding_is_ffcvs_own(mode):
    """The writer's encode (without FFCV's typed-Dict lookup) fills the same header and bytes as
    RGBImageField.encode."""
    from ffcv.fields import RGBImageField

    from data_prep.writer import _encode_stored

    img = np.random.default_rng(2).integers(0, 256, (21, 30, 3), dtype=np.uint8)
    got = {}
    for name in ("ffcv", "ours"):
        field = RGBImageField(write_mode=mode, max_resolution=None, jpeg_quality=90)
        destination, stored = np.zeros(1, field.metadata_type), []

        def malloc(n):
            stored.append(np.zeros(n, np.uint8))
            return 4096, stored[-1]

        (field.encode if name == "ffcv" else functools.partial(_encode_stored, field))(destination, img, malloc)
        got[name] = destination.tobytes(), stored[0].tobytes()
    assert got["ours"] == got["ffcv"]


def test_pixel_statistics_sample_every_eighth_row_and_column_of_large_images():
    from data_prep.writer import pixel_sums

    rng = np.random.default_rng(3)
    for shape, step in [((100, 120, 3), 1), ((200, 150, 3), 8)]:
        img = rng.integers(0, 256, shape, dtype=np.uint8)
        x = img[::step, ::step].reshape(-1, 3).astype(np.float64)
        want = np.concatenate([x.sum(0), (x.T @ x).ravel(), [len(x)]])
        assert np.array_equal(pixel_sums(img), want)


def _digest_by_hand(beton) -> str:
    """sha256 over (crc32 of pixels then shape, label) per stored image, in beton order, from the file's own
    contents (FFCV's Reader): independent of the writer's bookkeeping."""
    import zlib

    images, labels = read_beton(beton)
    rows = [(zlib.crc32(np.asarray(im.shape, np.uint32), zlib.crc32(np.ascontiguousarray(im))), int(y))
            for im, y in zip(images, labels)]
    return hashlib.sha256(np.asarray(rows, dtype="<u8").tobytes()).hexdigest()


def test_data_hash_names_the_images_not_the_file_layout(tmp_path):
    # One worker and two lay FFCV's pages out differently (so the files differ), yet hold the same images in the
    # same order: the data hash, which every run hash includes, must be the same.
    manifests = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        prepare("synthetic", None, out, opts(res=16, workers=workers, write_mode="raw", train_per_class=60),
                progress=False)
        manifests[workers] = json.loads((out / "manifest.json").read_text())
        for name, info in manifests[workers]["splits"].items():
            assert info["content"] == _digest_by_hand(out / info["file"])
    assert manifests[1]["hash"] == manifests[2]["hash"]
    # a different image order is different data
    out = tmp_path / "seed1"
    prepare("synthetic", None, out, opts(res=16, workers=1, write_mode="raw", train_per_class=60, seed=1),
            progress=False)
    assert json.loads((out / "manifest.json").read_text())["hash"] != manifests[1]["hash"]

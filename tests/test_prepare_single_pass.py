"""Files that cannot be decoded are left out in the one pass that writes a split: each file is decoded once, and
the beton is the one a write of the good files alone gives (the second pass that used to follow), byte for byte."""

from __future__ import annotations

import collections
import hashlib
import json
import os

import numpy as np
import pytest
from conftest_data import class_image, make_tree, opts, read_beton

import data_prep.writer as writer
from data_prep.prepare import prepare
from data_prep.sources import load_source
from repro.data.beton import BetonReader
from repro.errors import UserError

CLASSES = ["a", "b", "c"]


def corrupt_tree(root, per_class=4, val_per_class=2) -> dict[str, str]:
    """An imagefolder tree with broken files in both splits; returns {broken file's path: expected reason}."""
    make_tree(root / "train", CLASSES, per_class)
    make_tree(root / "val", CLASSES, val_per_class)
    good = (root / "train" / "a" / "a_0.JPEG").read_bytes()
    broken = {root / "train" / "a" / "a_cut.JPEG": good[: len(good) // 2],
              root / "train" / "c" / "c_page.JPEG": b"<html>404 Not Found</html>",
              root / "train" / "b" / "b_zero.JPEG": b"",
              root / "val" / "b" / "b_cut.JPEG": good[: len(good) // 3]}
    for path, data in broken.items():
        path.write_bytes(data)
    reasons = ["truncated image", "not an image (unknown format)", "empty file", "truncated image"]
    return {str(p): r for p, r in zip(broken, reasons)}


def _count_calls(monkeypatch, log):
    """Log every decode (its path) and every encode, from whichever forked worker makes it."""
    def note(line):
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)  # one write per line: workers do not interleave
        os.write(fd, f"{line}\n".encode())
        os.close(fd)

    real_read, real_encode = writer.read_image, writer._encode_stored

    def read_image(path, res):
        note(f"decode {path}")
        return real_read(path, res)

    def encode(*args):
        note("encode")
        return real_encode(*args)

    monkeypatch.setattr(writer, "read_image", read_image)
    monkeypatch.setattr(writer, "_encode_stored", encode)


def test_each_file_is_decoded_once_and_only_good_ones_encoded(tmp_path, monkeypatch):
    broken = corrupt_tree(tmp_path / "d")
    log = tmp_path / "calls.log"
    _count_calls(monkeypatch, log)
    summary = prepare("imagefolder", tmp_path / "d", tmp_path / "out", opts(res=16), progress=False)
    lines = log.read_text().splitlines()
    decodes = collections.Counter(line.split(" ", 1)[1] for line in lines if line.startswith("decode "))
    files = {str(p) for p in (tmp_path / "d").rglob("*.JPEG")}
    assert set(decodes) == files and set(decodes.values()) == {1}, decodes.most_common(3)
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    written = m["splits"]["train"]["count"] + m["splits"]["val"]["count"]
    assert written == len(files) - len(broken) == lines.count("encode")
    assert {s["path"]: s["reason"] for s in m["skipped"]} == broken and f"skipped {len(broken)}" in summary


def _manifest_without_times(out) -> dict:
    m = json.loads((out / "manifest.json").read_text())
    return {k: v for k, v in m.items() if k not in ("seconds", "created")}


def test_prepare_gives_the_manifest_and_betons_of_the_two_pass_path(tmp_path, monkeypatch):
    """The old path, as a wrapper: a first write learns which files fail, a second writes the others. Same
    manifest (hash, contents, skipped files and reasons, statistics, mean image) and the same beton bytes; the val
    split, kept in source order, is also the one a copy of the tree without the broken files gives."""
    broken = corrupt_tree(tmp_path / "d")
    prepare("imagefolder", tmp_path / "d", tmp_path / "one", opts(res=16), progress=False)
    real = writer.write_split

    def two_pass(path, split, *, order, **kw):
        first = real(path, split, order=order, **kw)
        return {**real(path, split, order=first["index"], **kw), "skipped": first["skipped"]}

    monkeypatch.setattr(writer, "write_split", two_pass)
    prepare("imagefolder", tmp_path / "d", tmp_path / "two", opts(res=16), progress=False)
    one, two = _manifest_without_times(tmp_path / "one"), _manifest_without_times(tmp_path / "two")
    assert one == two and len(one["skipped"]) == len(broken)
    for name in ("train.beton", "val.beton", "mean_image.npy"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    for path in broken:
        os.unlink(path)
    monkeypatch.setattr(writer, "write_split", real)
    prepare("imagefolder", tmp_path / "d", tmp_path / "clean", opts(res=16), progress=False)
    clean = _manifest_without_times(tmp_path / "clean")
    assert clean["splits"]["val"] == one["splits"]["val"] and clean["skipped"] == []
    # train is shuffled over every file listed, broken ones included (as it was), so only its counts compare here
    assert clean["splits"]["train"]["per_class"] == one["splits"]["train"]["per_class"]


@pytest.fixture(scope="module")
def corrupt_split(tmp_path_factory):
    """The train split of a corrupt tree (a real imagefolder Split, broken files and all) and those files."""
    root = tmp_path_factory.mktemp("corrupt")
    broken = {p: r for p, r in corrupt_tree(root, per_class=5).items() if "/train/" in p}
    return load_source("imagefolder", root, opts(res=16)).train, broken


def _write(path, split, order, workers=1):
    with writer.make_progress(False) as bar:
        return writer.write_split(str(path), split, res=16, max_side=False, write_mode="jpg", jpeg_quality=90,
                                  workers=workers, order=np.asarray(order), stats=True, progress=bar, name="train")


def _same_result(a: dict, b: dict, one_worker: bool = True) -> None:
    assert np.array_equal(a["index"], b["index"]) and a["content"] == b["content"]
    assert a["stat_images"] == b["stat_images"] and np.array_equal(a["sums"], b["sums"])
    # workers' sums of the mean image add up in whichever grouping they happened to take their chunks
    assert np.array_equal(a["mean_image"], b["mean_image"]) if one_worker else \
        np.allclose(a["mean_image"], b["mean_image"], rtol=0, atol=1e-3)


def test_output_is_the_two_pass_output(tmp_path, corrupt_split):
    """The old second pass wrote the good files of the same split in the written order; here that is a write of
    `index` (nothing fails in it). Also the same as a dataset of the good files alone: its content, hence the
    manifest's hash, and its bytes."""
    split, broken = corrupt_split
    order = np.random.default_rng(3).permutation(len(split))
    one = _write(tmp_path / "one.beton", split, order)
    assert {split.paths[i]: r for i, r in one["skipped"]} == broken
    assert len(one["index"]) == len(split) - len(broken)
    two_pass = _write(tmp_path / "two.beton", split, one["index"])
    assert two_pass["skipped"] == []
    _same_result(one, two_pass)
    good = split.subset(np.sort(one["index"]))
    alone = _write(tmp_path / "alone.beton", good, np.searchsorted(np.sort(one["index"]), one["index"]))
    assert alone["content"] == one["content"] and np.array_equal(alone["sums"], one["sums"])
    digest = {name: hashlib.sha256((tmp_path / f"{name}.beton").read_bytes()).hexdigest()
              for name in ("one", "two", "alone")}
    assert digest["one"] == digest["two"] == digest["alone"]


def _class_of(image: np.ndarray) -> int:
    colours = np.array([np.asarray(class_image(k)).reshape(-1, 3)[0] for k in range(len(CLASSES))], float)
    return int(np.argmin(np.abs(colours - image.reshape(-1, 3).mean(0)).sum(1)))


def test_labels_stay_with_their_images_across_workers(tmp_path, corrupt_split):
    """Several workers, each filling its own pages: after the broken positions are dropped, every row still holds
    its own image and label, and the allocation table numbers each image as the row that points to it."""
    split, broken = corrupt_split
    big = split.subset(np.tile(np.arange(len(split)), 30))  # 540 files, 90 of them broken: three workers
    order = np.random.default_rng(4).permutation(len(big))
    result = _write(tmp_path / "big.beton", big, order, workers=3)
    assert len(result["index"]) == len(big) - 30 * len(broken) and len(result["skipped"]) == 30 * len(broken)
    images, labels = read_beton(tmp_path / "big.beton")
    assert np.array_equal(labels, big.labels[result["index"]])
    assert [_class_of(im) for im in images] == labels.tolist()
    reader = BetonReader(tmp_path / "big.beton")
    assert len(reader) == len(labels) and np.array_equal(reader.labels, labels)
    from ffcv.reader import Reader

    ffcv = Reader(str(tmp_path / "big.beton"))
    table = ffcv.alloc_table
    assert sorted(table["sample_id"].tolist()) == list(range(len(labels)))
    owner = dict(zip(table["ptr"].tolist(), table["sample_id"].tolist()))
    assert [owner[int(p)] for p in ffcv.metadata["f0"]["data_ptr"]] == list(range(len(labels)))
    reference = _write(tmp_path / "ref.beton", big, result["index"], workers=3)
    _same_result(result, reference, one_worker=False)


def test_every_file_broken_is_refused(tmp_path, corrupt_split):
    split, broken = corrupt_split
    bad = np.array([i for i, p in enumerate(split.paths) if p in broken])
    with pytest.raises(UserError, match="every train image failed to decode"):
        _write(tmp_path / "none.beton", split, bad)

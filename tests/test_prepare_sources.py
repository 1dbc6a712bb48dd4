"""Each source read from tiny files in its real on-disk format, checked image by image in the written betons."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest_data import FM_NAMES, make_cifar, make_fashion, make_imagenet, make_tree, opts, read_beton

from data_prep.prepare import prepare
from data_prep.sources.synthetic import generate


def manifest(out):
    return json.loads((out / "manifest.json").read_text())


def test_fashion_mnist_idx_grey_to_rgb(tmp_path):
    data = make_fashion(tmp_path / "fm", n_train=30, n_val=20)
    prepare("fashion-mnist", tmp_path / "fm", tmp_path / "out", opts(), progress=False)
    m = manifest(tmp_path / "out")
    assert m["classes"]["names"] == FM_NAMES and m["settings"]["write_mode"] == "raw"
    assert m["image"] == {"height": 28, "width": 28, "fixed_size": True}
    images, labels = read_beton(tmp_path / "out" / "val.beton")
    grey, want = data["val"]
    assert np.array_equal(labels, want)  # val keeps the source order
    assert np.array_equal(np.stack(images), np.repeat(grey[..., None], 3, axis=3))
    # train is stored shuffled: same (image, label) pairs, other order
    images, labels = read_beton(tmp_path / "out" / "train.beton")
    got = sorted((lab, im[..., 0].tobytes()) for im, lab in zip(images, labels))
    assert got == sorted((int(lab), im.tobytes()) for im, lab in zip(*data["train"]))
    assert m["splits"]["train"]["per_class"] == np.bincount(data["train"][1], minlength=10).tolist()


def test_cifar10_pickles_as_numpy1_wrote_them(tmp_path):
    data = make_cifar(tmp_path / "cifar-10-batches-py", per_batch=4, numpy1_names=True)
    prepare("cifar10", tmp_path, tmp_path / "out", opts(), progress=False)  # parent folder is found too
    m = manifest(tmp_path / "out")
    assert m["classes"]["names"][:3] == ["airplane", "automobile", "bird"]
    assert m["splits"]["train"]["count"] == 20 and m["splits"]["val"]["count"] == 4
    images, labels = read_beton(tmp_path / "out" / "val.beton")
    assert np.array_equal(np.stack(images), data["val"][0]) and np.array_equal(labels, data["val"][1])


def test_cifar10_channel_layout(tmp_path):
    """A batch row is 1024 red, 1024 green, 1024 blue values, each row-major 32x32."""
    root = tmp_path / "c"
    make_cifar(root, per_batch=2)
    import pickle

    batch = pickle.loads((root / "test_batch").read_bytes())
    row = batch[b"data"][0]
    prepare("cifar10", root, tmp_path / "out", opts(), progress=False)
    images, _ = read_beton(tmp_path / "out" / "val.beton")
    assert images[0][0, 1, 0] == row[1] and images[0][2, 0, 1] == row[1024 + 64] and images[0][31, 31, 2] == row[-1]


@pytest.mark.parametrize("val", ["devkit", "kaggle", "folders"])
def test_imagenet_val_layouts(tmp_path, val):
    wnids = ["n0003", "n0001", "n0002"]
    labels = make_imagenet(tmp_path / "in", wnids, per_class=2, val=val)
    prepare("imagenet", tmp_path / "in", tmp_path / "out", opts(res=72), progress=False)
    m = manifest(tmp_path / "out")
    assert m["classes"]["ids"] == sorted(wnids)
    if val == "devkit":
        assert m["classes"]["names"][0] == "words of n0001"
    assert m["settings"]["write_mode"] == "jpg" and m["image"]["height"] == 72
    images, got = read_beton(tmp_path / "out" / "val.beton")
    assert got.tolist() == [sorted(wnids).index(w) for w in labels]
    # the class colour survives decode, resize and JPEG: val image colour = its train class colour
    train_images, train_labels = read_beton(tmp_path / "out" / "train.beton")
    colour = {int(lab): im.reshape(-1, 3).mean(0) for im, lab in zip(train_images, train_labels)}
    for im, lab in zip(images, got):
        assert im.shape == (72, 72, 3)
        assert np.abs(im.reshape(-1, 3).mean(0) - colour[int(lab)]).max() < 3


def test_imagenet_kaggle_tree(tmp_path):
    root = tmp_path / "kaggle"
    make_imagenet(root / "ILSVRC" / "Data" / "CLS-LOC", ["n01", "n02"], val="folders")
    (root / "LOC_synset_mapping.txt").write_text("n01 tench, Tinca tinca\nn02 goldfish\n")
    prepare("imagenet", root, tmp_path / "out", opts(res=32), progress=False)
    assert manifest(tmp_path / "out")["classes"]["names"] == ["tench, Tinca tinca", "goldfish"]


def test_imagefolder_classes_file_and_caps(tmp_path):
    make_tree(tmp_path / "d" / "train", ["cat", "dog", "emu"], per_class=5)
    make_tree(tmp_path / "d" / "val", ["cat", "dog", "emu"], per_class=3, ext=".png")
    (tmp_path / "keep.txt").write_text("# subset\nemu\ncat\n")
    o = opts(res=24, class_list=str(tmp_path / "keep.txt"), train_per_class=2, val_per_class=1)
    prepare("imagefolder", tmp_path / "d", tmp_path / "out", o, progress=False)
    m = manifest(tmp_path / "out")
    assert m["classes"]["ids"] == ["emu", "cat"]  # the file's order gives the labels
    assert m["splits"]["train"]["per_class"] == [2, 2] and m["splits"]["val"]["per_class"] == [1, 1]
    images, labels = read_beton(tmp_path / "out" / "val.beton")
    assert labels.tolist() == [1, 0]  # source order: cat (label 1) before emu (label 0)


def test_synthetic_is_deterministic_and_learnable(tmp_path):
    o = opts(classes="4", train_per_class=30, val_per_class=10, res=16, seed=3)
    prepare("synthetic", None, tmp_path / "a", o, progress=False)
    prepare("synthetic", None, tmp_path / "b", o, progress=False)
    assert manifest(tmp_path / "a")["hash"] == manifest(tmp_path / "b")["hash"]
    assert manifest(tmp_path / "a")["splits"]["train"]["per_class"] == [30] * 4
    # a nearest-class-mean classifier fitted on train beats chance (25%) clearly on val
    tr, trl = read_beton(tmp_path / "a" / "train.beton")
    va, val = read_beton(tmp_path / "a" / "val.beton")
    feats = lambda ims: np.stack([im.reshape(-1, 3).mean(0) for im in ims])  # noqa: E731
    centres = np.stack([feats(tr)[trl == c].mean(0) for c in range(4)])
    pred = np.argmin(((feats(va)[:, None] - centres[None]) ** 2).sum(-1), axis=1)
    assert (pred == val).mean() > 0.7
    other = generate(4, 30, 16, np.random.default_rng([4, 0]))  # another seed, other images
    assert not np.array_equal(other.images, generate(4, 30, 16, np.random.default_rng([3, 0])).images)

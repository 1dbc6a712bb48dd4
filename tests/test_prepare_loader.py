"""Betons written by prepare-data read back through FFCV's own Loader: counts, labels and pixels."""

from __future__ import annotations

import json

import numpy as np
from conftest_data import class_image, make_fashion, make_tree, opts

from data_prep.prepare import prepare


def load_all(path, batch_size=16):
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor

    loader = Loader(str(path), batch_size=batch_size, num_workers=1, order=OrderOption.SEQUENTIAL, drop_last=False,
                    pipelines={"image": [SimpleRGBImageDecoder(), ToTensor()], "label": [IntDecoder(), ToTensor()]})
    images, labels = zip(*[(x.numpy().copy(), y.numpy().copy()) for x, y in loader])
    return np.concatenate(images), np.concatenate(labels).ravel()


def test_raw_and_jpeg_betons_through_the_loader(tmp_path):
    # raw (<= 64 px): Fashion-MNIST, pixels must come back exactly, grey in all three channels
    data = make_fashion(tmp_path / "fm", n_train=20, n_val=20)
    prepare("fashion-mnist", tmp_path / "fm", tmp_path / "fm_out", opts(), progress=False)
    images, labels = load_all(tmp_path / "fm_out" / "val.beton")
    assert images.shape == (20, 28, 28, 3)
    assert np.array_equal(labels, data["val"][1])
    assert np.array_equal(images, np.repeat(data["val"][0][..., None], 3, axis=3))

    # jpg (> 64 px): an image folder whose class colours must survive the JPEG round trip
    make_tree(tmp_path / "d" / "train", ["a", "b", "c"], per_class=2)
    make_tree(tmp_path / "d" / "val", ["a", "b", "c"], per_class=2)
    prepare("imagefolder", tmp_path / "d", tmp_path / "d_out", opts(res=80), progress=False)
    manifest = json.loads((tmp_path / "d_out" / "manifest.json").read_text())
    assert manifest["settings"]["write_mode"] == "jpg"
    images, labels = load_all(tmp_path / "d_out" / "val.beton", batch_size=4)
    assert images.shape == (6, 80, 80, 3) and labels.tolist() == [0, 0, 1, 1, 2, 2]
    for im, lab in zip(images, labels):
        want = np.asarray(class_image(int(lab)))[0, 0].astype(float)
        assert np.abs(im.reshape(-1, 3).mean(0) - want).max() < 3
    images, labels = load_all(tmp_path / "d_out" / "train.beton", batch_size=4)
    assert len(images) == manifest["splits"]["train"]["count"] == 6
    assert np.bincount(labels).tolist() == manifest["splits"]["train"]["per_class"] == [2, 2, 2]

"""The nvjpeg backend on the CPU (the same code decodes with libjpeg-turbo when there is no GPU): same batches as
the torch backend (with and without the mean image), the batched crop against a per-image reference, and a run
through `fit`.

JPEG tolerance: the other backends decode with libjpeg-turbo's fast integer IDCT (as FFCV does); this one with
torchvision's decoder (the accurate IDCT on the CPU, nvJPEG's on a GPU). On these 64 px synthetic images at
quality 90 the two differ by about one level on average and by at most 5; the test allows a mean of 1.5 levels
and a maximum of 8. Raw betons have no decoder in the way and must agree exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from repro.config import RunConfig, apply_overrides
from repro.data import make_loaders, pick_backend
from repro.data.crops import crop_window, draw_words, flip_bit, mean_image_crops, train_crops
from repro.data.nvjpeg_loader import gather_crops

JPEG_MEAN_TOL, JPEG_MAX_TOL = 1.5, 8.0
CROP = 56


def prepare_small(folder, write_mode: str):
    pytest.importorskip("ffcv")  # the betons are written with FFCV's writer
    from data_prep.prepare import PrepareOptions, prepare

    prepare("synthetic", None, folder, PrepareOptions(res=64, classes="4", train_per_class=12, val_per_class=4,
                                                      write_mode=write_mode, workers=1), progress=False)
    return folder


@pytest.fixture(scope="module")
def jpg_dir(tmp_path_factory):
    return prepare_small(tmp_path_factory.mktemp("nvjpeg-jpg"), "jpg")


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory):
    return prepare_small(tmp_path_factory.mktemp("nvjpeg-raw"), "raw")


def loaders(folder, backend: str, **overrides):
    base = {"data.dir": str(folder), "model.input_size": CROP, "train.batch_size": 8, "data.workers": 1,
            "data.backend": backend, "train.seed": 5}
    return make_loaders(apply_overrides(RunConfig(), {**base, **overrides}), device="cpu")


def everything(ld) -> list[torch.Tensor]:
    """Train images and labels of epochs 0 and 1, then val images and labels."""
    out = []
    for epoch in (0, 1):
        ld.set_epoch(epoch)
        xs, ys = zip(*[(x.clone(), y.clone()) for x, y in ld.train])
        out += [torch.cat(xs), torch.cat(ys)]
    xs, ys = zip(*[(x.clone(), y.clone()) for x, y in ld.val])
    return out + [torch.cat(xs), torch.cat(ys)]


@pytest.mark.parametrize("normalize", ["mean-image", "mean"])
def test_raw_beton_batches_equal_the_torch_backend(raw_dir, normalize):
    """uint8 batches ("mean": the engine's transform subtracts it), or float32 minus the mean image's window at
    each crop, mirrored with it ("mean-image", the paper's recipe): the same values to the bit."""
    ours = loaders(raw_dir, "nvjpeg", **{"data.normalize": normalize})
    theirs = loaders(raw_dir, "torch", **{"data.normalize": normalize})
    assert ours.backend == "nvjpeg" and len(ours.train) == len(theirs.train) == 48 // 8
    assert (everything(ours)[0].dtype == torch.uint8) == (normalize == "mean")
    for a, b in zip(everything(ours), everything(theirs)):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_jpg_beton_within_the_decoders_tolerance(jpg_dir):
    ours, theirs = everything(loaders(jpg_dir, "nvjpeg")), everything(loaders(jpg_dir, "torch"))
    for k in (1, 3, 5):  # labels: same order
        assert torch.equal(ours[k], theirs[k])
    for k in (0, 2, 4):
        assert ours[k].shape == theirs[k].shape
        diff = (ours[k].float() - theirs[k].float()).abs()
        assert diff.mean() <= JPEG_MEAN_TOL and diff.max() <= JPEG_MAX_TOL
    # the crops are in the right place: a window one pixel off is much further away than the decoders are apart
    shifted = (ours[0][..., 1:].float() - theirs[0][..., :-1].float()).abs().mean()
    assert shifted > 2 * (ours[0].float() - theirs[0].float()).abs().mean()


def test_gather_crops_matches_slicing_image_by_image():
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (6, 20, 24, 3), dtype=np.uint8))
    boxes = torch.tensor([[0, 0, 8], [12, 16, 8], [3, 5, 8], [7, 1, 8], [12, 0, 8], [0, 16, 8]])
    flips = torch.tensor([False, True, True, False, True, False])
    out = gather_crops(images, boxes, flips, 8)
    assert out.shape == (6, 3, 8, 8) and out.is_contiguous()
    for i, ((top, left, _), flipped) in enumerate(zip(boxes.tolist(), flips.tolist())):
        window = images[i, top:top + 8, left:left + 8].numpy().transpose(2, 0, 1)
        np.testing.assert_array_equal(out[i].numpy(), window[:, :, ::-1] if flipped else window)


def test_one_call_gives_a_batchs_crops_and_mean_image_windows_as_every_backend_draws_them():
    ids = np.array([5, 17, 2, 9], dtype=np.uint64)
    key = np.array([3, 4], dtype=np.uint64)
    size = np.full(4, 64, dtype=np.int64)
    table = train_crops(ids, key, size, size, 56, 64, True)
    words = draw_words(ids, key)
    assert table[:, :3].tolist() == [list(crop_window(w, 64, 64, 56, 64)) for w in words]
    assert table[:, 7].tolist() == [int(flip_bit(w)) for w in words]
    # columns 3-7 are the FFCV backend's mean-image windows
    np.testing.assert_array_equal(table[:, 3:], mean_image_crops(ids, key, size, size, 56, 64, True))
    assert not train_crops(ids, key, size, size, 56, 64, False)[:, 7].any()


def test_auto_picks_nvjpeg_on_cuda_only():
    assert pick_backend("auto", "cuda") == "nvjpeg"
    assert pick_backend("auto", "cpu") in ("ffcv", "torch")
    assert pick_backend("nvjpeg", "cpu") == "nvjpeg"


def test_stopping_early_ends_the_reader_thread(jpg_dir):
    import threading

    def reading() -> bool:
        return any(t.name == "nvjpeg-reader" and t.is_alive() for t in threading.enumerate())

    ld = loaders(jpg_dir, "nvjpeg")
    for _ in zip(range(1), ld.train):
        assert reading()  # 6 batches, one taken: the reader is still at work
    assert not reading()


def test_fit_records_the_backend_and_scores_ten_crops(tmp_path, jpg_dir):
    from repro.engine import fit

    torch.set_num_threads(1)
    cfg = apply_overrides(RunConfig(), {
        "data.dir": str(jpg_dir), "data.backend": "nvjpeg", "data.workers": 1, "model.name": "cifar4",
        "model.num_classes": 4, "model.input_size": CROP, "train.epochs": 1, "train.batch_size": 8,
        "train.device": "cpu", "train.schedule": "constant", "train.ten_crop": True})
    record = fit(cfg, tmp_path / "run", progress=False)
    assert record.status == "done", record.error
    assert record.provenance["data_backend"] == "nvjpeg"
    assert 0 <= record.metrics["top1_err_10crop"] <= 100


def test_the_reader_reuses_its_host_buffers(jpg_dir, raw_dir):
    """18 batches over three epochs through SLOTS host buffers per kind, allocated in the first epoch and never
    again; the batches handed over never share memory with them (kept without a copy, they still equal the torch
    backend's once the reader has filled every buffer again)."""
    from repro.data.nvjpeg_loader import SLOTS

    for folder in (jpg_dir, raw_dir):
        over = {"data.normalize": "mean"}
        ours, theirs = loaders(folder, "nvjpeg", **over), loaders(folder, "torch", **over)
        ring = ours.train.make.ring
        kept, counts = [], []
        for epoch in range(3):
            ours.set_epoch(epoch)
            kept += list(ours.train)  # no copy
            counts.append(ring.allocations)
        assert counts == [3 * SLOTS] * 3 and len(kept) == 18 > SLOTS  # labels, bytes and crop windows
        want = []
        for epoch in range(3):
            theirs.set_epoch(epoch)
            want += [(x.clone(), y.clone()) for x, y in theirs.train]
        if folder == raw_dir:
            assert all(torch.equal(a, b) for (x, y), (u, v) in zip(kept, want) for a, b in ((x, u), (y, v)))
        else:
            assert all(torch.equal(y, v) and (x.float() - u.float()).abs().max() <= JPEG_MAX_TOL
                       for (x, y), (u, v) in zip(kept, want))


def test_reading_ahead_into_the_next_epoch_changes_no_batch(raw_dir):
    """The reader goes on into the next epoch; a pass that is not that one (a resume inside an epoch, an epoch
    skipped) starts afresh. Every pass equals the torch backend's."""
    ours, theirs = loaders(raw_dir, "nvjpeg"), loaders(raw_dir, "torch")
    for epoch, first in [(0, 0), (1, 0), (1, 4), (3, 0), (4, 6), (5, 0)]:
        got = []
        for ld in (ours, theirs):
            ld.set_epoch(epoch, first_batch=first)
            got.append([(x.clone(), y.clone()) for x, y in ld.train])
        assert len(got[0]) == len(got[1]) == 6 - first
        assert all(torch.equal(a, b) for (x, y), (u, v) in zip(*got) for a, b in ((x, u), (y, v))), (epoch, first)


def test_one_call_draws_a_batch_as_the_per_image_functions():
    from repro.data.crops import mean_image_crops, train_crops

    rng = np.random.default_rng(4)
    ids, key = rng.integers(0, 10**9, 300).astype(np.uint64), np.array([11, 12], dtype=np.uint64)
    for heights, widths in ((np.full(300, 64), np.full(300, 64)), (rng.integers(40, 90, 300),
                                                                    rng.integers(40, 90, 300))):
        table = train_crops(ids, key, heights, widths, 56, 64, True)
        words = draw_words(ids, key)
        assert table[:, :3].tolist() == [list(crop_window(w, int(h), int(v), 56, 64))
                                         for w, h, v in zip(words, heights, widths)]
        np.testing.assert_array_equal(table[:, 3:], mean_image_crops(ids, key, heights, widths, 56, 64, True))
        assert table[:, 7].tolist() == [int(flip_bit(w)) for w in words]
        assert not train_crops(ids, key, heights, widths, 56, 64, False)[:, 7].any()


def test_variable_size_images_equal_the_torch_backend(tmp_path):
    """--max-side data (each image its own size): windows resized to the crop, val images the centre square at
    res; raw pixels, so both backends give the same values to the bit."""
    import json

    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    rng = np.random.default_rng(2)
    shapes = [(48, 72), (72, 48), (60, 60), (96, 48)] * 4
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]
    labels = np.arange(len(images)) % 4

    class Items:
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            return images[i], int(labels[i])

    splits = {}
    for name in ("train", "val"):
        path = tmp_path / f"{name}.beton"
        DatasetWriter(str(path), {"image": RGBImageField(write_mode="raw"), "label": IntField()},
                      num_workers=1).from_indexed_dataset(Items())
        splits[name] = {"file": path.name, "count": len(images), "bytes": path.stat().st_size}
    manifest = {"format": 1, "source": "synthetic", "settings": {"res": 48, "max_side": True},
                "image": {"height": 96, "width": 72, "fixed_size": False}, "classes": {}, "splits": splits,
                "mean": [0, 0, 0], "std": [1, 1, 1], "pca": {"eigval": [0, 0, 0], "eigvec": np.eye(3).tolist()},
                "hash": "0" * 16}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    over = {"model.input_size": 40, "data.normalize": "mean"}
    ours, theirs = everything(loaders(tmp_path, "nvjpeg", **over)), everything(loaders(tmp_path, "torch", **over))
    assert ours[0].shape == (16, 3, 40, 40) and ours[4].shape == (16, 3, 48, 48)
    for a, b in zip(ours, theirs):
        assert a.dtype == b.dtype and torch.equal(a, b)

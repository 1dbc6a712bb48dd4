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
from repro.data.crops import crop_window, draw_words, flip_bit
from repro.data.nvjpeg_loader import crop_boxes, gather_crops

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


def test_crop_boxes_are_the_shared_draws():
    ids = np.array([5, 17, 2, 9], dtype=np.uint64)
    key = np.array([3, 4], dtype=np.uint64)
    boxes, flips = crop_boxes(ids, key, np.full(4, 64), np.full(4, 64), 56, 64, flip=True)
    words = draw_words(ids, key)
    assert boxes.tolist() == [list(crop_window(w, 64, 64, 56, 64)) for w in words]
    assert flips.tolist() == [bool(flip_bit(w)) for w in words]
    assert not crop_boxes(ids, key, np.full(4, 64), np.full(4, 64), 56, 64, flip=False)[1].any()


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

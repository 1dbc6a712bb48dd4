"""repro.data.augment: PCA lighting and mean subtraction (per channel, mean image) against numpy, crops against slicing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from repro.config import RunConfig, apply_overrides
from repro.data.augment import BatchTransform, center_crop, subtract_mean_image, ten_crop


def manifest_from(pixels: np.ndarray) -> dict:
    """mean/std on 0..255 and the PCA of the [0, 1] RGB covariance, as prepare-data records them."""
    flat = pixels.reshape(-1, 3).astype(np.float64)
    eigval, eigvec = np.linalg.eigh(np.cov(flat / 255.0, rowvar=False))
    return {"mean": flat.mean(0).tolist(), "std": flat.std(0).tolist(),
            "pca": {"eigval": eigval[::-1].tolist(), "eigvec": eigvec[:, ::-1].tolist()}}


@pytest.fixture
def batch():
    rng = np.random.default_rng(0)
    direction = np.array([0.8, 0.5, 0.3])  # correlated channels so that the PCA is not trivial
    pixels = np.clip(120 + 60 * rng.normal(0, 1, (5, 8, 8, 1)) * direction + 10 * rng.normal(0, 1, (5, 8, 8, 3)),
                     0, 255).astype(np.uint8)
    return pixels, manifest_from(pixels)


def cfg(**overrides) -> RunConfig:
    return apply_overrides(RunConfig(), {"data.normalize": "mean", **overrides})


def test_pca_lighting_matches_numpy(batch):
    pixels, manifest = batch
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2)
    alpha = np.random.default_rng(1).normal(0, 0.1, (5, 3))
    out = BatchTransform(manifest, cfg(**{"data.pca_lighting": 0.1}), train=True)(images,
                                                                                  torch.tensor(alpha).float())
    # paper 4.1: add [p1 p2 p3][a1 l1, a2 l2, a3 l3]^T to every pixel (on [0, 1], times 255 here), then - mean
    vec, val = np.array(manifest["pca"]["eigvec"]), np.array(manifest["pca"]["eigval"])
    expected = pixels.astype(np.float64).copy()
    for i in range(5):
        expected[i] += 255.0 * vec @ (alpha[i] * val)
    expected -= np.array(manifest["mean"])
    np.testing.assert_allclose(out.permute(0, 2, 3, 1).numpy(), expected, rtol=0, atol=1e-3)


def test_lighting_draws_per_image_and_scales_with_sigma(batch):
    pixels, manifest = batch
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2)
    transform = BatchTransform(manifest, cfg(**{"data.pca_lighting": 0.1}), train=True)
    torch.manual_seed(0)
    offsets = transform(images) - BatchTransform(manifest, cfg(), train=False)(images)
    # one offset per image and channel, constant over the pixels, different between images
    per_image = offsets[:, :, 0, 0]
    assert torch.allclose(offsets, per_image[:, :, None, None].expand_as(offsets), atol=1e-4)
    assert (per_image[0] - per_image[1]).abs().max() > 1e-3
    # the offset lies in the span of eigvec * eigval with alpha of the right size: recover alpha by solving
    vec, val = np.array(manifest["pca"]["eigvec"]), np.array(manifest["pca"]["eigval"])
    alpha = np.linalg.solve(vec * val, per_image.double().numpy().T / 255.0).T
    assert np.abs(alpha).max() < 0.6 and np.abs(alpha).max() > 0.01  # N(0, 0.1) draws


def test_lighting_off_and_mean_std(batch):
    pixels, manifest = batch
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2)
    mean, std = np.array(manifest["mean"]), np.array(manifest["std"])
    off = BatchTransform(manifest, cfg(**{"data.pca_lighting": 0.0}), train=True)(images)
    np.testing.assert_allclose(off.permute(0, 2, 3, 1).numpy(), pixels - mean, atol=1e-4)
    assert abs(float(off.mean())) < 1e-3  # the manifest mean is the mean of these pixels
    val = BatchTransform(manifest, cfg(**{"data.normalize": "mean-std"}), train=False)(images)
    np.testing.assert_allclose(val.permute(0, 2, 3, 1).numpy(), (pixels - mean) / std, atol=1e-4)
    assert val.dtype == torch.float32


def test_center_crop_and_ten_crop():
    x = torch.arange(2 * 3 * 9 * 11, dtype=torch.float32).view(2, 3, 9, 11)
    s = 5
    c = center_crop(x, s)
    assert torch.equal(c, x[:, :, 2:7, 3:8])
    crops = ten_crop(x, s)
    assert crops.shape == (10, 2, 3, s, s)
    corners = [x[..., :s, :s], x[..., :s, -s:], x[..., -s:, :s], x[..., -s:, -s:], c]
    for k, expected in enumerate(corners):
        assert torch.equal(crops[k], expected)
    mirrored = x.flip(-1)
    mirrored_views = [mirrored[..., :s, :s], mirrored[..., :s, -s:], mirrored[..., -s:, :s],
                      mirrored[..., -s:, -s:], mirrored[..., 2:7, 3:8]]
    for k, expected in enumerate(mirrored_views):
        assert torch.equal(crops[5 + k], expected)
    # the mirrored top-left crop is the flipped top-right crop of the original
    assert torch.equal(crops[5], torch.flip(crops[1], dims=[-1]))


@pytest.mark.parametrize("gather", [False, True])  # the CPU's slices, the GPU's one gather
def test_subtract_mean_image_cuts_and_flips_as_the_crop(gather):
    """Known 2x2 crops of a known 4x5 mean image: image 0 at (1, 2) unflipped, image 1 at (0, 0) flipped."""
    mean = np.arange(3 * 4 * 5, dtype=np.float32).reshape(3, 4, 5)  # (C, H, W)
    images = np.full((2, 3, 2, 2), 100.0, dtype=np.float32)
    out = subtract_mean_image(torch.from_numpy(images), torch.from_numpy(mean),
                              torch.tensor([[1, 2, 2, 2], [0, 0, 2, 2]]), torch.tensor([False, True]), 2, gather)
    want = images.copy()
    want[0] -= mean[:, 1:3, 2:4]
    want[1] -= mean[:, 0:2, 0:2][:, :, ::-1]
    np.testing.assert_array_equal(out.numpy(), want)
    # by hand, channel 0: rows 1-2, columns 2-3 of [[0..4], [5..9], ...] are 7 8 / 12 13; image 1 mirrored: 1 0 / 6 5
    np.testing.assert_array_equal(out[0, 0].numpy(), [[93, 92], [88, 87]])
    np.testing.assert_array_equal(out[1, 0].numpy(), [[99, 100], [94, 95]])
    assert (images == 100).all()  # the input batch is left as it was


def test_subtract_mean_image_slices_equal_the_gather_on_random_crops():
    gen = torch.Generator().manual_seed(3)
    mean = torch.rand(3, 32, 40, generator=gen) * 255
    images = torch.rand(16, 3, 24, 24, generator=gen) * 255
    boxes = torch.stack([torch.randint(0, 9, (16,), generator=gen), torch.randint(0, 17, (16,), generator=gen),
                         torch.full((16,), 24), torch.full((16,), 24)], dim=1)
    flips = torch.rand(16, generator=gen) < 0.5
    torch.testing.assert_close(subtract_mean_image(images, mean, boxes, flips, 24),
                               subtract_mean_image(images, mean, boxes, flips, 24, gather=True), rtol=0, atol=0)


def test_subtract_mean_image_resizes_windows_of_another_size():
    """Windows of other sizes (aspect-kept data): numpy's slice of the window, mirrored by numpy, then resized by
    torchvision to the crop size; the same-size window in the batch is still exact."""
    mean = np.random.default_rng(0).uniform(0, 255, (3, 7, 7)).astype(np.float32)
    images = torch.zeros(2, 3, 3, 3)
    out = subtract_mean_image(images, torch.from_numpy(mean), torch.tensor([[1, 2, 5, 4], [4, 1, 3, 3]]),
                              torch.tensor([True, False]), 3)
    window = torch.from_numpy(mean[:, 1:6, 2:6][:, :, ::-1].copy())
    want = -TF.resize(window, [3, 3], antialias=True)
    np.testing.assert_allclose(out[0].numpy(), want.numpy(), atol=1e-4)
    np.testing.assert_array_equal(out[1].numpy(), -mean[:, 4:7, 1:4])


def test_mean_image_mode_adds_only_the_lighting(batch):
    """The loaders subtract the mean image; the transform then adds the PCA lighting and nothing else."""
    pixels, manifest = batch
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() - 50.0
    alpha = torch.tensor(np.random.default_rng(1).normal(0, 0.1, (5, 3))).float()
    transform = BatchTransform(manifest, cfg(**{"data.normalize": "mean-image"}), train=True)
    out = transform(images, alpha)
    np.testing.assert_allclose(out.numpy(), (images + transform.lighting(5, images.device, alpha)).numpy(), atol=1e-4)
    np.testing.assert_allclose(BatchTransform(manifest, cfg(**{"data.normalize": "mean-image"}), train=False)(
        images).numpy(), images.numpy())

"""Batch transforms in torch: PCA lighting, mean subtraction (per channel, or the mean image), centre and ten-crop.

Pixels stay on the 0..255 scale as in the paper (section 4.1): lighting adds `eigvec @ (alpha * eigval)`, with the
manifest's eigen-decomposition of the training pixels' RGB covariance (computed on [0, 1] values, hence the
factor 255), then the training set's per-channel mean is subtracted (and, for "mean-std", divided by the std).
The paper's own recipe (section 2, `data.normalize = "mean-image"`) subtracts the mean image instead, cut and
mirrored as each crop was: `subtract_mean_image`, which the loaders call, since they know the crop windows.
"""

from __future__ import annotations

import torch
from torchvision.transforms.v2 import functional as TF

from repro.config import RunConfig
from repro.data.order import rank_world


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device` without making the host wait: a host tensor goes to a GPU with a non-blocking copy from a
    pinned copy of its own. A blocking copy from pageable memory waits for every kernel queued before it (a sync with
    the GPU in the training thread per batch); copying straight from a loader's pinned buffer would race with the
    loader, which rewrites that buffer some batches later (FFCV does) while nothing waits for the copy. torch's
    pinned-memory allocator keeps the private copy until the transfer has run."""
    device = torch.device(device)
    if t.device == device or device.type != "cuda":
        return t.to(device)
    if t.device.type == "cpu":
        t = torch.empty_like(t, pin_memory=True).copy_(t)
    return t.to(device, non_blocking=True)


def subtract_mean_image(images: torch.Tensor, mean_image: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor,
                        out_size: int, gather: bool = False, same_size: bool | None = None) -> torch.Tensor:
    """`images` (N, C, S, S), uint8 or float, as float, minus for each image the window `boxes[i]` = (top, left,
    height, width) of `mean_image` (C, H, W), resized to out_size x out_size when the window is of another size, and
    mirrored left to right where `flips[i]`: the same crop and flip as the image's. Any device; boxes and flips (N,)
    may be on any (host ones go to a GPU without a sync). `same_size`: whether every window is out_size square, when
    the caller knows (else read from `boxes`: a sync when they are on a GPU).
    `gather` takes the GPU's path for same-size windows on a CPU too (tests).
    """
    if same_size is None:  # decided where the boxes are (the loaders draw them on the host)
        same_size = bool(((boxes[:, 2] == out_size) & (boxes[:, 3] == out_size)).all())
    mean = mean_image.to(device=images.device, dtype=torch.promote_types(images.dtype, torch.float32))
    boxes = to_device(boxes, images.device).long()
    flips = to_device(flips, images.device).bool()
    if same_size and (images.device.type != "cpu" or gather):  # one gather for the whole batch
        ar = torch.arange(out_size, device=images.device)
        rows = boxes[:, :1] + ar
        cols = boxes[:, 1:2] + torch.where(flips[:, None], ar.flip(0), ar)
        return images - mean[:, rows[:, :, None], cols[:, None, :]].transpose(0, 1)
    if same_size:
        # On a CPU the gather (an index per pixel) made a 224 px loader 5-8x slower; plain slices, taken from the
        # mirrored mean image for mirrored crops, cost a subtraction. Column `left` of a mirrored crop is column
        # W - left - out_size of the mirrored mean image.
        out = torch.empty_like(images, dtype=mean.dtype)  # the batch's memory layout (channels_last or not)
        mirrored, width = mean.flip(-1), mean.shape[-1]
        for i, ((top, left, _, _), flip) in enumerate(zip(boxes.tolist(), flips.tolist())):
            source, left = (mirrored, width - left - out_size) if flip else (mean, left)
            torch.sub(images[i], source[:, top:top + out_size, left:left + out_size], out=out[i])
        return out
    windows = []
    for (top, left, height, width), flip in zip(boxes.tolist(), flips.tolist()):
        window = TF.resize(mean[:, top:top + height, left:left + width], [out_size, out_size], antialias=True)
        windows.append(TF.horizontal_flip(window) if flip else window)
    return images - torch.stack(windows)


def subtract_loader_mean(images: torch.Tensor, mean_image: torch.Tensor, crops: torch.Tensor | None,
                         out_size: int) -> torch.Tensor:
    """What the loaders yield for "mean-image": float32 images minus the mean image (C, H, W), cut by `crops`
    (N, 5) = (top, left, height, width, flip) for train crops, or whole for stored-size images (crops None).
    Host crops go to a GPU in one non-blocking copy."""
    if crops is None:
        return images.float() - mean_image.to(images.device)
    # the mean image's windows are crop-sized by construction (repro.data.crops.mean_image_box); checked on the
    # host, where the loaders draw them, so that a GPU's copy is never read back
    same_size = bool((crops[:, 2:4] == out_size).all()) if crops.device.type == "cpu" else None
    crops = to_device(crops, images.device)
    return subtract_mean_image(images, mean_image, crops[:, :4], crops[:, 4], out_size, same_size=same_size)


class BatchTransform:
    """Loader batch -> float32 batch ready for the model; PCA lighting only when `train` and sigma > 0.

    With `data.normalize = "mean-image"` the loaders have already subtracted the mean image (they know each
    crop's window), so only the lighting is added here."""

    def __init__(self, manifest: dict, cfg: RunConfig, train: bool):
        self.sigma = cfg.data.pca_lighting if train else 0.0
        mean = [0.0, 0.0, 0.0] if cfg.data.normalize == "mean-image" else manifest["mean"]
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = manifest["std"] if cfg.data.normalize == "mean-std" else [1.0, 1.0, 1.0]
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.eigval = torch.tensor(manifest["pca"]["eigval"], dtype=torch.float32)
        self.eigvec = torch.tensor(manifest["pca"]["eigvec"], dtype=torch.float32)  # columns are eigenvectors
        self.channels_last = cfg.train.channels_last
        self.rank, self.world = rank_world()

    def lighting(self, n: int, device: torch.device, alpha: torch.Tensor | None = None) -> torch.Tensor:
        """Per-image RGB offsets (n, 3, 1, 1) on the 0..255 scale; `alpha` (n, 3) ~ N(0, sigma) unless given, drawn
        for the whole global batch and cut to this process's share (as dropout: the same at any world size)."""
        if alpha is None:
            alpha = torch.randn(n * self.world, 3, device=device)[self.rank * n:(self.rank + 1) * n] * self.sigma
        offset = (alpha.to(device) * self.eigval.to(device)) @ self.eigvec.to(device).T  # row i: V @ (a_i * l)
        return (offset * 255.0).view(n, 3, 1, 1)

    def __call__(self, images: torch.Tensor, alpha: torch.Tensor | None = None) -> torch.Tensor:
        """`alpha` (N, 3) replaces the random lighting draws (tests); lighting applies when given."""
        x = images.float()
        device = x.device
        if self.mean.device != device:  # move the constants once, not per batch (and without a sync)
            self.mean, self.std = to_device(self.mean, device), to_device(self.std, device)
            self.eigval, self.eigvec = to_device(self.eigval, device), to_device(self.eigvec, device)
        if self.sigma > 0 or alpha is not None:
            x = x + self.lighting(x.shape[0], device, alpha)
        x = (x - self.mean) / self.std
        if self.channels_last:  # the engine's models are channels_last on every device
            x = x.contiguous(memory_format=torch.channels_last)
        return x


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """The central size x size window of an (N, C, H, W) batch (the paper's single-crop test)."""
    return TF.center_crop(x, [size, size])


def ten_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """(10, N, C, size, size): the 4 corners and the centre, then the same five of the mirrored image (section 4.1)."""
    return torch.stack(TF.ten_crop(x, [size, size]))

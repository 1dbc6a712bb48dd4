"""The torchvision fallback: the same beton files, order, crops and flips as the FFCV loader, through a DataLoader.

Used where FFCV is not installed (`data.backend = "torch"` or "auto"). It never imports FFCV. Each DataLoader item
is a whole batch: the sampler (repro.data.order.BatchOrder) yields the epoch's crop key and the batch's sample ids in
the order every backend uses, and the dataset cuts the crops drawn by `repro.data.crops` from them, so all backends
produce the same batches. On a GPU the DataLoader pins each batch (images, labels and crop windows), which then go
over without blocking the training thread.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import functional as TF

from repro.data.augment import subtract_loader_mean
from repro.data.beton import BetonReader
from repro.data.crops import crop_window, draw_words, flip_bit, mean_image_crops
from repro.data.order import BatchOrder


class BetonBatches(Dataset):
    """`dataset[list of sample ids]` -> (uint8 images (N, 3, S, S), int64 labels (N,)) for one batch."""

    def __init__(self, path: str, *, train: bool, crop: int, res: int, fixed_size: bool, flip: bool):
        self.path, self.train, self.crop, self.res, self.fixed_size, self.flip = path, train, crop, res, fixed_size, flip
        self.reader = None  # opened lazily, once per worker process
        self.sizes = None  # (heights, widths) of every stored image, read once

    def __getitem__(self, item):
        """`item`: a batch's sample ids (evaluation), or (the epoch's crop key, sample ids) (training)."""
        if self.reader is None:
            self.reader = BetonReader(self.path)
        key, batch_indices = item if self.train else (None, item)
        ids = np.asarray(batch_indices, dtype=np.uint64)
        labels = torch.from_numpy(self.reader.labels[ids.astype(np.int64)])
        if not self.train:
            return torch.stack([self._eval_image(int(i)) for i in ids]), labels
        key = np.asarray(key, dtype=np.uint64)
        words = draw_words(ids, key)
        images = torch.stack([self._train_image(int(i), w) for i, w in zip(ids, words)])
        if self.sizes is None:
            self.sizes = self.reader.sizes()
        heights, widths = (a[ids.astype(np.int64)] for a in self.sizes)
        crops = mean_image_crops(ids, key, heights, widths, self.crop, self.res, self.flip)
        return images, labels, torch.from_numpy(crops)

    def _train_image(self, i: int, words: np.ndarray) -> torch.Tensor:
        image = self.reader.image(i)
        top, left, side = crop_window(words, image.shape[1], image.shape[2], self.crop, self.res)
        out = image[:, top:top + side, left:left + side]
        if side != self.crop:  # variable-size data: the window is scaled to the crop size
            out = TF.resize(out, [self.crop, self.crop], antialias=True)
        if self.flip and flip_bit(words):
            out = TF.horizontal_flip(out)
        return out.contiguous()

    def _eval_image(self, i: int) -> torch.Tensor:
        image = self.reader.image(i)
        if self.fixed_size:
            return image
        short = min(image.shape[1:])  # as FFCV's CenterCropRGBImageDecoder(ratio=1): centre square, then resize
        return TF.resize(TF.center_crop(image, [short, short]), [self.res, self.res], antialias=True)


class TorchBatches:
    """Batches `(images uint8 NCHW, labels int64 (N,))` on `device`; `set_epoch` picks the epoch (its order and crops)."""

    def __init__(self, dataset: BetonBatches, order: BatchOrder, *, workers: int, device: torch.device,
                 mean_image: torch.Tensor | None = None):
        self.order, self.device, self.crop = order, device, dataset.crop
        self.mean_image = None if mean_image is None else mean_image.to(device)
        self.loader = DataLoader(dataset, batch_size=None, sampler=order, num_workers=workers,
                                 pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                                 prefetch_factor=4 if workers > 0 else None)

    def __len__(self) -> int:
        return len(self.order)

    def set_epoch(self, epoch: int, first_batch: int = 0) -> None:
        self.order.epoch, self.order.first_batch = epoch, first_batch

    def __iter__(self):
        batches = iter(self.loader)  # the sampler's order is fixed here, before the epoch moves on
        self.order.epoch, self.order.first_batch = self.order.epoch + 1, 0
        for images, labels, *crops in batches:
            images = images.to(self.device, non_blocking=True)
            if self.mean_image is not None:
                images = subtract_loader_mean(images, self.mean_image, crops[0] if crops else None, self.crop)
            yield images, labels.to(self.device, non_blocking=True)


def make_torch_batches(path: str, *, indices: np.ndarray, batch_size: int, train: bool, crop: int, res: int,
                       fixed_size: bool, flip: bool, seed: int, workers: int, device: torch.device,
                       distributed: bool, mean_image: torch.Tensor | None = None) -> TorchBatches:
    """Same arguments and batches as `make_ffcv_batches` (`workers`: DataLoader processes, 0 = none)."""
    dataset = BetonBatches(str(path), train=train, crop=crop, res=res, fixed_size=fixed_size, flip=flip)
    order = BatchOrder(indices, batch_size, train=train, seed=seed, distributed=distributed)
    return TorchBatches(dataset, order, workers=workers, device=device,
                        mean_image=mean_image)

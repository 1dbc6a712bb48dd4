"""The GPU JPEG backend (`data.backend = "nvjpeg"`): the same betons, order, crops and flips, decoded on the device.

A background thread reads each batch's bytes from the beton (repro.data.beton's numpy reader, no FFCV), decodes the
whole batch with `torchvision.io.decode_jpeg(list, device=...)` (nvJPEG's batched decoder on CUDA; libjpeg-turbo
on the CPU, so CI runs the same code) and cuts every image's crop with one gather over the batch, while the main
thread trains on the previous batch. Raw betons skip the decode: their pixels are stacked and copied over.

Crops and flips are drawn exactly as by the other backends (`repro.data.crops`, from the epoch's crop key and each
sample's id, in the order of `repro.data.order.BatchOrder`), so positions are identical; pixels differ from the FFCV/torch backends
only by the JPEG decoders' IDCTs (libjpeg-turbo's fast integer DCT there, the accurate one or nvJPEG's here), a
few levels (tests/test_nvjpeg.py states the tolerance). With `data.normalize = "mean-image"` the mean image's
window at each crop (mirrored where the crop is) is subtracted on the device, as the other backends do.
"""

from __future__ import annotations

import contextlib
import queue
import threading

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as TF

from repro.data.augment import subtract_loader_mean
from repro.data.beton import JPG, BetonReader
from repro.data.crops import crop_window, draw_words, flip_bit, mean_image_crops
from repro.data.order import BatchOrder

PREFETCH = 3  # batches decoded ahead of the training step


def crop_boxes(ids: np.ndarray, key: np.ndarray, heights: np.ndarray, widths: np.ndarray, crop: int, res: int,
               flip: bool) -> tuple[np.ndarray, np.ndarray]:
    """(N, 3) int64 (top, left, side) and (N,) bool flips for one training batch, drawn as every backend draws."""
    words = draw_words(np.asarray(ids, dtype=np.uint64), np.asarray(key, dtype=np.uint64))
    boxes = np.array([crop_window(w, int(h), int(wd), crop, res) for w, h, wd in zip(words, heights, widths)],
                     dtype=np.int64).reshape(-1, 3)
    flips = np.array([flip and bool(flip_bit(w)) for w in words], dtype=bool)
    return boxes, flips


def gather_crops(images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, crop: int) -> torch.Tensor:
    """Equal-sized windows of a batch in one gather: images (N, H, W, C), boxes (N, 3) with side == crop, flips (N,)
    -> (N, C, crop, crop), each window mirrored left-right where its flip is set."""
    n, device = images.shape[0], images.device
    steps = torch.arange(crop, device=device)
    rows = boxes[:, :1] + steps                                   # (N, crop)
    cols = boxes[:, 1:2] + torch.where(flips[:, None], crop - 1 - steps, steps)
    batch = torch.arange(n, device=device)[:, None, None]
    return images[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


def resized_crops(images: list[torch.Tensor], boxes: torch.Tensor, flips: torch.Tensor, crop: int) -> torch.Tensor:
    """Variable-size data: each (C, H, W) image's window scaled to crop x crop, one image at a time."""
    out = []
    for image, (top, left, side), flipped in zip(images, boxes.tolist(), flips.tolist()):
        window = TF.resize(image[:, top:top + side, left:left + side], [crop, crop], antialias=True)
        out.append(TF.horizontal_flip(window) if flipped else window)
    return torch.stack(out)


class NvjpegBatches:
    """Batches `(images NCHW, labels int64 (N,))` on `device`, decoded there: uint8, or float32 minus the mean image
    when one is given (as the other backends); `set_epoch` as the others."""

    def __init__(self, path: str, order: BatchOrder, *, train: bool, crop: int, res: int, fixed_size: bool,
                 flip: bool, device: torch.device, mean_image: torch.Tensor | None = None):
        self.reader = BetonReader(path)
        self.order, self.train, self.crop, self.res = order, train, crop, res
        self.fixed_size, self.flip, self.device = fixed_size, flip, device
        self.mean_image = None if mean_image is None else mean_image.to(device)
        self.heights, self.widths = self.reader.sizes()

    def __len__(self) -> int:
        return len(self.order)

    def set_epoch(self, epoch: int, first_batch: int = 0) -> None:
        self.order.epoch, self.order.first_batch = epoch, first_batch

    def _images(self, ids: np.ndarray) -> list[torch.Tensor] | torch.Tensor:
        """The batch's stored images on the device: a stacked (N, H, W, 3) uint8 tensor where every image has one
        size, else a list of (3, H, W) tensors."""
        meta = self.reader.images_meta[ids]
        if (meta["mode"] == JPG).any():
            data = [torch.from_numpy(np.array(self.reader.raw_bytes(int(i)))) for i in ids]
            decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
            same = len({tuple(t.shape) for t in decoded}) == 1
            return torch.stack(decoded).permute(0, 2, 3, 1) if same else decoded
        pixels = [np.asarray(self.reader.raw_bytes(int(i))).reshape(int(m["height"]), int(m["width"]), 3)
                  for i, m in zip(ids, meta)]
        if len({p.shape for p in pixels}) == 1:
            host = torch.from_numpy(np.stack(pixels))
            if self.device.type == "cuda":
                host = host.pin_memory()
            return host.to(self.device, non_blocking=True)
        return [torch.from_numpy(p).permute(2, 0, 1).to(self.device) for p in pixels]

    def _batch(self, ids: np.ndarray, key: np.ndarray | None = None):
        """One batch: evaluation images, or training crops drawn with the epoch's crop `key`."""
        images = self._images(ids)
        labels = torch.from_numpy(self.reader.labels[ids.astype(np.int64)]).to(self.device, non_blocking=True)
        if not self.train:
            return self._minus_mean(self._eval(images), ids), labels
        heights, widths = self.heights[ids], self.widths[ids]
        boxes_np, flips_np = crop_boxes(ids, key, heights, widths, self.crop, self.res, self.flip)
        boxes, flips = torch.from_numpy(boxes_np).to(self.device), torch.from_numpy(flips_np).to(self.device)
        if isinstance(images, torch.Tensor) and (boxes_np[:, 2] == self.crop).all():
            crops = gather_crops(images, boxes, flips, self.crop)
        else:
            if isinstance(images, torch.Tensor):
                images = list(images.permute(0, 3, 1, 2))
            crops = resized_crops(images, boxes, flips, self.crop)
        return self._minus_mean(crops, ids, heights, widths, key), labels

    def _minus_mean(self, images: torch.Tensor, ids: np.ndarray, heights=None, widths=None, key=None) -> torch.Tensor:
        """"mean-image": the mean image's window at each train crop (the whole of it for stored-size val images)."""
        if self.mean_image is None:
            return images
        if heights is None:
            return subtract_loader_mean(images, self.mean_image, None, self.crop)
        windows = mean_image_crops(ids.astype(np.uint64), np.asarray(key, dtype=np.uint64), heights, widths, self.crop,
                                   self.res, self.flip)
        return subtract_loader_mean(images, self.mean_image, torch.from_numpy(windows), self.crop)

    def _eval(self, images) -> torch.Tensor:
        if isinstance(images, torch.Tensor) and self.fixed_size:
            return images.permute(0, 3, 1, 2).contiguous()
        if isinstance(images, torch.Tensor):
            images = list(images.permute(0, 3, 1, 2))
        out = []  # as the other backends: the centre square, resized to res
        for image in images:
            short = min(image.shape[1:])
            out.append(TF.resize(TF.center_crop(image, [short, short]), [self.res, self.res], antialias=True))
        return torch.stack(out)

    def __iter__(self):
        batches = list(iter(self.order))  # fixed now: the caller moves the epoch on right after
        self.order.epoch, self.order.first_batch = self.order.epoch + 1, 0
        results: queue.Queue = queue.Queue(maxsize=PREFETCH)
        stop = threading.Event()

        def put(item) -> bool:  # False once the consumer has gone away
            while not stop.is_set():
                try:
                    results.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        on_cuda = self.device.type == "cuda"
        # The reader works on a stream of its own and waits for it before handing a batch over: the consumer then
        # reads finished tensors, and `record_stream` below keeps the allocator from giving their memory back to
        # the reader while the training stream still uses it (without both, a float batch could be overwritten
        # by the next decode: a NaN loss on an H200).
        side = torch.cuda.Stream(self.device) if on_cuda else None

        def produce():
            try:
                with torch.cuda.stream(side) if on_cuda else contextlib.nullcontext():
                    for item in batches:
                        key, ids = item if self.train else (None, item)
                        batch = self._batch(np.asarray(ids, dtype=np.int64), key)
                        if on_cuda:
                            side.synchronize()
                        if not put(("batch", batch)):
                            return
                put(("end", None))
            except BaseException as e:  # handed to the consumer, which raises it
                put(("error", e))

        worker = threading.Thread(target=produce, name="nvjpeg-reader", daemon=True)
        worker.start()
        try:
            while True:
                kind, item = results.get()
                if kind == "end":
                    return
                if kind == "error":
                    raise item
                if on_cuda:
                    for t in item:
                        t.record_stream(torch.cuda.current_stream(self.device))
                yield item
        finally:
            stop.set()
            worker.join()


def make_nvjpeg_batches(path: str, *, indices: np.ndarray, batch_size: int, train: bool, crop: int, res: int,
                        fixed_size: bool, flip: bool, seed: int, workers: int, device: torch.device,
                        distributed: bool, mean_image: torch.Tensor | None = None) -> NvjpegBatches:
    """Same arguments and batches as `make_torch_batches`; `workers` is unused (one reader thread suffices: the
    decode, the costly part, runs on the device)."""
    order = BatchOrder(indices, batch_size, train=train, seed=seed, distributed=distributed)
    return NvjpegBatches(str(path), order, train=train, crop=crop, res=res, fixed_size=fixed_size, flip=flip,
                         device=device, mean_image=mean_image)

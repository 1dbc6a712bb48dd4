"""The GPU JPEG backend (`data.backend = "nvjpeg"`): the same betons, order, crops and flips, decoded on the device.

A background thread of the training process reads each batch's bytes from the beton (repro.data.beton's numpy
reader, no FFCV) into host buffers that it allocates once and reuses (pinned on CUDA, so that copies to the GPU are
asynchronous), decodes the whole batch with `torchvision.io.decode_jpeg(list, device=...)` (nvJPEG's batched
decoder on CUDA; libjpeg-turbo on the CPU, so CI runs the same code) and cuts every image's crop with one gather
over the batch, while the main thread trains on the previous batch. Raw betons skip the decode: their pixels go
over as they are stored. The thread holds the GIL as little as it can: one compiled call (without the GIL) copies
a batch's bytes, one compiled call draws its crops, and the GPU work is queued on a CUDA stream of its own, which
the training stream waits for through an event (the host never waits for the GPU). A training pass goes on into
the next epoch's first batches while the engine scores the last one, so an epoch starts with its batches ready.

Crops and flips are drawn exactly as by the other backends (`repro.data.crops`, from the epoch's crop key and each
sample's id, in the order of `repro.data.order.BatchOrder`), so positions are identical; pixels differ from the
FFCV/torch backends only by the JPEG decoders' IDCTs (libjpeg-turbo's fast integer DCT there, the accurate one or
nvJPEG's here), a few levels (tests/test_nvjpeg.py states the tolerance). With `data.normalize = "mean-image"` the
mean image's window at each crop (mirrored where the crop is) is subtracted on the device, as the other backends do.
"""

from __future__ import annotations

import contextlib
import copy
import queue
import threading
import weakref

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as TF

from repro.data.augment import subtract_loader_mean, subtract_mean_image
from repro.data.beton import JPG, BetonReader
from repro.data.crops import train_crops
from repro.data.order import BatchOrder

PREFETCH = 3  # batches decoded ahead of the training step
SLOTS = PREFETCH + 2  # host buffers: the queued batches, the one being made and the one being handed over

try:  # numba comes with FFCV; without it the copy loop runs in Python, with the same result
    from numba import njit

    _nogil = njit(nogil=True, cache=True)
except ImportError:  # pragma: no cover
    def _nogil(fn):
        return fn


@_nogil
def gather_bytes(data, starts, sizes, out):
    """Copy `data[starts[k]:starts[k] + sizes[k]]` for every k, one after another, into `out`; returns the bytes
    copied. Compiled without the GIL: the training thread runs while a batch's images are copied."""
    pos = 0
    for k in range(len(starts)):
        n = sizes[k]
        out[pos:pos + n] = data[starts[k]:starts[k] + n]
        pos += n
    return pos


def gather_crops(images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, crop: int) -> torch.Tensor:
    """Equal-sized windows of a batch in one gather: images (N, H, W, C), boxes (N, 3) with side == crop, flips (N,)
    -> (N, C, crop, crop), each window mirrored left-right where its flip is set."""
    n, device = images.shape[0], images.device
    steps = torch.arange(crop, device=device)
    rows = boxes[:, :1] + steps                                   # (N, crop)
    cols = boxes[:, 1:2] + torch.where(flips[:, None], crop - 1 - steps, steps)
    batch = torch.arange(n, device=device)[:, None, None]
    return images[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


def resized_crops(images: list[torch.Tensor], boxes, flips, crop: int) -> torch.Tensor:
    """Variable-size data: each (C, H, W) image's window scaled to crop x crop, one image at a time; `boxes` and
    `flips` on the host (read here per image)."""
    out = []
    for image, (top, left, side), flipped in zip(images, boxes.tolist(), flips.tolist()):
        window = TF.resize(image[:, top:top + side, left:left + side], [crop, crop], antialias=True)
        out.append(TF.horizontal_flip(window) if flipped else window)
    return torch.stack(out)


class HostRing:
    """Host buffers for the batches in flight, allocated once and reused: pinned on CUDA. A slot is refilled only
    after the GPU copies that read it have run (the CUDA event recorded after them, batches ago by then)."""

    def __init__(self, pinned: bool, slots: int = SLOTS):
        self.pinned, self.allocations, self.next = pinned, 0, 0
        self.buffers: list[dict[str, torch.Tensor]] = [{} for _ in range(slots)]
        self.events: list = [None] * slots

    def take(self) -> int:
        slot, self.next = self.next, (self.next + 1) % len(self.buffers)
        if self.events[slot] is not None:
            self.events[slot].synchronize()
            self.events[slot] = None
        return slot

    def get(self, slot: int, name: str, count: int, dtype: torch.dtype) -> torch.Tensor:
        """`count` elements of the slot's buffer `name`, grown (with room to spare) when a batch needs more."""
        buf = self.buffers[slot].get(name)
        if buf is None or buf.numel() < count or buf.dtype != dtype:
            buf = torch.empty(count + count // 4, dtype=dtype, pin_memory=self.pinned)
            self.buffers[slot][name] = buf
            self.allocations += 1
        return buf[:count]

    def done(self, slot: int, stream) -> torch.cuda.Event | None:
        """Mark the slot's copies queued on `stream` (None on the CPU, where they are done); returns the event."""
        if stream is None:
            return None
        event = torch.cuda.Event()
        event.record(stream)
        self.events[slot] = event
        return event


class BatchMaker:
    """Makes one batch from its sample ids (and, training, the epoch's crop key), in the reader thread."""

    def __init__(self, reader: BetonReader, *, train: bool, crop: int, res: int, fixed_size: bool, flip: bool,
                 device: torch.device, mean_image: torch.Tensor | None):
        self.train, self.crop, self.res, self.fixed_size, self.flip = train, crop, res, fixed_size, flip
        self.device, self.on_cuda = device, device.type == "cuda"
        self.mean_image = None if mean_image is None else mean_image.to(device)
        meta = reader.images_meta
        self.modes, self.labels = meta["mode"], reader.labels
        self.heights, self.widths = meta["height"].astype(np.int64), meta["width"].astype(np.int64)
        # each sample's bytes in the file, looked up once (BetonReader.raw_bytes does it per image)
        self.starts = meta["data_ptr"].astype(np.int64)
        self.sizes = reader._sizes[np.searchsorted(reader._ptrs, meta["data_ptr"])].astype(np.int64)
        self.data = np.asarray(reader._data)
        self.ring = HostRing(pinned=self.on_cuda)

    def __call__(self, ids: np.ndarray, key) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.cuda.Event | None]:
        """((images, labels), the event after the batch's work on the current stream, None on the CPU)."""
        slot = self.ring.take()
        labels = self._upload(self._fill(slot, "labels", self.labels[ids]))
        images = self._images(slot, ids)
        if self.train:
            table = train_crops(ids.astype(np.uint64), np.asarray(key, dtype=np.uint64), self.heights[ids],
                                self.widths[ids], self.crop, self.res, self.flip)
            out = self._crops(images, table, self._upload(self._fill(slot, "table", table)))
        else:
            out = self._eval(images)
            out = out if self.mean_image is None else subtract_loader_mean(out, self.mean_image, None, self.crop)
        stream = torch.cuda.current_stream(self.device) if self.on_cuda else None
        return (out, labels), self.ring.done(slot, stream)

    def _fill(self, slot: int, name: str, values: np.ndarray) -> torch.Tensor:
        """`values` copied into the slot's host buffer `name`, shaped as they are."""
        values = np.ascontiguousarray(values)
        buf = self.ring.get(slot, name, values.size, torch.from_numpy(values[:0]).dtype)
        buf.numpy()[:] = values.reshape(-1)
        return buf.view(values.shape)

    def _upload(self, host: torch.Tensor) -> torch.Tensor:
        """A slot's host tensor on the device: asynchronous from pinned memory; a copy on the CPU, so that no batch
        handed over shares memory with a buffer the reader fills again."""
        return host.to(self.device, non_blocking=True) if self.on_cuda else host.clone()

    def _images(self, slot: int, ids: np.ndarray) -> list[torch.Tensor] | torch.Tensor:
        """The batch's stored images on the device: a stacked (N, H, W, 3) uint8 tensor where every image has one
        size, else a list of (3, H, W) tensors."""
        sizes = self.sizes[ids]
        buf = self.ring.get(slot, "bytes", int(sizes.sum()), torch.uint8)
        gather_bytes(self.data, self.starts[ids], sizes, buf.numpy())
        parts = buf.split(sizes.tolist())  # views, one per image
        if (self.modes[ids] == JPG).any():
            # torchvision's nvJPEG call has read the bytes and decoded them when it returns
            decoded = decode_jpeg(list(parts), mode=ImageReadMode.RGB, device=self.device)
            same = len({tuple(t.shape) for t in decoded}) == 1
            return torch.stack(decoded).permute(0, 2, 3, 1) if same else decoded
        heights, widths = self.heights[ids], self.widths[ids]
        if (heights == heights[0]).all() and (widths == widths[0]).all():
            return self._upload(buf.view(len(ids), int(heights[0]), int(widths[0]), 3))
        return [self._upload(p.view(int(h), int(w), 3)).permute(2, 0, 1) for p, h, w in zip(parts, heights, widths)]

    def _crops(self, images, table: np.ndarray, on_device: torch.Tensor) -> torch.Tensor:
        """Training crops from the `train_crops` rows (`table` on the host, `on_device` its copy), minus the mean
        image's window at each (mirrored with it) for "mean-image"."""
        flips = on_device[:, 7].bool()
        if isinstance(images, torch.Tensor) and (table[:, 2] == self.crop).all():
            crops = gather_crops(images, on_device[:, :3], flips, self.crop)
        else:
            if isinstance(images, torch.Tensor):
                images = list(images.permute(0, 3, 1, 2))
            crops = resized_crops(images, table[:, :3], table[:, 7].astype(bool), self.crop)
        if self.mean_image is None:
            return crops
        same_size = bool((table[:, 5:7] == self.crop).all())  # read on the host: the device copy is never read back
        return subtract_mean_image(crops, self.mean_image, on_device[:, 3:7], flips, self.crop, same_size=same_size)

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


def _passes(order: BatchOrder, epoch: int, first: int, ahead: bool):
    """("batch", (epoch, index), item, last) for each batch of the pass (epoch, first) and ("end", ...) after it;
    with `ahead`, then those of every later epoch in turn (the reader stops when it is told to)."""
    while True:
        pass_order = copy.copy(order)  # the consumer's BatchOrder moves on meanwhile
        pass_order.epoch, pass_order.first_batch = epoch, first
        items = list(iter(pass_order))
        for i, item in enumerate(items):
            yield "batch", (epoch, first + i), item, i == len(items) - 1
        yield "end", (epoch, first + len(items)), None, True
        if not ahead:
            return
        epoch, first = epoch + 1, 0


def _produce(make: BatchMaker, passes, results: queue.Queue, stop: threading.Event) -> None:
    def put(entry) -> bool:  # False once the consumer has gone away
        while not stop.is_set():
            try:
                results.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    side = torch.cuda.Stream(make.device) if make.on_cuda else None
    try:
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            for kind, tag, item, last in passes:
                if kind == "batch":
                    key, ids = item if make.train else (None, item)
                    batch, event = make(np.asarray(ids, dtype=np.int64), key)
                    entry = ("batch", tag, batch, event, last)
                else:
                    entry = ("end", tag, None, None, True)
                if not put(entry):
                    return
    except BaseException as e:  # handed to the consumer, which raises it
        put(("error", None, e, None, True))


class Reader:
    """The reader thread, working through `passes` PREFETCH batches ahead of the consumer."""

    def __init__(self, make: BatchMaker, passes, start: tuple[int, int]):
        self.results: queue.Queue = queue.Queue(maxsize=PREFETCH)
        self.stop = threading.Event()
        self.next_pass, self.owed_end = start, False  # owed_end: a pass's end entry not read yet
        self.thread = threading.Thread(target=_produce, args=(make, passes, self.results, self.stop),
                                       name="nvjpeg-reader", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


def _close(held: list) -> None:
    if held[0] is not None:
        held[0].close()
        held[0] = None


class NvjpegBatches:
    """Batches `(images NCHW, labels int64 (N,))` on `device`, decoded there: uint8, or float32 minus the mean image
    when one is given (as the other backends); `set_epoch` as the others."""

    def __init__(self, path: str, order: BatchOrder, *, train: bool, crop: int, res: int, fixed_size: bool,
                 flip: bool, device: torch.device, mean_image: torch.Tensor | None = None):
        self.order, self.train, self.device = order, train, device
        self.make = BatchMaker(BetonReader(path), train=train, crop=crop, res=res, fixed_size=fixed_size, flip=flip,
                               device=device, mean_image=mean_image)
        self._held: list[Reader | None] = [None]  # the reader: the finaliser below must not hold `self`
        weakref.finalize(self, _close, self._held)

    def __len__(self) -> int:
        return len(self.order)

    def set_epoch(self, epoch: int, first_batch: int = 0) -> None:
        self.order.epoch, self.order.first_batch = epoch, first_batch

    def __iter__(self):
        epoch, first = self.order.epoch, self.order.first_batch  # fixed now: the caller moves the epoch on after
        self.order.epoch, self.order.first_batch = epoch + 1, 0
        reader = self._held[0]
        if reader is None or reader.next_pass != (epoch, first) or not reader.thread.is_alive():
            _close(self._held)  # another pass than the one read ahead (a resume, a test): start afresh
            reader = Reader(self.make, _passes(self.order, epoch, first, ahead=self.train), (epoch, first))
            self._held[0] = reader
        return self._take(reader, epoch, first)

    def _take(self, reader: Reader, epoch: int, first: int):
        over = False
        try:
            if reader.owed_end:  # the previous pass ended at its last batch, before its end entry was read
                reader.results.get()
                reader.owed_end = False
            expect = (epoch, first)
            while True:
                kind, tag, item, event, last = reader.results.get()
                if kind == "error":
                    raise item
                if tag != expect:
                    raise RuntimeError(f"nvjpeg reader: got batch {tag}, expected {expect}")
                if kind == "end":
                    over, reader.owed_end = True, False
                    return
                over, reader.owed_end, expect = last, last, (epoch, tag[1] + 1)
                yield self._hand_over(item, event)
        finally:
            if over and self.train:
                reader.next_pass = (epoch + 1, 0)  # it is already reading that epoch's first batches
            else:
                _close(self._held)

    def _hand_over(self, batch: tuple[torch.Tensor, torch.Tensor], event) -> tuple[torch.Tensor, torch.Tensor]:
        """The training stream waits (on the GPU) for the reader's work on the batch; `record_stream` keeps the
        allocator from giving the batch's memory back to the reader while the training stream still uses it."""
        if event is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(event)
            for t in batch:
                t.record_stream(stream)
        return batch


def make_nvjpeg_batches(path: str, *, indices: np.ndarray, batch_size: int, train: bool, crop: int, res: int,
                        fixed_size: bool, flip: bool, seed: int, workers: int, device: torch.device,
                        distributed: bool, mean_image: torch.Tensor | None = None) -> NvjpegBatches:
    """Same arguments and batches as `make_torch_batches`; `workers` is unused (one reader thread suffices: the
    decode, the costly part, runs on the device)."""
    order = BatchOrder(indices, batch_size, train=train, seed=seed, distributed=distributed)
    return NvjpegBatches(str(path), order, train=train, crop=crop, res=res, fixed_size=fixed_size, flip=flip,
                         device=device, mean_image=mean_image)

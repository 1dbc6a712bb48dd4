"""One split -> one .beton through FFCV's DatasetWriter, in parallel, with a rich progress bar.

Worker processes decode, resize and encode each image and add its pixel sums to shared arrays (for the manifest's
mean, std and RGB PCA). A file that fails to decode is flagged and not encoded: its metadata row stays empty and
`_Writer.finalize` drops it, so every file is decoded once, broken files or not. Which files are broken is only
known once each has been decoded (a truncated JPEG has a valid header), while FFCV sizes the metadata table, and
so places the first data page, from the sample count before any worker starts: the table is sized for every file
and compacted at the end. Data pointers are absolute file offsets, so the pages stay where they are.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import signal
import zlib
from multiprocessing import Process, Queue, RawArray, Value
from time import sleep
from typing import Callable

import cv2
import numpy as np
import torch
from ffcv.fields import IntField, RGBImageField
from ffcv.fields.rgb_image import encode_jpeg
from ffcv.memory_allocator import MemoryAllocator
from ffcv.types import ALLOC_TABLE_TYPE
from ffcv.utils import chunks
from ffcv.writer import MIN_PAGE_SIZE, DatasetWriter, handle_sample
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text

from data_prep.images import SkipImage, array_to_stored, read_image, to_stored
from data_prep.sources.base import Split
from repro.errors import UserError

STATS_SAMPLE = 50_000  # image files whose pixels enter mean/std/PCA (in-memory sources use every image)
STATS_FULL_PIXELS = 128 * 128  # larger images enter mean/std/PCA with 1/64 of their pixels (the mean image: all)
SQUARE_BYTES = 64 << 20  # per worker, for the mean image's sums by centre-square side
OK, FAILED = 0, 1


class RateColumn(ProgressColumn):
    def render(self, task) -> Text:
        return Text(f"{task.speed:,.0f} img/s" if task.speed else "- img/s", style="progress.data.speed")


def make_progress(enabled: bool) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(),
                    TimeRemainingColumn(), disable=not enabled, transient=False,
                    console=Console(stderr=True))  # stdout carries only the summary line


class CentreSquareMean:
    """The mean image as the loaders show each stored image: its centre square at res x res (FFCV's centre-crop
    decoder, ratio 1, which resizes with OpenCV's area filter).

    Resizing each sampled image's square took 0.1 ms, 40% of resizing the photo itself. The resize is linear, so
    each worker instead sums the squares of each side length as they are and resizes each sum once, at the end
    (`finish`). The mean then is that of the unrounded resized squares: within 0.5 of the mean of the uint8 squares
    the loaders show. Sums over SQUARE_BYTES are resized early, least-used side first, to bound memory.
    """

    def __init__(self, res: int):
        self.res = res
        self.squares: dict[int, np.ndarray] = {}  # side -> uint32 sum of the centre squares of that side
        self.counts: dict[int, int] = {}
        self.total = np.zeros((res, res, 3), np.float64)

    def add(self, img: np.ndarray) -> None:
        h, w = img.shape[:2]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        if side not in self.squares:
            while self.squares and sum(a.nbytes for a in self.squares.values()) + side * side * 12 > SQUARE_BYTES:
                self._resize_into_total(min(self.counts, key=self.counts.get))
            self.squares[side], self.counts[side] = np.zeros((side, side, 3), np.uint32), 0
        np.add(self.squares[side], img[top:top + side, left:left + side], out=self.squares[side])
        self.counts[side] += 1

    def _resize_into_total(self, side: int) -> None:
        sums = self.squares.pop(side).astype(np.float64)
        del self.counts[side]
        self.total += sums if side == self.res else cv2.resize(sums, (self.res, self.res),
                                                               interpolation=cv2.INTER_AREA)

    def finish(self) -> np.ndarray | None:
        """This worker's summed (res, res, 3) float64 image; None if it saw no sampled image."""
        if not self.squares and not self.total.any():
            return None
        for side in list(self.squares):
            self._resize_into_total(side)
        return self.total


class SplitDataset:
    """Indexable view the writer's workers read from: item i -> (stored RGB uint8 image, label), or None when the
    file cannot be decoded (status FAILED, with the reason in reason_codes)."""

    def __init__(self, split: Split, res: int, max_side: bool, stat_slots: np.ndarray):
        self.split, self.res, self.max_side = split, res, max_side
        n = len(split)
        self.status = np.frombuffer(RawArray(ctypes.c_int8, max(n, 1)), dtype=np.int8)
        # why it failed, as a code into REASONS: workers cannot cheaply send strings back
        self.reason_codes = np.frombuffer(RawArray(ctypes.c_int16, max(n, 1)), dtype=np.int16)
        # crc32 of each stored image (pixels, then shape): the data's identity, whatever page layout the workers
        # happened to give the beton file
        self.digests = np.frombuffer(RawArray(ctypes.c_uint32, max(n, 1)), dtype=np.uint32)
        # slot[i] >= 0: row of `sums` where image i's pixel sums go (sum RGB, sum of RGB outer products, count)
        self.slot = stat_slots
        self.sums = np.frombuffer(RawArray(ctypes.c_double, max(1, int((stat_slots >= 0).sum())) * 13),
                                  dtype=np.float64).reshape(-1, 13)
        self.mean = CentreSquareMean(res)  # replaced by _write; the forked workers fill their copies

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        label = int(self.split.labels[i])
        try:
            if self.split.images is not None:
                img = array_to_stored(self.split.images[i], self.res, self.max_side)
            else:
                img = to_stored(read_image(self.split.paths[i], self.res), self.res, self.max_side)
        except SkipImage as e:
            self.status[i] = FAILED
            self.reason_codes[i] = REASONS.get(str(e), OTHER)
            return None
        self.digests[i] = zlib.crc32(np.asarray(img.shape, np.uint32), zlib.crc32(np.ascontiguousarray(img)))
        if self.slot[i] >= 0:
            self.sums[self.slot[i]] = pixel_sums(img)
            self.mean.add(img)
        return img, label


def pixel_sums(img: np.ndarray) -> np.ndarray:
    """(sum of RGB, sum of RGB outer products, pixel count) over the image's pixels, as 13 float64.

    Images larger than STATS_FULL_PIXELS contribute every eighth row and column (a regular sample of 1/64 of
    their pixels: hundreds per image, some 40 million over the 50,000 images sampled, for three means and a 3x3
    covariance). On all pixels the statistics cost as much as decoding the file."""
    if img.shape[0] * img.shape[1] > STATS_FULL_PIXELS:
        img = img[::8, ::8]
    x = np.ascontiguousarray(img.reshape(-1, 3).T, dtype=np.float64)  # (3, n): contiguous rows for BLAS
    return np.concatenate([x.sum(1), (x @ x.T).ravel(), [x.shape[1]]])


# Reasons travel from workers as small integers; the table is fixed so codes mean the same in every process.
REASONS = {r: k for k, r in enumerate(["empty file", "not an image (unknown format)", "truncated image",
                                       "unreadable: permission denied", "image too large (over 268M pixels)",
                                       "cannot decode", "unreadable"])}
OTHER = REASONS["unreadable"]


def _worker(finish, results, work_fn, *args):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops the workers
    torch.set_num_threads(1)  # one process per core already: threads inside each would only contend
    cv2.setNumThreads(1)
    work_fn(*args)
    results.put(finish())


def _write_decoded(input_queue, metadata_sm, metadata_type, fields, allocator, done_number, allocations_queue,
                   dataset):
    """ffcv 1.0.2's worker_job_indexed_dataset, except that a file that failed to decode (item None) is not encoded:
    it takes no bytes in the data pages and leaves its metadata row empty, for `_Writer.finalize` to drop."""
    metadata = np.frombuffer(metadata_sm.buf, dtype=metadata_type)
    with allocator:  # flushes this worker's last page on the way out
        while (chunk := input_queue.get()) is not None:
            for dest_ix, source_ix in chunk:
                sample = dataset[source_ix]
                if sample is not None:
                    handle_sample(sample, dest_ix, metadata_type.names, metadata, allocator, fields)
            with done_number.get_lock():  # failed files count as done: the parent waits for every position
                done_number.value += len(chunk)
    allocations_queue.put(allocator.allocations)


class _Writer(DatasetWriter):
    """DatasetWriter whose progress goes to rich, which fails instead of waiting forever for a dead worker, which
    runs `finish` in each worker after its last image, keeping what each returns in `worker_results`, and which
    leaves out the positions where `kept()` (called once the workers are done) is False."""

    def __init__(self, fname, fields, page_size, num_workers, on_done, finish, kept: Callable[[], np.ndarray]):
        super().__init__(fname, fields, page_size=page_size, num_workers=num_workers)
        self.on_done, self.finish, self.kept, self.worker_results = on_done, finish, kept, []

    def write(self, dataset: SplitDataset, order: np.ndarray, chunksize: int) -> None:
        """dataset[order[k]] at position k, for each k that is kept; the kept ones then close ranks."""
        self._write_common(len(order), chunks(list(enumerate(order)), chunksize), _write_decoded, (dataset,))

    def finalize(self, allocations) -> None:
        """ffcv 1.0.2's DatasetWriter.finalize, writing only the kept metadata rows and numbering the samples
        among them. The table was sized for every position, so the dropped rows' space lies unused before the data:
        a page more than a write of the kept files alone takes when those rows span a page boundary, else nothing.
        Readers never look there: they read num_samples rows, and the data through its absolute pointers."""
        kept = np.asarray(self.kept(), dtype=bool)
        # the rows as bytes: numpy copies a structured row field by field, which leaves its padding undefined
        size = self.metadata_type.itemsize
        rows = np.frombuffer(self.metadata_sm.buf, np.uint8)[:len(kept) * size].reshape(-1, size)[kept]
        table = np.array(allocations, dtype=ALLOC_TABLE_TYPE).reshape(-1)
        table["sample_id"] = (np.cumsum(kept) - 1)[table["sample_id"]]  # a kept position's rank among the kept
        self.header["num_samples"] = len(rows)
        with open(self.fname, "r+b") as fp:
            fp.seek(self.metadata_start)
            fp.write(rows.tobytes())
            self.header["alloc_table_ptr"] = fp.seek(0, os.SEEK_END)
            fp.write(table.tobytes())
            fp.seek(0)
            fp.write(self.header.tobytes())

    def _write_common(self, num_samples, queue_content, work_fn, extra_worker_args):
        # Same steps as ffcv 1.0.2's DatasetWriter._write_common, with the polling loop changed.
        self.num_samples = num_samples
        self.prepare()
        workqueue, allocations_queue, results = Queue(), Queue(), Queue()
        for todo in queue_content:
            workqueue.put(todo)
        for _ in range(self.num_workers):
            workqueue.put(None)
        done_number = Value(ctypes.c_uint64, 0)
        allocator = MemoryAllocator(self.fname, self.data_region_start, self.page_size)
        args = (workqueue, self.metadata_sm, self.metadata_type, self.fields, allocator, done_number,
                allocations_queue, *extra_worker_args)
        processes = [Process(target=_worker, args=(self.finish, results, work_fn, *args), daemon=True)
                     for _ in range(self.num_workers)]
        try:
            for p in processes:
                p.start()
            previous = 0
            while previous != self.num_samples:
                value = done_number.value
                if value > previous:
                    self.on_done(value - previous)
                previous = value
                dead = [p for p in processes if p.exitcode not in (None, 0)]
                if dead:
                    raise UserError(f"writing {self.fname} failed: a worker process died (exit code "
                                    f"{dead[0].exitcode}: disk full, out of memory, or see its message above); "
                                    f"check free space in {os.path.dirname(self.fname)} and run again")
                sleep(0.01)  # the wait after the last image is up to one poll, once per split
            allocations = []
            for _ in processes:
                allocations.extend(allocations_queue.get())
            self.worker_results = [results.get() for _ in processes]  # before join: a queue's writer waits for it
            for p in processes:
                p.join()
            self.finalize(allocations)
        finally:
            for p in processes:
                if p.is_alive():
                    p.terminate()
            self.metadata_sm.close()
            self.metadata_sm.unlink()


# How RGBImageField's header numbers its write modes (ffcv.fields.rgb_image.IMAGE_MODES, a numba typed Dict)
STORED_MODES = {"jpg": 0, "raw": 1}


def _encode_stored(field: RGBImageField, destination, image: np.ndarray, malloc) -> None:
    """RGBImageField.encode for an image already at its stored size, in 'jpg' or 'raw' mode: the same header and
    bytes, without its lookup of the mode in IMAGE_MODES, whose first call in each process compiles for 0.2 s
    (each writer worker paid it, a tenth of a small split's time)."""
    destination["mode"] = STORED_MODES[field.write_mode]
    destination["height"], destination["width"] = image.shape[:2]
    jpg = field.write_mode == "jpg"
    data = encode_jpeg(image, field.jpeg_quality) if jpg else np.ascontiguousarray(image).reshape(-1)
    destination["data_ptr"], storage = malloc(data.nbytes)
    storage[:] = data


def _write(path: str, dataset: SplitDataset, order: np.ndarray, write_mode: str, res: int, jpeg_quality: int,
           workers: int, progress: Progress, description: str) -> np.ndarray | None:
    """Write `dataset[order]`, less the files that fail to decode; return the summed mean-image squares of the
    sampled images (None if none)."""
    image = RGBImageField(write_mode=write_mode, max_resolution=None, jpeg_quality=jpeg_quality)
    image.encode = functools.partial(_encode_stored, image)  # the workers are forked: nothing is pickled
    fields = {"image": image, "label": IntField()}
    # Each worker fills whole pages: fewer workers for small splits keeps tiny betons tiny.
    n_workers = max(1, min(workers, math.ceil(len(order) / 200)))
    page_size = MIN_PAGE_SIZE if res <= 512 else 8 * MIN_PAGE_SIZE
    dataset.mean = CentreSquareMean(res)
    task = progress.add_task(description, total=len(order))
    writer = _Writer(path, fields, page_size, n_workers, lambda k: progress.advance(task, k), dataset.mean.finish,
                     kept=lambda: dataset.status[order] != FAILED)
    # At least four chunks a worker, so that the last ones end together (300 images in chunks of 100 left one
    # of two workers idle for a third of the split).
    writer.write(dataset, order, chunksize=max(1, min(100, len(order) // (4 * n_workers))))
    progress.update(task, completed=len(order))
    sums = [r for r in writer.worker_results if r is not None]
    return np.sum(sums, axis=0) if sums else None


def write_split(path: str, split: Split, *, res: int, max_side: bool, write_mode: str, jpeg_quality: int,
                workers: int, order: np.ndarray, stats: bool, progress: Progress, name: str) -> dict:
    """Write `split[order]` to `path`; return {"index": written source indices, "skipped": [(i, reason)],
    "sums": summed pixel statistics or None, "stat_images": how many images they cover, "mean_image": their
    mean image, float32 (res, res, 3), or None}."""
    slots = np.full(len(split), -1, dtype=np.int64)
    if stats:
        chosen = order if len(order) <= STATS_SAMPLE or split.images is not None else np.sort(
            np.random.default_rng(0).choice(order, STATS_SAMPLE, replace=False))
        slots[chosen] = np.arange(len(chosen))
    dataset = SplitDataset(split, res, max_side, slots)
    square_sums = _write(path, dataset, order, write_mode, res, jpeg_quality, workers, progress, f"{name}")
    # The beton holds the others in this order, byte for byte as a write of them alone would (with one worker),
    # but for the unused space a larger metadata table may leave before the data (see _Writer.finalize).
    failed = order[dataset.status[order] == FAILED]
    order = order[dataset.status[order] != FAILED]
    if not len(order):
        raise UserError(f"every {name} image failed to decode (first: {split.paths[failed[0]]}); check the files")
    names = {k: r for r, k in REASONS.items()}
    skipped = [(int(i), names.get(int(dataset.reason_codes[i]), "unreadable")) for i in failed]
    used = slots[order]
    stat_images = int((used >= 0).sum())
    sums = dataset.sums[used[used >= 0]].sum(0) if stats else None
    mean_image = None
    if stats:
        summed = np.zeros((res, res, 3)) if square_sums is None else square_sums
        mean_image = (summed / max(stat_images, 1)).astype(np.float32)
    return {"index": order, "skipped": skipped, "sums": sums, "stat_images": stat_images, "mean_image": mean_image,
            "content": content_digest(dataset.digests[order], split.labels[order])}


def content_digest(digests: np.ndarray, labels: np.ndarray) -> str:
    """sha256 of (image crc32, label) at each position of the beton, in order: two writes of the same images in the
    same order agree, though FFCV's workers lay pages out in whatever order they finish (the files then differ)."""
    table = np.stack([np.asarray(digests, np.uint32).astype("<u8"), np.asarray(labels).astype("<u8")], axis=1)
    return hashlib.sha256(np.ascontiguousarray(table).tobytes()).hexdigest()

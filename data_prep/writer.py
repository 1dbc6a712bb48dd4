"""One split -> one .beton through FFCV's DatasetWriter, in parallel, with a rich progress bar.

Worker processes decode, resize and encode each image and add its pixel sums to shared arrays (for the manifest's
mean, std and RGB PCA). A file that fails to decode is written as a black placeholder and flagged; if any were
flagged, the split is written a second time without them, so the common case decodes every file once.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import signal
import zlib
from multiprocessing import Process, Queue, RawArray, Value
from time import sleep

import cv2
import numpy as np
import torch
from ffcv.fields import IntField, RGBImageField
from ffcv.writer import MIN_PAGE_SIZE, DatasetWriter
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text

from data_prep.images import SkipImage, array_to_stored, centre_square, read_image, to_stored
from data_prep.sources import Split
from repro.errors import UserError

STATS_SAMPLE = 50_000  # image files whose pixels enter mean/std/PCA (in-memory sources use every image)
STATS_FULL_PIXELS = 128 * 128  # larger images enter mean/std/PCA with 1/16 of their pixels (the mean image: all)
OK, FAILED = 0, 1


class RateColumn(ProgressColumn):
    def render(self, task) -> Text:
        return Text(f"{task.speed:,.0f} img/s" if task.speed else "- img/s", style="progress.data.speed")


def make_progress(enabled: bool) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(),
                    TimeRemainingColumn(), disable=not enabled, transient=False,
                    console=Console(stderr=True))  # stdout carries only the summary line


class SplitDataset:
    """Indexable view FFCV's workers read from: item i -> (stored RGB uint8 image, label)."""

    def __init__(self, split: Split, res: int, max_side: bool, stat_slots: np.ndarray, workers: int):
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
        # The mean image: each worker process adds the sampled images into its own row (integer sums are exact
        # and cheap); `mean_row` hands rows out, one per process, and `reset_mean` clears them before a pass.
        rows = max(1, workers) if (stat_slots >= 0).any() else 0
        self.mean_sums = np.frombuffer(RawArray(ctypes.c_uint32, max(1, rows * res * res * 3)),
                                       dtype=np.uint32)[:rows * res * res * 3].reshape(rows, res, res, 3)
        self.mean_rows_taken = Value(ctypes.c_int, 0)
        self._mean_row, self._pid = None, None

    def reset_mean(self) -> None:
        self.mean_sums[:] = 0
        self.mean_rows_taken.value = 0

    def _add_to_mean(self, img: np.ndarray) -> None:
        if self._pid != os.getpid():
            with self.mean_rows_taken.get_lock():
                row = self.mean_rows_taken.value
                self.mean_rows_taken.value += 1
            self._mean_row, self._pid = self.mean_sums[row], os.getpid()
        # Images stored with their aspect ratio count as the loaders show them: the centre square at res x res
        # (FFCV's centre-crop decoder; an upscale, since the longer side is at most res, hence plain bilinear).
        if img.shape[:2] != (self.res, self.res):
            img = centre_square(img, self.res)
        np.add(self._mean_row, img, out=self._mean_row)

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
            return np.zeros((8, 8, 3), np.uint8), label
        self.digests[i] = zlib.crc32(np.asarray(img.shape, np.uint32), zlib.crc32(np.ascontiguousarray(img)))
        if self.slot[i] >= 0:
            self.sums[self.slot[i]] = pixel_sums(img)
            self._add_to_mean(img)
        return img, label


def pixel_sums(img: np.ndarray) -> np.ndarray:
    """(sum of RGB, sum of RGB outer products, pixel count) over the image's pixels, as 13 float64.

    Images larger than STATS_FULL_PIXELS contribute every fourth row and column (a regular sample of 1/16 of
    their pixels, still thousands per image): on all pixels the statistics cost as much as decoding the file."""
    if img.shape[0] * img.shape[1] > STATS_FULL_PIXELS:
        img = img[::4, ::4]
    x = np.ascontiguousarray(img.reshape(-1, 3).T, dtype=np.float64)  # (3, n): contiguous rows for BLAS
    return np.concatenate([x.sum(1), (x @ x.T).ravel(), [x.shape[1]]])


# Reasons travel from workers as small integers; the table is fixed so codes mean the same in every process.
REASONS = {r: k for k, r in enumerate(["empty file", "not an image (unknown format)", "truncated image",
                                       "unreadable: permission denied", "image too large (over 268M pixels)",
                                       "cannot decode", "unreadable"])}
OTHER = REASONS["unreadable"]


def _worker(work_fn, *args):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops the workers
    torch.set_num_threads(1)  # one process per core already: threads inside each would only contend
    cv2.setNumThreads(1)
    work_fn(*args)


class _Writer(DatasetWriter):
    """DatasetWriter whose progress goes to rich and which fails instead of waiting forever for a dead worker."""

    def __init__(self, fname, fields, page_size, num_workers, on_done):
        super().__init__(fname, fields, page_size=page_size, num_workers=num_workers)
        self.on_done = on_done

    def _write_common(self, num_samples, queue_content, work_fn, extra_worker_args):
        # Same steps as ffcv 1.0.2's DatasetWriter._write_common, with the polling loop changed.
        from ffcv.memory_allocator import MemoryAllocator

        self.num_samples = num_samples
        self.prepare()
        workqueue, allocations_queue = Queue(), Queue()
        for todo in queue_content:
            workqueue.put(todo)
        for _ in range(self.num_workers):
            workqueue.put(None)
        done_number = Value(ctypes.c_uint64, 0)
        allocator = MemoryAllocator(self.fname, self.data_region_start, self.page_size)
        args = (workqueue, self.metadata_sm, self.metadata_type, self.fields, allocator, done_number,
                allocations_queue, *extra_worker_args)
        processes = [Process(target=_worker, args=(work_fn, *args), daemon=True) for _ in range(self.num_workers)]
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
                sleep(0.05)
            allocations = []
            for _ in processes:
                allocations.extend(allocations_queue.get())
            for p in processes:
                p.join()
            self.finalize(allocations)
        finally:
            for p in processes:
                if p.is_alive():
                    p.terminate()
            self.metadata_sm.close()
            self.metadata_sm.unlink()


def _write(path: str, dataset: SplitDataset, order: np.ndarray, write_mode: str, res: int, jpeg_quality: int,
           workers: int, progress: Progress, description: str) -> None:
    fields = {"image": RGBImageField(write_mode=write_mode, max_resolution=None, jpeg_quality=jpeg_quality),
              "label": IntField()}
    # Each worker fills whole pages: fewer workers for small splits keeps tiny betons tiny.
    n_workers = max(1, min(workers, math.ceil(len(order) / 200)))
    page_size = MIN_PAGE_SIZE if res <= 512 else 8 * MIN_PAGE_SIZE
    dataset.reset_mean()
    task = progress.add_task(description, total=len(order))
    writer = _Writer(path, fields, page_size, n_workers, lambda k: progress.advance(task, k))
    writer.from_indexed_dataset(dataset, indices=list(order), chunksize=max(1, min(100, len(order) // n_workers)))
    progress.update(task, completed=len(order))


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
    dataset = SplitDataset(split, res, max_side, slots, workers)
    _write(path, dataset, order, write_mode, res, jpeg_quality, workers, progress, f"{name}")
    failed = order[dataset.status[order] == FAILED]
    if len(failed):  # rare: rewrite without the broken files so the beton holds real images only
        order = order[dataset.status[order] != FAILED]
        if not len(order):
            raise UserError(f"every {name} image failed to decode (first: {split.paths[failed[0]]}); "
                            f"check the files")
        _write(path, dataset, order, write_mode, res, jpeg_quality, workers, progress, f"{name} (again, without "
               f"{len(failed)} bad files)")
    names = {k: r for r, k in REASONS.items()}
    skipped = [(int(i), names.get(int(dataset.reason_codes[i]), "unreadable")) for i in failed]
    used = slots[order]
    stat_images = int((used >= 0).sum())
    sums = dataset.sums[used[used >= 0]].sum(0) if stats else None
    mean_image = (dataset.mean_sums.sum(0, dtype=np.float64) / max(stat_images, 1)).astype(np.float32) \
        if stats else None
    return {"index": order, "skipped": skipped, "sums": sums, "stat_images": stat_images, "mean_image": mean_image,
            "content": content_digest(dataset.digests[order], split.labels[order])}


def content_digest(digests: np.ndarray, labels: np.ndarray) -> str:
    """sha256 of (image crc32, label) at each position of the beton, in order: two writes of the same images in the
    same order agree, though FFCV's workers lay pages out in whatever order they finish (the files then differ)."""
    table = np.stack([np.asarray(digests, np.uint32).astype("<u8"), np.asarray(labels).astype("<u8")], axis=1)
    return hashlib.sha256(np.ascontiguousarray(table).tobytes()).hexdigest()

"""FFCV loader pipelines: train (fixed-size random crop + flip), val and train_eval (full stored images, in order).

Train images come in the epoch's order (`SeededOrder`: repro.data.order, the same for every backend) and are
cropped by `CropFlipDecoder`, an FFCV decoder that cuts the paper's fixed-size random crop out of the stored image (a
true sub-window, no resize, for fixed-size data) and flips half of them, with draws from `repro.data.crops` so that
a seed repeats exactly. The compiled decoders read the epoch's crop key from a small array (`CropKey`) that is
rewritten before each epoch: a key baked into the code would recompile the pipeline every epoch. (FFCV's RandomResizedCropRGBImageDecoder with scale fixed at
(crop/res)^2 and ratio 1 cuts the same kind of window, but draws from numba's per-thread random states, which no
seed reaches: a run would not repeat, nor a resumed run match an uninterrupted one.) Normalisation happens later in torch (`repro.data.augment`):
FFCV's `NormalizeImage` after `ToTensor` spins forever on CPU and needs cupy on GPU.

An FFCV Loader compiles its pipeline with numba on its first epoch (seconds), so Loaders are kept in a small
per-process cache and reused, each user with its own subset, seed and batch size, when a later run of a sweep
asks for the same pipeline on the same file.

On a GPU nothing here makes the training thread wait for it: FFCV pins every host buffer it allocates, `ToDevice`
copies images and labels from them without blocking on FFCV's own streams (the training stream waits for those on
the GPU), and the crop windows for the mean image follow the same way (repro.data.augment.to_device). FFCV's
threads are `data.workers`, else the cores this process may run on (repro.data.usable_cores).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import replace

import numpy as np
import torch
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import CenterCropRGBImageDecoder, IMAGE_MODES, SimpleRGBImageDecoder
from ffcv.libffcv import imdecode, resize_crop
from ffcv.loader import Loader, OrderOption
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.pipeline_spec import PipelineSpec
from ffcv.transforms import ToDevice, ToTensor, ToTorchImage
from ffcv.traversal_order.base import TraversalOrder
from numba import carray, types
from numba.extending import intrinsic

from repro.data.augment import subtract_loader_mean
from repro.data.crops import crop_window, draw_words, flip_bit, mean_image_crops
from repro.data.order import crop_key, epoch_order, rank_share, rank_world

_CACHE: OrderedDict = OrderedDict()
_CACHE_SIZE = 8


@intrinsic
def _uint64_pointer(typingctx, address):
    """A uint64* from an integer address, which numba has no cast for."""
    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(signature.return_type))
    return types.CPointer(types.uint64)(address), codegen


class CropKey:
    """The epoch's crop key (repro.data.order.crop_key) where compiled decoders read it at every batch: numba freezes
    arrays a kernel captures, so the kernel captures this array's address and reads the words through it."""

    def __init__(self):
        self.words = np.zeros(2, dtype=np.uint64)
        self.address = self.words.ctypes.data

    def set(self, seed: int, epoch: int) -> None:
        self.words[:] = crop_key(seed, epoch)


class SeededOrder(TraversalOrder):
    """This rank's share of the epoch's global order (repro.data.order): what every backend trains on."""

    def sample_order(self, epoch: int):
        rank, world = rank_world() if self.distributed else (0, 1)
        return rank_share(epoch_order(self.indices, self.seed, epoch), self.loader.batch_size, rank, world)


class CropFlipDecoder(SimpleRGBImageDecoder):
    """Decode, cut a `crop` x `crop` window (see `crops.crop_window`) and optionally flip it horizontally."""

    def __init__(self, crop: int, res: int, flip: bool, key: CropKey):
        super().__init__()
        self.crop, self.res, self.flip, self.key = crop, res, flip, key

    def declare_state_and_memory(self, previous_state):
        max_h, max_w = int(self.metadata["height"].max()), int(self.metadata["width"].max())
        out_shape = (self.crop, self.crop, 3)
        state = replace(previous_state, jit_mode=True, shape=out_shape, dtype=np.dtype("<u1"))
        # the second buffer holds one decoded jpg per image
        return state, (AllocationQuery(out_shape, np.dtype("<u1")),
                       AllocationQuery((max_h * max_w * 3,), np.dtype("<u1")))

    def generate_code(self):
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        imdecode_c = Compiler.compile(imdecode)
        resize_crop_c = Compiler.compile(resize_crop)
        crop, res, do_flip, key_address = self.crop, self.res, self.flip, self.key.address

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            key = carray(_uint64_pointer(key_address), 2)
            words = draw_words(batch_indices, key)  # serial, before the parallel loop: thread-independent
            for dst_ix in my_range(len(batch_indices)):
                field = metadata[batch_indices[dst_ix]]
                data = mem_read(field["data_ptr"], storage_state)
                height, width = np.uint32(field["height"]), np.uint32(field["width"])
                if field["mode"] == jpg:
                    image = temp_storage[dst_ix]
                    imdecode_c(data, image, height, width, height, width, 0, 0, 1, 1, False, False)
                    image = image[:3 * height * width].reshape(height, width, 3)
                else:
                    image = data.reshape(height, width, 3)
                top, left, side = crop_window(words[dst_ix], height, width, crop, res)
                out = destination[dst_ix]
                flip = do_flip and flip_bit(words[dst_ix])
                if side == crop:  # one copy, mirrored on the way when flipped
                    window = image[top:top + side, left:left + side]
                    out[:] = window[:, ::-1] if flip else window
                else:
                    resize_crop_c(image, top, top + side, left, left + side, out)
                    if flip:
                        out[:] = out[:, ::-1].copy()
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode


class _Slice:
    """A traversal order that hands out `order[start:stop]` of another: an epoch that starts at a later batch."""

    def __init__(self, inner, start: int, stop: int):
        self.inner, self.start, self.stop = inner, start, stop

    def sample_order(self, epoch: int):
        return self.inner.sample_order(epoch)[:self.stop][self.start:]


class MeanImageCropsDecoder(Operation):
    """A second output from the image field: each train crop's window in the mean image and its flip, (N, 5)
    int64 (see `crops.mean_image_crops`), drawn from the same sample ids and key as `CropFlipDecoder`'s crops."""

    def __init__(self, crop: int, res: int, flip: bool, key: CropKey):
        super().__init__()
        self.crop, self.res, self.flip, self.key = crop, res, flip, key

    def declare_state_and_memory(self, previous_state):
        return (replace(previous_state, jit_mode=True, shape=(5,), dtype=np.dtype("<i8")),
                AllocationQuery((5,), np.dtype("<i8")))

    def generate_code(self):
        crop, res, do_flip, key_address = self.crop, self.res, self.flip, self.key.address

        def decode(batch_indices, destination, metadata, storage_state):
            key = carray(_uint64_pointer(key_address), 2)
            n = len(batch_indices)
            heights, widths = np.empty(n, np.int64), np.empty(n, np.int64)
            for k in range(n):
                heights[k], widths[k] = metadata[batch_indices[k]]["height"], metadata[batch_indices[k]]["width"]
            destination[:n] = mean_image_crops(batch_indices, key, heights, widths, crop, res, do_flip)
            return destination[:n]

        return decode


class FFCVBatches:
    """Batches `(images uint8 NCHW, labels int64 (N,))` of a possibly shared FFCV Loader over `indices`.

    The Loader's compiled pipeline is shared through the cache; the subset, batch size, seed and epoch belong to
    this object and are put on the Loader each time it starts an epoch, so two of them never disturb each other.
    """

    def __init__(self, loader: Loader, key: CropKey | None, indices: np.ndarray, batch_size: int, seed: int,
                 train: bool, mean_image: torch.Tensor | None = None, crop: int = 0):
        self.loader, self.indices, self.batch_size, self.seed, self.train = loader, indices, batch_size, seed, train
        self.key, self.mean_image, self.crop = key, mean_image, crop
        self.epoch, self.first_batch = 0, 0
        self._configure()
        self.length = len(loader)

    def _configure(self) -> None:
        loader = self.loader
        loader.indices, loader.batch_size, loader.seed, loader.drop_last = (
            self.indices, self.batch_size, self.seed, self.train)
        order = loader.traversal_order
        order = order.inner if isinstance(order, _Slice) else order
        loader.traversal_order = type(order)(loader)  # it copies indices and seed
        loader.next_epoch = self.epoch
        loader.first_traversal_order = loader.next_traversal_order()
        if self.key is not None:  # the epoch's crops: FFCV's threads have finished the previous epoch's batches
            self.key.set(self.seed, self.epoch)
        if self.first_batch:  # the epoch's own order, its first batches cut off: they are never decoded
            full = len(loader) * self.batch_size
            loader.traversal_order = _Slice(loader.traversal_order, self.first_batch * self.batch_size, full)

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int, first_batch: int = 0) -> None:
        """Make the next pass epoch `epoch` (its order and crops; the next pass otherwise takes the following epoch)
        and start it at batch `first_batch` (the next pass only)."""
        self.epoch, self.first_batch = epoch, first_batch

    def __iter__(self):
        self._configure()
        epoch_iterator = iter(self.loader)
        self.epoch, self.first_batch = self.epoch + 1, 0
        # FFCV reuses its output buffers a few batches later: consume a batch before asking for the next ones
        for images, labels, *crops in epoch_iterator:
            if self.mean_image is not None:
                images = subtract_loader_mean(images, self.mean_image, crops[0] if crops else None, self.crop)
            yield images, labels.view(-1)


def make_ffcv_batches(path: str, *, indices: np.ndarray, batch_size: int, train: bool, crop: int, res: int,
                      fixed_size: bool, flip: bool, seed: int, workers: int, device: torch.device,
                      distributed: bool, mean_image: torch.Tensor | None = None) -> FFCVBatches:
    """Batches over `path` restricted to `indices`; train: shuffled, cropped, flipped; else in stored order.
    With `mean_image` (C, res, res) float: float32 images minus the mean image, cut and flipped as each crop."""
    indices = np.asarray(indices, dtype=np.uint64)
    if mean_image is not None:
        mean_image = mean_image.to(device)
    # what the compiled pipeline depends on (crop and flip only matter for training)
    key = (str(path), train, (crop, flip) if train else None, res, fixed_size, workers, str(device), distributed,
           train and mean_image is not None)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return FFCVBatches(*_CACHE[key], indices, batch_size, seed, train, mean_image, crop)
    # fresh operation objects for every Loader: FFCV operations must not be shared between Loaders
    epoch_key = CropKey() if train else None
    if train:
        decoder = CropFlipDecoder(crop, res, flip, epoch_key)
    elif fixed_size:
        decoder = SimpleRGBImageDecoder()
    else:
        decoder = CenterCropRGBImageDecoder((res, res), ratio=1.0)
    # on CPU, ToDevice would only copy each batch into another host buffer
    to_device = [ToDevice(device, non_blocking=True)] if device.type != "cpu" else []
    image_pipeline = [decoder, ToTensor(), *to_device, ToTorchImage()]
    label_pipeline = [IntDecoder(), ToTensor(), *to_device]
    pipelines = {"image": image_pipeline, "label": label_pipeline}
    if train and mean_image is not None:
        pipelines["mean_image_crops"] = PipelineSpec(
            "image", decoder=MeanImageCropsDecoder(crop, res, flip, epoch_key), transforms=[ToTensor()])
    loader = Loader(str(path), batch_size=batch_size, num_workers=workers,
                    order=OrderOption.RANDOM if train else OrderOption.SEQUENTIAL, distributed=distributed,
                    seed=seed, indices=indices, pipelines=pipelines, drop_last=train, os_cache=True)
    if train:  # FFCV's Loader takes only its own orders (a TraversalOrder class fails its isinstance check)
        loader.traversal_order = SeededOrder(loader)
    _CACHE[key] = (loader, epoch_key)
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return FFCVBatches(loader, epoch_key, indices, batch_size, seed, train, mean_image, crop)

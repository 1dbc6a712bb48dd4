"""Which training samples an epoch visits, in which order, and the key of its crop draws: a pure function of
(seed, epoch), the same for every backend and every number of processes.

Each (seed, epoch) pair has streams of its own, spawned by numpy's `SeedSequence` from (stream tag, seed, epoch), so
no two pairs share one: seed 1's epoch 0 is not seed 0's epoch 1, as it was with a generator seeded by
`seed + epoch`. The order is global: with W processes a step trains on `W * batch` consecutive samples of it, each
rank on its own slice, so which samples a step sees, and their crops (drawn from the epoch's key and each sample's
id, repro.data.crops), do not depend on W. `order_digest` condenses an epoch's order and crop key into 16 hex
digits, which every epoch's metrics line records: two runs with equal digests saw the same data.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from torch.utils.data import DistributedSampler

ORDER_STREAM, CROP_STREAM = 1, 2  # the first word of each SeedSequence: the order and the crop draws never share one


def _entropy(stream: int, seed: int, epoch: int) -> np.random.SeedSequence:
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed {seed} and epoch {epoch} must be >= 0")
    return np.random.SeedSequence([stream, seed, epoch])


def epoch_order(indices: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """The epoch's permutation of the training sample ids `indices`."""
    return np.random.default_rng(_entropy(ORDER_STREAM, seed, epoch)).permutation(np.asarray(indices))


def crop_key(seed: int, epoch: int) -> np.ndarray:
    """Two uint64 words from which every crop and flip of the epoch is drawn (with each sample's id)."""
    return _entropy(CROP_STREAM, seed, epoch).generate_state(2, np.uint64)


def rank_share(order: np.ndarray, batch: int, rank: int = 0, world: int = 1) -> np.ndarray:
    """One rank's samples in step order: of every `world * batch` consecutive samples (one step of all ranks) the
    rank's `batch`; an incomplete last step is dropped, as the training loaders drop an incomplete batch."""
    step = batch * world
    whole = order[:len(order) // step * step].reshape(-1, world, batch)
    return whole[:, rank, :].reshape(-1)


def order_digest(indices: np.ndarray, seed: int, epoch: int, step: int) -> str:
    """16 hex digits of the samples the epoch trains on, in order (whole steps of `step` samples), and its crop key."""
    order = epoch_order(indices, seed, epoch)
    visited = np.ascontiguousarray(order[:len(order) // step * step], dtype="<u8")
    return hashlib.sha256(visited.tobytes() + crop_key(seed, epoch).astype("<u8").tobytes()).hexdigest()[:16]


def rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class BatchOrder:
    """The batches of one pass for the torch and nvjpeg backends, as the FFCV backend makes them.

    Training: `(crop key, sample ids)` per batch, this rank's share of the epoch's global order. Evaluation: sample
    ids in stored order (sharded as torch's DistributedSampler does when distributed, which repro.engine.parallel's
    gather puts back in order)."""

    def __init__(self, indices: np.ndarray, batch_size: int, *, train: bool, seed: int, distributed: bool):
        self.indices, self.batch_size, self.train, self.seed = np.asarray(indices), batch_size, train, seed
        self.epoch, self.first_batch = 0, 0  # first_batch: where the next pass starts (a resume inside an epoch)
        self.rank, self.world = rank_world() if distributed else (0, 1)
        self.sampler = DistributedSampler(self.indices, shuffle=False) if distributed and not train else None

    def order(self) -> np.ndarray:
        if self.train:
            return rank_share(epoch_order(self.indices, self.seed, self.epoch), self.batch_size, self.rank,
                              self.world)
        if self.sampler is not None:
            return self.indices[np.array(list(self.sampler))]
        return self.indices

    def __len__(self) -> int:
        n = len(self.order())
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def __iter__(self):
        # computed now, not lazily: the caller moves the epoch on right after asking for the iterator
        order, size = self.order(), self.batch_size
        batches = [order[b * size:(b + 1) * size].tolist() for b in range(self.first_batch, len(self))]
        if not self.train:
            return iter(batches)
        key = tuple(int(k) for k in crop_key(self.seed, self.epoch))
        return iter([(key, ids) for ids in batches])

"""Batches from prepared betons: `make_loaders(cfg, device=...)` -> train, val and train_eval loaders.

Train batches are the paper's fixed-size random crops (cfg.model.input_size out of the stored image) with random
horizontal flips; val and train_eval batches are the full stored images in stored order. All are NCHW on the
device with int64 labels: uint8, or float32 minus the mean image, cut and flipped as each crop, when
`data.normalize = "mean-image"`; `repro.data.augment.BatchTransform` turns them into model input. FFCV does the work
when it is importable (or asked for); otherwise a torch DataLoader reads the same files (repro.data.torch_loader).
On a GPU, "auto" picks the nvjpeg backend, which decodes the JPEGs on the device (repro.data.nvjpeg_loader).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from repro.config import RunConfig
from repro.data.manifest import beton_path, read_manifest, read_mean_image
from repro.data.order import order_digest, rank_world
from repro.hints import prepare_command
from repro.errors import UserError

__all__ = ["Loaders", "make_loaders", "read_manifest", "subset_indices", "pick_backend"]


@dataclass
class Loaders:
    train: Any        # iterable of (images uint8 NCHW, labels int64) with len() and set_epoch(epoch, first_batch)
    val: Any
    train_eval: Any   # the (limited) training images, uncropped and in stored order, e.g. for retrieval
    manifest: dict
    backend: str      # "ffcv" | "torch" | "nvjpeg"
    num_train: int
    num_val: int
    batches_per_epoch: int
    mean_image: torch.Tensor | None = None  # (3, res, res) float32, subtracted by the loaders ("mean-image")
    train_ids: np.ndarray | None = None     # the training sample ids an epoch permutes (repro.data.order)
    train_score: Any = None                 # `train.score_train`: a fixed sample of them, uncropped, in stored order
    num_train_score: int = 0
    seed: int = 0
    step: int = 0                           # samples per optimizer step over all processes

    def set_epoch(self, epoch: int, first_batch: int = 0) -> None:
        """Make the next training pass epoch `epoch`: its order and crops (call before each epoch; needed after a
        resume), starting at batch `first_batch` of that order (a resume inside an epoch; earlier batches are
        neither read nor decoded)."""
        self.train.set_epoch(epoch, first_batch)

    def order_digest(self, epoch: int) -> str:
        """16 hex digits of the samples epoch `epoch` trains on, in order, and of its crop draws."""
        return order_digest(self.train_ids, self.seed, epoch, self.step)


def subset_indices(count: int, limit: int) -> np.ndarray:
    """A fixed random subset of `limit` of `count` samples (all when limit is 0), sorted; independent of any seed
    but 0, so every run of every experiment sees the same images."""
    if limit <= 0 or limit >= count:
        return np.arange(count, dtype=np.uint64)
    return np.sort(np.random.default_rng(0).choice(count, size=limit, replace=False)).astype(np.uint64)


def pick_backend(requested: str, device: torch.device | str = "cpu") -> str:
    """The loader backend for `requested` ("auto", "ffcv", "torch", "nvjpeg") on `device`.

    auto on CPU: FFCV when importable (benchmarks/RESULTS.md, rows "loader, 224 of 256 px": 1.44x (jpg) and 3.11x
    (raw) the torchvision DataLoader on 2 cores), else the torch fallback. auto on CUDA: nvjpeg, which decodes on
    the GPU instead of the host's cores; see the "## GPU" section of benchmarks/RESULTS.md, rows "end to end,
    ... 256 px jpg beton", where each backend is measured against the others on the same GPU.
    """
    device = torch.device(device)
    has_ffcv = importlib.util.find_spec("ffcv") is not None
    if requested == "auto":
        if device.type == "cuda":
            return "nvjpeg"
        return "ffcv" if has_ffcv else "torch"
    if requested == "ffcv" and not has_ffcv:
        raise UserError("data.backend = 'ffcv' but FFCV is not installed; install ffcv==1.0.2 or "
                        "use --set data.backend=torch")
    return requested


def usable_cpus() -> list[int]:
    """The cores this process may run on: its CPU affinity (a Slurm job's or a pool worker's share), not the
    host's. numba refuses more threads than that, so FFCV asked for every core of the host fails under a cpuset."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def usable_cores() -> int:
    return len(usable_cpus())


def make_loaders(cfg: RunConfig, *, device: torch.device | str, distributed: bool = False) -> Loaders:
    """Loaders over `cfg.data.dir` for one run; `distributed` shards every split over the process group."""
    device = torch.device(device)
    folder = cfg.data.dir
    manifest = read_manifest(folder)
    res = int(manifest["settings"].get("res") or manifest["image"]["height"])
    fixed = bool(manifest["image"].get("fixed_size", True))
    stored = min(int(manifest["image"]["height"]), int(manifest["image"]["width"])) if fixed else res
    crop = cfg.model.input_size
    if crop > stored:
        raise UserError(f"model.input_size = {crop} is larger than the {stored}px images in {folder}; "
                        f"set model.input_size <= {stored} or prepare the data with a larger --res")
    train_ids = subset_indices(int(manifest["splits"]["train"]["count"]), cfg.data.train_limit)
    if len(train_ids) < cfg.train.batch_size:  # the train loader drops the last partial batch
        raise UserError(f"train.batch_size = {cfg.train.batch_size} is larger than the {len(train_ids)} training "
                        f"images in {folder}; lower train.batch_size or raise data.train_limit")
    backend = pick_backend(cfg.data.backend, device)
    # only the chosen backend loads: FFCV (numba) and the GPU decoder take seconds to import
    if backend == "ffcv":
        from repro.data.ffcv_loader import make_ffcv_batches as make
    elif backend == "nvjpeg":
        from repro.data.nvjpeg_loader import make_nvjpeg_batches as make
    else:
        from repro.data.torch_loader import make_torch_batches as make
    splits = manifest["splits"]
    val_ids = subset_indices(int(splits["val"]["count"]), cfg.data.val_limit)
    mean_image = None
    if cfg.data.normalize == "mean-image":
        mean_image = torch.from_numpy(read_mean_image(folder, manifest)).permute(2, 0, 1).contiguous()
        if tuple(mean_image.shape) != (3, res, res):
            raise UserError(f"{folder}: the mean image is {tuple(mean_image.shape)[1:]}, the loaders show {res}x{res} "
                            f"images; rebuild with `{prepare_command(Path(folder), manifest, force=True)}`")
    world = rank_world()[1] if distributed else 1
    if cfg.train.batch_size % world:
        raise UserError(f"train.batch_size = {cfg.train.batch_size} does not split over {world} processes: the batch "
                        f"is global (each process trains batch / processes); use a world size that divides it")
    # train.batch_size is the global batch: each of the world's processes trains its share of every step
    common = dict(batch_size=cfg.train.batch_size // world, crop=crop, res=res, fixed_size=fixed, flip=cfg.data.flip,
                  seed=cfg.train.seed, workers=cfg.data.workers or usable_cores(), device=device,
                  distributed=distributed, mean_image=mean_image)
    train_path, val_path = beton_path(folder, manifest, "train"), beton_path(folder, manifest, "val")
    train = make(train_path, indices=train_ids, train=True, **common)
    val = make(val_path, indices=val_ids, train=False, **common)
    train_eval = make(train_path, indices=train_ids, train=False, **common)
    # training error in evaluation mode: a fixed sample as large as the validation set, so both errors are as precise
    score_ids = subset_indices(len(train_ids), len(val_ids))
    train_score = make(train_path, indices=train_ids[score_ids.astype(np.int64)], train=False, **common) \
        if cfg.train.score_train else None
    return Loaders(train=train, val=val, train_eval=train_eval, manifest=manifest, backend=backend,
                   num_train=len(train_ids), num_val=len(val_ids), batches_per_epoch=len(train),
                   mean_image=mean_image, train_ids=train_ids, seed=cfg.train.seed,
                   step=cfg.train.batch_size, train_score=train_score,
                   num_train_score=len(score_ids) if train_score is not None else 0)

"""Tiny stand-ins for the engine tests: a 4-class model and in-memory loaders that honour the loader contract
(uint8 NCHW batches, seeded shuffle by (seed, epoch), fixed val order). Also runnable as a script so that the
signal tests can train in a child process:  python tests/engine_support.py RUN_DIR '{"train.epochs": 3}'
"""

from __future__ import annotations

import json
import sys
import time
import types
from pathlib import Path

import torch
from torch import nn

from repro.config import RunConfig, apply_overrides


class TinyNet(nn.Module):
    """conv -> act -> global pool -> fc (the features) -> act -> dropout -> fc."""

    def __init__(self, num_classes: int = 4, activation: str = "relu"):
        super().__init__()
        act = nn.Tanh if activation == "tanh" else nn.ReLU
        self.conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), act(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Sequential(nn.Linear(8, 16), act())
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(16, num_classes))
        self.features_dim = 16

    def forward_features(self, x):
        return self.fc(self.conv(x))

    def forward(self, x):
        return self.head(self.forward_features(x))


def make_images(n: int, seed: int, side: int = 8, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    base = torch.tensor([[200, 40, 40], [40, 200, 40], [40, 40, 200], [150, 150, 150]], dtype=torch.float)[labels]
    x = base[:, :, None, None] + 50 * torch.randn(n, 3, side, side, generator=g)
    return x.clamp(0, 255).to(torch.uint8), labels


class TrainLoader:
    """Shuffles with a generator seeded by (seed, epoch) and flips at random, as the real loaders do."""

    def __init__(self, images, labels, batch_size, seed, rank=0, world=1):
        self.images, self.labels, self.batch_size, self.seed, self.epoch = images, labels, batch_size, seed, 0
        self.first_batch = 0
        self.rank, self.world = rank, world

    def set_epoch(self, epoch, first_batch=0):
        self.epoch, self.first_batch = epoch, first_batch

    def __len__(self):
        return len(self.labels) // (self.batch_size * self.world)  # full batches only, as the real loaders

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        first, self.epoch, self.first_batch = self.first_batch, self.epoch + 1, 0
        order = torch.randperm(len(self.labels), generator=g)[self.rank::self.world]  # as DistributedSampler
        for b, i in enumerate(range(0, len(self) * self.batch_size, self.batch_size)):
            idx = order[i:i + self.batch_size]
            x = self.images[idx]
            flip = torch.rand(len(idx), generator=g) < 0.5  # drawn for skipped batches too: the same flips after
            x[flip] = x[flip].flip(-1)
            if b >= first:
                yield x, self.labels[idx]


class ValLoader:
    def __init__(self, images, labels, batch_size):
        self.images, self.labels, self.batch_size = images, labels, batch_size

    def __iter__(self):
        for i in range(0, len(self.labels), self.batch_size):
            yield self.images[i:i + self.batch_size], self.labels[i:i + self.batch_size]


class Transform:
    """Mean subtraction, and at train time a little noise from torch's global generator (as PCA lighting)."""

    def __init__(self, manifest, cfg, train):
        self.train = train

    def __call__(self, x):
        x = (x.float() - 128.0) / 64.0
        return x + 0.05 * torch.randn_like(x) if self.train else x


def make_loaders(cfg, *, device, distributed=False):
    n_train = cfg.data.train_limit or 64
    xtr, ytr = make_images(n_train, 1)
    xva, yva = make_images(32, 2)
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if distributed else (0, 1)
    train = TrainLoader(xtr, ytr, cfg.train.batch_size // world, cfg.train.seed, rank, world)  # the batch is global
    if distributed:  # as DistributedSampler(shuffle=False): rank r takes samples r, r+W, ..., padded from the start
        idx = torch.arange(-(-32 // world) * world) % 32
        xva, yva = xva[idx[rank::world]], yva[idx[rank::world]]
    return types.SimpleNamespace(train=train, val=ValLoader(xva, yva, 16), train_eval=ValLoader(xtr, ytr, 16),
                                 manifest={"hash": "stand-in"}, backend="torch", num_train=n_train, num_val=32,
                                 batches_per_epoch=len(train),
                                 order_digest=lambda epoch: f"stand-in-{cfg.train.seed}-{epoch}",
                                 train_score=ValLoader(xtr[:32], ytr[:32], 16) if cfg.train.score_train else None,
                                 num_train_score=32)


def build_model(mcfg):
    return TinyNet(mcfg.num_classes, mcfg.activation)


def read_jsonl(path) -> list[dict]:
    """The records of a JSON-lines file (metrics, curve), in order."""
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def tiny_config(**overrides) -> RunConfig:
    base = {"model.num_classes": 4, "model.input_size": 8, "train.epochs": 2, "train.batch_size": 16,
            "train.lr": 0.05, "train.log_every": 3, "train.schedule": "constant", "train.device": "cpu",
            "train.target_train_err": 60.0, "train.channels_last": False}
    base.update(overrides)
    return apply_overrides(RunConfig(), base)


def use_stand_ins(monkeypatch_or_module) -> None:
    """Point the engine at the stand-ins (a pytest monkeypatch, or None to patch for good in a child process)."""
    import importlib

    ev = importlib.import_module("repro.engine.scoring")
    st = importlib.import_module("repro.engine.state")

    for mod, name, value in [(st, "make_loaders", make_loaders), (st, "build_model", build_model),
                             (st, "BatchTransform", Transform), (ev, "build_model", build_model)]:
        if monkeypatch_or_module is None:
            setattr(mod, name, value)
        else:
            monkeypatch_or_module.setattr(mod, name, value)


if __name__ == "__main__":
    from repro.engine import fit

    import os
    import signal

    import repro.engine.checkpoint as ck

    torch.set_num_threads(1)
    overrides = json.loads(sys.argv[2])
    real = overrides.pop("_real", False)  # the real loaders and models: overrides are then the whole config
    if not real:
        use_stand_ins(None)
    sleep = overrides.pop("_sleep", 0)  # seconds per training batch, so a signal lands mid-run
    kill_at = overrides.pop("_kill_in_save", None)  # [save number, "write" | "rename"]: SIGKILL inside a save
    if sleep:
        import repro.engine.state as tr

        def slow(manifest, cfg, train, base=tr.BatchTransform):
            inner = base(manifest, cfg, train)

            def call(x):
                if train:
                    time.sleep(sleep)
                return inner(x)
            return call

        tr.BatchTransform = slow
    if kill_at:
        saves = {"n": 0}
        real_save, real_replace = ck.torch.save, ck.os.replace

        def torch_save(obj, f):
            saves["n"] += 1
            if saves["n"] == kill_at[0] and kill_at[1] == "write":
                f.write(b"PK\x03\x04 half a checkpoint")  # the start of a zip, then the process dies
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            real_save(obj, f)

        def replace(src, dst):
            real_replace(src, dst)
            if saves["n"] == kill_at[0] and kill_at[1] == "rename" and str(dst).endswith("prev.pt"):
                os.kill(os.getpid(), signal.SIGKILL)  # between moving the old one away and the new one in

        ck.torch.save = torch_save
        ck.os.replace = replace
    cfg = apply_overrides(RunConfig(), overrides) if real else tiny_config(**overrides)
    run_dir = Path(sys.argv[1])
    if "WORLD_SIZE" in os.environ:  # under torchrun: log every file write per rank, keep each rank's final weights
        import repro.engine.state as tr
        from repro.engine import parallel

        rank, _ = parallel.init_from_env()
        log = run_dir.parent / f"writes-rank{rank}.txt"
        real_write, real_ckpt = tr.io.write_json, ck.save
        built = []

        def write_json(path, obj):
            with open(log, "a") as f:
                f.write(f"{Path(path).name}\n")
            real_write(path, obj)

        def save(d, state):
            with open(log, "a") as f:
                f.write("checkpoint.pt\n")
            return real_ckpt(d, state)

        tr.io.write_json, ck.save = write_json, save
        tr.build_model = lambda mcfg: built.append(build_model(mcfg)) or built[-1]
        fit(cfg, run_dir, progress=False)
        torch.save(built[0].state_dict(), run_dir.parent / f"weights-rank{rank}.pt")
        torch.distributed.destroy_process_group()
    else:
        fit(cfg, run_dir, progress=False)


class SlowBatches:
    """A training loader that sleeps `delay` s before each batch (a loader slower than the model)."""

    def __init__(self, batches, delay: float):
        self.batches, self.delay = batches, delay

    def __iter__(self):
        for batch in self.batches:
            time.sleep(self.delay)
            yield batch

    def __getattr__(self, name):
        return getattr(self.batches, name)


def slow_make_loaders(delay: float):
    """`make_loaders` of the stand-ins whose training batches come `delay` s apart."""
    def make(*a, **k):
        loaders = make_loaders(*a, **k)
        loaders.train = SlowBatches(loaders.train, delay)
        return loaders
    return make

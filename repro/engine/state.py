"""A run in progress: what it carries (`RunState`), how it is set up (loaders, model, optimizer, transforms:
`Parts`), checkpointed and restored, and the run record it ends with.

A checkpoint carries every field of `RunState` that the rest of the run depends on, so a run restored from one
continues exactly as if it had gone straight through (repro.engine.train).
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from repro import io
from repro.config import RunConfig, to_dict
from repro.data import make_loaders
from repro.data.augment import BatchTransform
from repro.engine import checkpoint, parallel, preempt
from repro.engine.provenance import provenance
from repro.engine.recipe import autocast_dtype, configure_device, make_optimizer, pick_device
from repro.record import RunRecord
from repro.errors import UserError
from repro.models import build_model
from repro.rundir import RunDir


@dataclass
class RunState:
    """Everything about a run in progress that a checkpoint must carry, plus what the record is built from."""

    cfg: RunConfig
    run_dir: RunDir
    config_hash: str
    rank: int = 0
    world: int = 1
    epoch: int = 0                 # the epoch in progress, 0-based (= epochs completed)
    batch: int = 0                 # the next batch of `epoch`; > 0 only in a checkpoint written inside an epoch
    iteration: int = 0             # optimizer steps taken
    lr_state: dict = field(default_factory=dict)  # repro.engine.schedule's state
    epoch_sums: list = field(default_factory=lambda: [0.0, 0.0, 0.0])  # loss sum, errors, images (all ranks)
    epoch_seconds: float = 0.0
    curve_sums: list = field(default_factory=lambda: [0.0, 0.0, 0.0])  # since the last curve point (all ranks)
    curve_rows: list = field(default_factory=list)  # the training curve so far (rank 0: for the learn check)
    events: Any = None             # rank 0's TensorBoard event log (repro.engine.events)
    progress: Any = None           # rank 0's progress file for `repro status --watch` (repro.engine.events)
    iters_to_target: int | None = None
    best_val: float = math.inf
    rows: list = field(default_factory=list)  # metrics.jsonl
    train_images: float = 0.0
    train_seconds: float = 0.0
    data_wait_s: float = 0.0       # of train_seconds, how long the loop waited for the loader's next batch
    final: dict | None = None      # the final scoring
    lrn_strength: dict | None = None  # measured on one validation batch at the end (models with LRN)
    logits: torch.Tensor | None = None
    prov: dict = field(default_factory=dict)
    started: str = ""
    t0: float = field(default_factory=time.perf_counter)
    last_save: float = field(default_factory=time.monotonic)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class Parts:
    """What set-up builds for a run: loaders, model, optimizer and transforms."""

    loaders: Any
    model: torch.nn.Module    # the plain model (weights, checkpoints, scoring)
    net: torch.nn.Module      # what trains: the model, maybe wrapped in DDP and/or torch.compile
    optimizer: torch.optim.Optimizer
    train_tf: Any
    val_tf: Any
    device: torch.device
    dtype: torch.dtype | None
    val_count: int | None     # the val split's size when it is sharded over processes
    eager: torch.nn.Module | None = None  # `net` without torch.compile, to fall back to
    compile_pending: bool = False         # compiled, and its first step (where compiling happens) not run yet


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def check_run_dir(run_dir: RunDir, cfg: RunConfig, chash: str, is_main: bool) -> RunRecord | None:
    """Write the run's config, refuse a folder that holds another config, and return a finished record if any."""
    old = (io.read_json(run_dir.config) or {}).get("config_hash") if run_dir.config.exists() else None
    if old is not None and old != chash:
        raise UserError(f"{run_dir} holds a run of another config (hash {old}, this one is {chash}); "
                        f"train it in a new folder")
    if is_main:
        io.write_json(run_dir.config, {"config": to_dict(cfg), "config_hash": chash})
    record = run_dir.read_record()
    return record if record is not None and record.finished and record.config_hash == chash else None


def set_up(state: RunState) -> Parts:
    cfg, t = state.cfg, state.cfg.train
    if t.eval_every > 1 and t.schedule == "plateau":
        raise UserError(f"train.eval_every = {t.eval_every}: the plateau schedule reads the validation error after "
                        f"every epoch; use --set train.eval_every=1 or another train.schedule")
    device = pick_device(t.device)
    state.prov = provenance(device)
    loaders = make_loaders(cfg, device=device, distributed=state.world > 1)
    state.prov.update(data_manifest_hash=loaders.manifest.get("hash"), data_backend=loaders.backend)
    if loaders.batches_per_epoch < 1:
        raise UserError(f"{cfg.data.dir}: {loaders.num_train} training images make no full batch of "
                        f"{t.batch_size} per process; lower train.batch_size or raise data.train_limit")
    torch.manual_seed(t.seed)  # the initial weights depend on the seed only
    model = build_model(cfg.model).to(device)
    if t.channels_last:  # oneDNN on CPU gains from it too (1.5x at demo scale)
        model = model.to(memory_format=torch.channels_last)
    configure_device(device)
    net = parallel.wrap(model, device) if state.world > 1 else model
    parts = Parts(loaders=loaders, model=model, net=net, optimizer=make_optimizer(model, t),
                  train_tf=BatchTransform(loaders.manifest, cfg, train=True),
                  val_tf=BatchTransform(loaders.manifest, cfg, train=False), device=device,
                  dtype=autocast_dtype(t.precision, device),
                  val_count=loaders.num_val if state.world > 1 else None, eager=net)
    set_up_compile(state, parts)
    return parts


def wants_compile(setting: str, device: torch.device) -> bool:
    """`train.compile`: "auto" compiles on CUDA (on a CPU compiling takes longer than it saves in a short run)."""
    return setting == "true" or (setting == "auto" and device.type == "cuda")


def set_up_compile(state: RunState, parts: Parts) -> None:
    """torch.compile the training net when `train.compile` asks for it. Compiling happens at the first step, which
    the loop runs under `compile_failed`'s fallback; the run record's provenance says what came of it."""
    state.prov["compile"] = "off"
    if not wants_compile(state.cfg.train.compile, parts.device):
        return
    try:
        import torch._inductor.config as inductor  # deferred: loads the compiler's settings only when compiling
        # dropout masks from torch's own generator, as in eager mode: otherwise inductor draws its own on CUDA, and a
        # compiled run (compile is not hashed) or one that falls back to eager would train on other masks
        inductor.fallback_random = True
        # static shapes: a training batch has one shape (the last partial batch is dropped)
        parts.net, parts.compile_pending = torch.compile(parts.eager, dynamic=False), True
        state.prov["compile"] = "on"
    except Exception as e:
        compile_failed(state, parts, e)


_warned: set[str] = set()


def compile_failed(state: RunState, parts: Parts, error: BaseException) -> None:
    """Train eager from here: warn (once per process) and say so in the run record's provenance."""
    text = " ".join(str(error).split())[:300]
    note = f"torch.compile failed ({type(error).__name__}: {text}); trained eager"
    parts.net, parts.compile_pending = parts.eager, False
    state.prov["compile"] = note
    if "compile" not in _warned:
        _warned.add("compile")
        logging.getLogger("repro.engine").warning(note)


def restore(state: RunState, parts: Parts) -> None:
    """Continue from the run folder's checkpoint, if any; drop log lines written after it."""
    saved = checkpoint.load(state.run_dir)
    if saved is not None:
        if saved.get("config_hash") != state.config_hash:
            raise UserError(f"{state.run_dir.checkpoint} belongs to another config; train this run in a new folder")
        parts.model.load_state_dict(saved["model"])
        parts.optimizer.load_state_dict(saved["optimizer"])
        state.epoch, state.batch, state.iteration = saved["epoch"], _batch_at(state, saved), saved["iteration"]
        # summed over ranks when saved: rank 0 carries them on, the others start from zero
        state.lr_state = dict(saved["lr_state"])
        state.curve_sums = list(saved["curve_sums"]) if state.is_main else [0.0, 0.0, 0.0]
        state.epoch_sums = list(saved["epoch_sums"]) if state.is_main else [0.0, 0.0, 0.0]  # summed over ranks
        state.epoch_seconds, state.iters_to_target = saved["epoch_seconds"], saved["iters_to_target"]
        state.best_val, state.train_images, state.train_seconds = (saved["best_val"], saved["train_images"],
                                                                  saved["train_seconds"])
        state.data_wait_s = saved.get("data_wait_s", 0.0)
    if state.is_main:
        state.rows = keep_jsonl(state.run_dir.metrics, "epoch", state.epoch)
        state.curve_rows = keep_jsonl(state.run_dir.curve, "iteration", state.iteration)


def keep_jsonl(path: Path, key: str, upto: int) -> list[dict]:
    """Keep the rows written up to the checkpoint we resume from (key <= upto), dropping later and torn lines."""
    rows = [r for r in io.read_jsonl(path) if r.get(key, math.inf) <= upto]
    io.write_jsonl(path, rows)
    return rows


def _batch_at(state: RunState, saved: dict) -> int:
    """The step to continue from: where the checkpoint stood in samples of its epoch, over the global batch. A step
    is the same global batch at any world size, so a run resumed on another number of processes continues at the
    same sample; a checkpoint that stood between steps of this batch size cannot be continued exactly."""
    batch = state.cfg.train.batch_size
    samples = saved.get("samples", saved["batch"] * batch)
    if samples % batch:
        raise UserError(f"{state.run_dir.checkpoint} stopped after sample {samples} of epoch {saved['epoch'] + 1}, "
                        f"not at a step of train.batch_size = {batch}; resume it with the batch size it trained with")
    return samples // batch


def save(state: RunState, parts: Parts) -> None:
    """A checkpoint of everything the run needs to continue from here (at an epoch's end or inside it)."""
    if state.is_main:
        preempt.check_owned("a checkpoint")
        checkpoint.save(state.run_dir, {
            "model": parallel.unwrap(parts.model).state_dict(), "optimizer": parts.optimizer.state_dict(),
            "epoch": state.epoch, "batch": state.batch, "iteration": state.iteration, "lr_state": state.lr_state,
            "samples": state.batch * state.cfg.train.batch_size, "world": state.world,
            "epoch_sums": state.epoch_sums, "epoch_seconds": state.epoch_seconds, "curve_sums": state.curve_sums,
            "iters_to_target": state.iters_to_target, "best_val": state.best_val,
            "train_images": state.train_images, "train_seconds": state.train_seconds,
            "data_wait_s": state.data_wait_s, "config_hash": state.config_hash})
    state.last_save = time.monotonic()


def make_record(state: RunState, status: str, error: str | None) -> RunRecord:
    """The run record of `state` as it stands, ending with `status`."""
    last = state.rows[-1] if state.rows else {}
    final = state.final or {}
    metrics = {
        "top1_err": final.get("top1_err", last.get("val_top1_err")),
        "top5_err": final.get("top5_err", last.get("val_top5_err")),
        "top1_err_10crop": final.get("top1_err_10crop"), "top5_err_10crop": final.get("top5_err_10crop"),
        "train_loss": last.get("train_loss"), "train_top1_err": last.get("train_top1_err"),
        "train_eval_top1_err": last.get("train_eval_top1_err"),
        "best_val_top1_err": state.best_val, "iters_to_target": state.iters_to_target,
    }
    prov = dict(state.prov)
    prov.update(wall_time_s=time.perf_counter() - state.t0,
                images_per_s=state.train_images / state.train_seconds if state.train_seconds else None,
                data_wait_fraction=state.data_wait_s / state.train_seconds if state.train_seconds else None,
                started=state.started, finished=now())
    return RunRecord(status=status, error=error, config=to_dict(state.cfg), config_hash=state.config_hash,
                     epochs_done=state.epoch, iterations=state.iteration, metrics=metrics, provenance=prov,
                     lrn_strength=state.lrn_strength)

"""Training one run: the paper's SGD recipe (section 5), per-epoch metrics and checkpoints, exact resume, and a
run record (`result.json`) that says how the run ended: done, diverged, interrupted, preempted or failed.

Randomness is reseeded before every optimizer step from (seed, epoch, batch, rank), and the loaders shuffle by
(seed, epoch) and can start an epoch at any batch, so a run resumed from a checkpoint, written at an epoch's end
or inside an epoch (on a timer, `train.checkpoint_minutes`, or on a preemption request, `repro.engine.preempt`),
continues exactly as if it had gone straight through.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from repro import io
from repro.config import RunConfig, config_hash, to_dict
from repro.data import make_loaders
from repro.data.augment import BatchTransform, center_crop
from repro.engine import checkpoint, parallel, preempt, schedule
from repro.engine.recipe import autocast_dtype, make_optimizer, pick_device, step_seed
from repro.engine.scoring import evaluate, lrn_strength
from repro.engine.provenance import provenance
from repro.engine.record import RunRecord
from repro.errors import UserError
from repro.models import build_model
from repro.rundir import RunDir
from repro.views import progress_console


class Diverged(Exception):
    """The training loss became NaN or infinite."""


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
    curve_sums: list = field(default_factory=lambda: [0.0, 0.0, 0.0])  # since the last curve point (rank 0)
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


# --- set-up -------------------------------------------------------------------------------------------------------

def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _check_run_dir(run_dir: RunDir, cfg: RunConfig, chash: str, is_main: bool) -> RunRecord | None:
    """Write the run's config, refuse a folder that holds another config, and return a finished record if any."""
    old = (io.read_json(run_dir.config) or {}).get("config_hash") if run_dir.config.exists() else None
    if old is not None and old != chash:
        raise UserError(f"{run_dir} holds a run of another config (hash {old}, this one is {chash}); "
                        f"train it in a new folder")
    if is_main:
        io.write_json(run_dir.config, {"config": to_dict(cfg), "config_hash": chash})
    record = run_dir.read_record()
    return record if record is not None and record.finished and record.config_hash == chash else None


def _set_up(state: RunState) -> Parts:
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
    net = parallel.wrap(model, device) if state.world > 1 else model
    if t.compile:
        net = torch.compile(net)
    return Parts(loaders=loaders, model=model, net=net, optimizer=make_optimizer(model, t),
                 train_tf=BatchTransform(loaders.manifest, cfg, train=True),
                 val_tf=BatchTransform(loaders.manifest, cfg, train=False), device=device,
                 dtype=autocast_dtype(t.precision, device),
                 val_count=loaders.num_val if state.world > 1 else None)


def _restore(state: RunState, parts: Parts) -> None:
    """Continue from the run folder's checkpoint, if any; drop log lines written after it."""
    saved = checkpoint.load(state.run_dir)
    if saved is not None:
        if saved.get("config_hash") != state.config_hash:
            raise UserError(f"{state.run_dir.checkpoint} belongs to another config; train this run in a new folder")
        parts.model.load_state_dict(saved["model"])
        parts.optimizer.load_state_dict(saved["optimizer"])
        state.epoch, state.batch, state.iteration = saved["epoch"], saved["batch"], saved["iteration"]
        state.lr_state, state.curve_sums = dict(saved["lr_state"]), list(saved["curve_sums"])
        state.epoch_sums = list(saved["epoch_sums"]) if state.is_main else [0.0, 0.0, 0.0]  # summed over ranks
        state.epoch_seconds, state.iters_to_target = saved["epoch_seconds"], saved["iters_to_target"]
        state.best_val, state.train_images, state.train_seconds = (saved["best_val"], saved["train_images"],
                                                                  saved["train_seconds"])
        state.data_wait_s = saved.get("data_wait_s", 0.0)
    if state.is_main:
        state.rows = _keep_jsonl(state.run_dir.metrics, "epoch", state.epoch)
        _keep_jsonl(state.run_dir.curve, "iteration", state.iteration)


def _keep_jsonl(path: Path, key: str, upto: int) -> list[dict]:
    """Keep the rows written up to the checkpoint we resume from (key <= upto), dropping later and torn lines."""
    rows = [r for r in io.read_jsonl(path) if r.get(key, math.inf) <= upto]
    io.write_jsonl(path, rows)
    return rows


def _save(state: RunState, parts: Parts) -> None:
    """A checkpoint of everything the run needs to continue from here (at an epoch's end or inside it)."""
    if state.is_main:
        preempt.check_owned("a checkpoint")
        checkpoint.save(state.run_dir, {
            "model": parallel.unwrap(parts.model).state_dict(), "optimizer": parts.optimizer.state_dict(),
            "epoch": state.epoch, "batch": state.batch, "iteration": state.iteration, "lr_state": state.lr_state,
            "epoch_sums": state.epoch_sums, "epoch_seconds": state.epoch_seconds, "curve_sums": state.curve_sums,
            "iters_to_target": state.iters_to_target, "best_val": state.best_val,
            "train_images": state.train_images, "train_seconds": state.train_seconds,
            "data_wait_s": state.data_wait_s, "config_hash": state.config_hash})
    state.last_save = time.monotonic()


# --- the loop -----------------------------------------------------------------------------------------------------

def _progress_bar(enabled: bool):
    if not enabled:
        return None
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[ips]:>7.0f} img/s"), TimeRemainingColumn(), transient=False,
                    console=progress_console())


def _curve_point(state: RunState, sums: torch.Tensor) -> None:
    loss_sum, errors, n = sums.tolist()
    if parallel.any_true(not math.isfinite(loss_sum)):
        raise Diverged(f"training loss is {loss_sum / max(n, 1)} at iteration {state.iteration} "
                       f"(epoch {state.epoch + 1})")
    row = {"iteration": state.iteration, "epoch": state.epoch + 1, "train_loss": loss_sum / max(n, 1),
           "train_top1_err": 100.0 * errors / max(n, 1)}
    if state.iters_to_target is None and row["train_top1_err"] < state.cfg.train.target_train_err:
        state.iters_to_target = state.iteration
    if state.is_main:
        preempt.check_owned(state.run_dir.curve.name)
        io.append_jsonl(state.run_dir.curve, row)


def _check_inside_epoch(state: RunState, parts: Parts, sums: torch.Tensor, t_start: float, synced: bool) -> None:
    """After a step: checkpoint when the timer is due, and checkpoint then stop when a stop was requested. With
    several processes all of them must agree, so they decide only at curve points, where they synchronise anyway."""
    if state.world > 1 and not synced:
        return
    minutes = state.cfg.train.checkpoint_minutes
    if state.is_main:
        preempt.check_owned("a checkpoint")
    stop = parallel.any_true(preempt.requested())
    due = minutes > 0 and parallel.any_true(time.monotonic() - state.last_save >= 60.0 * minutes)
    if stop or due:
        state.epoch_sums, state.curve_sums = parallel.all_sum(sums[0]).tolist(), sums[1].tolist()
        state.epoch_seconds = time.perf_counter() - t_start
        _save(state, parts)
    if stop:
        raise preempt.Preempted(f"in epoch {state.epoch + 1} before batch {state.batch + 1}")


def _waited(batches, state: RunState):
    """The batches of `batches`, adding the time spent waiting for each to `state.data_wait_s`: near 0 when the
    model is the bottleneck, the loader's shortfall when it is not (on a GPU the wait is the host's: the GPU runs
    asynchronously and the host blocks elsewhere while the GPU is the bottleneck)."""
    batches = iter(batches)
    while True:
        t0 = time.perf_counter()
        try:
            batch = next(batches)
        except StopIteration:
            return
        state.data_wait_s += time.perf_counter() - t0
        yield batch


def _train_epoch(state: RunState, parts: Parts, bar, task) -> dict:
    """Train from batch `state.batch` to the end of epoch `state.epoch`; returns its loss, error and images."""
    t, device = state.cfg.train, parts.device
    steps = parts.loaders.batches_per_epoch
    sums = torch.tensor([state.epoch_sums, state.curve_sums], dtype=torch.float64).to(device)  # epoch; curve
    per_step = schedule.changes_within_epoch(t, state.epoch)
    parts.net.train()
    parts.loaders.train.set_epoch(state.epoch, first_batch=state.batch)
    t_start, t_here, first_batch = time.perf_counter() - state.epoch_seconds, time.perf_counter(), state.batch
    wait_before = state.data_wait_s
    for images, labels in _waited(parts.loaders.train, state):
        torch.manual_seed(step_seed(t.seed, state.epoch, state.batch, state.rank))
        if per_step:
            for group in parts.optimizer.param_groups:
                group["lr"] = schedule.lr_at(t, state.lr_state, state.epoch, state.batch, steps)
        x = parts.train_tf(images)  # channels_last when the model is
        with contextlib.nullcontext() if parts.dtype is None else torch.autocast(device.type, dtype=parts.dtype):
            out = parts.net(x)
            loss = F.cross_entropy(out.float(), labels)
        parts.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        parts.optimizer.step()
        # Accumulate on the device; synchronise only at curve points (a .item() per step stalls a GPU).
        sums += torch.stack([loss.detach().double() * labels.shape[0], (out.argmax(1) != labels).sum().double(),
                             torch.full((), labels.shape[0], device=device, dtype=torch.float64)])  # a fill, no copy
        state.iteration += 1
        state.batch += 1
        curve_point = state.iteration % t.log_every == 0
        if curve_point:
            _curve_point(state, sums[1])
            sums[1].zero_()
        if bar is not None:
            images = (state.batch - first_batch) * labels.shape[0] * state.world
            bar.update(task, advance=1, ips=images / max(time.perf_counter() - t_here, 1e-9))
        if state.batch >= steps or (t.max_iters and state.iteration >= t.max_iters):
            break
        _check_inside_epoch(state, parts, sums, t_start, curve_point)
    state.curve_sums = sums[1].tolist()
    state.epoch_seconds = time.perf_counter() - t_start
    loss_sum, errors, n = parallel.all_sum(sums[0]).tolist()
    if not math.isfinite(loss_sum):
        raise Diverged(f"training loss is {loss_sum} in epoch {state.epoch + 1} (iteration {state.iteration})")
    return {"train_loss": loss_sum / max(n, 1), "train_top1_err": 100.0 * errors / max(n, 1), "images": n,
            "data_wait_s": state.data_wait_s - wait_before}


def _score(state: RunState, parts: Parts, ten_crop: bool) -> tuple[dict, torch.Tensor]:
    return evaluate(parts.model, parts.loaders.val, parts.val_tf, crop=state.cfg.model.input_size,
                    dtype=parts.dtype, count=parts.val_count, ten_crop=ten_crop)


def _end_epoch(state: RunState, parts: Parts, stats: dict, lr: float) -> None:
    """Score the epoch, log it, move the schedule on and checkpoint."""
    t = state.cfg.train
    final = state.epoch == t.epochs - 1 or bool(t.max_iters and state.iteration >= t.max_iters)
    val = {"top1_err": None, "top5_err": None}
    if final or (state.epoch + 1) % t.eval_every == 0:
        val, logits = _score(state, parts, ten_crop=t.ten_crop and final)  # the last epoch's scoring is the final one
        if final:
            state.final, state.logits = val, logits
        state.lr_state = schedule.after_epoch(t, state.lr_state, val["top1_err"])
        state.best_val = min(state.best_val, val["top1_err"])
    state.train_images += stats["images"]
    state.train_seconds += state.epoch_seconds
    row = {"epoch": state.epoch + 1, "iteration": state.iteration, "train_loss": stats["train_loss"],
           "train_top1_err": stats["train_top1_err"], "val_top1_err": val["top1_err"],
           "val_top5_err": val["top5_err"], "lr": lr,
           "images_per_s": stats["images"] / max(state.epoch_seconds, 1e-9), "seconds": state.epoch_seconds,
           "data_wait_s": stats["data_wait_s"]}
    state.rows.append(row)
    state.epoch, state.batch, state.epoch_sums, state.epoch_seconds = state.epoch + 1, 0, [0.0, 0.0, 0.0], 0.0
    if state.is_main:
        preempt.check_owned(state.run_dir.metrics.name)
        io.append_jsonl(state.run_dir.metrics, row)
    _save(state, parts)


def _epoch_loop(state: RunState, parts: Parts, progress: bool) -> None:
    t = state.cfg.train
    steps = parts.loaders.batches_per_epoch
    total = min(t.epochs * steps, t.max_iters) if t.max_iters else t.epochs * steps
    bar = _progress_bar(progress and state.is_main)
    with bar if bar is not None else contextlib.nullcontext():
        task = bar.add_task("train", total=total, completed=min(state.iteration, total), ips=0.0) if bar else None
        while state.epoch < t.epochs and not (t.max_iters and state.iteration >= t.max_iters):
            if parallel.any_true(preempt.requested()):  # asked during the last scoring, or before this run
                raise preempt.Preempted(f"before epoch {state.epoch + 1}")
            lr = schedule.lr_at(t, state.lr_state, state.epoch, 0, steps)
            for group in parts.optimizer.param_groups:
                group["lr"] = lr
            if bar is not None:
                scored = [r["val_top1_err"] for r in state.rows if r["val_top1_err"] is not None]
                last = f", val err {scored[-1]:.1f}%" if scored else ""
                bar.update(task, description=f"epoch {state.epoch + 1}/{t.epochs}{last}")
            stats = _train_epoch(state, parts, bar, task)
            _end_epoch(state, parts, stats, lr)


def _final_scoring(state: RunState, parts: Parts) -> None:
    if state.final is None:  # resumed after the last epoch's checkpoint
        state.final, state.logits = _score(state, parts, ten_crop=state.cfg.train.ten_crop)
    images, _ = next(iter(parts.loaders.val))
    with contextlib.nullcontext() if parts.dtype is None else torch.autocast(parts.device.type, dtype=parts.dtype):
        x = parts.val_tf(center_crop(images, state.cfg.model.input_size))
        state.lrn_strength = lrn_strength(parts.model, x, alpha_mode=state.cfg.model.lrn_alpha_mode)
    if state.is_main:
        preempt.check_owned(state.run_dir.val_logits.name)
        with io.atomic_path(state.run_dir.val_logits) as tmp, open(tmp, "wb") as f:
            np.save(f, state.logits.numpy().astype(np.float16))


def _run(state: RunState, progress: bool) -> None:
    """Set up, restore, train to the end (or max_iters) and score the final model."""
    parts = _set_up(state)
    _restore(state, parts)
    _epoch_loop(state, parts, progress)
    _final_scoring(state, parts)


def _record(state: RunState, status: str, error: str | None) -> RunRecord:
    last = state.rows[-1] if state.rows else {}
    final = state.final or {}
    metrics = {
        "top1_err": final.get("top1_err", last.get("val_top1_err")),
        "top5_err": final.get("top5_err", last.get("val_top5_err")),
        "top1_err_10crop": final.get("top1_err_10crop"), "top5_err_10crop": final.get("top5_err_10crop"),
        "train_loss": last.get("train_loss"), "train_top1_err": last.get("train_top1_err"),
        "best_val_top1_err": state.best_val, "iters_to_target": state.iters_to_target,
    }
    prov = dict(state.prov)
    prov.update(wall_time_s=time.perf_counter() - state.t0,
                images_per_s=state.train_images / state.train_seconds if state.train_seconds else None,
                data_wait_fraction=state.data_wait_s / state.train_seconds if state.train_seconds else None,
                started=state.started, finished=_now())
    return RunRecord(status=status, error=error, config=to_dict(state.cfg), config_hash=state.config_hash,
                     epochs_done=state.epoch, iterations=state.iteration, metrics=metrics, provenance=prov,
                     lrn_strength=state.lrn_strength)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def fit(cfg: RunConfig, run_dir: Path | RunDir, *, progress: bool = True) -> RunRecord:
    """Train (or resume, or return the finished record of) the run `cfg` in `run_dir`; returns the run record,
    also written into the folder (`RunDir.result`). Divergence is recorded, not raised. A preemption request
    (`repro.engine.preempt`: SIGUSR2, SIGHUP or `preempt.request()`) checkpoints inside the epoch and returns a
    "preempted" record; SIGINT/SIGTERM do the same, record "interrupted" and raise KeyboardInterrupt; any other
    error records "failed" and re-raises."""
    run_dir = RunDir(run_dir)
    rank, world = parallel.rank_world()
    run_dir.path.mkdir(parents=True, exist_ok=True)
    chash = config_hash(cfg)
    done = _check_run_dir(run_dir, cfg, chash, rank == 0)
    if done is not None:
        return done
    state = RunState(cfg=cfg, run_dir=run_dir, config_hash=chash, rank=rank, world=world, started=_now(),
                     lr_state=schedule.initial_state(cfg.train))

    def finish(status: str, error: str | None) -> RunRecord:
        record = _record(state, status, error)
        if state.is_main:
            preempt.check_owned(run_dir.result.name)
            run_dir.write_record(record)
        return record

    with preempt.handlers():
        try:
            _run(state, progress)
        except preempt.Abandoned:
            raise
        except Diverged as e:
            return finish("diverged", _one_line(e))
        except preempt.Preempted as e:
            if preempt.reason() == "interrupted":
                finish("interrupted", f"interrupted by a signal ({e}); run again to continue from there")
                raise KeyboardInterrupt(str(e)) from None
            return finish("preempted", f"preempted ({e}); run again to continue from there")
        except KeyboardInterrupt:
            finish("interrupted", "interrupted by a signal; run again to resume from the last checkpoint")
            raise
        except Exception as e:
            finish("failed", _one_line(e))
            raise
    return finish("done", None)

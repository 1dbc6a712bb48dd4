"""Training one run: the paper's SGD recipe (section 5), per-epoch metrics and checkpoints, exact resume, and a
run record that says how the run ended: done, diverged, did not learn, interrupted, preempted or failed.

Randomness is reseeded before every optimizer step from (seed, epoch, batch), and the loaders shuffle by
(seed, epoch) and can start an epoch at any batch, so a run resumed from a checkpoint, written at an epoch's end
or inside an epoch (on a timer, `train.checkpoint_minutes`, or on a preemption request, `repro.engine.preempt`),
continues exactly as if it had gone straight through.

Inside an epoch the host never waits for the GPU: the loss and error sums stay on the device, and the training
curve's points reach the host together, about every CURVE_SYNC_STEPS steps, before a checkpoint and at the epoch's
end (one transfer, and with several processes one all-reduce that also carries the stop and timer requests).
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from repro import io
from repro.config import RunConfig, config_hash
from repro.data.augment import center_crop, to_device
from repro.engine import parallel, preempt, schedule
from repro.engine.events import EventLog, ProgressFile
from repro.engine.recipe import step_seed
from repro.engine.scoring import evaluate, lrn_strength
from repro.record import RunRecord
from repro.engine.state import (Parts, RunState, check_run_dir, compile_failed, make_record, now, restore, save,
                                set_up)
from repro.rundir import RunDir
from repro.views import progress_console


class Diverged(Exception):
    """The training loss became NaN or infinite."""


class DidNotLearn(Exception):
    """The training error was still near chance at the learn check (`train.learn_check`)."""


LEARN_CHECK_MIN_ITERS = 100  # before this many steps a training error near chance says nothing yet


# --- the loop -----------------------------------------------------------------------------------------------------

def _progress_bar(enabled: bool):
    if not enabled:
        return None
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[ips]:>7.0f} img/s"), TimeRemainingColumn(), transient=False,
                    console=progress_console())


CURVE_SYNC_STEPS = 500  # the curve's points reach the host about this often (and at every epoch's end)


class _Curve:
    """The training curve's points not yet on the host: each point's (loss sum, errors, images) stays on the device
    until a sync (when its buffer is full, before a checkpoint, at the epoch's end), so that no step waits for the
    GPU. The curve file gets the same rows, only later; the divergence and learn checks read them as they arrive."""

    def __init__(self, log_every: int, device: torch.device):
        self.sums = torch.zeros(max(1, CURVE_SYNC_STEPS // log_every), 3, dtype=torch.float64, device=device)
        self.at: list[tuple[int, int]] = []  # (iteration, epoch) of each point held

    def add(self, point: torch.Tensor, iteration: int, epoch: int) -> None:
        self.sums[len(self.at)].copy_(point)
        self.at.append((iteration, epoch))

    @property
    def full(self) -> bool:
        return len(self.at) == len(self.sums)


def _synced(curve: _Curve, sums: torch.Tensor, flags: tuple[float, ...] = ()) -> tuple[list, list, list, list]:
    """(curve points as (iteration, epoch, loss sum, errors, images), the epoch's sums, the curve's running sums,
    `flags`), all summed over the ranks: one all-reduce with several processes and one transfer to the host. The
    curve is emptied."""
    n = len(curve.at)
    parts = [curve.sums[:n].reshape(-1), sums.reshape(-1)]
    if flags:
        parts.append(to_device(torch.tensor(flags, dtype=torch.float64), sums.device))
    values = parallel.all_sum(torch.cat(parts)).tolist()
    points = [(it, epoch, *values[3 * k:3 * k + 3]) for k, (it, epoch) in enumerate(curve.at)]
    curve.at.clear()
    return points, values[3 * n:3 * n + 3], values[3 * n + 3:3 * n + 6], values[3 * n + 6:]


def _record_points(state: RunState, total: int, points: list) -> None:
    """Curve points that reached the host, in order: a non-finite loss stops the run (every rank reads the same
    sums), else the row is written and the learn check looks at it."""
    if state.is_main and points:
        preempt.check_owned(state.run_dir.curve.name)
    for iteration, epoch, loss_sum, errors, n in points:
        if not math.isfinite(loss_sum):
            raise Diverged(f"training loss is {loss_sum / max(n, 1)} at iteration {iteration} (epoch {epoch + 1})")
        row = {"iteration": iteration, "epoch": epoch + 1, "train_loss": loss_sum / max(n, 1),
               "train_top1_err": 100.0 * errors / max(n, 1)}
        if state.iters_to_target is None and row["train_top1_err"] < state.cfg.train.target_train_err:
            state.iters_to_target = iteration
        if state.is_main:
            io.append_jsonl(state.run_dir.curve, row)
            state.curve_rows.append(row)
            state.events.curve(row)
        _check_learning(state, total, iteration)


def _check_learning(state: RunState, total: int, iteration: int) -> None:
    """At the first curve point past `train.learn_check` of the `total` iterations (and past LEARN_CHECK_MIN_ITERS):
    stop a run whose training error (the curve's mean over the second half of that span, as logged while training)
    is within `train.learn_margin` points of chance. The point is `iteration`'s; the run stops where the point
    reached the host. Every rank reaches the check at the same step; rank 0's curve decides."""
    t = state.cfg.train
    at = max(math.ceil(t.learn_check * total), LEARN_CHECK_MIN_ITERS)
    if not t.learn_check or not (iteration >= at > iteration - t.log_every):
        return
    window = [r["train_top1_err"] for r in state.curve_rows if at / 2 < r["iteration"] <= iteration]
    err = float(np.mean(window)) if window else math.nan
    chance = 100.0 * (1.0 - 1.0 / state.cfg.model.num_classes)
    if parallel.any_true(state.is_main and err > chance - t.learn_margin):
        raise DidNotLearn(f"training error {err:.1f}% over iterations {math.floor(at / 2) + 1}-{iteration} of "
                          f"{total}, within {t.learn_margin:g} points of chance ({chance:.1f}% for "
                          f"{state.cfg.model.num_classes} classes); stopped at the learn check "
                          f"(train.learn_check = {t.learn_check:g})")


def _inside_epoch(state: RunState, parts: Parts, curve: _Curve, sums: torch.Tensor, t_start: float,
                  total: int) -> None:
    """After a step that does not end the epoch: bring the curve to the host when its buffer is full; checkpoint
    when the timer is due, and checkpoint then stop when a stop was requested. In one process the requests are host
    flags, read every step. With several processes all of them must agree, so they decide at the curve's syncs,
    their flags summed over the ranks in the same all-reduce as the curve."""
    minutes = state.cfg.train.checkpoint_minutes
    stop, due = preempt.requested(), minutes > 0 and time.monotonic() - state.last_save >= 60.0 * minutes
    if state.world > 1 and not curve.full:
        return
    if state.is_main:
        preempt.check_owned("a checkpoint")
    if state.world > 1:
        points, epoch_sums, curve_sums, flags = _synced(curve, sums, (float(stop), float(due)))
        stop, due = flags[0] > 0, flags[1] > 0
    elif curve.full or stop or due:
        points, epoch_sums, curve_sums, _ = _synced(curve, sums)
    else:
        return
    _record_points(state, total, points)  # the rows up to here are written before a checkpoint that counts them
    if stop or due:
        state.epoch_sums, state.curve_sums = epoch_sums, curve_sums
        state.epoch_seconds = time.perf_counter() - t_start
        save(state, parts)
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


def _step(state: RunState, parts: Parts, images, labels, lr_per_step: bool, steps: int):
    """One optimizer step, seeded by (seed, epoch, batch) so that a resumed run repeats it (seeding sets the
    generators' seeds on the host: no sync). The first step of a compiled model may fail to compile: then the model
    trains eager from here, this step again from its seed. Returns (outputs, loss)."""
    t, device = state.cfg.train, parts.device
    while True:
        torch.manual_seed(step_seed(t.seed, state.epoch, state.batch))
        if lr_per_step:
            for group in parts.optimizer.param_groups:
                group["lr"] = schedule.lr_at(t, state.lr_state, state.epoch, state.batch, steps)
        x = parts.train_tf(images)  # channels_last when the model is
        try:
            with contextlib.nullcontext() if parts.dtype is None else torch.autocast(device.type, dtype=parts.dtype):
                out = parts.net(x)
                loss = F.cross_entropy(out.float(), labels)
            parts.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            break
        except Exception as e:
            if not parts.compile_pending:
                raise
            compile_failed(state, parts, e)
    parts.compile_pending = False
    parts.optimizer.step()
    return out, loss


def _train_epoch(state: RunState, parts: Parts, bar, task) -> dict:
    """Train from batch `state.batch` to the end of epoch `state.epoch`; returns its loss, error and images."""
    t, device = state.cfg.train, parts.device
    steps = parts.loaders.batches_per_epoch
    total = min(t.epochs * steps, t.max_iters) if t.max_iters else t.epochs * steps
    sums = to_device(torch.tensor([state.epoch_sums, state.curve_sums], dtype=torch.float64), device)  # epoch; curve
    curve = _Curve(t.log_every, device)
    per_step = schedule.changes_within_epoch(t, state.epoch)
    parts.net.train()
    parts.loaders.train.set_epoch(state.epoch, first_batch=state.batch)
    t_start, t_here, first_batch = time.perf_counter() - state.epoch_seconds, time.perf_counter(), state.batch
    wait_before = state.data_wait_s
    for images, labels in _waited(parts.loaders.train, state):
        out, loss = _step(state, parts, images, labels, per_step, steps)
        # Accumulate on the device; the host reads the sums only at syncs (a .item() per step stalls a GPU).
        sums += torch.stack([loss.detach().double() * labels.shape[0], (out.argmax(1) != labels).sum().double(),
                             torch.full((), labels.shape[0], device=device, dtype=torch.float64)])  # a fill, no copy
        state.iteration += 1
        state.batch += 1
        if state.iteration % t.log_every == 0:
            curve.add(sums[1], state.iteration, state.epoch)  # the whole global batch, summed over ranks at a sync
            sums[1].zero_()
        images_here = (state.batch - first_batch) * labels.shape[0] * state.world
        if bar is not None:
            bar.update(task, advance=1, ips=images_here / max(time.perf_counter() - t_here, 1e-9))
        if state.progress is not None:
            state.progress.beat(state)
        if state.batch >= steps or (t.max_iters and state.iteration >= t.max_iters):
            break
        _inside_epoch(state, parts, curve, sums, t_start, total)
    points, (loss_sum, errors, n), curve_sums, _ = _synced(curve, sums)
    state.curve_sums = curve_sums if state.is_main else [0.0, 0.0, 0.0]  # the next epoch adds to it on rank 0 only
    state.epoch_seconds = time.perf_counter() - t_start
    _record_points(state, total, points)
    if not math.isfinite(loss_sum):
        raise Diverged(f"training loss is {loss_sum} in epoch {state.epoch + 1} (iteration {state.iteration})")
    return {"train_loss": loss_sum / max(n, 1), "train_top1_err": 100.0 * errors / max(n, 1), "images": n,
            "data_wait_s": state.data_wait_s - wait_before}


def _eval_merge(t) -> int:
    """Loader batches per evaluation batch: `train.eval_batch_size` (0: twice the training batch) over the batch."""
    return max(1, -(-(t.eval_batch_size or 2 * t.batch_size) // t.batch_size))


def _score(state: RunState, parts: Parts, ten_crop: bool) -> tuple[dict, torch.Tensor]:
    return evaluate(parts.model, parts.loaders.val, parts.val_tf, crop=state.cfg.model.input_size,
                    dtype=parts.dtype, count=parts.val_count, ten_crop=ten_crop, merge=_eval_merge(state.cfg.train))


def _score_train(state: RunState, parts: Parts) -> float | None:
    """`train.score_train`: top-1 error on the fixed training sample, in evaluation mode (no dropout, centre crop)."""
    if parts.loaders.train_score is None:
        return None
    count = parts.loaders.num_train_score if state.world > 1 else None
    metrics, _ = evaluate(parts.model, parts.loaders.train_score, parts.val_tf, crop=state.cfg.model.input_size,
                          dtype=parts.dtype, count=count, merge=_eval_merge(state.cfg.train))
    return metrics["top1_err"]


def _end_epoch(state: RunState, parts: Parts, stats: dict, lr: float) -> None:
    """Score the epoch, log it, move the schedule on and checkpoint."""
    t = state.cfg.train
    final = state.epoch == t.epochs - 1 or bool(t.max_iters and state.iteration >= t.max_iters)
    val, train_eval = {"top1_err": None, "top5_err": None}, None
    if final or (state.epoch + 1) % t.eval_every == 0:
        val, logits = _score(state, parts, ten_crop=t.ten_crop and final)  # the last epoch's scoring is the final one
        train_eval = _score_train(state, parts)
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
           "data_wait_s": stats["data_wait_s"], "data_order_digest": parts.loaders.order_digest(state.epoch)}
    if t.score_train:
        row["train_eval_top1_err"] = train_eval
    state.rows.append(row)
    state.epoch, state.batch, state.epoch_sums, state.epoch_seconds = state.epoch + 1, 0, [0.0, 0.0, 0.0], 0.0
    if state.is_main:
        preempt.check_owned(state.run_dir.metrics.name)
        io.append_jsonl(state.run_dir.metrics, row)
        state.events.epoch(row)
    save(state, parts)


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
    parts = set_up(state)
    restore(state, parts)
    if state.is_main:  # TensorBoard's copy of the curves, from where the run continues; the progress file
        state.events = EventLog(state.run_dir, state.iteration)
        t = state.cfg.train
        steps = parts.loaders.batches_per_epoch
        total = min(t.epochs * steps, t.max_iters) if t.max_iters else t.epochs * steps
        state.progress = ProgressFile(state.run_dir, total, steps, state.iteration)
    try:
        _epoch_loop(state, parts, progress)
        _final_scoring(state, parts)
    finally:
        if state.events is not None:
            state.events.close()


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
    done = check_run_dir(run_dir, cfg, chash, rank == 0)
    if done is not None:
        return done
    state = RunState(cfg=cfg, run_dir=run_dir, config_hash=chash, rank=rank, world=world, started=now(),
                     lr_state=schedule.initial_state(cfg.train))

    def finish(status: str, error: str | None) -> RunRecord:
        record = make_record(state, status, error)
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
        except DidNotLearn as e:
            return finish("did not learn", str(e))
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

"""Training one run: the paper's SGD recipe (section 5), per-epoch metrics and checkpoints, exact resume, and a
run record that says how the run ended: done, diverged, did not learn, interrupted, preempted or failed.

Randomness is reseeded before every optimizer step from (seed, epoch, batch, rank), and the loaders shuffle by
(seed, epoch) and can start an epoch at any batch, so a run resumed from a checkpoint, written at an epoch's end
or inside an epoch (on a timer, `train.checkpoint_minutes`, or on a preemption request, `repro.engine.preempt`),
continues exactly as if it had gone straight through.
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
from repro.data.augment import center_crop
from repro.engine import parallel, preempt, schedule
from repro.engine.recipe import step_seed
from repro.engine.scoring import evaluate, lrn_strength
from repro.record import RunRecord
from repro.engine.state import (Parts, RunState, check_run_dir, make_record, now, restore, save, set_up)
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
        state.curve_rows.append(row)


def _check_learning(state: RunState, total: int) -> None:
    """At the first curve point past `train.learn_check` of the `total` iterations (and past LEARN_CHECK_MIN_ITERS):
    stop a run whose training error (the curve's mean over the second half of that span, as logged while training)
    is within `train.learn_margin` points of chance. Every rank reaches the check at the same step; rank 0's curve
    decides."""
    t = state.cfg.train
    at = max(math.ceil(t.learn_check * total), LEARN_CHECK_MIN_ITERS)
    if not t.learn_check or not (state.iteration >= at > state.iteration - t.log_every):
        return
    window = [r["train_top1_err"] for r in state.curve_rows if r["iteration"] > at / 2]
    err = float(np.mean(window)) if window else math.nan
    chance = 100.0 * (1.0 - 1.0 / state.cfg.model.num_classes)
    if parallel.any_true(state.is_main and err > chance - t.learn_margin):
        raise DidNotLearn(f"training error {err:.1f}% over iterations {math.floor(at / 2) + 1}-{state.iteration} of "
                          f"{total}, within {t.learn_margin:g} points of chance ({chance:.1f}% for "
                          f"{state.cfg.model.num_classes} classes); stopped at the learn check "
                          f"(train.learn_check = {t.learn_check:g})")


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
        state.epoch_sums, state.curve_sums = parallel.all_sum(sums[0]).tolist(), parallel.all_sum(sums[1]).tolist()
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


def _train_epoch(state: RunState, parts: Parts, bar, task) -> dict:
    """Train from batch `state.batch` to the end of epoch `state.epoch`; returns its loss, error and images."""
    t, device = state.cfg.train, parts.device
    steps = parts.loaders.batches_per_epoch
    total = min(t.epochs * steps, t.max_iters) if t.max_iters else t.epochs * steps
    sums = torch.tensor([state.epoch_sums, state.curve_sums], dtype=torch.float64).to(device)  # epoch; curve
    per_step = schedule.changes_within_epoch(t, state.epoch)
    parts.net.train()
    parts.loaders.train.set_epoch(state.epoch, first_batch=state.batch)
    t_start, t_here, first_batch = time.perf_counter() - state.epoch_seconds, time.perf_counter(), state.batch
    wait_before = state.data_wait_s
    for images, labels in _waited(parts.loaders.train, state):
        torch.manual_seed(step_seed(t.seed, state.epoch, state.batch))
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
            _curve_point(state, parallel.all_sum(sums[1]))  # the whole global batch, at any world size
            sums[1].zero_()
            _check_learning(state, total)
        if bar is not None:
            images = (state.batch - first_batch) * labels.shape[0] * state.world
            bar.update(task, advance=1, ips=images / max(time.perf_counter() - t_here, 1e-9))
        if state.batch >= steps or (t.max_iters and state.iteration >= t.max_iters):
            break
        _check_inside_epoch(state, parts, sums, t_start, curve_point)
    curve = parallel.all_sum(sums[1]).tolist()  # the next epoch adds to it on rank 0 only: it is every rank's
    state.curve_sums = curve if state.is_main else [0.0, 0.0, 0.0]
    state.epoch_seconds = time.perf_counter() - t_start
    loss_sum, errors, n = parallel.all_sum(sums[0]).tolist()
    if not math.isfinite(loss_sum):
        raise Diverged(f"training loss is {loss_sum} in epoch {state.epoch + 1} (iteration {state.iteration})")
    return {"train_loss": loss_sum / max(n, 1), "train_top1_err": 100.0 * errors / max(n, 1), "images": n,
            "data_wait_s": state.data_wait_s - wait_before}


def _score(state: RunState, parts: Parts, ten_crop: bool) -> tuple[dict, torch.Tensor]:
    return evaluate(parts.model, parts.loaders.val, parts.val_tf, crop=state.cfg.model.input_size,
                    dtype=parts.dtype, count=parts.val_count, ten_crop=ten_crop)


def _score_train(state: RunState, parts: Parts) -> float | None:
    """`train.score_train`: top-1 error on the fixed training sample, in evaluation mode (no dropout, centre crop)."""
    if parts.loaders.train_score is None:
        return None
    count = parts.loaders.num_train_score if state.world > 1 else None
    metrics, _ = evaluate(parts.model, parts.loaders.train_score, parts.val_tf, crop=state.cfg.model.input_size,
                          dtype=parts.dtype, count=count)
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
    _epoch_loop(state, parts, progress)
    _final_scoring(state, parts)


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

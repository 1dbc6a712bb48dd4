"""What a run reports while it trains (rank 0 only): TensorBoard event files (`EventLog`) and a small progress
file for `repro status --watch` (`ProgressFile`).

The event files hold the training curve, and each epoch's validation and evaluation-mode training errors, learning
rate, images/s and loader wait.

They lie in the run folder (`RunDir.events`), one subfolder named by scale, experiment, variant and seed, so that
`tensorboard --logdir runs/store` lists every run by what it is. A resumed run opens a new event file that purges
every point from its resume step on (TensorBoard's `purge_step`): the points written after the checkpoint by the
process that stopped are dropped, as the run's own curve and metrics files drop them, and the curves continue
without duplicates.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from repro import io
from repro.rundir import RunDir

PROGRESS_S = float(os.environ.get("REPRO_PROGRESS_S", "10"))  # how often the progress file is rewritten

CURVE = {"train_loss": "train/loss", "train_top1_err": "train/top1_err"}
EPOCH = {"val_top1_err": "val/top1_err", "val_top5_err": "val/top5_err",
         "train_eval_top1_err": "train/top1_err_eval_mode", "lr": "train/lr", "images_per_s": "speed/images_per_s",
         "data_wait_s": "speed/data_wait_s"}


def run_name(run: RunDir) -> str:
    """`<scale>.<experiment>.<variant>.seed<k>` of the run's first planned user; the config hash where none."""
    planned = run.read_planned() or {}
    users = planned.get("runs") or []
    if not users:
        return run.config_hash
    u = users[0]
    return f"{planned.get('scale')}.{u.get('experiment')}.{u.get('variant')}.seed{u.get('seed')}"


class EventLog:
    """Scalars for TensorBoard; `iteration`: the step the run continues after (0 for a fresh start). Points an
    earlier process wrote past it are purged, also those of an attempt killed before its first checkpoint."""

    def __init__(self, run: RunDir, iteration: int = 0):
        # tensorboard loads only in a training process, and only on rank 0
        from torch.utils.tensorboard import SummaryWriter

        folder = Path(run.events) / run_name(run)
        self.writer = SummaryWriter(log_dir=str(folder), purge_step=iteration + 1, flush_secs=30)

    def curve(self, row: dict[str, Any]) -> None:
        for key, tag in CURVE.items():
            if row.get(key) is not None:
                self.writer.add_scalar(tag, row[key], row["iteration"])

    def epoch(self, row: dict[str, Any]) -> None:
        for key, tag in EPOCH.items():
            if row.get(key) is not None:
                self.writer.add_scalar(tag, row[key], row["iteration"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class ProgressFile:
    """Rewrites the run's progress file every PROGRESS_S seconds from host-side counters only (no device sync):
    epoch, step, images/s over the last interval, and the latest training and validation errors the run has."""

    def __init__(self, run: RunDir, total: int, steps: int, iteration: int):
        self.run, self.total, self.steps = run, total, steps
        self.last_t, self.last_iteration = time.monotonic(), iteration  # a resumed run counts from where it is

    def beat(self, state) -> None:
        now = time.monotonic()
        if now - self.last_t < PROGRESS_S:
            return
        # global steps of the global batch: every rank's images, whatever the epoch or the resume point
        rate = (state.iteration - self.last_iteration) * state.cfg.train.batch_size / max(now - self.last_t, 1e-9)
        self.last_t, self.last_iteration = now, state.iteration
        curve = state.curve_rows[-1] if state.curve_rows else {}
        val = next((r["val_top1_err"] for r in reversed(state.rows) if r.get("val_top1_err") is not None), None)
        io.write_json(self.run.progress, {
            "epoch": state.epoch + 1, "epochs": state.cfg.train.epochs, "batch": state.batch,
            "steps_per_epoch": self.steps, "iteration": state.iteration, "iterations": self.total,
            "images_per_s": rate, "train_top1_err": curve.get("train_top1_err"), "val_top1_err": val,
            "updated": time.time()})

"""TensorBoard event files of a run, written as it trains (rank 0 only): the training curve, and each epoch's
validation and evaluation-mode training errors, learning rate, images/s and loader wait.

They lie in the run folder (`RunDir.events`), one subfolder named by scale, experiment, variant and seed, so that
`tensorboard --logdir runs/store` lists every run by what it is. A resumed run opens a new event file that purges
every point from its resume step on (TensorBoard's `purge_step`): the points written after the checkpoint by the
process that stopped are dropped, as the run's own curve and metrics files drop them, and the curves continue
without duplicates.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from repro.rundir import RunDir

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

"""Learning-rate schedules, with state made only of plain numbers (it goes into checkpoints).

- plateau: section 5. Divide by 10 when the validation top-1 error has not improved for `plateau_patience`
  epochs, at most `lr_drops` times (the paper: three times in about 90 epochs).
- step: `lr_drops` divisions by 10 at equal intervals over the epochs (torchvision's reference recipe style).
- cosine: half a cosine from lr to 0 over all iterations (set every step: short runs end annealed).
- constant: lr throughout (section 3.1's CIFAR experiments).
Any of them can start with `warmup_epochs` of linear warm-up from lr/steps to lr (none in the paper's recipe;
small-scale runs use it so the nets without LRN survive their first steps at the same lr as those with it).
"""

from __future__ import annotations

import math

from repro.config import TrainConfig


def initial_state(t: TrainConfig) -> dict:
    return {"lr": float(t.lr), "best": math.inf, "bad_epochs": 0, "drops": 0}


def lr_at(t: TrainConfig, state: dict, epoch: int, step: int = 0, steps_per_epoch: int = 1) -> float:
    """The learning rate for iteration `step` (0-based) of epoch `epoch` (0-based)."""
    position = epoch + step / max(steps_per_epoch, 1)  # in epochs
    if t.schedule == "step":
        lr = t.lr * 0.1 ** min(t.lr_drops, epoch * (t.lr_drops + 1) // max(t.epochs, 1))
    elif t.schedule == "cosine":
        lr = 0.5 * t.lr * (1 + math.cos(math.pi * position / max(t.epochs, 1)))
    else:
        lr = state["lr"]  # plateau and constant
    if position < t.warmup_epochs:
        lr *= (epoch * steps_per_epoch + step + 1) / (t.warmup_epochs * steps_per_epoch)
    return lr


def changes_within_epoch(t: TrainConfig, epoch: int) -> bool:
    """Whether the lr must be set at every step of `epoch` rather than once at its start."""
    return t.schedule == "cosine" or epoch < t.warmup_epochs


def after_epoch(t: TrainConfig, state: dict, val_top1_err: float) -> dict:
    """Update the plateau state with this epoch's validation error; other schedules ignore it."""
    state = dict(state)
    if val_top1_err < state["best"]:
        state["best"], state["bad_epochs"] = float(val_top1_err), 0
    else:
        state["bad_epochs"] += 1
    if t.schedule == "plateau" and state["bad_epochs"] >= t.plateau_patience and state["drops"] < t.lr_drops:
        state["lr"] *= 0.1
        state["drops"] += 1
        state["bad_epochs"] = 0
    return state

"""Learning-rate schedules, set once per epoch, with state made only of plain numbers (it goes into checkpoints).

- plateau: section 5. Divide by 10 when the validation top-1 error has not improved for `plateau_patience`
  epochs, at most `lr_drops` times (the paper: three times in about 90 epochs).
- step: `lr_drops` divisions by 10 at equal intervals over the epochs (torchvision's reference recipe style).
- cosine: half a cosine from lr to 0 over the epochs.
- constant: lr throughout (section 3.1's CIFAR experiments).
"""

from __future__ import annotations

import math

from repro.config import TrainConfig


def initial_state(t: TrainConfig) -> dict:
    return {"lr": float(t.lr), "best": math.inf, "bad_epochs": 0, "drops": 0}


def lr_for_epoch(t: TrainConfig, state: dict, epoch: int) -> float:
    """The learning rate to train epoch `epoch` (0-based) with."""
    if t.schedule == "step":
        return t.lr * 0.1 ** min(t.lr_drops, epoch * (t.lr_drops + 1) // max(t.epochs, 1))
    if t.schedule == "cosine":
        return 0.5 * t.lr * (1 + math.cos(math.pi * epoch / max(t.epochs, 1)))
    return state["lr"]  # plateau and constant


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

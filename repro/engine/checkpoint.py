"""Checkpoints that survive a kill at any instant, and loading that never runs code from the file.

`save` writes the latest checkpoint under this process's temporary name, fsyncs it, moves the current one to the
previous one's name and renames the new file into place (repro.rundir names both), so at every instant at least one complete checkpoint exists on disk. `load` reads with
`torch.load(weights_only=True)`, which is why a checkpoint holds only tensors, numbers, strings and plain
containers; a truncated or corrupt latest checkpoint falls back to the previous one with a one-line warning.
"""

from __future__ import annotations

import logging
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from repro import io
from repro.errors import UserError
from repro.rundir import RunDir

log = logging.getLogger("repro.engine")


def save(run_dir: Path | RunDir, state: dict[str, Any]) -> Path:
    """Atomically write `state` as the run's latest checkpoint, keeping the one before as the previous one."""
    run_dir = RunDir(run_dir)
    path, prev, tmp = run_dir.checkpoint, run_dir.checkpoint_prev, io.temp_name(run_dir.checkpoint)
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            # A kill between these two renames leaves only checkpoint.prev.pt, which `load` falls back to.
            os.replace(path, prev)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    io.fsync_dir(run_dir.path)
    return path


def _read(path: Path) -> dict[str, Any]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "model" not in state or "epoch" not in state:
        raise ValueError("not a repro checkpoint (no model/epoch entries)")
    return state


_CORRUPT = (RuntimeError, EOFError, ValueError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, KeyError)


def load(run_dir: Path | RunDir) -> dict[str, Any] | None:
    """The newest readable checkpoint in `run_dir`, or None when there is none to resume from."""
    run_dir = RunDir(run_dir)
    path, prev = run_dir.checkpoint, run_dir.checkpoint_prev
    for tmp in run_dir.path.glob(path.name + ".*.tmp"):  # saves cut short; never complete, never read
        tmp.unlink(missing_ok=True)
    problem = None
    if path.exists():
        try:
            return _read(path)
        except _CORRUPT as e:
            problem = f"{path} is unreadable ({type(e).__name__}: {' '.join(str(e).split())[:120]})"
    if prev.exists():
        try:
            state = _read(prev)
        except _CORRUPT as e:
            what = problem or f"{path} is missing"
            raise UserError(f"{what} and {prev} is unreadable too ({type(e).__name__}); "
                            f"delete {run_dir} to train this run from scratch") from None
        what = problem or f"{path} is missing (a save was cut short)"
        log.warning("%s; resuming from %s (epoch %d)", what, prev.name, state["epoch"])
        return state
    if problem:
        raise UserError(f"{problem} and there is no {prev.name}; delete {run_dir} to train this run from scratch")
    return None

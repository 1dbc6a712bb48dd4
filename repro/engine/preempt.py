"""Stopping a run cleanly on request: a signal handler (or a launcher, or a test) calls `request()`, which only sets
a flag; the training loop polls `requested()` after every optimizer step and, when it is set, writes a checkpoint
inside the epoch and ends the run. A launcher requeues a run whose record says "preempted"; the requeued run
continues from the same batch of the same epoch.

    preempt.install([signal.SIGUSR2])    # e.g. Slurm's early-warning signal (sbatch --signal=USR2@120)
    record = fit(cfg, run_dir)          # record.status == "preempted" when the signal came during training

`fit` installs the handlers itself while it trains: SIGUSR2 and SIGHUP request a preemption (status "preempted",
`fit` returns); SIGINT and SIGTERM request a stop (status "interrupted", `fit` raises KeyboardInterrupt so a sweep
stops too), and a second SIGINT/SIGTERM raises KeyboardInterrupt at once. The flag stays set for the life of the
process (every later run in it stops at its first step) until `clear()`.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterable, Iterator

PREEMPT_SIGNALS = (signal.SIGUSR2, signal.SIGHUP)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

_reason: list[str] = []  # a list, not a global rebound in the handler: appending is all a handler does


class Preempted(Exception):
    """A run stopped at a preemption request after writing a checkpoint inside the epoch."""


def request(reason: str = "preempted") -> None:
    """Ask the running training loop to checkpoint and stop after its current step. Async-signal-safe: it only
    records the request. `reason` "interrupted" makes `fit` raise KeyboardInterrupt after the checkpoint."""
    _reason.append(reason)


def requested() -> bool:
    """Whether a stop has been requested (and not cleared) in this process."""
    return bool(_reason)


def reason() -> str | None:
    """"interrupted" if any request was a stop (SIGINT/SIGTERM), else "preempted"; None without a request."""
    if not _reason:
        return None
    return "interrupted" if "interrupted" in _reason else "preempted"


def clear() -> None:
    """Forget earlier requests (a launcher that keeps the process for another run; tests)."""
    _reason.clear()


def _preempt_handler(signum, frame) -> None:
    request("preempted")


def _stop_handler(signum, frame) -> None:
    if "interrupted" in _reason:  # asked twice: stop now, from the last checkpoint on disk
        raise KeyboardInterrupt(signal.Signals(signum).name)
    request("interrupted")


def install(signals: Iterable[int] = PREEMPT_SIGNALS, *, stop: bool = False) -> dict[int, object]:
    """Make each of `signals` call `request()` ("interrupted" with stop=True); returns the handlers it replaced
    (give them to `restore`). Only the main thread can install handlers; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    handler = _stop_handler if stop else _preempt_handler
    return {s: signal.signal(s, handler) for s in signals}


def restore(previous: dict[int, object]) -> None:
    for s, h in previous.items():
        signal.signal(s, h)


@contextlib.contextmanager
def handlers() -> Iterator[None]:
    """The handlers `fit` trains under: preemption signals and stop signals as the module docstring says."""
    old = {**install(PREEMPT_SIGNALS), **install(STOP_SIGNALS, stop=True)}
    try:
        yield
    finally:
        restore(old)

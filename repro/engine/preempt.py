"""Stopping a run cleanly on request: a signal handler (or a launcher, or a test) calls `request()`, which only sets
a flag; the training loop polls `requested()` after every optimizer step and, when it is set, writes a checkpoint
inside the epoch and ends the run. A launcher requeues a run whose record says "preempted"; the requeued run
continues from the same batch of the same epoch.

    preempt.install([signal.SIGUSR2])    # e.g. Slurm's early-warning signal (sbatch --signal=USR2@120)
    record = fit(cfg, run_dir)          # record.status == "preempted" when the signal came during training

`fit` installs the handlers itself while it trains: SIGUSR2 and SIGHUP request a preemption (status "preempted",
`fit` returns); SIGINT and SIGTERM request a stop (status "interrupted", `fit` raises KeyboardInterrupt so a sweep
stops too), and a second SIGINT/SIGTERM raises KeyboardInterrupt at once. The flag stays set for the life of the
process (every later run in it stops at its first step) until `clear()`. Inside a Slurm job `sigterm_preempts()`
makes SIGTERM a preemption signal: Slurm's preemption, time limit and `scancel` all send it, and each should leave a
checkpoint and a "preempted" run, whatever else arrives meanwhile; `received()` says which signals asked.

`abandon()` is the other kind of stop: this process lost its claim on the run (its lease's heartbeat lapsed and
another process took the run over), so the loop stops at its next step and writes nothing more to the run folder
(`Abandoned`), which is now the other process's.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterable, Iterator

PREEMPT_SIGNALS = (signal.SIGUSR2, signal.SIGHUP)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

_reason: list[str] = []  # a list, not a global rebound in the handler: appending is all a handler does
_received: list[int] = []  # the signals that asked for a preemption, in order
_term_preempts: list[bool] = []  # non-empty: SIGTERM is a preemption signal (`sigterm_preempts`)


class Preempted(Exception):
    """A run stopped at a preemption request after writing a checkpoint inside the epoch."""


class Abandoned(Exception):
    """A run stopped without writing anything, because another process now owns its folder (`abandon()`)."""


def request(reason: str = "preempted") -> None:
    """Ask the running training loop to checkpoint and stop after its current step. Async-signal-safe: it only
    records the request. `reason` "interrupted" makes `fit` raise KeyboardInterrupt after the checkpoint."""
    _reason.append(reason)


def requested() -> bool:
    """Whether a stop has been requested (and not cleared) in this process."""
    return bool(_reason)


def abandon() -> None:
    """Ask the training loop to stop at its next step without writing anything (the run is no longer ours)."""
    _reason.append("abandoned")


def reason() -> str | None:
    """"abandoned" if the run was taken over, else "interrupted" if any request was a stop (SIGINT/SIGTERM), else
    "preempted"; None without a request."""
    if not _reason:
        return None
    return next(r for r in ("abandoned", "interrupted", "preempted") if r in _reason)


def check_owned(what: str) -> None:
    """Raise `Abandoned` instead of letting a run write `what` to a folder that is no longer its own."""
    if "abandoned" in _reason:
        raise Abandoned(f"another process took this run over; not writing {what}")


def forget_abandon() -> None:
    """Drop an `abandon()` request once its run has stopped (other requests stay)."""
    while "abandoned" in _reason:
        _reason.remove("abandoned")


def clear() -> None:
    """Forget earlier requests (a launcher that keeps the process for another run; tests)."""
    _reason.clear()
    _received.clear()


def received() -> tuple[int, ...]:
    """The signals that asked for a preemption since the last `clear()` (a launcher tells a warning from SIGTERM)."""
    return tuple(_received)


def sigterm_preempts(on: bool = True) -> None:
    """From now on `handlers()` treats SIGTERM as a preemption signal (on=False: as a stop signal again)."""
    _term_preempts.clear()
    if on:
        _term_preempts.append(True)


def _preempt_handler(signum, frame) -> None:
    _received.append(signum)
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
    term = (signal.SIGTERM,) if _term_preempts else ()
    stops = tuple(s for s in STOP_SIGNALS if s not in term)
    old = {**install(PREEMPT_SIGNALS + term), **install(stops, stop=True)}
    try:
        yield
    finally:
        restore(old)

"""`--launcher local --parallel 1` (the default): train the runs in this process, one after another.

Each run is trained under its claim (repro.launch.worker.train_claimed); a run another process holds is waited for
once the others are done, then finished here if its holder stopped early.
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.markup import escape

from repro.record import finite
from repro.launch.worker import BUSY, load_config, placement, train_claimed
from repro.rundir import RunDir

WAIT_POLL_S = 2.0


def run_here(todo: list[tuple[str, RunDir]], *, console: Console, progress: bool) -> dict[str, str]:
    """Train `[(label, run)]` in this process; returns {config hash: final status}."""
    statuses: dict[str, str] = {}
    waiting: list[tuple[str, RunDir]] = []
    for label, run in todo:
        status = _run_one(run, label, progress, console)
        if status == BUSY:
            console.print(f"{label}: running in another process; will wait")
            waiting.append((label, run))
        else:
            statuses[run.config_hash] = status
    while waiting:  # another process had them: wait for it, then finish them here if it stopped early
        label, run = waiting[0]
        if run.is_held():
            time.sleep(WAIT_POLL_S)
            continue
        status = _run_one(run, label, progress, console)
        if status != BUSY:
            statuses[run.config_hash] = status
            waiting.pop(0)
    return statuses


def _run_one(run: RunDir, label: str, progress: bool, console: Console) -> str:
    """Train one run in this process under its claim; BUSY when another process holds it."""
    t0, trained = time.time(), []

    def started(status: str) -> None:
        trained.append(status)
        console.print(f"{label}: {'resuming' if status in ('interrupted', 'preempted') else 'training'}")

    status = train_claimed(load_config(run), run, progress=progress, where=placement("local"), on_start=started)
    if status == BUSY:
        return status
    record = run.read_record()
    if not trained:
        console.print(f"{label}: {status}, reused")
        return status
    top1 = record.metrics.get("top1_err") if record else None
    extra = f", top-1 err {top1:.2f}%" if finite(top1) else ""
    if status == "failed":
        console.print(f"[red]failed[/] {escape(str(run))}: {escape(str(record.error if record else None))}")
    console.print(f"{label}: {status} in {time.time() - t0:.1f} s{extra}")
    return status

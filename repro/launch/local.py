"""`--launcher local --parallel N`: up to N runs at once on this machine, each in its own worker process.

With GPUs each worker sees its own device (CUDA_VISIBLE_DEVICES); on a CPU each worker runs on its own group of
cores (`--cpus`, cores // N of them, as many torch and loader threads). A worker's output goes to the run's
`train_log`. A run that another launcher holds is polled until it is free, then tried again here if it did
not finish there.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from repro.errors import UserError
from repro.launch.worker import EXIT_BUSY, devices
from repro.rundir import RunDir

POLL_S = 0.5


def core_groups(parallel: int) -> list[str]:
    """This process's cores cut into `parallel` groups of equal size, each as `--cpus` takes it ("0,1")."""
    from repro.data import usable_cpus  # imports torch: only once a pool starts

    mine = usable_cpus()
    size = max(1, len(mine) // parallel)
    return [",".join(map(str, mine[k * size:(k + 1) * size])) for k in range(min(parallel, len(mine)))]


def _start(run_dir: RunDir, threads: int, slot: str | None, on_gpu: bool) -> subprocess.Popen:
    """A worker on one GPU (slot: its CUDA_VISIBLE_DEVICES) or on one group of cores (slot: `--cpus`)."""
    log = run_dir.train_log
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "repro.launch.worker", str(run_dir), "--threads", str(threads), "--log", str(log)]
    if on_gpu:
        env["CUDA_VISIBLE_DEVICES"] = slot
    elif slot is not None:
        cmd += ["--cpus", slot]
    with open(log, "a") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def run_pool(todo: list[tuple[str, RunDir]], parallel: int, *, console: Console, progress: bool) -> dict[str, str]:
    """Train `[(label, run)]` with up to `parallel` workers; returns {config hash: final status}."""
    gpus = devices()
    if gpus and parallel > len(gpus):
        raise UserError(f"--parallel {parallel}: this machine shows {len(gpus)} GPU(s); use --parallel {len(gpus)}")
    from repro.data import usable_cores  # imports torch: only once a pool starts

    cores = usable_cores()
    if not gpus and parallel > cores:
        raise UserError(f"--parallel {parallel}: this machine gives this process {cores} core(s); "
                        f"use --parallel {cores} or fewer")
    threads = max(1, cores // parallel)
    queue = list(todo)
    running: dict[RunDir, tuple[str, subprocess.Popen, str | None, float]] = {}
    busy: list[tuple[str, RunDir]] = []
    statuses: dict[str, str] = {}
    # each worker gets a GPU, or a group of cores of its own: FFCV's and numba's threads, which follow the core
    # count, would otherwise oversubscribe the machine (two unpinned workers on two cores ran 10x slower)
    free = list(gpus) if gpus else core_groups(parallel)
    pinned = bool(free)
    where = f"{len(gpus)} GPU(s)" if gpus else f"{threads} CPU thread(s) each"
    console.print(f"training {len(todo)} run(s), up to {parallel} at once ({where}); each run's log in its folder")
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=console, disable=not progress, transient=True)
    with bar:
        task = bar.add_task("runs", total=len(todo))
        try:
            while queue or running or busy:
                while queue and len(running) < parallel:
                    label, run_dir = queue.pop(0)
                    slot = free.pop(0) if pinned else None
                    running[run_dir] = (label, _start(run_dir, threads, slot, bool(gpus)), slot, time.time())
                for run_dir, (label, proc, slot, t0) in list(running.items()):
                    code = proc.poll()
                    if code is None:
                        continue
                    del running[run_dir]
                    if slot is not None:
                        free.append(slot)
                    if code == EXIT_BUSY:
                        busy.append((label, run_dir))
                        bar.console.print(f"{label}: running in another process; will wait")
                        continue
                    status = run_dir.own_status()
                    statuses[run_dir.config_hash] = status
                    bar.advance(task)
                    note = "" if code in (0, 1) else f" (worker exit {code}, see {run_dir.train_log})"
                    bar.console.print(f"{label}: {status} in {time.time() - t0:.1f} s{escape(note)}")
                for item in list(busy):  # held elsewhere: try again here once that holder lets go
                    if not item[1].is_held():
                        busy.remove(item)
                        queue.append(item)
                time.sleep(POLL_S)
        finally:
            for _, proc, _, _ in running.values():  # Ctrl-C: the workers record "interrupted" and stop
                proc.terminate()
            for _, proc, _, _ in running.values():
                proc.wait()
    return statuses

"""`--launcher local --parallel N`: up to N runs at once on this machine, each in its own worker process.

Each worker runs on its own group of cores (`--cpus`, cores // N of them, as many torch and loader threads), and
with GPUs also sees its own device (CUDA_VISIBLE_DEVICES): on an N-GPU machine worker k gets GPU k and the k-th
share of the cores, so N loaders do not fight over every core. A worker's output goes to the run's `train_log`.
A run that another launcher holds is polled until it is free, then tried again here if it did not finish there.
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


def worker_slots(parallel: int, gpus: list[str]) -> list[tuple[str | None, str | None]]:
    """(CUDA_VISIBLE_DEVICES, `--cpus`) of each of the `parallel` workers that may run at once: a GPU each where
    there are GPUs, and an equal share of this process's cores each (None where there are fewer cores than workers)."""
    groups = core_groups(parallel)
    count = min(parallel, len(gpus)) if gpus else len(groups)
    return [(gpus[k] if gpus else None, groups[k] if k < len(groups) else None) for k in range(count)]


def _start(run_dir: RunDir, threads: int, slot: tuple[str | None, str | None]) -> subprocess.Popen:
    """A worker on its slot: a GPU (CUDA_VISIBLE_DEVICES) and/or a group of cores (`--cpus`)."""
    log = run_dir.train_log
    gpu, cpus = slot
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "repro.launch.worker", str(run_dir), "--threads", str(threads), "--log", str(log)]
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    if cpus is not None:
        cmd += ["--cpus", cpus]
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
    running: dict[RunDir, tuple[str, subprocess.Popen, tuple, float]] = {}
    busy: list[tuple[str, RunDir]] = []
    statuses: dict[str, str] = {}
    # each worker gets a group of cores of its own (and its own GPU): FFCV's and numba's threads, which follow the
    # core count, would otherwise oversubscribe the machine (two unpinned workers on two cores ran 10x slower)
    free = worker_slots(parallel, gpus)
    where = (f"{len(free)} GPU(s), " if gpus else "") + f"{threads} CPU thread(s) each"
    console.print(f"training {len(todo)} run(s), up to {parallel} at once ({where}); each run's log in its folder")
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=console, disable=not progress, transient=True)
    with bar:
        task = bar.add_task("runs", total=len(todo))
        try:
            while queue or running or busy:
                while queue and free:  # one slot per worker running at once
                    label, run_dir = queue.pop(0)
                    slot = free.pop(0)
                    running[run_dir] = (label, _start(run_dir, threads, slot), slot, time.time())
                for run_dir, (label, proc, slot, t0) in list(running.items()):
                    code = proc.poll()
                    if code is None:
                        continue
                    del running[run_dir]
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

"""`--launcher local --parallel N`: up to N runs at once on this machine, each in its own worker process.

With GPUs each worker sees its own device (CUDA_VISIBLE_DEVICES); on a CPU the cores are divided between the
workers (torch threads per run = cores // N). A worker's output goes to `<run dir>/train.log`. A run that another
launcher holds is polled until it is free, then tried again here if it did not finish there.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from repro import lease
from repro import runs as store
from repro.errors import UserError
from repro.launch.worker import EXIT_BUSY, devices

POLL_S = 0.5


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _start(run_dir: Path, threads: int, gpu: str | None) -> subprocess.Popen:
    log = run_dir / "train.log"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    with open(log, "a") as out:
        return subprocess.Popen([sys.executable, "-m", "repro.launch.worker", str(run_dir), "--threads", str(threads),
                                 "--log", str(log)], stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)


def _free(run_dir: Path) -> bool:
    return not store.is_locked(run_dir) and lease.holder(run_dir) is None


def run_pool(todo: list[tuple[str, Path]], parallel: int, *, console: Console, progress: bool) -> dict[str, str]:
    """Train `[(label, run_dir)]` with up to `parallel` workers; returns {run dir name: final status}."""
    gpus = devices()
    if gpus and parallel > len(gpus):
        raise UserError(f"--parallel {parallel}: this machine shows {len(gpus)} GPU(s); use --parallel {len(gpus)}")
    threads = max(1, cores() // parallel)
    queue = list(todo)
    running: dict[Path, tuple[str, subprocess.Popen, str | None, float]] = {}
    busy: list[tuple[str, Path]] = []
    statuses: dict[str, str] = {}
    free_gpus = list(gpus)
    where = f"{len(gpus)} GPU(s)" if gpus else f"{threads} CPU thread(s) each"
    console.print(f"training {len(todo)} run(s), up to {parallel} at once ({where}); logs in <run dir>/train.log")
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=console, disable=not progress, transient=True)
    with bar:
        task = bar.add_task("runs", total=len(todo))
        try:
            while queue or running or busy:
                while queue and len(running) < parallel:
                    label, run_dir = queue.pop(0)
                    gpu = free_gpus.pop(0) if gpus else None
                    running[run_dir] = (label, _start(run_dir, threads, gpu), gpu, time.time())
                for run_dir, (label, proc, gpu, t0) in list(running.items()):
                    code = proc.poll()
                    if code is None:
                        continue
                    del running[run_dir]
                    if gpu is not None:
                        free_gpus.append(gpu)
                    if code == EXIT_BUSY:
                        busy.append((label, run_dir))
                        bar.console.print(f"{label}: running in another process; will wait")
                        continue
                    status = store.run_status(run_dir)
                    statuses[run_dir.name] = status
                    bar.advance(task)
                    note = "" if code in (0, 1) else f" (worker exit {code}, see {run_dir}/train.log)"
                    bar.console.print(f"{label}: {status} in {time.time() - t0:.1f} s{escape(note)}")
                for item in list(busy):  # held elsewhere: try again here once that holder lets go
                    if _free(item[1]):
                        busy.remove(item)
                        queue.append(item)
                time.sleep(POLL_S)
        finally:
            for _, proc, _, _ in running.values():  # Ctrl-C: the workers record "interrupted" and stop
                proc.terminate()
            for _, proc, _, _ in running.values():
                proc.wait()
    return statuses

"""Launchers: where and how the runs of `repro run` train. Each takes `[(label, RunDir)]` and returns
{config hash: status}; `train(...)` picks one from the options.

- local, `--parallel 1`: in this process, one run after another (repro.launch.inprocess).
- local, `--parallel N`: up to N worker processes on this machine, each with its own GPU or share of the cores
  (repro.launch.local).
- slurm: one Slurm job per run through submitit, a job array where the runs share settings (repro.launch.slurm);
  inside a job, repro.launch.job trains the run, with DDP when the job has several tasks, and requeues it when
  Slurm warns of preemption or the time limit.

Every path trains through `repro.launch.worker.train_claimed`, which takes the run's lease first, so two launchers
(two shells, two login nodes) never train one run twice.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from repro.launch.options import LAUNCHERS, LaunchOptions, resolve_options
from repro.rundir import RunDir

__all__ = ["LAUNCHERS", "LaunchOptions", "resolve_options", "train"]


def train(todo: list[tuple[str, RunDir]], runs_dir: Path, opts: LaunchOptions, *, console: Console,
          progress: bool) -> dict[str, str]:
    """Train `[(label, run)]` with the launcher `opts` names; returns {config hash: status} (for Slurm without
    `--wait`, the status at submission: "submitted", "pending", "running", ...)."""
    # each launcher loads only when chosen: the Slurm one imports submitit, the others torch
    if opts.launcher == "slurm":
        from repro.launch.slurm import submit_and_wait

        return submit_and_wait(todo, runs_dir, opts, console=console, progress=progress)
    if opts.parallel > 1:
        from repro.launch.local import run_pool

        return run_pool(todo, opts.parallel, console=console, progress=progress)
    from repro.launch.inprocess import run_here

    return run_here(todo, console=console, progress=progress)

"""`repro run`: plan every run of the chosen experiments (repro.plan), train what is missing (repro.launch), analyse
(repro.analysis), summarise.

Runs are planned per experiment, then deduplicated by config hash so that a run several experiments share is
trained once. A done, diverged or did-not-learn run is reused, an interrupted one resumes (the engine continues from its
checkpoint), a failed one is tried again. Training goes to a launcher (repro.launch): in this process, a local
pool of worker processes, or Slurm jobs. Every launcher claims a run's lease before training it, so two
`repro run` processes (or hosts) never train one run twice; a run held elsewhere is waited for.
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from repro.analysis import analyse
from repro.errors import UserError
from repro.launch import LaunchOptions, train
from repro.plan import PlannedRun, plan, print_plan, unique_runs
from repro.plan import users as plan_users
from repro.rundir import REUSED, create, store_dir
from repro.views import cli_console

def _label(r: PlannedRun, users: dict[str, list[str]]) -> str:
    others = [u for u in users[r.config_hash] if u != r.experiment]
    extra = f" (shared with {', '.join(others)})" if others else ""
    return escape(f"{r.experiment}/{r.variant} seed {r.seed} ({r.config_hash}){extra}")


def train_all(planned: dict[str, list[PlannedRun]], runs_dir: Path, *, progress: bool, console: Console,
              launch: LaunchOptions | None = None) -> dict[str, str]:
    """Create every planned run's folder, then train the distinct runs not done yet with the chosen launcher;
    returns {config hash: status} (with Slurm and no --wait, the status at submission)."""
    for runs in planned.values():
        for r in runs:
            create(runs_dir, r)
    users = plan_users(planned)
    todo = unique_runs(planned)
    items = [(f"[{i}/{len(todo)}] {_label(r, users)}", store_dir(runs_dir, r.config_hash))
             for i, r in enumerate(todo, 1)]
    return train(items, runs_dir, launch or LaunchOptions(), console=console, progress=progress)


def run_experiments(name_or_all: str, scale: str, *, data_dir=None, runs_dir=Path("runs"), seeds=None, sets=(),
                    dry_run: bool = False, progress: bool = True, console: Console | None = None,
                    experiments_dir=None, launch: LaunchOptions | None = None, fmt: str = "table") -> int:
    """Plan, train, analyse and summarise; returns the exit code (0 ok, 1 when a run failed). With Slurm and no
    wait, it returns once the jobs are submitted; the analyses run on a later `repro run` once the runs are done."""
    console = console or cli_console()
    runs_dir = Path(runs_dir)
    registry, planned = plan([name_or_all], scale, data_dir=data_dir, seeds=seeds, sets=sets,
                             experiments_dir=experiments_dir, without_data=dry_run)
    if dry_run:
        # Record each planned run's config (status "pending") so that a run can also be trained
        # on several GPUs: `torchrun --nproc_per_node N -m repro.engine.distributed runs/store/<hash>`.
        # A run planned without its data has no hash yet: nothing to record.
        for r in (r for runs in planned.values() for r in runs if r.data_ready):
            create(runs_dir, r)
        return print_plan(planned, runs_dir, console, fmt)
    t0 = time.time()
    launch = launch or LaunchOptions()
    statuses = train_all(planned, runs_dir, progress=progress, console=console, launch=launch)
    if launch.launcher == "slurm" and not launch.wait and set(statuses.values()) - set(REUSED):
        console.print("runs are queued or running as Slurm jobs: `repro status` shows where they are; run this "
                      "command again (or with --wait) once they have ended to run the analyses")
        return 0
    for exp_name, runs in planned.items():
        try:
            summary = analyse(registry[exp_name], runs, runs_dir)
        except (KeyboardInterrupt, UserError):
            raise
        except Exception as e:  # an analysis bug must not hide the runs that did finish
            console.print(f"[red]analysis of {exp_name} failed[/]: {escape(f'{type(e).__name__}: {e}')}")
            statuses[f"analysis:{exp_name}"] = "failed"
            continue
        if summary:
            console.print(escape(f"{exp_name}: {summary}"))
    counts = defaultdict(int)
    for s in statuses.values():
        counts[s] += 1
    console.print(f"{len(statuses)} runs in {time.time() - t0:.0f} s: "
                  + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + f"; results under {runs_dir}")
    return 1 if set(counts) - set(REUSED) else 0  # anything else: failed, cancelled, preempted, ...

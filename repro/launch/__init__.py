"""Launchers: where and how the runs of `repro run` train.

- local, `--parallel 1`: in this process, one run after another (repro.runner).
- local, `--parallel N`: up to N worker processes on this machine, each with its own GPU or share of the cores
  (repro.launch.local).
- slurm: one Slurm job per run through submitit, a job array where the runs share settings (repro.launch.slurm);
  inside a job, repro.launch.job trains the run, with DDP when the job has several tasks, and requeues it when
  Slurm warns of preemption or the time limit.

Every path trains through `repro.launch.worker.train_claimed`, which takes the run's lease first, so two launchers
(two shells, two login nodes) never train one run twice.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from repro.errors import UserError

LAUNCHERS = ("local", "slurm")
_TIME_RE = re.compile(r"^(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)$")
CONFIG_KEYS = {"partition", "account", "time", "gpus_per_run", "tasks_per_run", "cpus_per_task", "nodes", "setup",
               "slurm", "signal_minutes", "parallel"}


@dataclass
class LaunchOptions:
    """How to launch: resolved once from the command line and an optional launcher-config TOML file."""

    launcher: str = "local"
    parallel: int = 1
    partition: str | None = None
    account: str | None = None
    time: str = "04:00:00"
    gpus_per_run: int = 0
    tasks_per_run: int = 1
    cpus_per_task: int | None = None
    nodes: int = 1
    setup: list[str] = field(default_factory=list)
    slurm: dict[str, str | bool] = field(default_factory=dict)  # extra sbatch options, e.g. {"qos": "high"}
    signal_minutes: float = 2.0  # Slurm's warning before a time limit or preemption: checkpoint and requeue
    wait: bool = False


def time_minutes(text: str) -> int:
    """Slurm's [D-]HH:MM:SS (or MM:SS) as whole minutes, rounded up; a clear error for anything else."""
    m = _TIME_RE.match(text.strip())
    if not m:
        raise UserError(f"--time {text!r}: give HH:MM:SS (or D-HH:MM:SS), e.g. --time 12:00:00")
    days, hours, minutes, seconds = (int(g) if g else 0 for g in m.groups())
    total = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    if total <= 0:
        raise UserError(f"--time {text!r}: the time limit must be positive")
    return -(-total // 60)


def parse_slurm_sets(items: list[str]) -> dict[str, str | bool]:
    """`--slurm key=value` (or a bare `--slurm key` for a flag such as `hold`) as sbatch options."""
    out: dict[str, str | bool] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-")
        if not key or (sep and not value.strip()):
            raise UserError(f"--slurm {item!r}: give an sbatch option as key=value (e.g. --slurm qos=high) "
                            f"or a flag's name (e.g. --slurm hold)")
        out[key] = value.strip() if sep else True
    return out


def read_launcher_config(path: Path) -> dict[str, Any]:
    """Settings a user repeats on every submission, e.g.

        partition = "gpu"
        account = "my-lab"
        setup = ["module load cuda/12.4", "source ~/venvs/repro/bin/activate"]
        [slurm]
        qos = "normal"
    """
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise UserError(f"--launcher-config {path}: cannot read it ({e.strerror})") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"--launcher-config {path}: not valid TOML ({e})") from None
    unknown = sorted(set(data) - CONFIG_KEYS)
    if unknown:
        raise UserError(f"--launcher-config {path}: unknown key(s) {', '.join(unknown)}; "
                        f"known: {', '.join(sorted(CONFIG_KEYS))}")
    if "setup" in data and not (isinstance(data["setup"], list) and all(isinstance(s, str) for s in data["setup"])):
        raise UserError(f"--launcher-config {path}: `setup` must be a list of shell lines")
    if "slurm" in data and not isinstance(data["slurm"], dict):
        raise UserError(f"--launcher-config {path}: `[slurm]` must be a table of sbatch options")
    return data


def resolve_options(launcher: str, *, config_file: Path | None = None, slurm_sets: list[str] = (),
                    **cli: Any) -> LaunchOptions:
    """Command-line values (those not None) over the config file over the defaults."""
    if launcher not in LAUNCHERS:
        raise UserError(f"--launcher {launcher!r}: choose local or slurm")
    values: dict[str, Any] = dict(read_launcher_config(config_file)) if config_file else {}
    values.update({k: v for k, v in cli.items() if v is not None})
    extra = {str(k): v if v is True else str(v) for k, v in values.pop("slurm", {}).items()}
    extra.update(parse_slurm_sets(list(slurm_sets)))
    opts = LaunchOptions(launcher=launcher, slurm=extra, **values)
    time_minutes(opts.time)
    if opts.gpus_per_run and opts.tasks_per_run == 1:
        opts.tasks_per_run = opts.gpus_per_run  # one task (one DDP rank) per GPU
    if opts.parallel < 1 or opts.nodes < 1 or opts.tasks_per_run < 1 or opts.gpus_per_run < 0:
        raise UserError("--parallel, --nodes and --tasks-per-run must be at least 1, --gpus-per-run at least 0")
    if opts.tasks_per_run % opts.nodes:
        raise UserError(f"--tasks-per-run {opts.tasks_per_run} does not split over --nodes {opts.nodes}")
    if launcher == "local" and (opts.nodes > 1 or opts.tasks_per_run > 1):
        raise UserError("--launcher local trains each run in one process; for one run on several GPUs use "
                        "torchrun (README: Several GPUs) or --launcher slurm --gpus-per-run N")
    return opts

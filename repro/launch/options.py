"""How to launch: the options of `repro run` that say where runs train, resolved once from the command line over
an optional launcher-config TOML file (`--launcher-config`), and checked."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from repro.errors import UserError
from repro.schema import read_table, spec

LAUNCHERS = ("local", "slurm")
_TIME_RE = re.compile(r"^(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)$")
_MEM_RE = re.compile(r"^\d+[KMGT]?$")


@dataclass
class LaunchOptions:
    """How to launch: resolved once from the command line over an optional launcher-config TOML file, whose keys
    are the fields not marked `derived` (those come from the command line only)."""

    launcher: str = spec("local", choices=LAUNCHERS, derived=True)
    parallel: int = spec(1, help="local: runs at once")
    partition: str | None = spec(None, help="slurm: partition")
    account: str | None = spec(None, help="slurm: account")
    time: str = spec("04:00:00", help="slurm: time limit per job, [D-]HH:MM:SS")
    gpus_per_run: int | None = spec(None, help="slurm: GPUs per run, one DDP task each (default 1; 0: CPUs only)")
    tasks_per_run: int = spec(1, help="slurm: DDP tasks per run")
    cpus_per_task: int | None = spec(None, help="slurm: CPU cores per task (CPU-only runs)")
    # Per GPU, enough for its loader: AlexNet trains thousands of images/s on one GPU (README: On one GPU) and the
    # loader decodes them on CPU cores, with the betons' page cache and pinned buffers in memory. A cluster's own
    # default (often 1-2 cores and a few GB per job) starves the GPU or gets the job OOM-killed; 8 cores and 32G
    # per GPU is an even share of a typical 8-GPU node (64+ cores, 256+ GB).
    cpus_per_gpu: int = spec(8, help="slurm: CPU cores per GPU (loader threads)")
    mem_per_gpu: str = spec("32G", help="slurm: memory per GPU, as sbatch takes it (e.g. 32G)")
    nodes: int = spec(1, help="slurm: nodes per run")
    setup: list = spec(None, factory=list, help="slurm: shell lines run before each job")
    slurm: dict = spec(None, factory=dict, help='slurm: any other sbatch option, e.g. {qos = "high"}')
    signal_minutes: float = spec(2.0, help="slurm: the warning before a time limit or preemption")
    wait: bool = spec(False, derived=True)



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
    return read_table(LaunchOptions, data, path=f"--launcher-config {path}", partial=True)


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
    if opts.gpus_per_run is None:  # a Slurm job gets a GPU unless asked not to; a local run uses what it finds
        opts.gpus_per_run = 1 if launcher == "slurm" else 0
    if opts.cpus_per_gpu < 1:
        raise UserError(f"--cpus-per-gpu {opts.cpus_per_gpu}: give at least 1 (default 8)")
    if not _MEM_RE.match(str(opts.mem_per_gpu)):
        raise UserError(f"--mem-per-gpu {opts.mem_per_gpu!r}: give a size as sbatch takes it, e.g. --mem-per-gpu 32G")
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

"""Train one run directory under its claim: the lease (and, outside Slurm jobs, the flock) first, then `fit`, then the
claim is released.

In process (`repro run --parallel 1`), in the worker processes of the local pool (`python -m repro.launch.worker
RUN_DIR`), and inside Slurm jobs: all train through `train_claimed`, so a run another launcher holds is never
trained twice. The run's placement record (`RunDir.placement`) says where it trained.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sys
import traceback
from pathlib import Path
from typing import Any

from repro import io
from repro.config import config_hash, from_dict
from repro.engine import preempt
from repro.record import RunRecord
from repro.errors import UserError
from repro.rundir import REUSED, RunDir

BUSY = "busy"  # another live process holds the run
EXIT_BUSY = 3


def devices() -> list[str]:
    """The GPUs this process may use or hand out, by the names CUDA_VISIBLE_DEVICES uses; none on a CPU."""
    import torch  # torch loads on first use: the local pool's parent imports this module and never trains

    if not torch.cuda.is_available():
        return []
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    return [d.strip() for d in env.split(",") if d.strip()] if env else [str(i) for i in range(torch.cuda.device_count())]


def visible_gpus() -> str | None:
    """`devices()` as one CUDA_VISIBLE_DEVICES value; None on a CPU."""
    return ",".join(devices()) or None


def placement(launcher: str, **extra: Any) -> dict[str, Any]:
    """Where this process trains: launcher, host, pid, GPUs, cores, threads (the run's placement record)."""
    import torch  # on first use, as in devices()

    from repro.data import usable_cpus

    cpus = ",".join(map(str, usable_cpus()))
    return {"launcher": launcher, "host": socket.gethostname(), "pid": os.getpid(), "gpus": visible_gpus(),
            "cpus": cpus, "threads": torch.get_num_threads(), "slurm_job_id": None, "log": None, "tasks": 1, **extra}


def load_config(run_dir: Path | RunDir):
    """The config a run was planned with, checked against its folder's name."""
    run = RunDir(run_dir)
    config = run.planned_config()
    if config is None:
        raise UserError(f"{run.planned}: missing or unreadable; plan the run again with `repro run`")
    cfg = from_dict(config, source=str(run.planned))
    if config_hash(cfg) != run.config_hash:
        raise UserError(f"{run.planned}: its config hashes to {config_hash(cfg)}, not the folder's name")
    return cfg


def record_failure(run: RunDir, chash: str, e: BaseException) -> None:
    """Keep the traceback and make sure the run record says failed, with a one-line reason and where to look."""
    io.write_text(run.error_log, traceback.format_exc())
    record = run.read_record()
    if record is None or record.status != "failed":
        run.write_record(RunRecord(
            status="failed", error=f"{type(e).__name__}: {e}".splitlines()[0][:300] + f" (traceback in {run.error_log})",
            config=record.config if record else run.planned_config(), config_hash=chash,
            epochs_done=record.epochs_done if record else 0, iterations=record.iterations if record else 0))


def fit_run(cfg, run_dir: Path | RunDir, *, progress: bool, catch: bool = True) -> str:
    """`fit` with failures recorded; returns the final status. With catch=False the error is re-raised after."""
    from repro.engine import fit  # at call time: the engine imports torch, which `repro status` does not need

    try:
        return fit(cfg, run_dir, progress=progress).status
    except (KeyboardInterrupt, UserError):
        raise
    except preempt.Abandoned:  # our lease lapsed and another process took the run: it is theirs to finish
        return BUSY
    except Exception as e:  # a bug or a resource error in one run must not take down the sweep
        record_failure(RunDir(run_dir), config_hash(cfg), e)
        if not catch:
            raise
        return "failed"


def train_claimed(cfg, run_dir: Path | RunDir, *, progress: bool, where: dict[str, Any], catch: bool = True,
                  on_start=None) -> str:
    """Claim `run_dir`, train it unless it is finished, release it; BUSY when another process holds it.

    A Slurm job claims with the lease alone: over NFS a flock is a lock on the server that a lost node keeps (until
    it reboots, with NFSv3), which would keep the requeued job out; the lease is taken over from a lost node."""
    run = RunDir(run_dir)
    lock = contextlib.nullcontext(True) if where.get("launcher") == "slurm" else run.lock()
    with lock as got:
        if not got:
            return BUSY
        held = run.claim(job_id=where.get("slurm_job_id"), log=where.get("log"))
        if held is None:
            return BUSY
        held.keep_alive(on_lost=preempt.abandon)
        try:
            status = run.own_status(check_held=False)
            if status in REUSED:
                return status
            if on_start is not None:
                on_start(status)
            run.write_placement(where)
            return fit_run(cfg, run, progress=progress, catch=catch)
        finally:
            held.release()
            preempt.forget_abandon()  # the next run this process trains is claimed afresh


def main(argv: list[str] | None = None) -> int:
    """A worker of the local pool: train one run directory; exit 0 (trained or finished), 1 (failed or
    interrupted), 2 (bad input), 3 (another process holds it)."""
    parser = argparse.ArgumentParser(prog="python -m repro.launch.worker", description=main.__doc__)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--log", default=None, help="where this worker's output goes (recorded, not opened)")
    parser.add_argument("--cpus", default=None, help="run on these cores only, e.g. 0,1 (the pool's share for it)")
    args = parser.parse_args(argv)
    if args.cpus and hasattr(os, "sched_setaffinity"):  # before torch and numba start their threads (they inherit it)
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        cfg = load_config(args.run_dir)
        status = train_claimed(cfg, args.run_dir, progress=False, where=placement("local", log=args.log))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    print(f"{args.run_dir}: {status}")
    return EXIT_BUSY if status == BUSY else 0 if status in REUSED else 1


if __name__ == "__main__":
    sys.exit(main())

"""What runs inside a Slurm job: train one run directory, with DDP when the job has several tasks, and requeue
the job when Slurm warns that it will stop it.

Preemption: sbatch asks for the warning signal (`--signal=USR2@<s>`, submitit's choice; `SUBMITIT_PREEMPT_SIGNAL`
changes it) a few minutes before a time limit or preemption. submitit's own handler would call `checkpoint()` and
requeue at once, from inside the signal handler, so the epoch in progress would be lost. Here the signal only
raises the engine's preemption flag (repro.engine.preempt): the training loop writes a checkpoint inside the
epoch and `fit` returns "preempted"; only then is submitit's handler run, which calls `checkpoint()` (this class
is a `submitit.helpers.Checkpointable`), requeues the job with `scontrol requeue` and exits. The requeued job
resumes from that checkpoint, at the same batch.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import submitit

from repro.engine import preempt
from repro.errors import UserError
from repro.launch.worker import BUSY, fit_run, load_config, placement, train_claimed
from repro.rundir import REUSED, RunDir


def _threads(env: submitit.JobEnvironment) -> int:
    per_task = os.environ.get("SLURM_CPUS_PER_TASK")
    if per_task:
        return max(1, int(per_task))
    on_node = int(os.environ.get("SLURM_CPUS_ON_NODE", "1"))
    return max(1, on_node // max(1, env.num_tasks // max(1, env.num_nodes)))


def _train_ddp(cfg, run_dir: RunDir, where: dict[str, Any]) -> str:
    """Several tasks, one run: rank 0 holds the claim, every rank trains (repro.engine.parallel, as under torchrun)."""
    # torch loads inside the job only: the login node that submits imports this module too
    from repro.engine import parallel

    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    rank, _ = parallel.init_from_env()
    held = None
    try:
        go = True
        if rank == 0:
            held = run_dir.claim(job_id=where["slurm_job_id"], log=where["log"])
            go = held is not None and run_dir.own_status(check_held=False) not in REUSED
            if held is not None:
                held.keep_alive(on_lost=preempt.abandon)
            if go:
                run_dir.write_placement(where)
        busy = parallel.any_true(rank == 0 and held is None)  # every rank learns what rank 0 found
        if parallel.any_true(not go):
            return BUSY if busy else run_dir.own_status(check_held=False)
        return fit_run(cfg, run_dir, progress=False, catch=False)
    finally:
        if held is not None:
            held.release()
        import torch.distributed as dist  # inside the job only, as above

        dist.destroy_process_group()


class TrainJob(submitit.helpers.Checkpointable):
    """The callable submitted for each run: `TrainJob()(run_dir)` returns the run's final status and raises when
    the run failed, so that Slurm records the job as FAILED."""

    def __call__(self, run_dir: str) -> str:
        import torch  # inside the job only, as in _train_ddp

        env = submitit.JobEnvironment()
        run_dir = RunDir(run_dir)
        torch.set_num_threads(_threads(env))
        where = placement("slurm", slurm_job_id=env.job_id, log=str(env.paths.stdout), tasks=env.num_tasks,
                          nodes=env.num_nodes)
        usr = env._usr_sig()
        submitit_handler = signal.getsignal(usr)
        preempt.install([usr])  # fit installs USR2/HUP itself; this covers SUBMITIT_PREEMPT_SIGNAL and set-up time
        cfg = load_config(run_dir)
        if env.num_tasks > 1:
            status = _train_ddp(cfg, run_dir, where)
        else:
            status = train_claimed(cfg, run_dir, progress=False, where=where, catch=False)
        record = run_dir.read_record()
        print(f"{run_dir}: {status} (job {env.job_id}, rank {env.global_rank}"
              + (f"; {record.error})" if status == "preempted" and record else ")"), flush=True)
        if status == "preempted":
            if callable(submitit_handler) and env.global_rank == 0:
                submitit_handler(usr, None)  # checkpoint() -> requeue -> exit
            return status
        if status == BUSY:
            raise UserError(f"{run_dir} is held by another process ({run_dir.holder()}); nothing trained")
        if status not in REUSED:
            raise RuntimeError(f"run {run_dir} ended {status}: {record.error if record else 'no record'}")
        return status

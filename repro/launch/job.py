"""What runs inside a Slurm job: train one run directory, with DDP when the job has several tasks, and stop cleanly
whenever Slurm says it will stop the job.

Signals: Slurm preempts (PreemptMode=REQUEUE), enforces time limits and carries out `scancel` with SIGTERM (then
SIGKILL after the cluster's KillWait); it sends the early warning (`--signal=USR2@<s>`, submitit's choice;
`SUBMITIT_PREEMPT_SIGNAL` changes it) only where the job asks for it. Here both only raise the engine's preemption
flag (repro.engine.preempt, with SIGTERM made a preemption signal for the whole job): the training loop writes a
checkpoint inside the epoch after its current step and `fit` returns "preempted"; more signals meanwhile change
nothing. Then:
- after the warning signal, submitit's handler runs: it calls `checkpoint()` (this class is a
  `submitit.helpers.Checkpointable`), requeues the job with `scontrol requeue` and exits;
- after SIGTERM alone the job just ends: Slurm requeues a preempted job itself, a cancelled one stays cancelled (a
  later `repro run` resumes it), a timed-out one waits for `repro run` too.
Either way the next start resumes from that checkpoint, at the same batch. A job requeued after a hard kill
(kill -9, the OOM killer, a lost node) takes over its own lease at once (repro.lease: a lease of the same job id held
by another process is stale) and resumes from the last checkpoint written.
"""

from __future__ import annotations

import os
import signal
import threading
import time
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
            held = run_dir.claim(job_id=where["slurm_job_id"], log=where["log"])  # takes over its own job's at once
            go = held is not None and run_dir.own_status(check_held=False) not in REUSED
            if held is not None:
                held.keep_alive(on_lost=preempt.abandon)
            if go:
                run_dir.write_placement(where)
                _started(run_dir, where)(run_dir.own_status(check_held=False))
        busy = parallel.any_true(rank == 0 and held is None)  # every rank learns what rank 0 found
        if parallel.any_true(not go):
            return BUSY if busy else run_dir.own_status(check_held=False)
        return fit_run(cfg, run_dir, progress=False, catch=False)
    finally:
        if held is not None:
            held.release()
        import torch.distributed as dist  # inside the job only, as above

        dist.destroy_process_group()


def _started(run_dir: RunDir, where: dict[str, Any]):
    """The line a job prints when it starts training a run (under its claim): which job and process, and from what,
    so that a job's log shows every start and stop of its run."""
    def say(status: str) -> None:
        print(f"{run_dir}: {'resuming' if status in ('interrupted', 'preempted') else 'training'} from {status} "
              f"(job {where['slurm_job_id']}, pid {os.getpid()}, at {time.time():.3f})", flush=True)
    return say


_terms: list[float] = []  # when SIGTERM came (for the job's log)


def _await_sigterm() -> None:
    while True:
        signal.sigwait({signal.SIGTERM})
        _terms.append(time.time())
        preempt.request("preempted")  # again and again if Slurm repeats it: never more than a request


def _catch_signals(usr: int) -> Any:
    """From here on the warning signal and SIGTERM only ask the run to checkpoint and stop (also during set-up, and
    inside `fit`, which installs its own handlers); returns submitit's handler of the warning signal.

    Slurm sends SIGTERM to every process of the job step, the data loader's worker processes too, and torch's
    workers die of it (their handler re-raises it), which fails the run in the middle of its checkpoint. So SIGTERM
    is blocked in this thread, and thereby in every thread and process started from it, and taken by one thread of
    its own that asks for the preemption; the workers end when the run lets them go."""
    submitit_handler = signal.getsignal(usr)
    preempt.sigterm_preempts()  # where a SIGTERM still reaches a handler, it preempts too
    preempt.install([usr, signal.SIGTERM])
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_await_sigterm, name="sigterm", daemon=True).start()
    return submitit_handler


class TrainJob(submitit.helpers.Checkpointable):
    """The callable submitted for each run: `TrainJob()(run_dir)` returns the run's final status and raises when
    the run failed, so that Slurm records the job as FAILED."""

    def __call__(self, run_dir: str) -> str:
        env = submitit.JobEnvironment()
        usr = env._usr_sig()
        submitit_handler = _catch_signals(usr)  # first: a SIGTERM during the imports below must not be lost
        import torch  # inside the job only, as in _train_ddp

        run_dir = RunDir(run_dir)
        torch.set_num_threads(_threads(env))
        where = placement("slurm", slurm_job_id=env.job_id, log=str(env.paths.stdout), tasks=env.num_tasks,
                          nodes=env.num_nodes)
        cfg = load_config(run_dir)
        if env.num_tasks > 1:
            status = _train_ddp(cfg, run_dir, where)
        else:
            status = train_claimed(cfg, run_dir, progress=False, where=where, catch=False,
                                   on_start=_started(run_dir, where))
        record = run_dir.read_record()
        warned = usr in preempt.received()
        signals = ", ".join([signal.Signals(s).name for s in preempt.received()] + ["SIGTERM"] * bool(_terms))
        print(f"{run_dir}: {status} (job {env.job_id}, rank {env.global_rank}, pid {os.getpid()}, at {time.time():.3f}"
              + (f"; {record.error}; signals {signals})" if status == "preempted" and record else ")"), flush=True)
        if status == "preempted":
            if warned and callable(submitit_handler) and env.global_rank == 0:
                submitit_handler(usr, None)  # checkpoint() -> requeue -> exit
            return status  # SIGTERM: Slurm requeues a preempted job itself and keeps a cancelled one cancelled
        if status == BUSY:
            raise UserError(f"{run_dir} is held by another process ({run_dir.holder()}); nothing trained")
        if status not in REUSED:
            raise RuntimeError(f"run {run_dir} ended {status}: {record.error if record else 'no record'}")
        return status

"""`--launcher slurm`: one Slurm job per run that is not finished, queued or running, submitted with submitit
(a job array when several runs are submitted together), and what Slurm says about them.

Each submitted run gets a launch record in its folder (`RunDir.launch`: launcher, job id, log, submission time,
earlier job ids); jobs write their logs and submitit's pickles under `<runs>/slurm/`. Job states come from
`squeue` asked for these jobs only (the controller remembers ended jobs for a while) and, for jobs it has
forgotten, `sacct` where accounting answers; each is handed to the run folder as a `Job`, whose status folds it in
(`RunDir.status`); without either the run's own files say what happened. `--wait` asks at most every
REPRO_SLURM_POLL_S seconds (30).

Defaults for a shared cluster: one GPU per run (`--gpus-per-run 0` for CPUs), with 8 cores and 32G per GPU
(repro.launch.options says why); a run of a scale judged on magnitude (subset, full) is refused on CPUs.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from repro.errors import UserError
from repro.launch.options import LaunchOptions, time_minutes
from repro.rundir import REUSED, Job, RunDir
from repro.scales import find_scale

ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUE_HOLD", "REQUEUE_FED",
          "RESIZING", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD"}
# --wait asks the controller at most this often (REPRO_SLURM_POLL_S; tests shorten it): on a shared cluster every
# user's polling loads slurmctld, and runs that last hours gain nothing from a tighter loop
POLL_S = 30.0
FILE_POLL_S = 2.0  # between two questions to Slurm, --wait reads the run folders (cheap) this often
SQUEUE_FIELDS = ("JobArrayID", "State", "Reason", "NodeList", "RestartCnt", "exit_code")


def poll_s() -> float:
    """Seconds between two questions to Slurm while `--wait` waits: REPRO_SLURM_POLL_S, else POLL_S."""
    text = os.environ.get("REPRO_SLURM_POLL_S", "")
    try:
        value = float(text) if text else POLL_S
    except ValueError:
        value = -1.0
    if not value > 0:
        raise UserError(f"REPRO_SLURM_POLL_S={text!r}: give seconds between two Slurm queries, e.g. 30")
    return value


def _need_sbatch() -> None:
    if shutil.which("sbatch") is None:
        raise UserError("--launcher slurm: `sbatch` is not on PATH; run on a Slurm login node, or use --launcher local")


def _exit_text(raw: str) -> str:
    """squeue's exit_code is a wait status (768); Slurm's own words for it are code:signal ("3:0")."""
    return f"{int(raw) >> 8}:{int(raw) & 0x7F}" if raw.isdigit() else raw


def _squeue(job_ids: list[str]) -> dict[str, dict[str, str]]:
    """{job id: {state, reason, node, exit, restarts}} for these jobs only, ended ones too while the controller
    remembers them (MinJobAge); array tasks one by one ("<array id>_<task>"), pending ones too."""
    if not job_ids or shutil.which("squeue") is None:
        return {}
    fmt = ",".join(f"{f}:|" for f in SQUEUE_FIELDS)  # "|" after each field, no padding
    arrays = sorted({j.split("_")[0] for j in job_ids})  # an array's id lists all its tasks
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-j", ",".join(arrays), "-O", fmt],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    table = {}
    for line in out.stdout.splitlines():  # one unknown id of several still lists the others
        parts = line.split("|")
        if len(parts) > len(SQUEUE_FIELDS):
            job, state, reason, node, restarts, code = (p.strip() for p in parts[:len(SQUEUE_FIELDS)])
            table[job] = {"state": state, "reason": reason, "node": node, "exit": _exit_text(code),
                          "restarts": restarts if restarts.isdigit() else "0"}
    for j in job_ids:  # tasks that never started are listed as the array's own record once it ended (cancelled)
        if j not in table and "_" in j and j.split("_")[0] in table:
            table[j] = table[j.split("_")[0]]
    return table


def _sacct(job_ids: list[str]) -> dict[str, dict[str, str]]:
    """What the accounting database says of jobs the controller has forgotten (nothing when it is absent)."""
    if not job_ids or shutil.which("sacct") is None:
        return {}
    try:
        out = subprocess.run(["sacct", "-n", "-P", "-X", "-j", ",".join(job_ids), "-o", "JobID,State,ExitCode,NodeList"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    table = {}
    for line in out.stdout.splitlines() if out.returncode == 0 else []:
        parts = line.split("|")
        if len(parts) == 4:
            state = parts[1].split()[0] if parts[1] else "UNKNOWN"
            table[parts[0]] = {"state": state, "reason": "", "node": parts[3], "exit": parts[2], "restarts": "0"}
    return table


def job_states(job_ids: list[str]) -> dict[str, dict[str, str]]:
    """What Slurm says of these jobs: squeue for those the controller knows, sacct for the others."""
    table = _squeue(job_ids)
    table.update(_sacct([j for j in job_ids if j not in table]))
    return {j: table[j] for j in job_ids if j in table}


def job_of(info: dict[str, str], job_id: str) -> Job:
    """Slurm's words for one job as the run folder's `Job`."""
    state = info["state"]
    if state in ACTIVE:
        phase = "running" if state == "RUNNING" else "pending"
        return Job(job_id, phase, int(info.get("restarts") or 0), info.get("reason", ""))
    if state == "COMPLETED":
        return Job(job_id, "completed")
    reason = f"Slurm: {state}" + (f" ({info['reason']})" if info.get("reason") not in ("", "None") else "") + \
        (f", exit {info['exit']}" if info.get("exit") else "")
    return Job(job_id, "cancelled" if state.startswith("CANCELLED") else "failed", reason=reason)


def run_jobs(runs: list[RunDir]) -> dict[RunDir, Job]:
    """The Slurm job of each run that `repro run --launcher slurm` submitted (runs without one are left out)."""
    ids = {run: run.read_launch().get("job_id") for run in runs if run.read_launch().get("launcher") == "slurm"}
    ids = {run: str(j) for run, j in ids.items() if j}
    if not ids:  # nothing submitted: no need to ask the controller
        return {}
    states = job_states(sorted(set(ids.values())))
    return {run: job_of(states[j], j) for run, j in ids.items() if j in states}


def _per_gpu(opts: LaunchOptions) -> dict[str, str]:
    """sbatch's --cpus-per-gpu and --mem-per-gpu for a GPU job, unless other options that exclude them are given."""
    if not opts.gpus_per_run:
        return {}
    given = {k.replace("-", "_") for k in opts.slurm}
    out = {}
    if not opts.cpus_per_task and not given & {"cpus_per_task", "cpus_per_gpu"}:
        out["cpus_per_gpu"] = str(opts.cpus_per_gpu)
    if not given & {"mem", "mem_per_cpu", "mem_per_gpu"}:
        out["mem_per_gpu"] = str(opts.mem_per_gpu)
    return out


def refuse_cpu_training(runs: list[RunDir], opts: LaunchOptions) -> None:
    """A run of a scale judged on magnitude (subset, full: hours on a GPU) would take weeks on CPUs: refuse it."""
    for run in runs:
        planned = run.read_planned() or {}
        scale = find_scale(planned.get("scale"))
        if scale is None or scale.direction_only:  # smoke and demo are made for CPUs
            continue
        device = str(((planned.get("config") or {}).get("train") or {}).get("device", "auto"))
        if not opts.gpus_per_run:
            raise UserError(f"--gpus-per-run 0: {scale.name}-scale runs train for hours on a GPU and far longer on "
                            f"CPUs; give --gpus-per-run 1 (the default) or more")
        if device == "cpu":
            raise UserError(f"--set train.device=cpu: {scale.name}-scale runs train for hours on a GPU and far "
                            f"longer on CPUs; drop it (train.device=auto uses the job's GPU)")


def _executor(runs_dir: Path, opts: LaunchOptions):
    import submitit  # only to submit: `repro status` reads job states without it

    ex = submitit.SlurmExecutor(folder=Path(runs_dir).resolve() / "slurm", max_num_timeout=10_000)
    params: dict[str, Any] = {
        "job_name": "repro", "time": time_minutes(opts.time), "nodes": opts.nodes,
        "ntasks_per_node": opts.tasks_per_run // opts.nodes, "signal_delay_s": int(opts.signal_minutes * 60),
        "setup": list(opts.setup),
        "additional_parameters": {"requeue": True, **_per_gpu(opts), **opts.slurm},
        # one run's tasks live and die together: when a rank dies, srun ends the others rather than leave them
        # waiting in a collective for a peer that will never come
        "srun_args": ["--kill-on-bad-exit=1"],
    }
    if opts.gpus_per_run:
        params["gpus_per_node"] = opts.gpus_per_run // opts.nodes
    for key in ("partition", "account", "cpus_per_task"):
        if getattr(opts, key):
            params[key] = getattr(opts, key)
    ex.update_parameters(**params)
    return ex


def submit(runs: list[RunDir], runs_dir: Path, opts: LaunchOptions) -> dict[RunDir, str]:
    """Submit one job per run (one array when several); returns {run: job id}."""
    from repro.launch.job import TrainJob  # imports submitit: only to submit, as in _executor

    _need_sbatch()
    if not runs:
        return {}
    ex = _executor(runs_dir, opts)
    try:
        if len(runs) == 1:
            jobs = [ex.submit(TrainJob(), str(runs[0].path.resolve()))]
        else:
            jobs = ex.map_array(TrainJob(), [str(run.path.resolve()) for run in runs])
    except Exception as e:  # sbatch refused: a bad partition, account or option
        raise UserError(f"sbatch refused the jobs: {' '.join(str(e).split())[:400]}; "
                        f"check --partition/--account/--slurm/--launcher-config") from None
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    out = {}
    for run, job in zip(runs, jobs):
        old = run.read_launch()
        run.write_launch({
            "launcher": "slurm", "job_id": job.job_id, "log": str(job.paths.stdout), "err": str(job.paths.stderr),
            "submitted": now, "submit_host": socket.gethostname(),
            "earlier_job_ids": old.get("earlier_job_ids", []) + ([old["job_id"]] if old.get("job_id") else [])})
        out[run] = job.job_id
    return out


def submit_and_wait(todo: list[tuple[str, RunDir]], runs_dir: Path, opts: LaunchOptions, *, console: Console,
                    progress: bool) -> dict[str, str]:
    """Submit every run of `[(label, run)]` that is not finished, queued or running; with opts.wait, wait for all
    of them. Returns {config hash: status}."""
    _need_sbatch()
    jobs = run_jobs([run for _, run in todo])
    statuses, to_submit = {}, []
    for label, run in todo:
        job = jobs.get(run)
        status = run.own_status()
        if status in REUSED:
            statuses[run.config_hash] = status
        elif job is not None and job.phase in ("pending", "running"):
            statuses[run.config_hash] = run.status(job)[0]
            console.print(f"{label}: {statuses[run.config_hash]} as Slurm job {job.id}; not submitted again")
        elif status == "running":
            statuses[run.config_hash] = status
            console.print(f"{label}: running in another process ({(run.holder() or {}).get('host')}); not submitted")
        else:
            to_submit.append((label, run))
    refuse_cpu_training([run for _, run in to_submit], opts)
    every = poll_s() if opts.wait else None  # a bad REPRO_SLURM_POLL_S stops before anything is submitted
    submitted = submit([run for _, run in to_submit], runs_dir, opts)
    for label, run in to_submit:
        statuses[run.config_hash] = "submitted"
        console.print(f"{label}: submitted as Slurm job {submitted[run]}")
    if not opts.wait:
        if not to_submit:
            console.print("nothing to submit")
        return statuses
    return wait([run for _, run in todo], console=console, progress=progress, every=every)


def wait(runs: list[RunDir], *, console: Console, progress: bool, every: float | None = None) -> dict[str, str]:
    """Poll until none of `runs` has an active job or a live claim; returns {config hash: final status}. Slurm is
    asked at most every `every` s (default `poll_s()`), the run folders more often; the end is decided on a fresh
    answer from Slurm."""
    every = poll_s() if every is None else every
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[detail]}"),
                   TimeElapsedColumn(), console=console, disable=not progress)
    with bar:
        task = bar.add_task("Slurm jobs", total=len(runs), detail="")
        jobs, asked, fresh = run_jobs(runs), time.monotonic(), True
        while True:
            states = {run: run.status(jobs.get(run))[0] for run in runs}
            active = [run for run, s in states.items() if s in ("pending", "requeued", "running")]
            counts: dict[str, int] = {}
            for s in states.values():
                counts[s] = counts.get(s, 0) + 1
            bar.update(task, completed=len(runs) - len(active),
                       detail=", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
            if not active and fresh:
                break
            # the folders between two answers from Slurm; once they look finished, one more answer decides
            time.sleep(max(0.0, asked + every - time.monotonic()) if not active else min(FILE_POLL_S, every))
            fresh = False
            if time.monotonic() - asked >= every:
                jobs, asked, fresh = run_jobs(runs), time.monotonic(), True
    for run, s in states.items():
        if s not in REUSED:
            console.print(f"[red]{s}[/] {run}: log {run.read_launch().get('log')}")
    return {run.config_hash: s for run, s in states.items()}


def cancel(runs: list[RunDir], console: Console) -> int:
    """scancel the active jobs of these runs; returns how many were cancelled."""
    ids = sorted({job.id for job in run_jobs(runs).values() if job.phase in ("pending", "running")})
    if not ids:
        console.print("no queued or running Slurm jobs for these runs")
        return 0
    _need_sbatch()
    out = subprocess.run(["scancel", *ids], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise UserError(f"scancel {' '.join(ids)} failed: {out.stderr.strip()[:300]}")
    console.print(f"cancelled Slurm job(s) {', '.join(ids)}")
    return len(ids)

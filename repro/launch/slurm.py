"""`--launcher slurm`: one Slurm job per run that is not finished, queued or running, submitted with submitit
(a job array when several runs are submitted together), and what Slurm says about them.

Each submitted run gets a launch record in its folder (`RunDir.launch`: launcher, job id, log, submission time,
earlier job ids); jobs write their logs and submitit's pickles under `<runs>/slurm/`. Job states come from
`scontrol show job` (jobs the controller still remembers) and, where installed and answering, `sacct`; each is
handed to the run folder as a `Job`, whose status folds it in (`RunDir.status`); without either the run's own
files say what happened.
"""

from __future__ import annotations

import datetime as dt
import re
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

ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUE_HOLD", "REQUEUE_FED",
          "RESIZING", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD"}
POLL_S = 1.0
NO_VAL = 4294967294  # how scontrol prints "no task id" on an array's own record
_FIELD_RE = re.compile(r"(\w+)=(\S*)")


def _need_sbatch() -> None:
    if shutil.which("sbatch") is None:
        raise UserError("--launcher slurm: `sbatch` is not on PATH; run on a Slurm login node, or use --launcher local")


def _expand(ids: str) -> list[str]:
    """ArrayTaskId as scontrol prints it ("0-3,7%4") -> ["0", "1", "2", "3", "7"]."""
    out = []
    for part in ids.split("%")[0].split(","):
        lo, _, hi = part.partition("-")
        if lo.isdigit():
            out += [str(i) for i in range(int(lo), int(hi or lo) + 1)]
    return out


def job_table() -> dict[str, dict[str, str]]:
    """{job id: {state, reason, node, exit, restarts}} for every job the controller remembers; array tasks are
    keyed "<array id>_<task>", pending ones too."""
    try:
        out = subprocess.run(["scontrol", "show", "job", "-o"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    table: dict[str, dict[str, str]] = {}
    for line in out.stdout.splitlines():
        f = dict(_FIELD_RE.findall(line))
        if "JobId" not in f:
            continue
        info = {"state": f.get("JobState", "UNKNOWN"), "reason": f.get("Reason", "None"),
                "node": f.get("NodeList", "(null)"), "exit": f.get("ExitCode", ""), "restarts": f.get("Restarts", "0")}
        if f.get("ArrayJobId") and f.get("ArrayTaskId"):
            tasks = _expand(f["ArrayTaskId"])
            if not tasks or int(tasks[0]) >= NO_VAL:  # the array's own record: its tasks not listed on their own
                table[f"{f['ArrayJobId']}_*"] = info
            for task in tasks if tasks and int(tasks[0]) < NO_VAL else []:
                table[f"{f['ArrayJobId']}_{task}"] = info
        else:
            table[f["JobId"]] = info
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
    table = job_table()
    for j in job_ids:
        if j not in table and f"{j.split('_')[0]}_*" in table and "_" in j:
            table[j] = table[f"{j.split('_')[0]}_*"]
    missing = [j for j in job_ids if j not in table]
    table.update(_sacct(missing))
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


def _executor(runs_dir: Path, opts: LaunchOptions):
    import submitit  # only to submit: `repro status` reads job states without it

    ex = submitit.SlurmExecutor(folder=Path(runs_dir).resolve() / "slurm", max_num_timeout=10_000)
    params: dict[str, Any] = {
        "job_name": "repro", "time": time_minutes(opts.time), "nodes": opts.nodes,
        "ntasks_per_node": opts.tasks_per_run // opts.nodes, "signal_delay_s": int(opts.signal_minutes * 60),
        "setup": list(opts.setup), "additional_parameters": {"requeue": True, **opts.slurm},
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
    submitted = submit([run for _, run in to_submit], runs_dir, opts)
    for label, run in to_submit:
        statuses[run.config_hash] = "submitted"
        console.print(f"{label}: submitted as Slurm job {submitted[run]}")
    if not opts.wait:
        if not to_submit:
            console.print("nothing to submit")
        return statuses
    return wait([run for _, run in todo], console=console, progress=progress)


def wait(runs: list[RunDir], *, console: Console, progress: bool) -> dict[str, str]:
    """Poll until none of `runs` has an active job or a live claim; returns {config hash: final status}."""
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[detail]}"),
                   TimeElapsedColumn(), console=console, disable=not progress)
    with bar:
        task = bar.add_task("Slurm jobs", total=len(runs), detail="")
        while True:
            jobs = run_jobs(runs)
            states = {run: run.status(jobs.get(run))[0] for run in runs}
            active = [run for run, s in states.items() if s in ("pending", "requeued", "running")]
            counts: dict[str, int] = {}
            for s in states.values():
                counts[s] = counts.get(s, 0) + 1
            bar.update(task, completed=len(runs) - len(active),
                       detail=", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
            if not active:
                break
            time.sleep(POLL_S)
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

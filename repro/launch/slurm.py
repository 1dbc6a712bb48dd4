"""`--launcher slurm`: one Slurm job per run that is not finished, queued or running, submitted with submitit
(a job array when several runs are submitted together), and what Slurm says about them.

Each submitted run gets `launch.json` in its directory (launcher, job id, log, submission time, earlier job ids);
jobs write their logs and submitit's pickles under `<runs>/slurm/`. Job states come from `scontrol show job`
(jobs the controller still remembers) and, where installed and answering, `sacct`; without either the run's own
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

from repro import io, lease
from repro import runs as store
from repro.errors import UserError
from repro.launch import LaunchOptions, time_minutes
from repro.launch.worker import REUSED

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


def launch_record(run_dir: Path) -> dict[str, Any] | None:
    rec = io.read_json(Path(run_dir) / "launch.json")
    return rec if isinstance(rec, dict) and rec.get("launcher") == "slurm" and rec.get("job_id") else None


def _executor(runs_dir: Path, opts: LaunchOptions):
    import submitit

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


def submit(run_dirs: list[Path], runs_dir: Path, opts: LaunchOptions) -> dict[Path, str]:
    """Submit one job per run directory (one array when several); returns {run dir: job id}."""
    from repro.launch.job import TrainJob

    _need_sbatch()
    if not run_dirs:
        return {}
    ex = _executor(runs_dir, opts)
    try:
        if len(run_dirs) == 1:
            jobs = [ex.submit(TrainJob(), str(run_dirs[0].resolve()))]
        else:
            jobs = ex.map_array(TrainJob(), [str(d.resolve()) for d in run_dirs])
    except Exception as e:  # sbatch refused: a bad partition, account or option
        raise UserError(f"sbatch refused the jobs: {' '.join(str(e).split())[:400]}; "
                        f"check --partition/--account/--slurm/--launcher-config") from None
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    out = {}
    for d, job in zip(run_dirs, jobs):
        old = launch_record(d) or {}
        io.write_json(d / "launch.json", {
            "launcher": "slurm", "job_id": job.job_id, "log": str(job.paths.stdout), "err": str(job.paths.stderr),
            "submitted": now, "submit_host": socket.gethostname(),
            "earlier_job_ids": old.get("earlier_job_ids", []) + ([old["job_id"]] if old.get("job_id") else [])})
        out[d] = job.job_id
    return out


def run_state(run_dir: Path, jobs: dict[str, dict[str, str]]) -> tuple[str, str | None]:
    """(status, Slurm's reason) of one run from its files and its job: done / diverged / pending / requeued /
    running / failed / cancelled / interrupted / ..."""
    status = store.run_status(run_dir)
    rec = launch_record(run_dir)
    job = jobs.get(rec["job_id"]) if rec else None
    if status in REUSED or job is None:
        return status, None
    state = job["state"]
    if state in ACTIVE:
        if state == "RUNNING" or status == "running":
            return "running", None
        return ("requeued" if int(job.get("restarts") or 0) > 0 else "pending"), job["reason"]
    if state == "COMPLETED" and status not in REUSED:
        return status, None
    reason = f"Slurm: {state}" + (f" ({job['reason']})" if job.get("reason") not in ("", "None") else "") + \
        (f", exit {job['exit']}" if job.get("exit") else "")
    return ("cancelled" if state.startswith("CANCELLED") else "failed"), reason


def submit_and_wait(todo, runs_dir: Path, opts: LaunchOptions, *, labels: dict[str, str], console: Console,
                    progress: bool) -> dict[str, str]:
    """Submit every run of `todo` (PlannedRuns) that is not finished, queued or running; with opts.wait, wait for
    all of them. Returns {config_hash: status}."""
    _need_sbatch()
    dirs = {r.config_hash: store.store_dir(runs_dir, r.config_hash) for r in todo}
    recs = {h: launch_record(d) for h, d in dirs.items()}
    jobs = job_states([rec["job_id"] for rec in recs.values() if rec])
    statuses, to_submit = {}, []
    for h, d in dirs.items():
        status = store.run_status(d)
        rec, job = recs[h], jobs.get(recs[h]["job_id"]) if recs[h] else None
        if status in REUSED:
            statuses[h] = status
        elif job is not None and job["state"] in ACTIVE:
            statuses[h] = run_state(d, jobs)[0]
            console.print(f"{labels[h]}: {statuses[h]} as Slurm job {rec['job_id']}; not submitted again")
        elif status == "running":
            statuses[h] = status
            console.print(f"{labels[h]}: running in another process ({(lease.holder(d) or {}).get('host')}); "
                          f"not submitted")
        else:
            to_submit.append(h)
    submitted = submit([dirs[h] for h in to_submit], runs_dir, opts)
    for h in to_submit:
        statuses[h] = "submitted"
        console.print(f"{labels[h]}: submitted as Slurm job {submitted[dirs[h]]}")
    if not opts.wait:
        if not to_submit:
            console.print("nothing to submit")
        return statuses
    return wait(dirs, console=console, progress=progress)


def wait(dirs: dict[str, Path], *, console: Console, progress: bool) -> dict[str, str]:
    """Poll until no run of `dirs` ({config_hash: run dir}) has an active job or a live claim; final statuses."""
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[detail]}"),
                   TimeElapsedColumn(), console=console, disable=not progress)
    with bar:
        task = bar.add_task("Slurm jobs", total=len(dirs), detail="")
        while True:
            recs = {h: launch_record(d) for h, d in dirs.items()}
            jobs = job_states([rec["job_id"] for rec in recs.values() if rec])
            states = {h: run_state(d, jobs)[0] for h, d in dirs.items()}
            active = [h for h, s in states.items() if s in ("pending", "requeued", "running")]
            counts: dict[str, int] = {}
            for s in states.values():
                counts[s] = counts.get(s, 0) + 1
            bar.update(task, completed=len(dirs) - len(active),
                       detail=", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
            if not active:
                break
            time.sleep(POLL_S)
    for h, s in states.items():
        if s not in REUSED:
            rec = recs.get(h) or {}
            console.print(f"[red]{s}[/] {dirs[h]}: log {rec.get('log')}")
    return states


def cancel(run_dirs: list[Path], console: Console) -> int:
    """scancel the active jobs of these runs; returns how many were cancelled."""
    recs = {d: launch_record(d) for d in run_dirs}
    jobs = job_states([r["job_id"] for r in recs.values() if r])
    ids = sorted({r["job_id"] for r in recs.values() if r and jobs.get(r["job_id"], {}).get("state") in ACTIVE})
    if not ids:
        console.print("no queued or running Slurm jobs for these runs")
        return 0
    _need_sbatch()
    out = subprocess.run(["scancel", *ids], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise UserError(f"scancel {' '.join(ids)} failed: {out.stderr.strip()[:300]}")
    console.print(f"cancelled Slurm job(s) {', '.join(ids)}")
    return len(ids)

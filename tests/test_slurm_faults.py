"""Faults of a real shared cluster against the test Slurm (tests/slurm_cluster.py: a low and a high partition with
preemption by requeue): preemption by a higher-priority job, kill -9 on a node that is then lost, scancel, a rank
failing in a two-task job, torchrun on a run a job holds, and a seeded soak of random kills, requeues and
preemptions. Each ends with the numbers of an undisturbed run, every run trained to its end exactly once."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from repro.rundir import RunDir
from repro.cli.rows import status_rows
from test_slurm import SLURM, TORCH_LOADER, job_ids, results, run_cli, wait_until

pytestmark = pytest.mark.slow
# 20 epochs of 30 steps (240 images, batch 8): about 8 s of training in a job, long enough for a fault to land
# inside it; the learn check off, so that no run stops early as "did not learn"
FAULT = ["--set", "train.epochs=20", "--set", "train.batch_size=8", "--set", "train.learn_check=0"]
STEPS = 240 // 8
START_RE = re.compile(r"^(\S+): (?:training|resuming) from (\S+) \(job (\S+), pid (\d+), at ([\d.]+)\)")
END_RE = re.compile(r"^(\S+): ([a-z ]+) \(job (\S+), rank \d+, pid (\d+), at ([\d.]+)")


@pytest.fixture(scope="module")
def reference(synthetic_data, tmp_path_factory):
    """The baseline with FAULT settings trained in this process with one thread, as each job trains it."""
    runs_dir = tmp_path_factory.mktemp("fault-ref")
    with one_thread():
        code, out = run_cli("baseline", synthetic_data, runs_dir, *FAULT)
    assert code == 0, out
    return results(runs_dir)


class one_thread:
    def __enter__(self):
        self.before = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.before)


def submit(data: Path, runs_dir: Path, exp: str = "baseline", *extra: str) -> tuple[RunDir, str]:
    code, out = run_cli(exp, data, runs_dir, *SLURM, *FAULT, *extra)
    assert code == 0 and "submitted as Slurm job" in out, out
    (run_dir,) = [RunDir(d) for d in (runs_dir / "store").iterdir()]
    (job,) = job_ids(runs_dir)
    return run_dir, job


def iteration(run: RunDir) -> int:
    return max((r["iteration"] for r in run.curve_rows()), default=0)


def log_lines(run: RunDir) -> list[str]:
    return Path(run.read_launch()["log"]).read_text(errors="replace").splitlines()


def wait_requeued(cluster, job: str, restarts: int = 1) -> None:
    """Until Slurm has requeued `job`. It then waits (Reason=BeginTime) for REQUEUE_DELAY_S here (120 s on a
    default cluster) and starts by itself. Not `scontrol update StartTime=now`: within that delay the node still
    refuses the job's revoked credential and Slurm ends it FAILED ("Job credential revoked")."""
    def requeued() -> bool:
        info = cluster.job(job)
        return int(info.get("Restarts", 0)) >= restarts and info.get("JobState") in ("PENDING", "RUNNING")

    wait_until(requeued, timeout=60, what=f"job {job} to be requeued")


def test_preempted_by_a_higher_priority_job_resumes_mid_epoch(slurm_cluster, reference, synthetic_data, tmp_path):
    # Guards: Slurm's preemption (PreemptMode=REQUEUE) sends SIGTERM to every process of the job, the loader's
    # worker processes included; the run must checkpoint after its current step and end "preempted" (not
    # "interrupted", not failed by a worker dying of the same SIGTERM), Slurm requeues the same job, and the
    # requeued job resumes at that batch and ends with the undisturbed run's numbers.
    run_dir, job = submit(synthetic_data, tmp_path)
    wait_until(lambda: iteration(run_dir) >= 40, timeout=120, what="training to start")
    slurm_cluster.run("sbatch", "-p", "high", "--exclusive", "-o", "/dev/null", "--wrap", "sleep 1")
    wait_requeued(slurm_cluster, job)
    code, out = run_cli("baseline", synthetic_data, tmp_path, *SLURM, "--wait", *FAULT)
    assert code == 0 and "submitted as" not in out, out
    assert job_ids(tmp_path) == [job] and slurm_cluster.job(job)["Restarts"] == "1"  # requeued by Slurm itself
    lines = log_lines(run_dir)
    (stop,) = [line for line in lines if ": preempted (" in line]
    assert "signals SIGTERM" in stop and "USR2" not in stop, "\n".join(lines)
    if "before batch" in stop:  # a signal during an epoch's scoring stops "before epoch": also fine
        assert 1 < int(re.search(r"before batch (\d+)", stop)[1]) <= STEPS, stop  # 1-based: after 1..29 steps
    assert [m[2] for m in map(START_RE.match, lines) if m] == ["pending", "preempted"]
    assert results(tmp_path) == reference


def test_kill_9_on_a_lost_node_then_requeue_takes_over_at_once(slurm_cluster, reference, synthetic_data, tmp_path):
    # Guards: after kill -9 (or the OOM killer) on a node that is then lost, the run's lease names a host whose
    # process cannot be checked and whose heartbeat is fresh; the requeued job (same job id) must take it over at
    # once, not fail as "held by another process" nor wait out the 300 s stale timeout, and resume from the last
    # checkpoint to the undisturbed run's numbers.
    assert "REPRO_LEASE_STALE_S" not in os.environ  # the default 300 s: longer than this test may take
    run_dir, job = submit(synthetic_data, tmp_path)
    wait_until(lambda: len(run_dir.metric_rows()) >= 2, timeout=120, what="two epochs (a checkpoint to resume from)")
    owner = json.loads(run_dir.lease_file.read_text())
    os.kill(owner["pid"], signal.SIGKILL)
    wait_until(lambda: slurm_cluster.job(job).get("JobState") == "FAILED", timeout=60, what="the job to fail")
    run_dir.lease_file.write_text(json.dumps({**owner, "host": "lost-node"}))  # touched now: a fresh heartbeat
    assert run_dir.holder() is not None  # held, for anyone but a requeue of its own job
    t0 = time.monotonic()
    slurm_cluster.run("scontrol", "requeue", job)
    wait_requeued(slurm_cluster, job)
    code, out = run_cli("baseline", synthetic_data, tmp_path, *SLURM, "--wait", *FAULT)
    assert code == 0 and "submitted as" not in out, out
    assert time.monotonic() - t0 < 120
    starts = [m[2] for m in map(START_RE.match, log_lines(run_dir)) if m]
    assert starts == ["pending", "interrupted"], starts  # killed without a record: resumed from its checkpoint
    assert results(tmp_path) == reference


def test_scancel_stops_with_a_checkpoint_and_repro_run_resumes(slurm_cluster, reference, synthetic_data, tmp_path):
    # Guards: scancel sends SIGTERM; the run must stop with a checkpoint recorded "preempted", the job stay
    # cancelled (not requeued), `repro status` say so, and a later `repro run` resume it to the same numbers.
    run_dir, job = submit(synthetic_data, tmp_path)
    wait_until(lambda: iteration(run_dir) >= 40, timeout=120, what="training to start")
    slurm_cluster.run("scancel", job)
    wait_until(lambda: run_dir.read_record() is not None and not run_dir.is_held(), timeout=60, what="the stop")
    wait_until(lambda: slurm_cluster.job(job).get("JobState") == "CANCELLED", timeout=60, what="the cancel")
    record = run_dir.read_record()
    assert record.status == "preempted" and run_dir.checkpoint.exists(), record
    assert 0 < record.iterations < 20 * STEPS
    assert slurm_cluster.job(job)["Restarts"] == "0"
    (row,) = status_rows(tmp_path)
    assert row["status"] == "cancelled" and "CANCELLED" in row["error"], row
    with one_thread():
        code, out = run_cli("baseline", synthetic_data, tmp_path, *FAULT)
    assert code == 0 and "resuming" in out, out
    assert results(tmp_path) == reference


def test_rank_0_failing_ends_both_tasks_and_says_why(slurm_cluster, synthetic_data, tmp_path):
    # Guards: when rank 0 of a two-task job fails (here its write of metrics.jsonl, made a directory), rank 1 must
    # not wait in a collective for it: the whole job ends within a minute, and `repro status` gives the reason.
    code, out = run_cli("baseline", synthetic_data, tmp_path, *FAULT, "--dry-run")
    assert code == 0, out
    (run_dir,) = [RunDir(d) for d in (tmp_path / "store").iterdir()]
    run_dir.metrics.mkdir()  # only rank 0 writes it: rank 0 alone fails when it resumes
    t0 = time.monotonic()
    run_dir2, job = submit(synthetic_data, tmp_path, "baseline", "--tasks-per-run", "2")
    assert run_dir2 == run_dir
    wait_until(lambda: slurm_cluster.job(job).get("JobState") in ("FAILED", "CANCELLED", "COMPLETED"), timeout=90,
               what="the job to end")
    assert time.monotonic() - t0 < 60
    assert slurm_cluster.job(job)["JobState"] == "FAILED"
    (row,) = status_rows(tmp_path)
    assert row["status"] == "failed" and "Slurm: FAILED" in row["error"], row
    assert "Is a directory" in row["error"] and "metrics.jsonl" in row["error"], row


def test_torchrun_on_a_run_a_job_holds_is_refused(slurm_cluster, synthetic_data, tmp_path):
    # Guards: torchrun started by hand on a run a Slurm job is training must not train it a second time.
    run_dir, job = submit(synthetic_data, tmp_path, "baseline", "--set", "train.epochs=200")
    try:
        wait_until(lambda: run_dir.holder() is not None, timeout=120, what="the job to hold the run")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node",
               "1", "-m", "repro.engine.distributed", str(run_dir), "--quiet", *TORCH_LOADER]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode != 0, proc.stdout[-2000:]
        refusal = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(refusal) == 1 and f"Slurm job {job}" in refusal[0], proc.stderr[-3000:]
        assert run_dir.holder()["job_id"] == job  # the job still holds it
    finally:
        slurm_cluster.run("scancel", job, check=False)


# --- the soak -----------------------------------------------------------------------------------------------------

SOAK_SEED = 1202
SOAK_FAULTS = 6  # a bounded series: the whole test stays within about two minutes
SOAK = ["--set", "train.epochs=20", "--set", "train.batch_size=8", "--set", "train.learn_check=0"]


class Injector:
    """Random faults against the running jobs of a suite, drawn from a seeded generator: kill -9 of the training
    process (then `scontrol requeue`, as an OOM kill with a requeue policy), the same on a node then lost (the lease
    moved to another host), an admin's `scontrol requeue` (SIGTERM), and preemption by a job in the high
    partition (SIGTERM to every running job). Requeued jobs start again after REQUEUE_DELAY_S."""

    def __init__(self, cluster, runs: list[RunDir], seed: int):
        self.cluster, self.runs, self.rng = cluster, runs, random.Random(seed)
        self.done: list[tuple[str, str]] = []  # (fault, job)
        self.killed: dict[int, float] = {}  # pid -> when

    def _kill(self, run: RunDir, job: str, lost: bool) -> bool:
        owner = run.holder()
        if owner is None or not _is_job_process(owner):
            return False
        try:
            os.kill(int(owner["pid"]), signal.SIGKILL)
        except ProcessLookupError:  # it ended this instant
            return False
        self.killed[int(owner["pid"])] = time.time()
        wait_until(lambda: self.cluster.job(job).get("JobState") not in ("RUNNING", "COMPLETING"), timeout=60,
                   what=f"job {job} to end after kill -9")
        if lost:
            run.lease_file.write_text(json.dumps({k: v for k, v in owner.items() if k != "heartbeat"}
                                                 | {"host": "lost-node"}))
        if self.cluster.job(job).get("JobState") != "PENDING":
            self.cluster.run("scontrol", "requeue", job)
        return True

    def inject(self) -> None:
        t_end = time.monotonic() + 90
        while len(self.done) < SOAK_FAULTS and time.monotonic() < t_end:
            time.sleep(self.rng.uniform(0.5, 2.5))
            live = [(run, run.read_launch()["job_id"]) for run in self.runs if _is_job_process(run.holder())]
            if not live:
                if all(run.own_status() == "done" for run in self.runs):
                    return
                continue  # between two starts: try again shortly
            fault = self.rng.choice(["kill", "lost-node", "requeue", "preempt"])
            run, job = self.rng.choice(live)
            if fault in ("kill", "lost-node"):
                if not self._kill(run, job, lost=fault == "lost-node"):
                    continue
            elif fault == "requeue":
                self.cluster.run("scontrol", "requeue", job, check=False)
            else:
                self.cluster.run("sbatch", "-p", "high", "--exclusive", "-o", "/dev/null", "--wrap", "sleep 1")
            self.done.append((fault, job))


def _is_job_process(owner: dict | None) -> bool:
    """A lease held by a live job process on this host (not one left by a killed one, nor a reused pid)."""
    if owner is None or owner.get("host") != socket.gethostname():
        return False
    try:
        return b"submitit" in Path(f"/proc/{int(owner['pid'])}/cmdline").read_bytes()
    except OSError:
        return False


def trainings(runs: list[RunDir], killed: dict[int, float]) -> dict[RunDir, list[tuple[float, float, str]]]:
    """Per run, every training of it by a job as (start, end, how it ended), from the jobs' logs and the kills."""
    out = {}
    for run in runs:
        lines = log_lines(run)
        starts = {m[4]: float(m[5]) for m in map(START_RE.match, lines) if m}  # pid -> start
        ends = {m[4]: (float(m[5]), m[2]) for m in map(END_RE.match, lines) if m and m[4] in starts}
        out[run] = sorted((t, *(ends.get(pid) or (killed.get(int(pid), float("inf")), "killed")))
                          for pid, t in starts.items())
    return out


def test_fault_soak_every_run_finishes_once_with_undisturbed_results(slurm_cluster, synthetic_data, tmp_path):
    # Guards, under a seeded series of kills, requeues and preemptions: no run is lost (every record done), none is
    # trained by two processes at once or again after it finished, and the numbers equal an undisturbed suite's.
    with one_thread():
        code, out = run_cli("ablation-lrn", synthetic_data, tmp_path / "undisturbed", *SOAK)
    assert code == 0, out
    runs_dir = tmp_path / "soak"
    code, out = run_cli("ablation-lrn", synthetic_data, runs_dir, *SLURM, *SOAK)
    assert code == 0 and out.count("submitted as Slurm job") == 3, out
    runs = [RunDir(d) for d in sorted((runs_dir / "store").iterdir())]
    ids = job_ids(runs_dir)
    wait_until(lambda: any(run.holder() for run in runs), timeout=120, what="the jobs to start")
    injector = Injector(slurm_cluster, runs, SOAK_SEED)
    injector.inject()
    code, out = run_cli("ablation-lrn", synthetic_data, runs_dir, *SLURM, "--wait", *SOAK)
    print(f"soak faults: {injector.done}")
    assert code == 0 and "submitted as" not in out, out
    assert job_ids(runs_dir) == ids and len(injector.done) == SOAK_FAULTS, injector.done
    assert {run.read_record().status for run in runs} == {"done"}
    for run, spans in trainings(runs, injector.killed).items():
        assert [end for _, end, _ in spans] == sorted(end for _, end, _ in spans), spans
        assert all(a_end <= b_start for (_, a_end, _), (b_start, _, _) in zip(spans, spans[1:])), spans  # one at once
        assert [how for _, _, how in spans].count("done") == 1 and spans[-1][2] == "done", spans  # none after
    assert results(runs_dir) == results(tmp_path / "undisturbed")

"""The launchers without a cluster: Slurm's defaults and refusals, how often `--wait` asks Slurm, a requeued job taking
over its own lease, SIGTERM as a preemption inside a job, status believing a live lease, the local pool's slots on a
GPU machine, and planned runs recording absolute data paths."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from io import StringIO
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from repro import io
from repro.cli import app
from repro.config import RunConfig, to_dict
from repro.engine import preempt
from repro.errors import UserError
from repro.launch import local, slurm
from repro.launch.options import resolve_options
from repro.record import RunRecord
from repro.rundir import Job, RunDir


def planned_run(folder: Path, scale: str, **train) -> RunDir:
    run = RunDir(folder)
    run.path.mkdir(parents=True, exist_ok=True)
    config = to_dict(RunConfig())
    config["train"].update(train)
    io.write_json(run.planned, {"scale": scale, "config": config, "config_hash": run.config_hash})
    return run


# --- Slurm defaults -------------------------------------------------------------------------------------------------

def test_slurm_asks_for_a_gpu_with_cores_and_memory_by_default(tmp_path):
    # guards against jobs landing on a shared cluster with its defaults: no GPU, one core, a few GB
    opts = resolve_options("slurm")
    assert (opts.gpus_per_run, opts.tasks_per_run, opts.cpus_per_gpu, opts.mem_per_gpu) == (1, 1, 8, "32G")
    text = slurm._executor(tmp_path, opts)._make_submission_file_text("python -m x", "u")
    for line in ("--gpus-per-node=1", "--cpus-per-gpu=8", "--mem-per-gpu=32G", "--requeue", "--kill-on-bad-exit=1"):
        assert line in text, text
    opts = resolve_options("slurm", gpus_per_run=0, cpus_per_task=2)
    text = slurm._executor(tmp_path, opts)._make_submission_file_text("python -m x", "u")
    assert "gpus" not in text and "per-gpu" not in text and "--cpus-per-task=2" in text
    assert resolve_options("local").gpus_per_run == 0
    # options that exclude the per-GPU ones replace them
    assert slurm._per_gpu(resolve_options("slurm", cpus_per_task=4)) == {"mem_per_gpu": "32G"}
    assert slurm._per_gpu(resolve_options("slurm", slurm_sets=["mem=64G"])) == {"cpus_per_gpu": "8"}
    assert slurm._per_gpu(resolve_options("slurm", cpus_per_gpu=12, mem_per_gpu="48G")) == \
        {"cpus_per_gpu": "12", "mem_per_gpu": "48G"}
    with pytest.raises(UserError, match="--mem-per-gpu '32 GB'"):
        resolve_options("slurm", mem_per_gpu="32 GB")
    with pytest.raises(UserError, match="--cpus-per-gpu 0"):
        resolve_options("slurm", cpus_per_gpu=0)


def test_gpu_scales_are_refused_on_cpus(tmp_path):
    # guards against a subset or full run sent to a CPU job, where it would take weeks
    subset, smoke = planned_run(tmp_path / "a", "subset"), planned_run(tmp_path / "b", "smoke")
    slurm.refuse_cpu_training([subset, smoke], resolve_options("slurm"))
    slurm.refuse_cpu_training([smoke], resolve_options("slurm", gpus_per_run=0))
    with pytest.raises(UserError, match="--gpus-per-run 0: subset-scale"):
        slurm.refuse_cpu_training([smoke, subset], resolve_options("slurm", gpus_per_run=0))
    cpu = planned_run(tmp_path / "c", "full", device="cpu")
    with pytest.raises(UserError, match="train.device=cpu: full-scale"):
        slurm.refuse_cpu_training([cpu], resolve_options("slurm"))


def test_the_refusal_is_one_line_and_exit_2(fake_manifest, tmp_path, monkeypatch):
    monkeypatch.setattr(slurm.shutil, "which", lambda name: f"/usr/bin/{name}")  # as on a login node
    monkeypatch.setattr(slurm, "run_jobs", lambda runs: {})
    submitted = []
    monkeypatch.setattr(slurm, "submit", lambda *a: submitted.append(a) or {})
    res = CliRunner().invoke(app, ["run", "ablation-lrn", "--scale", "subset", "--data", str(tmp_path / "d"),
                                   "--runs", str(tmp_path / "runs"), "--launcher", "slurm", "--gpus-per-run", "0"])
    text = " ".join(res.output.split())  # rich wraps long lines at the terminal's width
    assert res.exit_code == 2 and not submitted, res.output
    assert text.count("error:") == 1 and "error: --gpus-per-run 0: subset-scale runs" in text, res.output


def test_wait_asks_slurm_at_most_every_poll_and_decides_on_a_fresh_answer(tmp_path, monkeypatch):
    # guards against --wait hammering the controller (it used to ask for the whole cluster every second)
    run = planned_run(tmp_path / "r", "smoke")
    asked: list[float] = []

    def run_jobs(runs):
        asked.append(time.monotonic())
        return {run: Job("7", "running")}

    monkeypatch.setattr(slurm, "run_jobs", run_jobs)
    monkeypatch.setattr(slurm, "FILE_POLL_S", 0.05)
    done = RunRecord(status="done", config={}, config_hash=run.config_hash)
    threading.Timer(0.5, lambda: run.write_record(done)).start()
    t0 = time.monotonic()
    statuses = slurm.wait([run], console=_quiet(), progress=False, every=0.4)
    assert statuses == {run.config_hash: "done"} and time.monotonic() - t0 < 3
    gaps = [b - a for a, b in zip(asked, asked[1:])]
    assert gaps and min(gaps) >= 0.39, gaps
    monkeypatch.setenv("REPRO_SLURM_POLL_S", "soon")
    with pytest.raises(UserError, match="REPRO_SLURM_POLL_S='soon'"):
        slurm.poll_s()
    monkeypatch.setenv("REPRO_SLURM_POLL_S", "2.5")
    assert slurm.poll_s() == 2.5


def test_a_live_lease_is_running_whatever_a_duplicate_job_says(tmp_path, monkeypatch):
    # guards against `repro status` and --wait trusting a failed or cancelled duplicate job over the live owner
    run = planned_run(tmp_path / "r", "smoke")
    held = run.claim(job_id="11")
    try:
        for phase in ("failed", "cancelled", "pending"):
            assert run.status(Job("12", phase, reason="Slurm: FAILED"))[0] == "running"
        monkeypatch.setattr(slurm, "run_jobs", lambda runs: {run: Job("12", "failed", reason="Slurm: FAILED")})
        monkeypatch.setattr(slurm, "FILE_POLL_S", 0.05)
        threading.Timer(0.6, held.release).start()
        t0 = time.monotonic()
        statuses = slurm.wait([run], console=_quiet(), progress=False, every=0.1)
        assert time.monotonic() - t0 >= 0.5 and statuses[run.config_hash] == "failed"  # only once the lease went
    finally:
        held.release()
    assert run.status(Job("12", "failed", reason="Slurm: FAILED")) == ("failed", "Slurm: FAILED")


def _quiet() -> Console:
    return Console(file=StringIO())


# --- a requeued job takes over its own lease ------------------------------------------------------------------------

def _lease(run: RunDir, **fields) -> None:
    owner = {"host": "lost-node", "pid": 1, "job_id": "42", "token": "old", "since": 0.0}
    owner.update(fields)
    run.lease_file.write_text(json.dumps(owner))  # touched now: a fresh heartbeat


def test_a_requeued_job_takes_over_its_own_lease_at_once(tmp_path):
    # guards against a requeued job failing (or waiting 5 minutes) because its killed start, on a node that is now
    # gone, left a lease with a fresh heartbeat: the launchers claim with the job id (repro.lease does the rest)
    from repro.launch.worker import train_claimed

    run = planned_run(tmp_path / "r", "smoke")
    _lease(run)
    where = {"launcher": "slurm", "slurm_job_id": "43", "log": "x.out"}
    seen = []
    assert train_claimed(None, run, progress=False, where=where, on_start=seen.append) == "busy" and not seen
    where["slurm_job_id"] = "42"
    with pytest.MonkeyPatch.context() as m:  # stop right after the claim: what matters is who got it
        m.setattr("repro.launch.worker.fit_run", lambda cfg, run_dir, **kw: run.holder()["job_id"])
        assert train_claimed(None, run, progress=False, where=where, on_start=seen.append) == "42"
    assert seen == ["pending"] and run.holder() is None  # released after
    # a flock left on the shared filesystem by the lost node (NFS keeps it on the server) does not keep it out
    _lease(run)
    with run.lock() as got, pytest.MonkeyPatch.context() as m:
        assert got
        m.setattr("repro.launch.worker.fit_run", lambda cfg, run_dir, **kw: run.holder()["job_id"])
        assert train_claimed(None, run, progress=False, where=where) == "42"


# --- SIGTERM inside a job -------------------------------------------------------------------------------------------

def test_sigterm_preempts_inside_a_job_and_repeats_change_nothing():
    # guards against SIGTERM (Slurm's preemption, time limit, scancel) ending a job's run "interrupted" or, on a
    # second SIGTERM, without its checkpoint
    preempt.clear()
    preempt.sigterm_preempts()
    try:
        with preempt.handlers():
            for _ in range(3):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.01)  # Python runs the handler between bytecodes
            assert preempt.reason() == "preempted" and signal.SIGTERM in preempt.received()
    finally:
        preempt.sigterm_preempts(False)
        preempt.clear()
    with preempt.handlers():  # outside a job SIGTERM is a stop, as before
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert preempt.reason() == "interrupted" and not preempt.received()
    preempt.clear()


# --- the local pool on GPUs -----------------------------------------------------------------------------------------

class _FakeProc:
    def __init__(self, cmd, stdout=None, stderr=None, env=None, start_new_session=False):
        self.cmd, self.env = cmd, env
        _FakeProc.started.append(self)

    def poll(self):
        return 0

    def terminate(self):
        pass

    def wait(self):
        return 0


def test_local_pool_pins_each_gpu_worker_to_its_share_of_the_cores(tmp_path, monkeypatch):
    # guards against N GPU workers each starting loader threads for every core of the machine
    monkeypatch.setattr(local.os, "sched_getaffinity", lambda pid: set(range(16)))
    gpus = ["0", "1", "2", "3"]
    assert local.worker_slots(4, gpus) == [("0", "0,1,2,3"), ("1", "4,5,6,7"), ("2", "8,9,10,11"),
                                           ("3", "12,13,14,15")]
    assert local.worker_slots(2, gpus) == [("0", "0,1,2,3,4,5,6,7"), ("1", "8,9,10,11,12,13,14,15")]
    assert local.worker_slots(2, []) == [(None, "0,1,2,3,4,5,6,7"), (None, "8,9,10,11,12,13,14,15")]
    monkeypatch.setattr(local, "devices", lambda: gpus)
    monkeypatch.setattr(local.subprocess, "Popen", _FakeProc)
    _FakeProc.started = []
    runs = [(f"r{k}", planned_run(tmp_path / f"r{k}", "smoke")) for k in range(4)]
    local.run_pool(runs, 4, console=_quiet(), progress=False)
    seen = {(p.env["CUDA_VISIBLE_DEVICES"], p.cmd[p.cmd.index("--cpus") + 1], p.cmd[p.cmd.index("--threads") + 1],
             p.env["OMP_NUM_THREADS"]) for p in _FakeProc.started}
    assert seen == {(gpu, cpus, "4", "4") for gpu, cpus in local.worker_slots(4, gpus)}


# --- planned runs record absolute data paths ------------------------------------------------------------------------

def test_planned_runs_record_the_data_folder_as_an_absolute_path(fake_manifest, tmp_path, monkeypatch):
    # guards against a job (or a later `repro run`) started in another folder looking for data/... relative to it
    from repro.plan import plan

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "smoke").mkdir(parents=True)
    (tmp_path / "data" / "smoke" / "manifest.json").write_text("{}")  # prepared (its facts are the fake manifest's)
    _, rel = plan(["baseline"], "smoke", data_dir="data/smoke", seeds=1, sets=[])
    _, absolute = plan(["baseline"], "smoke", data_dir=str(tmp_path / "data" / "smoke"), seeds=1, sets=[])
    (r,), (a,) = rel["baseline"], absolute["baseline"]
    assert r.cfg.data.dir == str(tmp_path / "data" / "smoke") and r.config_hash == a.config_hash
    res = CliRunner().invoke(app, ["run", "baseline", "--scale", "smoke", "--data", "data/smoke", "--dry-run",
                                   "--runs", "runs"])
    assert res.exit_code == 0, res.output
    (planned,) = Path("runs/store").glob("*/planned.json")
    assert json.loads(planned.read_text())["config"]["data"]["dir"] == str(tmp_path / "data" / "smoke")

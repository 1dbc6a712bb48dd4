"""The launchers against a real single-node Slurm cluster (started by the `slurm_cluster` fixture) and a local pool:
runs trained as Slurm jobs equal runs trained here, resubmission submits nothing twice, a failed job says why,
and a run of two DDP tasks in one job equals the same run under torchrun."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from repro import io
from repro.rundir import RunDir
from repro.cli import app
from repro.record import TIMING_KEYS
from repro.launch.local import core_groups
from repro.cli.rows import status_rows

pytestmark = pytest.mark.slow
TORCH_LOADER = ["--set", "data.backend=torch"]  # the same runs (the backend is not hashed), no numba compile per job
OTHER_LR = ["--set", "train.lr=0.02"]
SLURM = ["--launcher", "slurm", "--gpus-per-run", "0"]  # CPU jobs: smoke runs may train on CPUs
# the default request, one GPU per run with cores and memory per GPU, scaled to the test cluster's fake GPUs
SLURM_GPU = ["--launcher", "slurm", "--cpus-per-gpu", "1", "--mem-per-gpu", "100M"]


def cli(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(app, list(args))
    if res.exception and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res.exit_code, " ".join(res.output.split())  # rich wraps lines at the terminal's width


def run_cli(exp: str, data: Path, runs_dir: Path, *extra: str) -> tuple[int, str]:
    return cli("run", exp, "--scale", "smoke", "--data", str(data), "--runs", str(runs_dir), "--quiet",
               *TORCH_LOADER, *extra)


def results(runs_dir: Path) -> dict[str, dict]:
    """{config hash: (metrics, per-epoch rows without timings, val logits)} of every run under runs_dir."""
    out = {}
    for d in sorted((runs_dir / "store").iterdir()):
        rows = [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS}
                for line in (d / "metrics.jsonl").read_text().splitlines()]
        out[d.name] = {"metrics": RunDir(d).read_record().metrics, "rows": rows,
                       "logits": np.load(d / "val_logits.npy").tolist()}
    return out


@pytest.fixture
def one_thread():
    """Train in this process with one CPU thread, as each Slurm job and each of two local workers on 2 cores does."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def local_reference(synthetic_data, tmp_path_factory):
    """ablation-lrn trained in this process with one thread: what every launcher must reproduce."""
    runs_dir = tmp_path_factory.mktemp("local-ref")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code, out = run_cli("ablation-lrn", synthetic_data, runs_dir)
    finally:
        torch.set_num_threads(before)
    assert code == 0, out
    return results(runs_dir)


def job_ids(runs_dir: Path) -> list[str]:
    return sorted(io.read_json(d / "launch.json")["job_id"] for d in (runs_dir / "store").iterdir()
                  if (d / "launch.json").exists())


def wait_until(check, timeout: float = 240.0, what: str = "") -> None:
    t_end = time.time() + timeout
    while time.time() < t_end:
        if check():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_local_parallel_two_equals_in_process(local_reference, synthetic_data, tmp_path):
    code, out = run_cli("ablation-lrn", synthetic_data, tmp_path, "--parallel", "2")
    assert code == 0, out
    assert results(tmp_path) == local_reference
    for d in (tmp_path / "store").iterdir():  # each run trained in its own worker, with a log and a placement
        where = io.read_json(d / "placement.json")
        assert where["launcher"] == "local" and where["pid"] != os.getpid() and where["threads"] == 1
        assert where["cpus"] in core_groups(2)  # pinned to its own share of the cores
        assert (d / "train.log").exists() and not (d / ".lease").exists()


def test_slurm_wait_equals_local(slurm_cluster, local_reference, synthetic_data, tmp_path):
    code, out = run_cli("ablation-lrn", synthetic_data, tmp_path, *SLURM_GPU, "--wait")
    assert code == 0, out
    assert "submitted as Slurm job" in out and "ablation-lrn" in out  # the analysis ran after the jobs
    assert results(tmp_path) == local_reference
    ids = job_ids(tmp_path)
    assert len(ids) == 3 and all("_" in i for i in ids)  # one job array, one task per run
    # each job asked for a GPU with its cores and memory, and a run's tasks end together
    script = (tmp_path / "slurm" / f"{ids[0].split('_')[0]}_submission.sh").read_text()
    for line in ("--gpus-per-node=1", "--cpus-per-gpu=1", "--mem-per-gpu=100M", "--requeue", "--kill-on-bad-exit=1"):
        assert line in script, script
    for d in (tmp_path / "store").iterdir():
        where = io.read_json(d / "placement.json")
        assert where["launcher"] == "slurm" and where["slurm_job_id"] in ids and where["host"] == slurm_cluster.node
        assert Path(where["log"]).exists()
    rows = status_rows(tmp_path)
    assert {r["status"] for r in rows} == {"done"} and sorted(r["job"] for r in rows) == ids
    assert all(r["host"] == slurm_cluster.node and r["log"] for r in rows)
    # nothing left to do: a second submission submits nothing and retrains nothing
    before = {d.name: (d / "result.json").stat().st_mtime_ns for d in (tmp_path / "store").iterdir()}
    code, out = run_cli("ablation-lrn", synthetic_data, tmp_path, *SLURM)
    assert code == 0 and "submitted" not in out.replace("nothing to submit", "")
    assert job_ids(tmp_path) == ids
    assert before == {d.name: (d / "result.json").stat().st_mtime_ns for d in (tmp_path / "store").iterdir()}


def _copy_data(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_resubmit_and_failed_job(slurm_cluster, synthetic_data, tmp_path):
    data_ok, data_bad = _copy_data(synthetic_data, tmp_path / "ok"), _copy_data(synthetic_data, tmp_path / "bad")
    runs_dir = tmp_path / "runs"
    env = slurm_cluster.env()
    # held jobs stay pending until released, so the test decides when they start
    code, out = run_cli("ablation-lrn", data_ok, runs_dir, *SLURM, "--slurm", "hold")
    assert code == 0 and out.count("submitted as Slurm job") == 3, out
    # another lr: a run of its own (the copy of the data has the same content hash, so the same runs otherwise)
    code, out = run_cli("baseline", data_bad, runs_dir, *SLURM, "--slurm", "hold", *OTHER_LR)
    assert code == 0 and out.count("submitted as Slurm job") == 1, out
    ids = job_ids(runs_dir)
    assert len(ids) == 4
    assert {r["status"] for r in status_rows(runs_dir)} == {"pending"}

    # submitting again while the jobs are queued submits nothing
    code, out = run_cli("ablation-lrn", data_ok, runs_dir, *SLURM)
    assert code == 0 and "submitted as" not in out and out.count("not submitted again") == 3, out
    assert job_ids(runs_dir) == ids

    (data_bad / "train.beton").unlink()  # the baseline job will fail when it starts
    subprocess.run(["scontrol", "release", ",".join(i.split("_")[0] for i in ids)], env=env, check=True)
    code, out = run_cli("ablation-lrn", data_ok, runs_dir, *SLURM, "--wait")
    assert code == 0 and "submitted as" not in out, out
    bad_link = next((runs_dir / "baseline").glob("*/*"))

    def bad_row():
        return next(r for r in status_rows(runs_dir) if r["experiment"] == "baseline")

    wait_until(lambda: bad_row()["status"] == "failed", what="the baseline job to fail")
    row = bad_row()
    assert "Slurm: FAILED" in row["error"] and "train.beton" in row["error"], row
    assert Path(row["log"]).exists() and row["log"] == io.read_json(bad_link / "placement.json")["log"]
    assert "train.beton" in Path(row["log"]).with_name(Path(row["log"]).name.replace(".out", ".err")).read_text()
    status = cli("status", "--runs", str(runs_dir))[1]
    assert "failed" in status and "done" in status
    others = [r for r in status_rows(runs_dir) if r["experiment"] == "ablation-lrn"]
    assert {r["status"] for r in others} == {"done"}

    # again: only the failed run is submitted
    shutil.copy(synthetic_data / "train.beton", data_bad / "train.beton")
    code, out = run_cli("ablation-lrn", data_ok, runs_dir, *SLURM)
    assert code == 0 and "submitted as" not in out
    code, out = run_cli("baseline", data_bad, runs_dir, *SLURM, "--wait", *OTHER_LR)
    assert code == 0 and out.count("submitted as Slurm job") == 1, out
    assert bad_row()["status"] == "done"
    assert len(job_ids(runs_dir)) == 4 and io.read_json(bad_link / "launch.json")["earlier_job_ids"]


def test_two_tasks_in_one_job_equal_torchrun(slurm_cluster, synthetic_data, tmp_path):
    runs_dir = tmp_path / "runs"
    code, out = run_cli("baseline", synthetic_data, runs_dir, *SLURM, "--tasks-per-run", "2", "--wait")
    assert code == 0, out
    (run_dir,) = list((runs_dir / "store").iterdir())
    assert io.read_json(run_dir / "placement.json")["tasks"] == 2

    ref = tmp_path / "torchrun" / "store" / run_dir.name
    ref.mkdir(parents=True)
    shutil.copy(run_dir / "planned.json", ref / "planned.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", "2",
           "-m", "repro.engine.distributed", str(ref), "--quiet", *TORCH_LOADER]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert results(runs_dir) == results(tmp_path / "torchrun")


def test_preempted_job_requeues_and_resumes_inside_the_epoch(slurm_cluster, synthetic_data, tmp_path, one_thread):
    # 30 steps of 8 images per epoch and 10 epochs: long enough that the warning lands while the job trains, and
    # most likely inside an epoch; the signal's delay through Slurm is not under the test's control, so a stop at an
    # epoch boundary is accepted too (tests/test_preempt.py checks exact resume inside an epoch deterministically)
    steps = 240 // 8
    settings = ["--set", "train.epochs=10", "--set", "train.batch_size=8", "--set", "train.learn_check=0"]
    code, out = run_cli("baseline", synthetic_data, tmp_path / "straight", *settings)
    assert code == 0, out

    runs_dir = tmp_path / "runs"
    code, out = run_cli("baseline", synthetic_data, runs_dir, *SLURM, *settings)
    assert code == 0 and "submitted as Slurm job" in out, out
    (run_dir,) = list((runs_dir / "store").iterdir())
    (job,) = job_ids(runs_dir)

    def mid_epoch() -> bool:  # a few optimizer steps into the first epoch
        return any(r["iteration"] >= 2 for r in io.read_jsonl(run_dir / "curve.jsonl"))

    wait_until(mid_epoch, what="training to start")
    # Slurm's early warning, as sbatch --signal sends it before a time limit or a preemption
    subprocess.run(["scancel", "--signal", "USR2", job], env=slurm_cluster.env(), check=True)

    def requeued_and_waiting() -> bool:
        info = subprocess.run(["scontrol", "show", "job", job], env=slurm_cluster.env(), capture_output=True, text=True)
        return "Restarts=1" in info.stdout and "Reason=BeginTime" in info.stdout

    # slurmctld holds a requeued job back (Reason=BeginTime: 120 s on a default cluster, REQUEUE_DELAY_S in
    # tests/slurm_cluster.py), then starts it; forcing StartTime=now would race the node's revoked credential
    wait_until(requeued_and_waiting, what="the job to requeue itself")
    code, out = run_cli("baseline", synthetic_data, runs_dir, *SLURM, "--wait", *settings)
    assert code == 0 and "submitted as" not in out, out

    assert job_ids(runs_dir) == [job]  # the same job, requeued, not a new submission
    info = subprocess.run(["scontrol", "show", "job", job], env=slurm_cluster.env(), capture_output=True, text=True)
    assert "Restarts=1" in info.stdout, info.stdout
    log = Path(io.read_json(run_dir / "launch.json")["log"]).read_text()
    stop = [line for line in log.splitlines() if ": preempted (" in line]
    assert len(stop) == 1 and "before" in stop[0], log[-3000:]
    if "before batch" in stop[0]:
        batch = int(stop[0].split("before batch ")[1].split(")")[0].split()[0].rstrip(";"))
        assert 1 < batch <= steps, stop[0]  # stopped inside an epoch ("before batch" counts from 1)
    assert results(runs_dir) == results(tmp_path / "straight")


def test_cancel_cancels_what_was_submitted(slurm_cluster, synthetic_data, tmp_path):
    code, out = run_cli("ablation-lrn", synthetic_data, tmp_path, *SLURM, "--slurm", "hold")
    assert code == 0 and out.count("submitted as Slurm job") == 3, out
    ids = job_ids(tmp_path)
    code, out = cli("cancel", "ablation-lrn", "--runs", str(tmp_path))
    assert code == 0 and "cancelled Slurm job(s)" in out and all(i in out for i in ids), out
    wait_until(lambda: {r["status"] for r in status_rows(tmp_path)} == {"cancelled"}, timeout=30,
               what="the jobs to be cancelled")
    assert all("CANCELLED" in r["error"] for r in status_rows(tmp_path))
    code, out = cli("cancel", "ablation-lrn", "--runs", str(tmp_path))
    assert code == 0 and "no queued or running" in out
    assert cli("cancel", "no-such-experiment", "--runs", str(tmp_path))[0] == 2

"""Claiming runs without trusting flock: the lease file, its heartbeat and stale takeover; and the launcher options."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
import time
from pathlib import Path

import pytest

from repro import lease
from repro.errors import UserError
from repro.launch.options import parse_slurm_sets, resolve_options, time_minutes


def test_only_one_claim_while_held_and_another_after_release(tmp_path):
    first = lease.claim(tmp_path / ".lease", job_id="7")
    assert first is not None and lease.claim(tmp_path / ".lease") is None
    held = lease.holder(tmp_path / ".lease")
    assert held["job_id"] == "7" and held["pid"] == os.getpid() and held["host"] == socket.gethostname()
    first.release()
    assert lease.holder(tmp_path / ".lease") is None and not (tmp_path / ".lease").exists()
    assert lease.claim(tmp_path / ".lease") is not None


def _write_lease(path: Path, age: float = 0.0, **fields) -> None:
    """A lease of another owner whose last heartbeat (the file's modification time) is `age` s old on the
    filesystem's clock."""
    owner = {"host": "other-host", "pid": 1, "job_id": None, "token": "t0", "since": 0.0}
    owner.update(fields)
    (path / ".lease").write_text(json.dumps(owner))
    t = lease.filesystem_now(path / ".lease") - age
    os.utime(path / ".lease", (t, t))


def test_a_lease_from_another_host_is_kept_until_its_heartbeat_stops(tmp_path):
    _write_lease(tmp_path, age=10)
    assert lease.claim(tmp_path / ".lease", stale_after=60) is None  # alive: its heartbeat is 10 s old
    _write_lease(tmp_path, age=120)
    taken = lease.claim(tmp_path / ".lease", stale_after=60)
    assert taken is not None and lease.holder(tmp_path / ".lease")["token"] == taken.owner["token"]
    assert not list(tmp_path.glob(".lease.*.stale"))  # the stale lease moved aside is gone


def test_reading_a_lease_in_a_folder_it_may_not_write_uses_this_hosts_clock(tmp_path, monkeypatch):
    _write_lease(tmp_path, age=10)
    (tmp_path / ".lease.clock").unlink()
    real_open = os.open

    def read_only(path, flags, *args):
        if flags & os.O_CREAT:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", read_only)  # as root, a chmod would not stop this process
    assert lease.holder(tmp_path / ".lease", stale_after=60)["host"] == "other-host"  # alive by this host's clock
    assert lease.holder(tmp_path / ".lease", stale_after=5) is None
    assert not (tmp_path / ".lease.clock").exists()


def test_a_lease_of_a_dead_process_on_this_host_is_taken_at_once(tmp_path):
    proc = mp.get_context("spawn").Process(target=time.sleep, args=(0,))
    proc.start()
    proc.join()
    _write_lease(tmp_path, host=socket.gethostname(), pid=proc.pid)
    assert lease.claim(tmp_path / ".lease") is not None


def test_staleness_is_judged_by_the_filesystem_clock_not_the_writers(tmp_path):
    # a host whose clock runs 10 minutes behind wrote its own times into the lease: they are not read
    behind = time.time() - 600
    _write_lease(tmp_path, age=5, since=behind, heartbeat=behind)
    assert lease.claim(tmp_path / ".lease", stale_after=60) is None  # touched 5 s ago by the filesystem's clock
    # and one whose clock runs ahead cannot keep a dead lease alive: the file was last touched 10 minutes ago
    ahead = time.time() + 600
    _write_lease(tmp_path, age=600, since=ahead, heartbeat=ahead)
    assert lease.claim(tmp_path / ".lease", stale_after=60) is not None


def test_a_requeued_job_takes_over_its_own_lease_at_once(tmp_path):
    # the lease names another host (a lost node) whose process cannot be checked, and it is fresh: another job waits,
    # but the same Slurm job, requeued, takes it over without waiting for the stale timeout
    _write_lease(tmp_path, age=1, host="lost-node", pid=4242, job_id="77")
    assert lease.claim(tmp_path / ".lease", job_id="78") is None
    assert lease.claim(tmp_path / ".lease") is None
    again = lease.claim(tmp_path / ".lease", job_id="77")
    assert again is not None and lease.holder(tmp_path / ".lease")["pid"] == os.getpid()
    # a second claim by the same job from this very process is not a takeover of its own live lease
    assert lease.claim(tmp_path / ".lease", job_id="77") is None


def test_the_heartbeat_never_rewrites_a_lease_another_process_put_in_its_place(tmp_path):
    held = lease.claim(tmp_path / ".lease")
    os.rename(tmp_path / ".lease", tmp_path / "aside")  # as a taker does before creating its own
    _write_lease(tmp_path, age=200, token="taker")
    with pytest.raises(lease.LeaseLost):
        held.refresh()
    assert json.loads((tmp_path / ".lease").read_text())["token"] == "taker"
    assert lease.filesystem_now(tmp_path / ".lease") - (tmp_path / ".lease").stat().st_mtime >= 199  # untouched


def test_heartbeat_refreshes_and_a_taken_over_lease_is_noticed(tmp_path):
    held = lease.claim(tmp_path / ".lease")
    before = lease.holder(tmp_path / ".lease")["heartbeat"]
    time.sleep(0.05)
    held.refresh()
    assert lease.holder(tmp_path / ".lease")["heartbeat"] > before
    _write_lease(tmp_path, token="someone-else")  # taken over while this owner was stalled
    with pytest.raises(lease.LeaseLost):
        held.refresh()
    held.release()  # must not remove the new owner's lease
    assert lease.holder(tmp_path / ".lease")["token"] == "someone-else"


def test_keep_alive_beats_on_a_thread(tmp_path):
    held = lease.claim(tmp_path / ".lease").keep_alive(interval=0.05)
    first = lease.holder(tmp_path / ".lease")["heartbeat"]
    time.sleep(0.3)
    assert lease.holder(tmp_path / ".lease")["heartbeat"] > first
    held.release()
    assert lease.holder(tmp_path / ".lease") is None


def _race(run_dir: str, ready, done, out) -> None:
    ready.wait()  # every process is up before anyone claims: they really race
    got = lease.claim(Path(run_dir) / ".lease", stale_after=60)
    out.put(got is not None)
    done.wait(120)  # the winner stays alive (and holds the lease) until every claim is counted


@pytest.mark.parametrize("stale", [False, True])
def test_racing_processes_one_wins(tmp_path, stale):
    if stale:  # everyone sees the same stale lease and tries to take it over
        _write_lease(tmp_path, age=600)
    ctx = mp.get_context("spawn")
    out, ready, done = ctx.Queue(), ctx.Barrier(6), ctx.Event()
    procs = [ctx.Process(target=_race, args=(str(tmp_path), ready, done, out)) for _ in range(6)]
    for p in procs:
        p.start()
    wins = [out.get(timeout=120) for _ in procs]
    done.set()
    for p in procs:
        p.join()
    assert sum(wins) == 1


def test_launcher_options_and_their_errors(tmp_path):
    assert time_minutes("01:30:00") == 90 and time_minutes("1-00:00:30") == 24 * 60 + 1 and time_minutes("5:00") == 5
    with pytest.raises(UserError, match="--time"):
        time_minutes("ninety minutes")
    assert parse_slurm_sets(["qos=high", "hold"]) == {"qos": "high", "hold": True}
    with pytest.raises(UserError, match="--slurm"):
        parse_slurm_sets(["qos="])
    cfg = tmp_path / "cluster.toml"
    cfg.write_text('partition = "gpu"\naccount = "lab"\nsetup = ["module load cuda"]\n[slurm]\nqos = "low"\n')
    opts = resolve_options("slurm", config_file=cfg, slurm_sets=["qos=high"], partition=None, gpus_per_run=2,
                           time="02:00:00")
    assert (opts.partition, opts.account, opts.setup, opts.slurm) == ("gpu", "lab", ["module load cuda"],
                                                                       {"qos": "high"})
    assert opts.tasks_per_run == 2 and opts.time == "02:00:00"
    cfg.write_text('partitoin = "gpu"\n')
    with pytest.raises(UserError, match="partitoin"):
        resolve_options("slurm", config_file=cfg)
    with pytest.raises(UserError, match="torchrun"):
        resolve_options("local", tasks_per_run=2)
    with pytest.raises(UserError, match="cannot read"):
        resolve_options("slurm", config_file=tmp_path / "missing.toml")


def test_a_run_whose_lease_is_taken_over_stops_and_writes_nothing_more(tmp_path, monkeypatch):
    # A run trains under its lease; mid-run another process takes the lease over (as it may once the heartbeat has
    # lapsed). The heartbeat notices at its next beat, the loop stops at its next step, and from then on nothing in
    # the folder changes: no checkpoint, log line or result.json of the old owner lands on the new owner's run.
    import engine_support as sup

    from repro.engine import preempt
    from repro.engine import state as state_mod
    from repro.launch.worker import BUSY, train_claimed

    sup.use_stand_ins(monkeypatch)
    # 20 ms per batch: the run lasts long enough for the takeover to land inside it
    monkeypatch.setattr(state_mod, "make_loaders", sup.slow_make_loaders(0.02))
    monkeypatch.setattr(lease, "HEARTBEAT_S", 0.05)
    real_keep_alive = lease.Lease.keep_alive
    monkeypatch.setattr(lease.Lease, "keep_alive", lambda self, interval=0.05, on_lost=None:
                        real_keep_alive(self, 0.05, on_lost))
    cfg = sup.tiny_config(**{"train.epochs": 200})  # 200 epochs x 4 batches x 20 ms: far longer than the test
    snapshot = {}

    def take_over():
        time.sleep(0.5)
        _write_lease(tmp_path, host=socket.gethostname(), pid=os.getpid(), token="new-owner")
        # the old owner may write until its heartbeat notices (one beat); from then on, nothing
        deadline = time.monotonic() + 5
        while preempt.reason() != "abandoned" and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(0.1)  # a write begun just before the notice lands now
        snapshot.update({p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir() if p.name != ".lease"})

    import threading

    thief = threading.Thread(target=take_over)
    thief.start()
    t0 = time.monotonic()
    status = train_claimed(cfg, tmp_path, progress=False, where={"launcher": "test"})
    thief.join()
    assert status == BUSY and time.monotonic() - t0 < 10
    assert "result.json" not in snapshot and not (tmp_path / "result.json").exists()
    after = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir() if p.name != ".lease"}
    assert after == snapshot  # nothing written, created or removed after the takeover
    assert json.loads((tmp_path / ".lease").read_text())["token"] == "new-owner"  # release left theirs alone
    assert not preempt.requested()  # the next run in this process is not stopped by it


def test_local_pool_gives_each_cpu_worker_its_own_cores(monkeypatch):
    from repro.launch import local

    monkeypatch.setattr(local.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 5})
    assert local.core_groups(2) == ["0,1", "2,3"]
    assert local.core_groups(5) == ["0", "1", "2", "3", "5"]
    monkeypatch.setattr(local, "devices", lambda: [])
    with pytest.raises(UserError, match="--parallel 6: this machine gives this process 5 core"):
        local.run_pool([], 6, console=None, progress=False)


def test_a_pool_worker_runs_on_the_cores_it_is_given(tmp_path):
    # the worker pins itself before torch starts its threads; a run folder without planned.json then stops it
    import subprocess
    import sys

    code = ("import os, sys; from repro.launch import worker; "
            "worker.load_config = lambda d: print(sorted(os.sched_getaffinity(0))) or sys.exit(0); "
            f"worker.main([{str(tmp_path)!r}, '--cpus', '0'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[0]", out.stderr

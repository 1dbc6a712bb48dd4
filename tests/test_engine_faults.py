"""Faults during training, in a child process: SIGTERM, kill -9 mid-training, kill -9 inside a checkpoint save.
After each, running the same config again must finish with exactly the numbers of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import engine_support as sup
from repro.engine import fit

SCRIPT = Path(__file__).with_name("engine_support.py")
CFG = {"train.epochs": 5}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run every faulty one is compared with."""
    with pytest.MonkeyPatch.context() as m:
        sup.use_stand_ins(m)
        torch.set_num_threads(1)
        return fit(sup.tiny_config(**CFG), tmp_path_factory.mktemp("straight"), progress=False)


def resume(run_dir):
    with pytest.MonkeyPatch.context() as m:
        sup.use_stand_ins(m)
        return fit(sup.tiny_config(**CFG), run_dir, progress=False)


def child(run_dir, **extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(SCRIPT), str(run_dir), json.dumps({**CFG, **extra})],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout=60.0):
    end = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"child ended early: {proc.communicate()[1][-2000:]}"
        assert time.monotonic() < end, f"{path} never appeared"
        time.sleep(0.005)


def same_numbers(a: dict, b: dict):
    assert a.status == b.status == "done"
    assert a.metrics == b.metrics and a.iterations == b.iterations and a.epochs_done == b.epochs_done


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_marks_the_run_interrupted_and_it_resumes(tmp_path, straight, sig):
    proc = child(tmp_path, _sleep=0.05)  # ~0.2 s per epoch: the signal lands mid-run
    wait_for(tmp_path / "checkpoint.pt", proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "KeyboardInterrupt" in err  # re-raised, so a sweep stops too
    stopped = json.loads((tmp_path / "result.json").read_text())
    assert stopped["status"] == "interrupted" and 1 <= stopped["epochs_done"] < 5
    assert not list(tmp_path.glob("*.tmp"))
    same_numbers(resume(tmp_path), straight)


def test_kill_9_during_training_then_resume(tmp_path, straight):
    proc = child(tmp_path, _sleep=0.05)
    wait_for(tmp_path / "checkpoint.pt", proc)
    time.sleep(0.1)
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "result.json").exists()  # killed before it could say anything
    same_numbers(resume(tmp_path), straight)


@pytest.mark.parametrize("where", ["write", "rename"])
def test_kill_9_inside_a_checkpoint_save_then_resume(tmp_path, straight, where, caplog):
    proc = child(tmp_path, _kill_in_save=[3, where])
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    if where == "write":  # the half-written file has a temporary name; the last good checkpoint is intact
        assert len(list(tmp_path.glob("checkpoint.pt.*.tmp"))) == 1 and (tmp_path / "checkpoint.pt").exists()
    else:  # the newest complete checkpoint was moved aside and the new one not yet moved in
        assert not (tmp_path / "checkpoint.pt").exists() and (tmp_path / "checkpoint.prev.pt").exists()
    result = resume(tmp_path)
    same_numbers(result, straight)
    if where == "rename":
        assert "checkpoint.prev.pt" in caplog.text
    assert not list(tmp_path.glob("*.tmp"))
    assert sorted(os.listdir(tmp_path)) == sorted(["checkpoint.pt", "checkpoint.prev.pt", "config.json",
                                                   "curve.jsonl", "events", "metrics.jsonl", "result.json",
                                                   "val_logits.npy"])

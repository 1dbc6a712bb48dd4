"""Stopping inside an epoch and continuing from there: the preemption API, loaders that start an epoch at any batch,
timer checkpoints, and resumed runs that end with exactly the numbers and weights of an uninterrupted one."""

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
from engine_support import read_jsonl
from repro.rundir import RunDir
from repro.record import TIMING_KEYS
from repro.config import RunConfig, apply_overrides
from repro.data import make_loaders
from repro.engine import checkpoint, fit, preempt
from repro.engine import state as state_mod

SCRIPT = Path(__file__).with_name("engine_support.py")


@pytest.fixture(autouse=True)
def no_request_left():
    preempt.clear()
    yield
    preempt.clear()




def real_config(small_betons, backend, **overrides):
    base = {"data.dir": str(small_betons), "data.backend": backend, "data.workers": 1, "model.name": "cifar4",
            "model.num_classes": 4, "model.input_size": 28, "model.stem": "tiny", "train.epochs": 2,
            "train.batch_size": 8, "train.device": "cpu", "train.schedule": "cosine", "train.warmup_epochs": 0.5,
            "train.log_every": 3}
    base.update(overrides)
    return apply_overrides(RunConfig(), base)


def request_after(monkeypatch, steps: int) -> None:
    """Call preempt.request() while the `steps`-th training batch is being prepared, as a signal landing then."""
    real, count = state_mod.BatchTransform, {"n": 0}

    def transform(manifest, cfg, train):
        inner = real(manifest, cfg, train)

        def call(x):
            if train:
                count["n"] += 1
                if count["n"] == steps:
                    preempt.request()
            return inner(x)
        return call

    monkeypatch.setattr(state_mod, "BatchTransform", transform)


def without_timing(rows):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]



def assert_same_run(a: Path, b: Path, ra, rb):
    assert ra.status == rb.status == "done"
    assert ra.metrics == rb.metrics and ra.iterations == rb.iterations and ra.epochs_done == rb.epochs_done
    assert read_jsonl(a / "curve.jsonl") == read_jsonl(b / "curve.jsonl")
    assert without_timing(read_jsonl(a / "metrics.jsonl")) == without_timing(read_jsonl(b / "metrics.jsonl"))
    wa, wb = checkpoint.load(a)["model"], checkpoint.load(b)["model"]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_request_sets_a_flag_that_install_wires_to_signals():
    assert not preempt.requested() and preempt.reason() is None
    old = preempt.install([signal.SIGUSR2])
    try:
        os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(0.01)  # Python runs the handler between bytecodes
        assert preempt.requested() and preempt.reason() == "preempted"
    finally:
        preempt.restore(old)
    assert signal.getsignal(signal.SIGUSR2) is old[signal.SIGUSR2]
    preempt.request("interrupted")
    assert preempt.reason() == "interrupted"
    preempt.clear()
    assert not preempt.requested()


@pytest.mark.parametrize("backend", ["torch", "ffcv"])
def test_a_loader_starts_an_epoch_at_any_batch_with_the_same_order(small_betons, backend):
    loaders = make_loaders(real_config(small_betons, backend), device="cpu")
    loaders.set_epoch(1)
    full = [(x.clone(), y.clone()) for x, y in loaders.train]  # FFCV reuses its buffers
    assert len(full) == loaders.batches_per_epoch == 8
    loaders.set_epoch(1, first_batch=5)
    tail = [(x.clone(), y.clone()) for x, y in loaders.train]
    assert len(tail) == 3
    for (xa, ya), (xb, yb) in zip(full[5:], tail):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)  # same samples, same crops and flips
    again = [y.clone() for _, y in loaders.train]  # the next pass is a whole epoch (2) again
    assert len(again) == 8


@pytest.mark.parametrize("backend", ["torch", "ffcv"])
@pytest.mark.parametrize("stop_after", [5, 11])  # inside the first epoch; inside the second
def test_preempted_inside_an_epoch_then_resumed_equals_a_straight_run(tmp_path, small_betons, monkeypatch,
                                                                     backend, stop_after):
    torch.set_num_threads(1)
    cfg = real_config(small_betons, backend)
    straight = fit(cfg, tmp_path / "a", progress=False)
    with monkeypatch.context() as m:
        request_after(m, stop_after)
        stopped = fit(cfg, tmp_path / "b", progress=False)
    assert stopped.status == "preempted" and stopped.iterations == stop_after
    assert RunDir(tmp_path / "b").own_status() == "preempted"
    saved = checkpoint.load(tmp_path / "b")
    assert (saved["epoch"], saved["batch"]) == divmod(stop_after, 8)  # 8 batches per epoch
    preempt.clear()  # what a requeued job starts with: a fresh process
    resumed = fit(cfg, tmp_path / "b", progress=False)
    assert_same_run(tmp_path / "a", tmp_path / "b", straight, resumed)
    # the epoch it stopped inside keeps its order digest: the resumed run saw the straight run's data
    digests = [[r["data_order_digest"] for r in read_jsonl(tmp_path / d / "metrics.jsonl")] for d in "ab"]
    assert digests[0] == digests[1] and len(set(digests[0])) == 2


def test_a_second_run_in_a_preempted_process_stops_at_once(tmp_path):
    preempt.request()
    with pytest.MonkeyPatch.context() as m:
        sup.use_stand_ins(m)
        record = fit(sup.tiny_config(), tmp_path, progress=False)
    assert record.status == "preempted" and record.iterations == 0


def test_timer_checkpoints_inside_epochs_change_nothing(tmp_path, monkeypatch):
    sup.use_stand_ins(monkeypatch)
    torch.set_num_threads(1)
    cfg = sup.tiny_config(**{"train.epochs": 2})
    straight = fit(cfg, tmp_path / "a", progress=False)
    real, where = checkpoint.save, []

    def save(run_dir, state):
        where.append((state["epoch"], state["batch"]))
        return real(run_dir, state)

    monkeypatch.setattr(checkpoint, "save", save)
    timed = fit(apply_overrides(cfg, {"train.checkpoint_minutes": 1e-9}), tmp_path / "b", progress=False)
    # 4 batches per epoch: after every step inside an epoch, and at each epoch's end
    assert where == [(0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (1, 3), (2, 0)]
    assert timed.config_hash == straight.config_hash  # the timer cannot change results, so it is not hashed
    assert_same_run(tmp_path / "a", tmp_path / "b", straight, timed)

    where.clear()
    fit(apply_overrides(cfg, {"train.checkpoint_minutes": 60.0}), tmp_path / "c", progress=False)
    assert where == [(1, 0), (2, 0)]  # an hour never passes here: epoch ends only


def test_sigusr2_in_a_child_process_preempts_and_the_run_continues(tmp_path):
    with pytest.MonkeyPatch.context() as m:
        sup.use_stand_ins(m)
        torch.set_num_threads(1)
        straight = fit(sup.tiny_config(**{"train.epochs": 4}), tmp_path / "a", progress=False)
    run_dir = tmp_path / "b"
    args = json.dumps({"train.epochs": 4, "_sleep": 0.2})
    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(run_dir), args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    end = time.monotonic() + 60
    while not (run_dir / "curve.jsonl").exists() or not (run_dir / "curve.jsonl").read_text():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < end
        time.sleep(0.005)
    proc.send_signal(signal.SIGUSR2)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]  # fit returned: a launcher decides to requeue
    record = json.loads((run_dir / "result.json").read_text())
    assert record["status"] == "preempted" and 3 <= record["iterations"] < 16
    assert checkpoint.load(run_dir)["iteration"] == record["iterations"]
    with pytest.MonkeyPatch.context() as m:
        sup.use_stand_ins(m)
        resumed = fit(sup.tiny_config(**{"train.epochs": 4}), run_dir, progress=False)
    assert_same_run(tmp_path / "a", run_dir, straight, resumed)

"""The engine with the real pieces: synthetic betons from data_prep, repro.data loaders (torch and FFCV backends),
the four-layer net from repro.models, and torchrun with the package's own entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from repro.config import RunConfig, apply_overrides
from repro.data import make_loaders
from repro.data.augment import BatchTransform
from repro.data.order import order_digest
from repro.engine import checkpoint, evaluate, fit, load_model
from repro.rundir import RunDir


def real_config(small_betons, **overrides):
    base = {"data.dir": str(small_betons), "data.backend": "torch", "data.workers": 1, "model.name": "cifar4",
            "model.num_classes": 4, "model.input_size": 28, "model.stem": "tiny", "train.epochs": 2,
            "train.batch_size": 16, "train.device": "cpu", "train.schedule": "constant", "train.log_every": 3}
    base.update(overrides)
    return apply_overrides(RunConfig(), base)


def interrupt_after_first_save(monkeypatch):
    real = checkpoint.save

    def save(run_dir, state):
        real(run_dir, state)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save", save)


def test_every_epoch_records_the_digest_of_its_order_and_crops(tmp_path, small_betons):
    torch.set_num_threads(1)
    digests = {}
    for seed in (0, 1):
        cfg = real_config(small_betons, **{"train.seed": seed})
        fit(cfg, tmp_path / f"s{seed}", progress=False)
        rows = RunDir(tmp_path / f"s{seed}").metric_rows()
        ids = make_loaders(cfg, device="cpu").train_ids
        assert [r["data_order_digest"] for r in rows] == [order_digest(ids, seed, e, 16) for e in (0, 1)]
        digests.update({(seed, e): r["data_order_digest"] for e, r in enumerate(rows)})
    assert len(set(digests.values())) == 4  # seed 1's epoch 0 is not seed 0's epoch 1


def test_training_error_in_evaluation_mode_on_a_fixed_sample(tmp_path, small_betons):
    torch.set_num_threads(1)
    cfg = real_config(small_betons, **{"train.score_train": True, "model.dropout": 0.5})
    record = fit(cfg, tmp_path / "r", progress=False)
    rows = RunDir(tmp_path / "r").metric_rows()
    assert all(r["train_eval_top1_err"] is not None for r in rows)
    # the final value is the final model, in eval mode, on a fixed sample as large as the validation set
    loaders = make_loaders(cfg, device="cpu")
    model, _ = load_model(tmp_path / "r")
    again, _ = evaluate(model, loaders.train_score, BatchTransform(loaders.manifest, cfg, train=False), crop=28)
    assert loaders.num_train_score == loaders.num_val and record.metrics["train_eval_top1_err"] == again["top1_err"]
    assert rows[-1]["train_eval_top1_err"] == again["top1_err"]
    # not the running error with dropout and crops on, which the curve logs
    assert record.metrics["train_eval_top1_err"] != record.metrics["train_top1_err"]


@pytest.mark.parametrize("backend", ["torch", "ffcv"])
def test_resume_matches_a_straight_run(tmp_path, small_betons, monkeypatch, backend):
    torch.set_num_threads(1)
    cfg = real_config(small_betons, **{"data.backend": backend})
    straight = fit(cfg, tmp_path / "a", progress=False)
    assert straight.status == "done" and straight.provenance["data_backend"] == backend
    with monkeypatch.context() as m:
        interrupt_after_first_save(m)
        with pytest.raises(KeyboardInterrupt):
            fit(cfg, tmp_path / "b", progress=False)
    resumed = fit(cfg, tmp_path / "b", progress=False)
    assert resumed.metrics == straight.metrics and resumed.iterations == straight.iterations == 8
    digest = [[r["data_order_digest"] for r in RunDir(tmp_path / d).metric_rows()] for d in "ab"]
    assert digest[0] == digest[1] and len(digest[0]) == 2  # the resumed run saw the same data
    wa = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_killed_after_the_last_checkpoint_scores_the_final_model_on_resume(tmp_path, small_betons, monkeypatch):
    # The last epoch's scoring (ten-crop included) is the final one; a run stopped between the last checkpoint
    # and result.json must still be scored, once, on resume, with the numbers of a straight run.
    torch.set_num_threads(1)
    cfg = real_config(small_betons, **{"train.schedule": "cosine", "train.warmup_epochs": 0.5})
    straight = fit(cfg, tmp_path / "a", progress=False)
    real, saves = checkpoint.save, []

    def save(run_dir, state):
        real(run_dir, state)
        saves.append(state["epoch"])
        if state["epoch"] == cfg.train.epochs:
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(checkpoint, "save", save)
        with pytest.raises(KeyboardInterrupt):
            fit(cfg, tmp_path / "b", progress=False)
    assert saves == [1, 2] and not (tmp_path / "b" / "val_logits.npy").exists()
    resumed = fit(cfg, tmp_path / "b", progress=False)
    assert resumed.status == "done" and resumed.metrics == straight.metrics
    assert resumed.metrics["top1_err_10crop"] is not None
    np.testing.assert_array_equal(np.load(tmp_path / "a" / "val_logits.npy"), np.load(tmp_path / "b" / "val_logits.npy"))


def test_record_agrees_with_an_independent_scoring(tmp_path, small_betons):
    torch.set_num_threads(1)
    cfg = real_config(small_betons)
    result = fit(cfg, tmp_path, progress=False)
    assert result.provenance["data_manifest_hash"] == json.loads((small_betons / "manifest.json").read_text())["hash"]

    model, cfg2 = load_model(tmp_path)
    loaders = make_loaders(cfg2, device="cpu")
    images = torch.cat([x for x, _ in loaders.val])
    labels = torch.cat([y for _, y in loaders.val])
    with torch.no_grad():
        logits = model(BatchTransform(loaders.manifest, cfg2, train=False)(images[..., 2:30, 2:30]))
    stored = np.load(tmp_path / "val_logits.npy").astype(np.float32)
    np.testing.assert_allclose(stored, logits.numpy(), rtol=1e-2, atol=1e-2)
    assert result.metrics["top1_err"] == pytest.approx(100.0 * (logits.argmax(1) != labels).float().mean().item())
    metrics, _ = evaluate(model, loaders.val, BatchTransform(loaders.manifest, cfg2, train=False), crop=28)
    assert metrics["top1_err"] == result.metrics["top1_err"]


def test_tanh_with_a_huge_learning_rate_diverges_quietly(tmp_path, small_betons):
    cfg = real_config(small_betons, **{"model.activation": "tanh", "train.lr": 1e4, "train.epochs": 20,
                                   "train.log_every": 1})
    result = fit(cfg, tmp_path, progress=False)
    assert result.status == "diverged" and result.epochs_done < 20
    assert result.metrics["top1_err_10crop"] is None  # never scored as if it had finished


def test_torchrun_two_processes_on_gloo_is_the_one_process_run(tmp_path, small_betons):
    """train.batch_size is the global batch and the order, crops, dropout and lighting draws are global: two
    processes train the run one process trains, up to the order of floating-point sums."""
    from repro.config import to_dict

    torch.set_num_threads(1)
    cfg = real_config(small_betons, **{"train.ten_crop": False})
    one = fit(cfg, tmp_path / "one", progress=False)
    run_dir = tmp_path / "run"
    (tmp_path / "cfg.json").write_text(json.dumps(to_dict(cfg)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", "2",
           "-m", "repro.engine.distributed", str(run_dir), "--config", str(tmp_path / "cfg.json"), "--quiet",
           "--set", "data.workers=1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("done: top-1 err") == 1  # rank 0 alone reports

    two = RunDir(run_dir).read_record()
    assert two.status == "done" and two.epochs_done == 2
    assert two.iterations == one.iterations == 2 * 4  # 64 images, a global batch of 16: 4 steps per epoch
    rows = [RunDir(d).metric_rows() for d in (tmp_path / "one", run_dir)]
    assert [r["data_order_digest"] for r in rows[0]] == [r["data_order_digest"] for r in rows[1]]
    for a, b in zip(*rows):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3)
        assert a["val_top1_err"] == pytest.approx(b["val_top1_err"], abs=100 / 16 + 1e-9)  # at most one image
    # Scored again in one process, the final weights give the error the two processes recorded together.
    model, cfg2 = load_model(run_dir)
    loaders = make_loaders(cfg2, device="cpu")
    metrics, logits = evaluate(model, loaders.val, BatchTransform(loaders.manifest, cfg2, train=False), crop=28)
    assert metrics["top1_err"] == two.metrics["top1_err"]
    np.testing.assert_allclose(np.load(run_dir / "val_logits.npy").astype(np.float32), logits.numpy(),
                               rtol=1e-2, atol=1e-2)


def test_kill_9_mid_run_then_resume_matches_a_straight_run(tmp_path, small_betons):
    """Smoke scale end to end: a child process training on the real loaders is killed with SIGKILL after its
    first checkpoint; running the config again finishes with the numbers of an uninterrupted run."""
    import signal
    import time
    from pathlib import Path

    torch.set_num_threads(1)
    overrides = {"data.dir": str(small_betons), "data.backend": "torch", "data.workers": 1, "model.name": "cifar4",
                 "model.num_classes": 4, "model.input_size": 28, "model.stem": "tiny", "train.epochs": 4,
                 "train.batch_size": 16, "train.device": "cpu", "train.schedule": "plateau",
                 "train.plateau_patience": 1, "train.log_every": 3}
    cfg = apply_overrides(RunConfig(), overrides)
    straight = fit(cfg, tmp_path / "straight", progress=False)

    script = Path(__file__).with_name("engine_support.py")
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(script), str(run_dir),
                             json.dumps({**overrides, "_real": True, "_sleep": 0.1})],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    end = time.monotonic() + 120
    while not (run_dir / "checkpoint.pt").exists():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < end
        time.sleep(0.005)
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL and not (run_dir / "result.json").exists()

    resumed = fit(cfg, run_dir, progress=False)
    assert resumed.status == "done" and resumed.metrics == straight.metrics
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]


@pytest.mark.parametrize("backend", ["torch", "ffcv"])
def test_evaluation_keeps_every_batchs_labels(small_betons, backend):
    """FFCV hands out the same label buffer again a few batches later: scoring must copy each batch's labels."""
    from repro.data.beton import BetonReader
    from repro.engine import predict
    from repro.models import build_model

    cfg = real_config(small_betons, **{"data.backend": backend, "train.batch_size": 4})
    loaders = make_loaders(cfg, device="cpu")
    torch.manual_seed(0)
    _, labels = predict(build_model(cfg.model), loaders.val, BatchTransform(loaders.manifest, cfg, train=False),
                        crop=28)
    stored = BetonReader(small_betons / "val.beton").labels
    assert len(set(stored.tolist())) > 1 and len(stored) > 4 * 4  # several batches, several classes
    np.testing.assert_array_equal(labels.numpy(), stored)


def test_torchrun_refuses_a_run_another_live_process_holds(tmp_path, small_betons):
    from repro.config import to_dict

    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    held = run.claim(job_id="4711")  # this test process holds it, as a live Slurm job would
    (tmp_path / "cfg.json").write_text(json.dumps(to_dict(real_config(small_betons))))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", "2",
           "-m", "repro.engine.distributed", str(run), "--config", str(tmp_path / "cfg.json"), "--quiet"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    finally:
        held.release()
    assert proc.returncode != 0 and "is held by another live process" in proc.stderr
    assert f"pid {os.getpid()}, Slurm job 4711" in proc.stderr
    assert not run.result.exists() and not run.config.exists()  # nothing trained, nothing written


STOP_ON_RANK_1 = """
import json, sys
import torch
from repro.config import from_dict
from repro.data.augment import BatchTransform
from repro.engine import fit, parallel, preempt
from repro.engine import train as train_mod

torch.set_num_threads(1)
train_mod.CURVE_SYNC_STEPS = 2  # the ranks decide together every two steps
rank, _ = parallel.init_from_env()
init, call, calls = BatchTransform.__init__, BatchTransform.__call__, [0]

def init_(self, manifest, cfg, train):
    init(self, manifest, cfg, train)
    self.for_training = train

def call_(self, images, alpha=None):
    if self.for_training and rank == 1:
        calls[0] += 1
        if calls[0] == 1:  # asked while the first batch is prepared: both ranks stop at the sync after step 2
            preempt.request()
    return call(self, images, alpha)

BatchTransform.__init__, BatchTransform.__call__ = init_, call_
record = fit(from_dict(json.loads(sys.argv[2])), sys.argv[1], progress=False)
print(json.dumps({"rank": rank, "status": record.status}))
"""


def test_a_run_stopped_at_world_size_2_continues_at_world_size_1_from_the_same_sample(tmp_path, small_betons):
    """Two processes stop inside the first epoch; one process continues from the sample they reached and ends with
    the numbers of a run that one process trained straight through (up to the order of floating-point sums)."""
    from repro.config import to_dict

    torch.set_num_threads(1)
    cfg = real_config(small_betons, **{"train.ten_crop": False, "train.log_every": 1})
    (tmp_path / "stop.py").write_text(STOP_ON_RANK_1)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", "2",
           str(tmp_path / "stop.py"), str(tmp_path / "two"), json.dumps(to_dict(cfg))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count('"status": "preempted"') == 2, proc.stdout
    saved = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=True)
    assert (saved["epoch"], saved["world"], saved["samples"]) == (0, 2, 32)  # 2 of the epoch's 4 global steps

    resumed = fit(cfg, tmp_path / "two", progress=False)  # one process now
    one = fit(cfg, tmp_path / "one", progress=False)
    assert resumed.status == one.status == "done" and resumed.iterations == one.iterations == 2 * 4
    curves = [RunDir(tmp_path / d).curve_rows() for d in ("one", "two")]
    assert [r["iteration"] for r in curves[1]] == list(range(1, 9))  # nothing skipped, nothing repeated
    for a, b in zip(*curves):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3)
    rows = [RunDir(tmp_path / d).metric_rows() for d in ("one", "two")]
    assert [r["data_order_digest"] for r in rows[0]] == [r["data_order_digest"] for r in rows[1]]
    assert resumed.metrics["top1_err"] == pytest.approx(one.metrics["top1_err"], abs=100 / 16 + 1e-9)

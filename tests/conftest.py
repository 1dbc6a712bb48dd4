"""Shared fixtures: a tiny synthetic dataset (made once per session), a stand-in manifest and a stand-in `fit`.

The stand-in `fit` writes the files the engine's contract promises (config.json, curve.jsonl, metrics.jsonl,
val_logits.npy, result.json) without training, so the runner and run store can be tested in milliseconds.
Subprocess tests import it from this file (`from conftest import fake_fit`).
"""

from __future__ import annotations

import json
import os
import time
import types
from pathlib import Path

import numpy as np
import pytest

from repro.config import config_hash, to_dict
from repro.record import RunRecord
from repro.rundir import RunDir

FAKE_MANIFEST = ("feedc0ffee123456", 4, 200)  # (hash, classes, training images)


def fake_fit(cfg, run_dir, *, progress=True):
    """Write a contract-shaped run record. Env: FAKE_FIT_LOG (append the hash there), FAKE_FIT_SLEEP (seconds)."""
    run_dir = Path(run_dir)
    chash = config_hash(cfg)
    if os.environ.get("FAKE_FIT_LOG"):
        with open(os.environ["FAKE_FIT_LOG"], "a") as f:
            f.write(f"{chash} {os.getpid()}\n")
    time.sleep(float(os.environ.get("FAKE_FIT_SLEEP", "0")))
    (run_dir / "config.json").write_text(json.dumps({"config": to_dict(cfg), "config_hash": chash}))
    # relu learns faster than tanh, and a larger lr faster, so the convergence analysis has something to find
    rate = (3.0 if cfg.model.activation == "relu" else 1.0) * cfg.train.lr / 0.01
    curve = [{"iteration": i, "epoch": 0, "train_loss": 1.0, "train_top1_err": 75.0 / (1 + rate * i / 10)}
             for i in range(10, 210, 10)]
    (run_dir / "curve.jsonl").write_text("".join(json.dumps(c) + "\n" for c in curve))
    (run_dir / "metrics.jsonl").write_text(json.dumps({"epoch": 0, "iteration": 200, "train_loss": 1.0,
                                                       "train_top1_err": curve[-1]["train_top1_err"],
                                                       "val_top1_err": 30.0, "val_top5_err": 5.0, "lr": cfg.train.lr,
                                                       "images_per_s": 1000.0, "seconds": 0.1}) + "\n")
    rng = np.random.default_rng(cfg.train.seed)
    np.save(run_dir / "val_logits.npy", rng.normal(size=(20, cfg.model.num_classes)).astype(np.float16))
    top1 = 30.0 + cfg.train.seed + (0.0 if cfg.model.lrn else 1.5)
    record = RunRecord(
        status="done", config=to_dict(cfg), config_hash=chash, epochs_done=cfg.train.epochs, iterations=200,
        metrics={"top1_err": top1, "top5_err": top1 / 3, "top1_err_10crop": top1 - 1,
                          "top5_err_10crop": top1 / 3 - 0.5, "train_loss": 1.0,
                          "train_top1_err": curve[-1]["train_top1_err"], "best_val_top1_err": top1,
                          "iters_to_target": next((c["iteration"] for c in curve
                                                   if c["train_top1_err"] < cfg.train.target_train_err), None)},
        provenance={"git_commit": "abc", "packages": {"torch": "x"}, "device": "cpu",
                    "data_manifest_hash": cfg.data.manifest_hash, "data_backend": "torch",
                    "wall_time_s": 0.1, "images_per_s": 1000.0, "started": "s", "finished": "f",
                    "python": "3.11", "host": "test-host"})
    RunDir(run_dir).write_record(record)
    return record


def install_fakes(manifest=FAKE_MANIFEST, fit=fake_fit):
    """Point repro at the stand-in manifest and engine (for subprocesses; tests use the fixtures)."""
    import repro.engine
    import repro.plan

    repro.plan._manifest = lambda data_dir: manifest
    repro.engine.fit = fit


@pytest.fixture
def fake_manifest(monkeypatch):
    import repro.plan

    monkeypatch.setattr(repro.plan, "_manifest", lambda data_dir: FAKE_MANIFEST)
    return FAKE_MANIFEST


@pytest.fixture
def fake_engine(monkeypatch, fake_manifest, tmp_path):
    """A stand-in `repro.engine` whose fit logs every call; yields the list of trained config hashes."""
    calls: list[str] = []

    def fit(cfg, run_dir, *, progress=True):
        calls.append(config_hash(cfg))
        return fake_fit(cfg, run_dir, progress=progress)

    import repro.engine

    monkeypatch.setattr(repro.engine, "fit", fit)
    return types.SimpleNamespace(calls=calls)


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> Path:
    """A tiny real dataset (betons + manifest): 4 classes of 32 px synthetic images, a few hundred in all."""
    prepare_mod = pytest.importorskip("data_prep.prepare")
    out = tmp_path_factory.mktemp("data") / "smoke"
    opts = prepare_mod.PrepareOptions(res=32, train_per_class=60, val_per_class=20, classes="4", seed=0)
    prepare_mod.prepare("synthetic", None, out, opts, progress=False)
    return out


@pytest.fixture(scope="session")
def small_betons(tmp_path_factory) -> Path:
    """Real betons for engine tests: 4 classes of 32 px synthetic images, 64 for training and 32 for validation."""
    from data_prep.prepare import PrepareOptions, prepare

    out = tmp_path_factory.mktemp("small")
    prepare("synthetic", None, out, PrepareOptions(res=32, classes="4", train_per_class=16, val_per_class=8),
            progress=False)
    return out


@pytest.fixture(scope="session")
def slurm_cluster():
    """A real single-node Slurm cluster (tests/slurm_cluster.py) for the session; SLURM_CONF points at it, jobs
    import this checkout of repro, and `--wait` asks Slurm every second (REPRO_SLURM_POLL_S; 30 s by default)."""
    import slurm_cluster as sc

    cluster = sc.start()
    saved = {k: os.environ.get(k) for k in ("SLURM_CONF", "PYTHONPATH", "REPRO_SLURM_POLL_S")}
    root = str(Path(__file__).resolve().parents[1])
    os.environ["SLURM_CONF"] = str(cluster.conf)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, saved["PYTHONPATH"]) if p)
    os.environ["REPRO_SLURM_POLL_S"] = "1"
    try:
        yield cluster
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        sc.stop(cluster)

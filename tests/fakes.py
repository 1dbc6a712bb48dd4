"""Fabricated run directories in the run-store layout, for the report tests (no training involved).

Each fake run is what `repro.engine.fit` and `repro.runs` would leave: store/<hash>/{planned.json, result.json,
metrics.jsonl, curve.jsonl} and the symlink runs/<experiment>/<variant>/seed<k>-<hash>.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from repro.config import RunConfig, apply_overrides, config_hash, to_dict
from repro.record import RunRecord
from repro.rundir import RunDir, analysis_paths


def make_run(runs: Path, experiment: str, variant: str, seed: int, *, scale: str = "smoke",
             metrics: dict | None = None, status: str = "done", overrides: dict | None = None,
             epochs: int = 3, curve: list[dict] | None = None, error: str | None = None) -> Path:
    cfg = apply_overrides(RunConfig(), {**(overrides or {}), "train.seed": seed})
    h = config_hash(cfg)
    real = runs / "store" / h
    real.mkdir(parents=True, exist_ok=True)
    (real / "planned.json").write_text(json.dumps({"scale": scale, "config": to_dict(cfg), "config_hash": h}))
    metrics = dict(metrics or {})
    if status != "pending":
        record = RunRecord(status=status, error=error, config=to_dict(cfg), config_hash=h, epochs_done=epochs,
                           iterations=100 * epochs, metrics=metrics,
                           provenance={"git_commit": "abc1234", "packages": {"torch": "2.14.1", "numpy": "2.4.6"},
                                       "device": "cpu", "data_manifest_hash": "feedbeef00112233",
                                       "data_backend": "ffcv", "wall_time_s": 12.5, "images_per_s": 800.0})
        RunDir(real).write_record(record)
        top1 = metrics.get("top1_err", 50.0)
        with open(real / "metrics.jsonl", "w") as f:
            for e in range(epochs):
                f.write(json.dumps({"epoch": e, "iteration": 100 * (e + 1), "train_loss": 2.0 - 0.3 * e,
                                    "train_top1_err": top1 + 10 - 4 * e, "val_top1_err": top1 + 6 - 3 * e,
                                    "val_top5_err": top1 / 3, "lr": 0.01, "images_per_s": 800.0,
                                    "seconds": 4.0}) + "\n")
        with open(real / "curve.jsonl", "w") as f:
            for p in curve or [{"iteration": 10 * i, "epoch": 0, "train_loss": 2.0, "train_top1_err": 80 - 5 * i}
                               for i in range(1, 12)]:
                f.write(json.dumps(p) + "\n")
    link = runs / experiment / variant / f"seed{seed}-{h}"
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.is_symlink():
        os.symlink(os.path.relpath(real, link.parent), link)
    return real


def fabricate_all(runs: Path, registry: dict, *, scale: str = "smoke", seeds: int = 3, rng_seed: int = 0,
                  hostile: str = "") -> None:
    """A plausible set of runs for every registered experiment, plus the three analyses.

    Effects have the paper's sign (so the report has something to judge); `hostile` is appended to a note in an
    analysis record, to check escaping.
    """
    rng = np.random.default_rng(rng_seed)
    for name, exp in registry.items():
        paper = exp.paper or {}
        for variant, ov in exp.variants.items():
            group = next((g for g, vs in getattr(exp, "groups", {}).items() if variant in vs), variant)
            is_treat = group in (exp.treatments or ())
            for seed in range(seeds):
                base = 30.0 + rng.normal(0, 0.3) + seed * 0.5
                eff = float(paper.get("top1_err", -1.0)) if (is_treat and exp.kind == "effect") else 0.0
                m = {"top1_err": base + eff, "top5_err": base / 3 + eff / 2, "top1_err_10crop": base - 1.2,
                     "top5_err_10crop": base / 3 - 0.8, "train_top1_err": base - 5, "train_loss": 1.0,
                     "best_val_top1_err": base + eff}
                curve = None
                if exp.kind == "convergence":
                    slope = 8.0 if variant.startswith("relu") else 1.5
                    errs = [max(5.0, 80 - slope * i + rng.normal(0, 0.5)) for i in range(1, 40)]
                    curve = [{"iteration": 5 * i, "epoch": 0, "train_loss": 1.0, "train_top1_err": e}
                             for i, e in enumerate(errs, start=1)]
                    m["iters_to_target"] = next((p["iteration"] for p in curve if p["train_top1_err"] < 25), None)
                make_run(runs, name, variant, seed, scale=scale, metrics=m, overrides={**exp.base, **ov}, curve=curve)
    if "ensemble" in registry:
        members = [{"variant": "baseline", "seed": i, "config_hash": "x", "top1_err": 30.0 + i * 0.5,
                    "top5_err": 10.0 + i * 0.2} for i in range(seeds)]
        write_analysis(runs, "ensemble", {"kind": "ensemble", "scale": scale, "members": members,
                                          "n_members": seeds, "ensemble": {"top1_err": 28.0, "top5_err": 9.0}})
    if "relu-vs-tanh" in registry:
        exp = registry["relu-vs-tanh"]
        write_analysis(runs, "relu-vs-tanh", {"kind": "convergence", "scale": scale, "target_train_err": 25.0,
                                              "relative_train_err": 20.0,
                                              "best": {g: vs[0] for g, vs in exp.groups.items()}})
    if "first-layer-filters" in registry:
        t1 = rng.normal(0, 1, (48, 3, 5, 5)).mean(axis=1, keepdims=True).repeat(3, axis=1)  # grey kernels
        t2 = rng.normal(0, 1, (48, 3, 5, 5))
        write_analysis(runs, "first-layer-filters",
                       {"kind": "filters", "scale": scale, "note": "tower" + hostile,
                        "runs": [{"variant": "baseline", "seed": i, "towers": [0.05 + 0.01 * i, 0.6]}
                                 for i in range(seeds)]},
                       {"tower1": t1.astype(np.float32), "tower2": t2.astype(np.float32)})
    if "retrieval" in registry:
        q_lab = np.arange(6) % 3
        nb_lab = np.stack([q_lab] * 5, axis=1)
        nb_lab[:, -1] = (q_lab + 1) % 3
        imgs = rng.integers(0, 255, (6, 16, 16, 3), dtype=np.uint8)
        write_analysis(runs, "retrieval",
                       {"kind": "retrieval", "scale": scale, "k": 5, "queries": 100, "feature_agreement": 0.8,
                        "pixel_agreement": 0.5, "chance_agreement": 0.1},
                       {"query_images": imgs, "neighbour_images": np.stack([imgs] * 5, axis=1),
                        "query_labels": q_lab, "neighbour_labels": nb_lab})


def place_run(real: Path, host: str, *, device: str = "cpu", gpus: str | None = None,
              finished: str = "2026-11-26T05:12:00+00:00") -> Path:
    """Say where a fabricated run trained, as a launcher and the engine would: its placement record (host, GPUs)
    and its record's provenance (host, device, finish time)."""
    run = RunDir(real)
    run.write_placement({"launcher": "local", "host": host, "gpus": gpus, "slurm_job_id": None, "log": None,
                         "tasks": 1, "threads": 2})
    record = run.read_record()
    record.provenance.update({"host": host, "device": device, "started": finished, "finished": finished})
    run.write_record(record)
    return real


def write_analysis(runs: Path, experiment: str, data: dict, arrays: dict | None = None) -> None:
    json_path, npz_path = analysis_paths(runs, experiment, data.get("scale"))
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(data))
    if arrays:
        np.savez(npz_path, **arrays)



def write_manifest(folder: Path, *, source: str = "fashion-mnist", px: int = 28, classes: int = 10,
                   colour: bool = False, train: int = 60000) -> Path:
    """A prepared data folder's manifest.json only (what repro.claims.facts.data_facts reads)."""
    folder.mkdir(parents=True, exist_ok=True)
    eigval = [0.05, 0.01, 0.002] if colour else [0.37, 0.0, 0.0]
    (folder / "manifest.json").write_text(json.dumps({
        "source": source, "image": {"height": px, "width": px}, "pca": {"eigval": eigval},
        "splits": {"train": {"count": train}}, "classes": {"ids": list(range(classes)),
                                                         "names": [f"class {i}" for i in range(classes)]}}))
    return folder

"""TensorBoard event files: every run writes its curves as it trains, read back with TensorBoard's own reader; a run
resumed from a checkpoint continues its curves without duplicate steps."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import engine_support as sup
from repro.engine import checkpoint, events, fit
from repro.engine.events import run_name
from repro.rundir import RunDir


@pytest.fixture(autouse=True)
def stand_ins(monkeypatch):
    sup.use_stand_ins(monkeypatch)
    torch.set_num_threads(1)


def scalars(run: RunDir) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} of the run's event files, as TensorBoard reads them (purged points dropped)."""
    folders = [p for p in run.events.iterdir() if p.is_dir()]
    assert len(folders) == 1, folders
    acc = EventAccumulator(str(folders[0]), size_guidance={"scalars": 0}, purge_orphaned_data=True)
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_a_run_writes_its_curves_and_epochs_as_event_files(tmp_path):
    cfg = sup.tiny_config(**{"train.epochs": 3})
    fit(cfg, tmp_path / "r", progress=False)
    run = RunDir(tmp_path / "r")
    got = scalars(run)
    curve, rows = run.curve_rows(), run.metric_rows()
    assert got["train/top1_err"] == [(c["iteration"], pytest.approx(c["train_top1_err"], abs=1e-4)) for c in curve]
    assert [s for s, _ in got["val/top1_err"]] == [r["iteration"] for r in rows]
    assert {"train/loss", "train/lr", "speed/images_per_s", "speed/data_wait_s", "val/top5_err",
            "train/top1_err_eval_mode"} <= set(got)


def test_a_resumed_run_continues_its_curves_without_duplicate_steps(tmp_path, monkeypatch):
    cfg = sup.tiny_config(**{"train.epochs": 3, "train.log_every": 1})
    straight = RunDir(tmp_path / "a")
    fit(cfg, straight.path, progress=False)
    real_save, saves = checkpoint.save, {"n": 0}

    def save_then_die_after_more_points(run_dir, state):
        real_save(run_dir, state)
        saves["n"] += 1
        if saves["n"] == 1:  # the first epoch's checkpoint is written; training goes on, then the process dies
            monkeypatch.setattr(checkpoint, "save", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))

    monkeypatch.setattr(checkpoint, "save", save_then_die_after_more_points)
    resumed = RunDir(tmp_path / "b")
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, resumed.path, progress=False)
    monkeypatch.setattr(checkpoint, "save", real_save)
    fit(cfg, resumed.path, progress=False)
    a, b = scalars(straight), scalars(resumed)
    for tag in ("train/top1_err", "train/loss", "val/top1_err"):
        steps = [s for s, _ in b[tag]]
        assert len(steps) == len(set(steps)), (tag, steps)  # no step twice
        assert steps == [s for s, _ in a[tag]]  # and none missing
        assert [v for _, v in b[tag]] == pytest.approx([v for _, v in a[tag]], abs=1e-5)
    assert len(list(next(resumed.events.iterdir()).glob("events.out.tfevents.*"))) == 2  # one file per process


def test_runs_are_named_by_scale_experiment_variant_and_seed(tmp_path):
    run = RunDir(tmp_path)
    run.planned.write_text('{"scale": "demo", "runs": [{"experiment": "ablation-lrn", "variant": "lrn", "seed": 2}]}')
    assert run_name(run) == "demo.ablation-lrn.lrn.seed2"


def test_the_progress_files_rate_after_a_resume_counts_only_the_steps_since(tmp_path, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(events.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(events, "PROGRESS_S", 10.0)
    state = SimpleNamespace(iteration=500, epoch=3, batch=20, curve_rows=[], rows=[],
                            cfg=SimpleNamespace(train=SimpleNamespace(batch_size=64, epochs=10)))
    progress = events.ProgressFile(RunDir(tmp_path), total=1600, steps=160, iteration=500)  # resumed at step 500
    state.iteration, clock[0] = 510, 1005.0
    progress.beat(state)  # before PROGRESS_S: nothing written
    assert not (tmp_path / "progress.json").exists()
    state.iteration, clock[0] = 540, 1020.0
    progress.beat(state)
    row = json.loads((tmp_path / "progress.json").read_text())
    # 40 global steps of 64 images in 20 s, not the 500 steps trained before the resume
    assert row["images_per_s"] == pytest.approx(40 * 64 / 20) and row["iteration"] == 540
    state.iteration, clock[0] = 580, 1040.0
    progress.beat(state)
    assert json.loads((tmp_path / "progress.json").read_text())["images_per_s"] == pytest.approx(40 * 64 / 20)

"""The dry run's time estimate where a GPU is present: a rate measured on this host's GPU, else the scale's rough
GPU guess (`guess_images_per_s_gpu` in _scales.toml), and the summary says which rate it used."""

from __future__ import annotations

import pandas as pd
import pytest
from rich.console import Console

import repro.plan as plan_mod
from repro.plan import estimate, fmt_time, measured_rates, plan, print_plan, training_images, unique_runs
from repro.scales import get_scale


def planned(scale: str, tmp_path, sets=()):
    _, runs = plan(["baseline"], scale, data_dir=tmp_path / "not-prepared", seeds=1, sets=list(sets),
                   without_data=True)
    return runs


def test_the_gpu_guess_and_measured_gpu_rates(tmp_path):
    run = unique_runs(planned("subset", tmp_path))[0]
    images = training_images([run])
    assert images == 126_689 * 40  # the subset's nominal training images x its epochs
    assert get_scale("subset").guess_images_per_s_gpu == 60000.0 and get_scale("full").guess_images_per_s_gpu
    assert estimate(run, {}, gpu=True) == (images, images / 60000.0, "rough guess of a GPU's rate (_scales.toml)")
    assert estimate(run, {}, gpu=False) == (images, images / 40.0, "rough guess")
    rates = {("gpu", "scale", "subset"): 30000.0, ("cpu", "scale", "subset"): 50.0}
    assert estimate(run, rates, gpu=True) == (images, images / 30000.0, "measured on this host's GPU at this scale")
    assert estimate(run, rates, gpu=False) == (images, images / 50.0, "measured at this scale")
    m = run.cfg.model
    rates[("gpu", m.name, m.width, m.input_size, m.stem)] = 25000.0
    assert estimate(run, rates, gpu=True)[1:] == (images / 25000.0, "measured on this host's GPU")
    # a run held to the CPU, and a scale without a GPU guess
    cpu_run = unique_runs(planned("subset", tmp_path, ["train.device=cpu"]))[0]
    assert estimate(cpu_run, {}, gpu=True)[2] == "rough guess"
    demo = unique_runs(planned("demo", tmp_path))[0]
    assert estimate(demo, {}, gpu=True)[1:] == (training_images([demo]) / 2000.0,
                                                "rough guess (a CPU's: the scale has no GPU guess)")


@pytest.mark.parametrize("gpu", [True, False])
def test_the_dry_run_says_which_rate_it_used(tmp_path, monkeypatch, gpu):
    monkeypatch.setattr(plan_mod, "gpu_present", lambda: gpu)
    runs = planned("subset", tmp_path)
    console = Console(record=True, width=300)
    print_plan(runs, tmp_path / "runs", console)
    images = training_images(unique_runs(runs))
    rate, source = (60000.0, "rough guess of a GPU's rate (_scales.toml)") if gpu else (40.0, "rough guess")
    assert f"about {fmt_time(images / rate)} ({source}; evaluation not included)" in console.export_text()


def test_measured_rates_keep_the_gpu_apart_from_the_cpu(tmp_path, monkeypatch):
    monkeypatch.setattr(plan_mod.socket, "gethostname", lambda: "here")
    rows = [{"status": "done", "prov.host": "here", "prov.images_per_s": 20000.0, "prov.device": "NVIDIA H200",
             "scale": "full", "model.name": "alexnet-paper", "model.width": 1.0, "model.input_size": 224,
             "model.stem": "imagenet"},
            {"status": "done", "prov.host": "here", "prov.images_per_s": 30.0, "prov.device": "cpu",
             "scale": "full", "model.name": "alexnet-paper", "model.width": 1.0, "model.input_size": 224,
             "model.stem": "imagenet"},
            {"status": "done", "prov.host": "elsewhere", "prov.images_per_s": 9.0, "prov.device": "cpu",
             "scale": "demo", "model.name": "cifar4", "model.width": 1.0, "model.input_size": 24, "model.stem": "tiny"}]
    monkeypatch.setattr(plan_mod.store, "collect", lambda runs_dir: pd.DataFrame(rows))
    assert measured_rates(tmp_path) == {
        ("gpu", "alexnet-paper", 1.0, 224, "imagenet"): 20000.0, ("gpu", "scale", "full"): 20000.0,
        ("cpu", "alexnet-paper", 1.0, 224, "imagenet"): 30.0, ("cpu", "scale", "full"): 30.0}

"""Every registered experiment end to end at smoke scale, through the CLI, on a tiny synthetic dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from repro import runs
from repro.rundir import store_dir
from repro.claims import ten_crop
from repro.cli import app
from repro.experiments import load_registry, scale_settings

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke_runs(synthetic_data, tmp_path_factory):
    runs_dir = tmp_path_factory.mktemp("runs")
    res = CliRunner().invoke(app, ["run", "all", "--scale", "smoke", "--data", str(synthetic_data),
                                   "--runs", str(runs_dir), "--quiet"])
    return runs_dir, res


def test_every_experiment_runs_at_smoke_scale(smoke_runs):
    runs_dir, res = smoke_runs
    assert res.exit_code == 0, res.output[-3000:]
    df = runs.collect(runs_dir)
    registry = load_registry()
    assert set(df.experiment) == set(registry)
    # one row per (experiment, variant, seed), at each experiment's own smoke seed count (ensemble and relu-vs-tanh:
    # 2, everything else the scale's 1)
    expected = sum(len(e.variants) * scale_settings(e, "smoke").seeds for e in registry.values())
    assert expected == sum(len(e.variants) * (2 if name in ("ensemble", "relu-vs-tanh") else 1)
                           for name, e in registry.items())
    assert len(df) == expected
    assert set(df.status) <= {"done", "diverged"} and (df.status == "done").sum() >= expected - 3, df.status
    assert df.config_hash.nunique() == len(list((runs_dir / "store").iterdir()))
    assert df.config_hash.nunique() < expected  # the baseline is shared, not retrained per experiment
    done = df[df.status == "done"]
    assert done.top1_err.between(0, 100).all() and done["prov.wall_time_s"].gt(0).all()
    # ten-crop trains nothing of its own: its runs are the baseline's
    ten = done[done.experiment == "ten-crop"]
    assert set(ten.config_hash) == set(done[done.experiment == "baseline"].config_hash)


def test_analyses_hold_their_numbers(smoke_runs, synthetic_data):
    runs_dir, _ = smoke_runs
    an = {name: by_scale["smoke"] for name, by_scale in runs.load_analyses(runs_dir).items()}
    assert {"ensemble", "relu-vs-tanh", "first-layer-filters", "retrieval"} <= set(an)
    # ensemble members scored from their float16 logits agree with the engine's own top-1 (to one image)
    df = runs.collect(runs_dir)
    n_val = json.loads((Path(synthetic_data) / "manifest.json").read_text())["splits"]["val"]["count"]
    for m in an["ensemble"]["members"]:
        engine = df[(df.config_hash == m["config_hash"])].top1_err.iloc[0]
        assert abs(m["top1_err"] - engine) <= 100 / n_val + 1e-9
    assert an["ensemble"]["n_members"] == 2
    f = an["first-layer-filters"]
    assert len(f["mean_per_tower"]) == 2 and all(0 <= x <= 1 for x in f["mean_per_tower"])
    arrays = runs.load_analysis_arrays(runs_dir, "first-layer-filters", "smoke")
    assert arrays["tower1"].shape[1] == 3 and arrays["tower1"].shape == arrays["tower2"].shape
    r = an["retrieval"]
    assert 0 <= r["feature_agreement"] <= 1 and 0 <= r["pixel_agreement"] <= 1
    thumbs = runs.load_analysis_arrays(runs_dir, "retrieval", "smoke")
    assert thumbs["query_images"].dtype == np.uint8 and thumbs["neighbour_images"].shape[1] == r["k"]
    assert len(r["per_query"]["feature_hits"]) == r["queries"] == len(r["per_query"]["pixel_hits"])
    assert np.mean(r["per_query"]["feature_hits"]) / r["k"] == pytest.approx(r["feature_agreement"])
    c = an["relu-vs-tanh"]
    assert set(c["best"]) == {"relu", "tanh"}
    # ten-crop: the baseline's kept final weights scored again give the numbers training recorded at its end
    t = an["ten-crop"]
    assert t["n_runs"] == 1 and t["runs"][0]["scored"] == "at the end of training"
    rescored = ten_crop._score(store_dir(runs_dir, t["runs"][0]["config_hash"]))
    for k, v in rescored.items():
        assert v == pytest.approx(t["runs"][0][k], abs=1e-6), k


def test_second_run_trains_nothing(smoke_runs, synthetic_data):
    runs_dir, _ = smoke_runs
    before = {p.name: (p / "result.json").stat().st_mtime_ns for p in (runs_dir / "store").iterdir()}
    res = CliRunner().invoke(app, ["run", "all", "--scale", "smoke", "--data", str(synthetic_data),
                                   "--runs", str(runs_dir), "--quiet"])
    assert res.exit_code == 0 and "training" not in res.output
    after = {p.name: (p / "result.json").stat().st_mtime_ns for p in (runs_dir / "store").iterdir()}
    assert before == after
    status = CliRunner().invoke(app, ["status", "--runs", str(runs_dir)])
    assert status.exit_code == 0 and "done" in status.output
    listed = CliRunner().invoke(app, ["list", "--runs", str(runs_dir), "--scale", "smoke"])
    assert listed.exit_code == 0 and "2/2" in listed.output  # ensemble: 2 seeds done

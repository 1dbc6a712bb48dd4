"""The runs folder read back: collect() as a DataFrame, results files, curves, analyses (the run folder itself, its
links and its status: test_rundir.py)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from repro import io, runs
from repro.plan import PlannedRun
from repro.errors import UserError
from repro.rundir import create

from conftest import fake_fit
from test_rundir import _planned, _record


def _store_with_runs(tmp_path):
    """Two experiments sharing one done run, plus a diverged, a stale and a pending run."""
    shared, no_lrn, pending, stale = _planned(), _planned(**{"model.lrn": False}), _planned(seed=1), _planned(seed=2)
    plan = [("lrn", "lrn", shared), ("lrn", "no-lrn", no_lrn), ("pool", "overlap", shared),
            ("pool", "overlap", pending), ("pool", "overlap", stale)]
    dirs = {}
    for exp, variant, r in plan:
        r = PlannedRun(exp, variant, variant, r.seed, "smoke", r.cfg, r.config_hash)
        dirs[r.config_hash] = create(tmp_path, r).path
    fake_fit(shared.cfg, dirs[shared.config_hash])
    fake_fit(no_lrn.cfg, dirs[no_lrn.config_hash])
    _record(dirs[no_lrn.config_hash], "diverged")
    fake_fit(stale.cfg, dirs[stale.config_hash])
    _record(dirs[stale.config_hash], "done", fmt=0)
    return shared, no_lrn, pending, stale


def test_collect_one_row_per_run_with_flattened_config(tmp_path):
    shared, no_lrn, pending, stale = _store_with_runs(tmp_path)
    df = runs.collect(tmp_path)
    assert len(df) == 5
    assert list(df.columns[:4]) == ["experiment", "variant", "seed", "scale"]
    for col in ("model.lrn", "train.lr", "data.pca_lighting", "top1_err", "top5_err_10crop", "prov.device",
                "prov.images_per_s", "epochs_done", "iterations", "config_hash", "run_dir", "error"):
        assert col in df.columns, col
    by = {(r.experiment, r.variant, r.seed): r for r in df.itertuples()}
    done = by[("lrn", "lrn", 0)]
    assert done.status == "done" and done.top1_err == 30.0 and done.top5_err == pytest.approx(10.0)
    assert df.loc[(df.experiment == "lrn") & (df.variant == "lrn"), "model.lrn"].item() == True  # noqa: E712
    assert by[("pool", "overlap", 0)].config_hash == done.config_hash  # the shared run seen twice
    div = by[("lrn", "no-lrn", 0)]
    assert div.status == "diverged" and math.isnan(div.top1_err) and "diverged" in div.error
    assert df.loc[(df.variant == "no-lrn"), "model.lrn"].item() == False  # noqa: E712
    assert by[("pool", "overlap", 1)].status == "pending" and math.isnan(by[("pool", "overlap", 1)].top1_err)
    assert by[("pool", "overlap", 2)].status == "stale" and math.isnan(by[("pool", "overlap", 2)].top1_err)
    assert df.loc[df.seed == 1, "train.seed"].item() == 1  # a pending run still shows its planned config
    assert df["top1_err"].dtype == float


def test_collect_of_nothing_is_an_empty_table(tmp_path):
    df = runs.collect(tmp_path / "none")
    assert df.empty and "top1_err" in df.columns and "experiment" in df.columns


def test_write_results_csv_and_parquet(tmp_path):
    _store_with_runs(tmp_path / "runs")
    out = runs.write_results(tmp_path / "runs", tmp_path / "out" / "results.csv", "csv")
    back = pd.read_csv(out)
    assert len(back) == 5 and set(back.status) == {"done", "diverged", "pending", "stale"}
    assert back.loc[back.status == "done", "top1_err"].tolist() == [30.0, 30.0]
    assert not list((tmp_path / "out").glob("*.tmp"))
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="pip install pyarrow"):
            runs.write_results(tmp_path / "runs", tmp_path / "out" / "r.parquet", "parquet")
        assert not (tmp_path / "out" / "r.parquet").exists()
    else:
        p = runs.write_results(tmp_path / "runs", tmp_path / "out" / "r.parquet", "parquet")
        assert len(pd.read_parquet(p)) == 5
    with pytest.raises(UserError, match="no runs folder"):
        runs.write_results(tmp_path / "missing", tmp_path / "x.csv")


def test_load_curves_skips_a_line_cut_by_a_kill(tmp_path):
    rows = [{"iteration": i, "epoch": 0, "train_loss": 2.0 - i / 100, "train_top1_err": 90 - i} for i in (2, 4, 6)]
    (tmp_path / "curve.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"iteration": 8, "ep')
    df = runs.load_curves(tmp_path)
    assert df.iteration.tolist() == [2, 4, 6] and df.train_top1_err.tolist() == [88, 86, 84]
    assert runs.load_curves(tmp_path / "none").empty


def test_load_analyses_and_arrays(tmp_path):
    (tmp_path / "ensemble").mkdir(parents=True)
    demo = {"kind": "ensemble", "n_members": 2, "scale": "demo"}
    io.write_json(tmp_path / "ensemble" / "analysis-demo.json", demo)
    io.write_json(tmp_path / "ensemble" / "analysis-smoke.json", {**demo, "scale": "smoke"})  # one per scale
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "analysis-demo.json").write_text("{nope")
    np.savez(tmp_path / "ensemble" / "analysis-demo.npz", a=np.arange(3))
    assert runs.load_analyses(tmp_path) == {"ensemble": {"demo": demo, "smoke": {**demo, "scale": "smoke"}}}
    assert runs.load_analysis_arrays(tmp_path, "ensemble", "demo")["a"].tolist() == [0, 1, 2]
    assert runs.load_analysis_arrays(tmp_path, "ensemble", "smoke") == {}
    assert runs.load_analysis_arrays(tmp_path, "broken", "demo") == {}


def test_two_processes_writing_one_json_file_never_collide(tmp_path):
    # Two runners can record the same planned run at once; each write must stay whole and neither may fail.
    target = tmp_path / "planned.json"
    code = ("import sys; from pathlib import Path; from repro.io import write_json\n"
            "for i in range(300): write_json(Path(sys.argv[1]), {'writer': sys.argv[2], 'i': i})\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(target), name], stderr=subprocess.PIPE, text=True)
             for name in ("a", "b")]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    assert json.loads(target.read_text())["i"] == 299
    assert not list(tmp_path.glob("*.tmp"))

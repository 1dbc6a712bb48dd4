"""The runner with a stand-in fit: reuse, sharing, resume, failures, dry run, and two processes at once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from rich.console import Console

from repro import runs
from repro.cli.rows import LIST_COLUMNS, STATUS_COLUMNS, list_rows, status_caption, status_rows
from repro.runner import run_experiments
from repro.views import show

from conftest import fake_fit

TESTS = Path(__file__).parent


def _console():
    return Console(record=True, width=200, force_terminal=False)


def _run(name, runs_dir, **kw):
    console = _console()
    data = Path(runs_dir).parent / "prepared"  # the stand-in manifest answers for any folder that has one
    data.mkdir(exist_ok=True)
    (data / "manifest.json").touch()
    code = run_experiments(name, "smoke", data_dir=data, runs_dir=runs_dir, seeds=kw.pop("seeds", None),
                           sets=kw.pop("sets", []), dry_run=kw.pop("dry_run", False), progress=False,
                           console=console)
    return code, console.export_text()


def test_shared_baseline_is_trained_once_and_reused(fake_engine, tmp_path):
    code, out = _run("ablation-lrn", tmp_path)
    assert code == 0 and len(fake_engine.calls) == 3  # lrn, no-lrn and the gain control lrn-gain
    code, out = _run("ablation-overlap-pool", tmp_path)
    # overlap (the baseline) is shared with ablation-lrn's lrn variant: only non-overlap trains
    assert code == 0 and len(fake_engine.calls) == 4 and "reused" in out
    assert len(list((tmp_path / "store").iterdir())) == 4
    df = runs.collect(tmp_path)
    assert len(df) == 5 and (df.status == "done").all()
    calls = len(fake_engine.calls)
    code, out = _run("ablation-lrn", tmp_path)
    assert code == 0 and len(fake_engine.calls) == calls  # a second run trains nothing


def test_seeds_and_set_change_the_plan(fake_engine, tmp_path):
    code, _ = _run("ablation-lrn", tmp_path, seeds=2, sets=["train.lr=0.02"])
    df = runs.collect(tmp_path)
    assert code == 0 and len(df) == 6 and set(df.seed) == {0, 1} and set(df["train.lr"]) == {0.02}


def test_interrupted_run_resumes(fake_engine, tmp_path, monkeypatch):
    import sys as _sys

    state = {"n": 0}

    def interrupted_once(cfg, run_dir, *, progress=True):
        state["n"] += 1
        if state["n"] == 1:
            (Path(run_dir) / "checkpoint.pt").write_bytes(b"ckpt")
            raise KeyboardInterrupt
        assert (Path(run_dir) / "checkpoint.pt").exists()  # resumed in the same directory
        return fake_fit(cfg, run_dir)

    monkeypatch.setattr(_sys.modules["repro.engine"], "fit", interrupted_once)
    try:
        _run("baseline", tmp_path)
    except KeyboardInterrupt:
        pass
    else:
        raise AssertionError("KeyboardInterrupt should reach the CLI")
    assert runs.collect(tmp_path).status.tolist() == ["interrupted"]
    code, out = _run("baseline", tmp_path)
    assert code == 0 and "resuming" in out and state["n"] == 2
    assert runs.collect(tmp_path).status.tolist() == ["done"]


def test_a_failed_run_does_not_stop_the_sweep(fake_engine, tmp_path, monkeypatch):
    import sys as _sys

    def broken_without_lrn(cfg, run_dir, *, progress=True):
        if not cfg.model.lrn:
            raise RuntimeError("out of memory in a test")
        return fake_fit(cfg, run_dir)

    monkeypatch.setattr(_sys.modules["repro.engine"], "fit", broken_without_lrn)
    code, out = _run("ablation-lrn", tmp_path)
    df = runs.collect(tmp_path).set_index("variant")
    assert code == 1
    assert df.loc["lrn", "status"] == "done" and df.loc["no-lrn", "status"] == "failed"
    assert "out of memory in a test" in df.loc["no-lrn", "error"]
    d = Path(df.loc["no-lrn", "run_dir"]).resolve()
    assert "RuntimeError" in (d / "error.log").read_text()
    # the next invocation tries the failed run again and reuses the done one
    monkeypatch.setattr(_sys.modules["repro.engine"], "fit", fake_fit)
    code, out = _run("ablation-lrn", tmp_path)
    assert code == 0 and (runs.collect(tmp_path).status == "done").all()


def test_dry_run_plans_without_training(fake_engine, tmp_path):
    code, out = _run("all", tmp_path, dry_run=True)
    assert code == 0 and fake_engine.calls == []
    # Each planned run is recorded as pending (planned.json, for torchrun), none trained.
    stored = list((tmp_path / "store").iterdir())
    assert stored and all((d / "planned.json").exists() and not (d / "result.json").exists() for d in stored)
    assert "relu-vs-tanh" in out and "tanh-lr0.02" in out and "rough guess" in out
    # smoke: 200 training images (the stand-in manifest) x 1 epoch per distinct run
    assert "shared" in out and "training images" in out


def test_dry_run_uses_the_measured_rate(fake_engine, tmp_path, monkeypatch):
    monkeypatch.setattr("socket.gethostname", lambda: "test-host")  # the stand-in records this host
    _run("baseline", tmp_path)
    code, out = _run("ablation-lrn", tmp_path, dry_run=True)
    # two new runs (no-lrn, lrn-gain): 200 images each at the measured 1000 images/s
    assert "measured" in out and "400 training images" in out and "0 s" in out


def test_list_and_status_tables(fake_engine, tmp_path):
    _run("ablation-lrn", tmp_path)
    console = _console()
    show(console, list_rows(tmp_path, "smoke"), LIST_COLUMNS)
    rows = status_rows(tmp_path)
    show(console, rows, STATUS_COLUMNS, caption=status_caption(rows))
    text = console.export_text()
    assert "ablation-lrn" in text and "3/3" in text and "top1_err -1.4" in text
    assert "relu-vs-tanh" in text and "0/16" in text  # 8 sweep variants x 2 seeds at smoke
    assert "3 done" in text


def test_two_processes_never_train_one_run_twice(tmp_path):
    script = tmp_path / "go.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(TESTS)!r})\n"
        "from conftest import install_fakes\n"
        "install_fakes()\n"
        "from rich.console import Console\n"
        "from repro.runner import run_experiments\n"
        f"sys.exit(run_experiments('ablation-lrn', 'smoke', data_dir='d', runs_dir={str(tmp_path / 'runs')!r},"
        " seeds=2, sets=[], dry_run=False, progress=False, console=Console()))\n")
    log = tmp_path / "calls.txt"
    env = {**os.environ, "FAKE_FIT_LOG": str(log), "FAKE_FIT_SLEEP": "0.7"}
    procs = [subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    hashes = [line.split()[0] for line in log.read_text().splitlines()]
    assert len(hashes) == 6 and len(set(hashes)) == 6, hashes  # 3 variants x 2 seeds, each trained once
    assert (runs.collect(tmp_path / "runs").status == "done").all()
    assert any("another process" in o for o in outs)

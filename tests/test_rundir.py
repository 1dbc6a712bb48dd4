"""The run folder: every file name in one place, the experiment links into the store, held or not, and the one
status of a run, from its files and, where a launcher knows it, its job."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from repro.config import RunConfig, apply_overrides, config_hash
from repro.plan import PlannedRun
from repro.rundir import Job, RunDir, create

from conftest import fake_fit
from test_hints import message_strings


def _planned(exp="e", variant="v", seed=0, **over):
    cfg = apply_overrides(RunConfig(), {"train.seed": seed, "model.num_classes": 4, **over})
    return PlannedRun(exp, variant, variant, seed, "smoke", cfg, config_hash(cfg))


def _record(run_dir: Path, status: str, fmt: int = 1):
    rec = json.loads((run_dir / "result.json").read_text())
    rec["status"], rec["format"] = status, fmt
    if status != "done":
        rec["error"] = f"{status} because of a test"
    (run_dir / "result.json").write_text(json.dumps(rec))


def test_create_makes_a_relative_link_into_the_store(tmp_path):
    r = _planned()
    real = create(tmp_path, r).path
    link = tmp_path / "e" / "v" / f"seed0-{r.config_hash}"
    assert real == tmp_path / "store" / r.config_hash and real.is_dir()
    assert link.is_symlink() and not os.path.isabs(os.readlink(link))
    assert link.resolve() == real.resolve()
    assert json.loads((real / "planned.json").read_text())["config_hash"] == r.config_hash
    # a second experiment sharing the run links to the same directory; calling again is harmless
    r2 = PlannedRun("other", "base", "base", 0, "smoke", r.cfg, r.config_hash)
    assert create(tmp_path, r2).path == real and create(tmp_path, r).path == real
    assert len(list((tmp_path / "store").iterdir())) == 1


def test_run_status_of_every_state(tmp_path):
    run = create(tmp_path, _planned())
    d = run.path
    assert run.own_status() == "pending"
    (d / "checkpoint.pt").write_bytes(b"x")
    assert run.own_status() == "interrupted"  # killed before any record: resumable
    fake_fit(_planned().cfg, d)
    assert run.own_status() == "done"
    for st in ("diverged", "failed", "interrupted"):
        _record(d, st)
        assert run.own_status() == st
    _record(d, "done", fmt=99)
    assert run.own_status() == "stale"
    (d / "result.json").write_text('{"format": 1, "sta')  # cut short: treated as no record
    assert run.own_status() == "interrupted"
    with run.lock() as got:
        assert got and run.own_status() == "running"
    assert RunDir(tmp_path / "nothing").own_status() == "pending"


def test_a_job_state_is_folded_into_the_status(tmp_path):
    run = create(tmp_path, _planned())
    assert run.status() == ("pending", None)
    assert run.status(Job("7", "pending", reason="Priority")) == ("pending", "Priority")
    assert run.status(Job("7", "pending", restarts=1, reason="BeginTime")) == ("requeued", "BeginTime")
    assert run.status(Job("7", "running")) == ("running", None)
    (run.checkpoint).write_bytes(b"x")
    assert run.status(Job("7", "completed")) == ("interrupted", None)  # the job ended; the run did not finish
    assert run.status(Job("7", "cancelled", reason="Slurm: CANCELLED")) == ("cancelled", "Slurm: CANCELLED")
    assert run.status(Job("7", "failed", reason="Slurm: FAILED, exit 1:0")) == ("failed", "Slurm: FAILED, exit 1:0")
    with run.lock():  # a queued duplicate job does not hide that the run trains
        assert run.status(Job("8", "pending", reason="Priority")) == ("running", None)
    fake_fit(_planned().cfg, run.path)
    assert run.status(Job("7", "failed", reason="Slurm: FAILED")) == ("done", None)  # finished is finished


def test_lock_excludes_another_process(tmp_path):
    run = create(tmp_path, _planned())
    code = ("import sys, time; sys.path.insert(0, %r); from repro.rundir import RunDir\n"
            "with RunDir(%r).lock() as got:\n print(got, flush=True); time.sleep(3)"
            % (str(Path(__file__).parent), str(run)))
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "True"
        assert run.is_locked() and run.own_status() == "running"
        with run.lock() as got:
            assert not got
    finally:
        p.wait()
    with run.lock() as got:
        assert got


def test_no_other_module_spells_a_run_folder_file_name():
    """Every name of a file in a run folder is written in repro/rundir.py only (string literals, docstrings aside)."""
    root = Path(__file__).resolve().parent.parent
    run = RunDir("x")
    names = {p.name for p in vars(run).values() if isinstance(p, Path) and p != run.path}
    assert {"result.json", "curve.jsonl", "planned.json", "metrics.jsonl", ".lease", "train.log"} <= names
    paths = [p for p in [*root.glob("repro/**/*.py"), *root.glob("data_prep/**/*.py")] if p.name != "rundir.py"]
    found = [f"{Path(path).relative_to(root)}: {text!r}" for path, texts in message_strings(paths).items()
             for text in texts for n in names if re.search(rf"(?<![\w.]){re.escape(n)}(?!\w)", text)]
    assert not found, found
    # the test can fail: a name spelled elsewhere is found
    assert re.search(rf"(?<![\w.]){re.escape('train.log')}(?!\w)", "see <run>/train.log")
    assert not re.search(rf"(?<![\w.]){re.escape('train.log')}(?!\w)", '"train.log_every": 2')

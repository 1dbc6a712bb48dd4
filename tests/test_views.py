"""What `repro list`, `status` and `run --dry-run` print at 80 columns into a pipe: names and hashes whole, lines
no wider than the terminal, log lines unwrapped; and the plain and json formats a script parses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from repro import runs
from repro.experiments import load_registry
from repro.runner import run_experiments
from repro.views import Column, show, to_plain

TESTS = Path(__file__).parent
REPO = TESTS.parent


def _cli(args: list[str], cwd: Path, columns: int = 80) -> subprocess.CompletedProcess:
    """The real command line in a subprocess, stdout a pipe, COLUMNS set; stand-in manifest and engine."""
    script = ("import sys\n"
              f"sys.path.insert(0, {str(TESTS)!r})\n"
              "from conftest import install_fakes\n"
              "install_fakes()\n"
              "from repro.cli import app\n"
              f"sys.argv = ['repro', *{args!r}]\n"
              "app()\n")
    env = {**os.environ, "COLUMNS": str(columns), "PYTHONPATH": str(REPO)}
    env.pop("TERM", None)
    return subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def _fill_runs(root: Path) -> Path:
    """Runs of two experiments under root/runs, on root/data/smoke (prepared, as far as the stand-in manifest
    goes: it answers for any folder that has a manifest.json)."""
    data = root / "data" / "smoke"
    data.mkdir(parents=True)
    (data / "manifest.json").touch()
    for name in ("ablation-overlap-pool", "relu-vs-tanh"):
        assert run_experiments(name, "smoke", data_dir=data, runs_dir=root / "runs", progress=False,
                               console=Console(file=open(os.devnull, "w"))) == 0
    return root / "runs"


def _assert_whole(out: str, words, width: int = 80) -> None:
    """Every table row fits the width and every word is whole (titles and log lines are never wrapped)."""
    lines = out.splitlines()
    rows = [line for line in lines if line.split()[:1] and line.split()[0] in words]
    assert rows and all(len(line) <= width for line in rows), [line for line in rows if len(line) > width]
    tokens = {t for line in lines for t in line.split()}
    missing = [w for w in words if w not in tokens]
    assert not missing, (missing, out)


@pytest.mark.slow
def test_list_status_and_dry_run_at_80_columns(fake_engine, tmp_path):
    runs_dir = _fill_runs(tmp_path)
    names = list(load_registry())
    listed = _cli(["list", "--runs", str(runs_dir), "--scale", "smoke"], tmp_path)
    assert listed.returncode == 0, listed.stderr
    _assert_whole(listed.stdout, names)
    assert "not shown at this width: claim" in listed.stdout

    df = runs.collect(runs_dir)
    status = _cli(["status", "--runs", str(runs_dir)], tmp_path)
    assert status.returncode == 0, status.stderr
    _assert_whole(status.stdout, set(df.experiment) | set(df.variant) | set(df.config_hash))

    plan = _cli(["run", "all", "--scale", "smoke", "--runs", str(runs_dir), "--dry-run"], tmp_path)
    assert plan.returncode == 0, plan.stderr
    planned = [line.split() for line in plan.stdout.splitlines() if line.split()[:1] and line.split()[0] in names]
    assert {p[0] for p in planned} == set(names)
    assert {"relu-lr0.02", "tanh-lr0.16", "non-overlap", "lrn-gain"} <= {p[1] for p in planned}
    assert all(len(p[3]) == 12 for p in planned), planned  # hash column whole
    _assert_whole(plan.stdout, names)


@pytest.mark.slow
def test_plain_and_json_formats_parse(fake_engine, tmp_path):
    runs_dir = _fill_runs(tmp_path)
    plain = _cli(["list", "--runs", str(runs_dir), "--scale", "smoke", "--format", "plain"], tmp_path)
    lines = plain.stdout.splitlines()
    assert lines[0].split("\t") == ["name", "section", "kind", "claim", "paper", "runs_done"]
    rows = {line.split("\t")[0]: line.split("\t") for line in lines[1:]}
    assert set(rows) == set(load_registry()) and all(len(r) == 6 for r in rows.values())
    assert rows["ablation-overlap-pool"][5] == "2/2" and rows["relu-vs-tanh"][5] == "16/16"
    assert rows["ablation-lrn"][3].startswith("Response normalization reduces")  # prose whole in plain

    status = json.loads(_cli(["status", "--runs", str(runs_dir), "--format", "json"], tmp_path).stdout)
    assert len(status) == 2 + 16 and {r["status"] for r in status} == {"done"}
    assert all(len(r["hash"]) == 12 and isinstance(r["top1_err"], float) for r in status)

    plan = _cli(["run", "relu-vs-tanh", "--scale", "smoke", "--runs", str(runs_dir), "--dry-run",
                 "--format", "json"], tmp_path)
    planned = json.loads(plan.stdout)  # stdout is only the JSON; the summary line went to stderr
    assert len(planned) == 16 and {r["status"] for r in planned} == {"done"} and "planned runs" in plan.stderr


@pytest.mark.slow
def test_log_lines_into_a_pipe_are_not_wrapped(tmp_path):
    runs_dir = tmp_path / ("a-long-folder-name-" * 5) / "runs"
    res = _cli(["run", "ablation-lrn", "--scale", "smoke", "--runs", str(runs_dir)], tmp_path)
    assert res.returncode == 0, res.stderr
    assert f"results under {runs_dir}" in res.stdout.splitlines()[-1]
    assert any(line.startswith("[1/3] ablation-lrn/lrn seed 0 (") and line.endswith(": training")
               for line in res.stdout.splitlines()), res.stdout


def test_narrow_table_shortens_then_drops_prose():
    cols = (Column("name"), Column("hash"), Column("note", kind="prose", drop=1),
            Column("claim", kind="prose", drop=2), Column("n", kind="num", fmt=lambda v: f"{v:,}"))
    rows = [{"name": "ablation-overlap-pool", "hash": "0123456789ab", "note": "short", "claim": "word " * 30,
             "n": 1234567}, {"name": "x", "hash": None, "note": "tab\there", "claim": "c", "n": float("nan")}]

    def render(width):
        console = Console(width=width, record=True, file=open(os.devnull, "w"))
        show(console, rows, cols)
        return console.export_text()

    wide, mid, narrow = render(250), render(90), render(60)
    assert "word " * 29 in wide and "not shown" not in wide
    assert "…" in mid and "claim" in mid and "not shown" not in mid  # shortened, still there
    assert "not shown at this width: claim" in narrow and "note" in narrow  # dropped by priority
    for text, width in ((wide, 250), (mid, 90), (narrow, 60)):
        _assert_whole(text, ["ablation-overlap-pool", "0123456789ab", "1,234,567"], width)
    plain = to_plain(rows, cols).splitlines()
    assert plain[0] == "name\thash\tnote\tclaim\tn"
    assert plain[2] == "x\t\ttab here\tc\t"  # a missing value is empty, a tab inside a value a space

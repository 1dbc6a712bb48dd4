"""`repro status --watch`: the rows of a run that is training, read from the folder of a real smoke run while it
trains (in another process), and the counts once it is done."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from rich.console import Console

from repro.cli.watch import counts_line, render, watch_rows

pytestmark = pytest.mark.slow


def test_the_watch_table_shows_a_run_while_it_trains(synthetic_data, tmp_path):
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "repro", "run", "baseline", "--scale", "smoke", "--data", str(synthetic_data),
           "--runs", str(runs), "--quiet", "--set", "train.epochs=30", "--set", "data.backend=torch"]
    env = {**os.environ, "REPRO_PROGRESS_S": "0.2", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        row, t_end = None, time.time() + 120
        while time.time() < t_end and proc.poll() is None:
            rows, counts = watch_rows(runs)
            if rows and rows[0]["epoch"] != "starting" and rows[0]["images_per_s"]:
                row = rows[0]
                break
            time.sleep(0.2)
        assert row is not None, proc.stdout.read() if proc.poll() is not None else "no progress seen"
        assert (row["experiment"], row["variant"], row["seed"]) == ("baseline", "baseline", 0)
        assert row["where"].startswith(socket.gethostname())
        epoch, epochs = row["epoch"].split("/")
        assert epochs == "30" and 1 <= int(epoch) <= 30 and "/" in row["step"]
        assert row["images_per_s"] > 0 and row["left"].endswith(("min", "h"))
        assert counts["running"] == 1 and counts_line(counts).startswith("1 training")
        console = Console(width=120, record=True)
        console.print(render(runs, 120))
        text = console.export_text()
        assert "baseline" in text and "1 training" in text and row["epoch"].split("/")[1] in text
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)  # stops at the next step with a checkpoint: "interrupted"
        proc.wait(timeout=120)
    rows, counts = watch_rows(runs)
    assert rows == [] and counts["running"] == 0 and sum(counts.values()) == 1

"""Two processes on gloo with the curve synced every two steps: the ranks decide together at a sync (one
all-reduce carries the curve, the sums and the stop and timer requests), so a stop asked on one rank only stops
both at the next sync, with a checkpoint from which the run continues exactly as a straight one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from engine_support import read_jsonl

TESTS = Path(__file__).parent
SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {tests!r})
    import torch
    import engine_support as sup
    from repro.engine import fit, parallel, preempt
    from repro.engine import train as train_mod

    sup.use_stand_ins(None)
    torch.set_num_threads(1)
    train_mod.CURVE_SYNC_STEPS = 2  # a sync every two steps (log_every 1)
    rank, _ = parallel.init_from_env()
    stop_at = json.loads(sys.argv[2])
    if rank == 1 and stop_at:  # a request on one rank only, while its stop_at-th batch is prepared
        calls, real = [0], sup.Transform.__call__

        def call(self, x):
            if self.train:
                calls[0] += 1
                if calls[0] == stop_at:
                    preempt.request()
            return real(self, x)
        sup.Transform.__call__ = call
    cfg = sup.tiny_config(**{{"train.epochs": 2, "train.log_every": 1, "data.train_limit": 128}})
    record = fit(cfg, sys.argv[1], progress=False)
    print(json.dumps({{"rank": rank, "status": record.status, "iterations": record.iterations}}))
    torch.distributed.destroy_process_group()
""")


def torchrun(tmp_path: Path, run_dir: Path, stop_at: int) -> list[dict]:
    script = tmp_path / "ddp_run.py"
    script.write_text(SCRIPT.format(tests=str(TESTS)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", "2",
           str(script), str(run_dir), json.dumps(stop_at)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sorted((json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")),
                  key=lambda r: r["rank"])



def test_a_stop_on_one_rank_stops_both_at_the_next_sync(tmp_path):
    straight = torchrun(tmp_path, tmp_path / "a", 0)
    assert [r["status"] for r in straight] == ["done", "done"] and straight[0]["iterations"] == 16
    # 128 images, a global batch of 16: 8 steps an epoch; rank 1 asks while preparing step 5, the sync after step 6
    # stops both ranks there
    stopped = torchrun(tmp_path, tmp_path / "b", 5)
    assert stopped == [{"rank": 0, "status": "preempted", "iterations": 6},
                       {"rank": 1, "status": "preempted", "iterations": 6}]
    saved = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert (saved["epoch"], saved["batch"]) == (0, 6)
    assert [r["iteration"] for r in read_jsonl(tmp_path / "b" / "curve.jsonl")] == list(range(1, 7))
    resumed = torchrun(tmp_path, tmp_path / "b", 0)
    assert [r["status"] for r in resumed] == ["done", "done"]
    assert read_jsonl(tmp_path / "a" / "curve.jsonl") == read_jsonl(tmp_path / "b" / "curve.jsonl")
    a, b = (json.loads((tmp_path / d / "result.json").read_text())["metrics"] for d in ("a", "b"))
    assert a == b

"""Two processes on gloo under torchrun: DistributedDataParallel keeps the replicas equal, each process trains on
its half of the data, and only rank 0 writes the run's files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

import engine_support as sup

SCRIPT = Path(__file__).with_name("engine_support.py")


def test_two_process_gloo_run(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", "2",
           str(SCRIPT), str(run_dir), json.dumps({"train.epochs": 2})]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]

    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "done"
    # 64 training images, a global batch of 16 (8 per process): 4 steps per epoch, as in one process
    assert result["iterations"] == 8 and result["epochs_done"] == 2
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2

    rank0 = (tmp_path / "writes-rank0.txt").read_text().split()
    assert rank0.count("result.json") == 1 and rank0.count("config.json") == 1 and rank0.count("checkpoint.pt") == 2
    assert not (tmp_path / "writes-rank1.txt").exists()

    w0 = torch.load(tmp_path / "weights-rank0.pt", weights_only=True)
    w1 = torch.load(tmp_path / "weights-rank1.pt", weights_only=True)
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]
    for k in w0:
        torch.testing.assert_close(w0[k], w1[k], rtol=0, atol=1e-6)
        assert torch.equal(w0[k], saved[k])

    # The validation set was sharded over the two processes; the stored logits are back in sample order.
    model = sup.TinyNet()
    model.load_state_dict(saved)
    x, y = sup.make_images(32, 2)
    with torch.no_grad():
        expected = model.eval()(sup.Transform(None, None, False)(x)).numpy()
    logits = np.load(run_dir / "val_logits.npy").astype(np.float32)
    np.testing.assert_allclose(logits, expected, rtol=1e-2, atol=1e-2)
    assert result["metrics"]["top1_err"] == 100.0 * (expected.argmax(1) != y.numpy()).mean()

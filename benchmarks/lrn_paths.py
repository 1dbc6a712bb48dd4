"""LRN's three ways on a GPU, model-bound training of alexnet-paper at 224 px (bf16 autocast, channels_last),
eager and torch.compile'd, in one process:

- "function, float32": what LRN does (`repro.models.layers._LRNFunction`, the gradient written out);
- "ops, float32": the same in torch's ops, the gradient left to autograd (what torch.compile sees whole);
- "ops, bf16": those ops left to autocast (window sum in bf16), as LRN was before it computed in float32.

    python benchmarks/lrn_paths.py [--steps 30]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from repro.bench.gpu import model_rate
from repro.config import RunConfig
from repro.models import layers


def ops(self, x, dtype=None):
    a = x.to(dtype or x.dtype)
    band = self.band(x.shape[1], x).to(a.dtype)
    s = F.conv2d(a * a, band, torch.full((band.shape[0],), self.k, dtype=a.dtype, device=a.device))
    return (a * s.pow(-self.beta)).to(x.dtype)


def float32_ops(self, x):
    with torch.autocast(x.device.type, enabled=False):
        return ops(self, x, torch.float32)


PATHS = {"function, float32": layers.LRN.forward, "ops, float32": float32_ops, "ops, bf16": ops}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    cfg = RunConfig()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; images/s, batch 256")
    for compiled in (False, True):
        for name, forward in PATHS.items():
            layers.LRN.forward = forward
            torch._dynamo.reset()
            rate = model_rate(cfg, bf16=True, channels_last=True, compiled=compiled, steps=args.steps)
            print(f"{'compiled' if compiled else 'eager':8s} {name:18s} {rate:9,.0f}", flush=True)


if __name__ == "__main__":
    main()

"""LRN's three ways on a GPU, model-bound training of alexnet-paper at 224 px (bf16 autocast, channels_last),
eager and torch.compile'd, in one process:

- "ops, float32": what LRN does off the CPU (`repro.models.layers._lrn_ops`);
- "function, float32": the CPU's autograd.Function with the gradient written out, forced onto the GPU;
- "ops, bf16": the same ops left to autocast (window sum in bf16), as LRN was before it computed in float32.

    python benchmarks/lrn_paths.py [--steps 30]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from repro.bench_gpu import model_rate
from repro.config import RunConfig
from repro.models import layers


def bf16_ops(self, x):
    band = self.band(x.shape[1], x).to(x.dtype)
    s = F.conv2d(x * x, band, torch.full((band.shape[0],), self.k, dtype=x.dtype, device=x.device))
    return x * s.pow(-self.beta)


PATHS = {
    "ops, float32": layers.LRN.forward,
    "function, float32": lambda self, x: layers._LRNFunction.apply(x, self.band(x.shape[1], x), self.k, self.beta),
    "ops, bf16": bf16_ops,
}


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

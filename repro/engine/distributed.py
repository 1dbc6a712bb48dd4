"""Several processes, one run: `torchrun` launches one process per GPU (or CPU process on gloo), each calls `fit`;
DistributedDataParallel averages gradients, the loaders shard every split, validation outputs are gathered back
into sample order (so every rank sees the same error and schedule), and only rank 0 writes files.

    torchrun --nproc_per_node 8 -m repro.engine.distributed RUN_DIR [--config FILE] [--set key=value ...]

The config comes from `--config FILE` (a `config.json` or `result.json` of another run, or a plain
{"model": {...}, "data": {...}, "train": {...}} file), else from RUN_DIR/config.json (an earlier or interrupted
run there); `--set` overrides apply on top. A folder that already holds another config is refused.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def rank_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when no process group is running."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum of `x` over all ranks (itself when single-process)."""
    if rank_world()[1] == 1:
        return x
    x = x.clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def any_true(flag: bool) -> bool:
    """True on every rank when `flag` is true on any rank (so all ranks leave the loop together)."""
    if rank_world()[1] == 1:
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_in_order(x: torch.Tensor, count: int) -> torch.Tensor:
    """Outputs of a split sharded as DistributedSampler(shuffle=False) shards it (rank r holds samples r, r+W, ...,
    padded to equal length) put back into sample order on every rank, padding cut to `count`."""
    if rank_world()[1] == 1:
        return x
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    local = x.to(device).contiguous()
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local)
    return torch.stack(parts, 1).reshape(-1, *x.shape[1:])[:count].to(x.device)


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    if device.type == "cuda":
        return DistributedDataParallel(model, device_ids=[device.index], output_device=device.index)
    return DistributedDataParallel(model)


def init_from_env() -> tuple[int, int]:
    """Join the process group torchrun describes in RANK/WORLD_SIZE/MASTER_ADDR/...: nccl on CUDA, gloo on CPU."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise SystemExit("run this under torchrun, e.g. torchrun --nproc_per_node 2 -m repro.engine.distributed RUN_DIR")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def main(argv: list[str] | None = None) -> int:
    from repro.config import apply_overrides, from_dict, parse_set
    from repro.engine.train import fit
    from repro.errors import UserError

    parser = argparse.ArgumentParser(prog="torchrun --nproc_per_node N -m repro.engine.distributed",
                                     description="Train one run on several processes.")
    parser.add_argument("run_dir", type=Path, help="run folder (created if missing)")
    parser.add_argument("--config", type=Path, help="config file; default RUN_DIR/config.json, else RUN_DIR/planned.json")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    rank, _ = init_from_env()
    try:
        cfg_path = args.config or args.run_dir / "config.json"
        if args.config is None and not cfg_path.exists():  # a run planned by `repro run --dry-run`, not started
            cfg_path = args.run_dir / "planned.json"
        try:
            raw = json.loads(cfg_path.read_text())
            raw = raw.get("config", raw)
        except (OSError, ValueError, AttributeError) as e:
            raise UserError(f"{cfg_path}: cannot read a run config ({type(e).__name__}); "
                            f"give one with --config FILE") from None
        cfg = apply_overrides(from_dict(raw, source=str(cfg_path)), parse_set(args.sets))
        result = fit(cfg, args.run_dir, progress=not args.quiet)
        if rank == 0:
            print(f"{result['status']}: top-1 err {result['metrics']['top1_err']}, run {args.run_dir}")
        return 0 if result["status"] == "done" else 1
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())

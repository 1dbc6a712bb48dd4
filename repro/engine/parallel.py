"""Collectives for one run trained by several processes (torchrun, one process per GPU or CPU process on gloo),
and the wrappers around a model: a leaf module the training and scoring code build on. Every function works
unchanged in a single process (no process group), where the collectives return their input.
"""

from __future__ import annotations

import datetime as dt
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


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
    if device.type == "cuda":
        return DistributedDataParallel(model, device_ids=[device.index], output_device=device.index)
    return DistributedDataParallel(model)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model inside DistributedDataParallel and/or torch.compile wrappers."""
    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif isinstance(model, torch._dynamo.eval_frame.OptimizedModule):  # what torch.compile returns
            model = model._orig_mod
        else:
            return model


# How long a collective may wait for a rank before it fails: when one rank dies (OOM, a full disk, a lost lease)
# the others stop within this bound with an error instead of waiting out NCCL's default of ten minutes or more.
TIMEOUT_S = float(os.environ.get("REPRO_DDP_TIMEOUT_S", "300"))


def init_from_env() -> tuple[int, int]:
    """Join the process group torchrun describes in RANK/WORLD_SIZE/MASTER_ADDR/...: nccl on CUDA, gloo on CPU,
    with collectives that fail after REPRO_DDP_TIMEOUT_S seconds (TIMEOUT_S) of waiting for a rank."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise SystemExit("run this under torchrun, e.g. torchrun --nproc_per_node 2 -m repro.engine.distributed RUN_DIR")
    timeout = dt.timedelta(seconds=TIMEOUT_S)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # a timed-out collective ends the process
        dist.init_process_group("nccl", timeout=timeout)
    else:
        dist.init_process_group("gloo", timeout=timeout)
    return dist.get_rank(), dist.get_world_size()

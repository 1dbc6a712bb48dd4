"""The torchrun entry point. Several processes, one run: `torchrun` launches one process per GPU (or CPU process
on gloo), each calls `fit`; DistributedDataParallel averages gradients, the loaders shard every split, validation
outputs are gathered back into sample order (so every rank sees the same error and schedule), and only rank 0
writes files. The collectives live in `repro.engine.parallel`.

    torchrun --nproc_per_node 8 -m repro.engine.distributed RUN_DIR [--config FILE] [--set key=value ...]

The config comes from `--config FILE` (the config or the record of another run, or a plain
{"model": {...}, "data": {...}, "train": {...}} file), else from the config of an earlier or interrupted run in
RUN_DIR, else from the one `repro run --dry-run` planned there; `--set` overrides apply on top. A folder that
already holds another config is refused, and so is a run another live process holds (rank 0 takes the run's lease,
as every launcher does).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

from repro.config import apply_overrides, from_dict, parse_set
from repro.engine import preempt
from repro.engine.parallel import any_true, init_from_env
from repro.engine.train import fit
from repro.errors import UserError
from repro.rundir import RunDir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="torchrun --nproc_per_node N -m repro.engine.distributed",
                                     description="Train one run on several processes.")
    parser.add_argument("run_dir", type=Path, help="run folder (created if missing)")
    parser.add_argument("--config", type=Path, help="config file; default: the config in RUN_DIR (trained or planned)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    rank, _ = init_from_env()
    try:
        run = RunDir(args.run_dir)
        cfg_path = args.config or run.config
        if args.config is None and not cfg_path.exists():  # a run planned by `repro run --dry-run`, not started
            cfg_path = run.planned
        try:
            raw = json.loads(cfg_path.read_text())
            raw = raw.get("config", raw)
        except (OSError, ValueError, AttributeError) as e:
            raise UserError(f"{cfg_path}: cannot read a run config ({type(e).__name__}); "
                            f"give one with --config FILE") from None
        cfg = apply_overrides(from_dict(raw, source=str(cfg_path)), parse_set(args.sets))
        with _claimed(run, rank):
            result = fit(cfg, args.run_dir, progress=not args.quiet)
        if rank == 0:
            print(f"{result.status}: top-1 err {result.metrics.get('top1_err')}, run {args.run_dir}")
        return 0 if result.finished else 1
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def _claimed(run: RunDir, rank: int):
    """Rank 0 takes the run's lease, as every launcher does, and keeps it alive while the ranks train; a run another
    live process holds is refused on every rank, naming the holder."""
    held = None
    if rank == 0:
        run.path.mkdir(parents=True, exist_ok=True)
        held = run.claim(job_id=os.environ.get("SLURM_JOB_ID"), log="torchrun")
    holder = None if held is not None or rank != 0 else run.holder() or {"host": "?", "pid": "?"}
    if any_true(held is None and rank == 0):
        what = "see rank 0" if holder is None else f"{holder.get('host')} pid {holder.get('pid')}" + (
            f", Slurm job {holder['job_id']}" if holder.get("job_id") else "")
        raise UserError(f"{run} is held by another live process ({what}); nothing "
                        f"trained: wait for it (repro status shows it) or train another run")
    if held is not None:
        held.keep_alive(on_lost=preempt.abandon)
    try:
        yield
    finally:
        if held is not None:
            held.release()


if __name__ == "__main__":
    sys.exit(main())

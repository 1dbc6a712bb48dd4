"""Training one run: the paper's SGD recipe (section 5), per-epoch metrics and checkpoints, exact resume, and a
run record (`result.json`) that says how the run ended: done, diverged, interrupted or failed.

Randomness is reseeded at the start of every epoch from (seed, epoch, rank), and the loaders shuffle by
(seed, epoch), so an epoch replays identically whether the run went straight through or resumed from the
checkpoint written at the end of the previous epoch. A run interrupted mid-epoch abandons that epoch.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import json
import math
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from repro.config import RunConfig, config_hash, to_dict
from repro.data import make_loaders
from repro.data.augment import BatchTransform
from repro.engine import checkpoint, distributed, schedule
from repro.engine.evaluate import evaluate, unwrap
from repro.engine.provenance import provenance
from repro.errors import UserError
from repro.models import build_model
from repro.views import progress_console

RESULT_FORMAT = 1


class Diverged(Exception):
    """The training loss became NaN or infinite."""


# --- small file helpers -------------------------------------------------------------------------------------------

def write_json(path: Path, obj) -> None:
    """Write JSON under a temporary name, then rename: readers never see half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, allow_nan=False) + "\n")
    os.replace(tmp, path)


def _append_jsonl(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")  # one short write: a kill leaves a whole line or none


def _keep_jsonl(path: Path, key: str, upto: int) -> list[dict]:
    """Drop lines written after the checkpoint we resume from (key > upto) and any torn last line."""
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if row.get(key, math.inf) <= upto:
                rows.append(row)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)
    return rows


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _clean(x):
    """JSON has no NaN/inf: such numbers become null."""
    return None if isinstance(x, float) and not math.isfinite(x) else x


# --- set-up -------------------------------------------------------------------------------------------------------

def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"train.device = {name!r} but no CUDA device is visible; use --set train.device=cpu")
    return torch.device(name)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def set_loader_epoch(loader, epoch: int) -> None:
    """Make the loader shuffle for `epoch` (needed after a resume: loaders count epochs from 0 themselves)."""
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    elif hasattr(loader, "next_epoch"):  # ffcv.Loader shuffles by seed + next_epoch
        loader.next_epoch = epoch


@contextlib.contextmanager
def signals_interrupt():
    """SIGTERM (and SIGINT) raise KeyboardInterrupt in the training thread, so both end a run the same way."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _check_run_dir(run_dir: Path, cfg: RunConfig, chash: str, is_main: bool) -> dict | None:
    """Write config.json, refuse a folder that holds another config, and return a finished result if any."""
    cfg_path = run_dir / "config.json"
    if cfg_path.exists():
        try:
            old = json.loads(cfg_path.read_text()).get("config_hash")
        except ValueError:
            old = None
        if old is not None and old != chash:
            raise UserError(f"{run_dir} holds a run of another config (hash {old}, this one is {chash}); "
                            f"train it in a new folder")
    if is_main:
        write_json(cfg_path, {"config": to_dict(cfg), "config_hash": chash})
    try:
        result = json.loads((run_dir / "result.json").read_text())
    except (OSError, ValueError):
        return None
    return result if result.get("status") == "done" and result.get("config_hash") == chash else None


# --- the loop -----------------------------------------------------------------------------------------------------

def _progress_bar(enabled: bool):
    if not enabled:
        return None
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[ips]:>7.0f} img/s"), TimeRemainingColumn(), transient=False,
                    console=progress_console())


def _train_epoch(run, net, optimizer, loader, transform, epoch: int, sched: dict, bar, task) -> dict:
    """One pass over the training data; returns the epoch's training loss, error and throughput."""
    t = run["cfg"].train
    device, dtype = run["device"], run["dtype"]
    epoch_acc = torch.zeros(3, device=device, dtype=torch.float64)  # loss sum, errors, images
    curve_acc = torch.tensor(run["curve_acc"], device=device, dtype=torch.float64)
    images_seen, t0 = 0, time.perf_counter()
    net.train()
    per_step = schedule.changes_within_epoch(t, epoch)
    steps = len(loader)
    batches = iter(loader)
    first = next(batches, None)
    # Seed once the loader has started: a DataLoader draws from torch's generator when it starts its workers,
    # which persistent workers do in a process's first epoch only, so a resumed run would draw once more.
    torch.manual_seed(epoch_seed(t.seed, epoch, run["rank"]))
    for step, (images, labels) in enumerate(itertools.chain([first] if first is not None else [], batches)):
        if per_step:
            for group in optimizer.param_groups:
                group["lr"] = schedule.lr_at(t, sched, epoch, step, steps)
        x = transform(images)  # channels_last when the model is
        with contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype):
            out = net(x)
            loss = F.cross_entropy(out.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        # Accumulate on the device; synchronise only at curve points (a .item() per step stalls a GPU).
        step = torch.stack([loss.detach().double() * labels.shape[0],
                            (out.argmax(1) != labels).sum().double(),
                            torch.full((), labels.shape[0], device=device, dtype=torch.float64)])  # a fill, no copy
        epoch_acc += step
        curve_acc += step
        run["iteration"] += 1
        images_seen += labels.shape[0]
        if run["iteration"] % t.log_every == 0:
            _curve_point(run, curve_acc, epoch)
            curve_acc.zero_()
        if bar is not None:
            bar.update(task, advance=1, ips=images_seen * run["world"] / max(time.perf_counter() - t0, 1e-9))
        if t.max_iters and run["iteration"] >= t.max_iters:
            break
    run["curve_acc"] = curve_acc.tolist()
    seconds = time.perf_counter() - t0
    totals = distributed.all_sum(epoch_acc)
    loss_sum, errors, n = totals.tolist()
    if not math.isfinite(loss_sum):
        raise Diverged(f"training loss is {loss_sum} in epoch {epoch + 1} (iteration {run['iteration']})")
    return {"train_loss": loss_sum / max(n, 1), "train_top1_err": 100.0 * errors / max(n, 1),
            "images": n, "seconds": seconds}


def _curve_point(run, acc: torch.Tensor, epoch: int) -> None:
    loss_sum, errors, n = acc.tolist()
    if distributed.any_true(not math.isfinite(loss_sum)):
        raise Diverged(f"training loss is {loss_sum / max(n, 1)} at iteration {run['iteration']} (epoch {epoch + 1})")
    row = {"iteration": run["iteration"], "epoch": epoch + 1, "train_loss": loss_sum / max(n, 1),
           "train_top1_err": 100.0 * errors / max(n, 1)}
    if run["iters_to_target"] is None and row["train_top1_err"] < run["cfg"].train.target_train_err:
        run["iters_to_target"] = run["iteration"]
    if run["is_main"]:
        _append_jsonl(run["dir"] / "curve.jsonl", row)


def _run(cfg: RunConfig, run_dir: Path, run: dict, progress: bool) -> None:
    """Train to the end (or max_iters) and score the final model; fills `run` as it goes."""
    t = cfg.train
    device = run["device"] = pick_device(t.device)
    run["dtype"] = autocast_dtype(t.precision, device)
    run["channels_last"] = t.channels_last  # oneDNN on CPU gains from it too (1.5x at demo scale)
    run["prov"] = provenance(device)
    loaders = make_loaders(cfg, device=device, distributed=run["world"] > 1)
    run["prov"].update(data_manifest_hash=loaders.manifest.get("hash"), data_backend=loaders.backend)
    if loaders.batches_per_epoch < 1:
        raise UserError(f"{cfg.data.dir}: {loaders.num_train} training images make no full batch of "
                        f"{t.batch_size} per process; lower train.batch_size or raise data.train_limit")
    train_tf = BatchTransform(loaders.manifest, cfg, train=True)
    val_tf = BatchTransform(loaders.manifest, cfg, train=False)

    torch.manual_seed(t.seed)  # the initial weights depend on the seed only
    model = build_model(cfg.model).to(device)
    if run["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    # torch's SGD adds weight_decay * w to the gradient before momentum: v <- 0.9 v + (g + wd w), w <- w - lr v.
    # The paper's rule is v <- 0.9 v - wd*lr*w - lr*g, w <- w + v: the same iterates while lr is constant
    # (torch's v is the paper's v / -lr); after an lr drop torch's momentum carries the old gradients at the new lr.
    optimizer = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    sched, start_epoch = schedule.initial_state(t), 0
    state = checkpoint.load(run_dir)
    if state is not None:
        if state.get("config_hash") != run["config_hash"]:
            raise UserError(f"{run_dir}/checkpoint.pt belongs to another config; train this run in a new folder")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        sched, start_epoch = state["schedule"], state["epoch"]
        run.update(iteration=state["iteration"], curve_acc=list(state["curve_acc"]),
                   iters_to_target=state["iters_to_target"], best_val=state["best_val"])
    if run["is_main"]:
        run["rows"] = _keep_jsonl(run_dir / "metrics.jsonl", "epoch", start_epoch)
        _keep_jsonl(run_dir / "curve.jsonl", "iteration", run["iteration"])
    run["epochs_done"] = start_epoch
    net = distributed.wrap(model, device) if run["world"] > 1 else model
    val_count = loaders.num_val if run["world"] > 1 else None  # the val split is sharded too
    if t.compile:
        net = torch.compile(net)

    total = t.epochs * loaders.batches_per_epoch
    total = min(total, t.max_iters) if t.max_iters else total
    bar = _progress_bar(progress and run["is_main"])
    with bar if bar is not None else contextlib.nullcontext():
        task = bar.add_task("train", total=total, completed=min(run["iteration"], total), ips=0.0) if bar else None
        for epoch in range(start_epoch, t.epochs):
            if t.max_iters and run["iteration"] >= t.max_iters:
                break
            lr = schedule.lr_at(t, sched, epoch, 0, loaders.batches_per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            set_loader_epoch(loaders.train, epoch)
            if bar is not None:
                last = f", val err {run['rows'][-1]['val_top1_err']:.1f}%" if run["rows"] else ""
                bar.update(task, description=f"epoch {epoch + 1}/{t.epochs}{last}")
            stats = _train_epoch(run, net, optimizer, loaders.train, train_tf, epoch, sched, bar, task)
            final_epoch = epoch == t.epochs - 1 or bool(t.max_iters and run["iteration"] >= t.max_iters)
            # the last epoch's scoring is the final one: ten-crop included, done once
            val, logits = evaluate(model, loaders.val, val_tf, crop=cfg.model.input_size, dtype=run["dtype"],
                                   count=val_count, ten_crop=t.ten_crop and final_epoch)
            if final_epoch:
                run["final"], run["logits"] = val, logits
            sched = schedule.after_epoch(t, sched, val["top1_err"])
            run["best_val"] = min(run["best_val"], val["top1_err"])
            run["train_images"] += stats["images"]
            run["train_seconds"] += stats["seconds"]
            row = {"epoch": epoch + 1, "iteration": run["iteration"], "train_loss": stats["train_loss"],
                   "train_top1_err": stats["train_top1_err"], "val_top1_err": val["top1_err"],
                   "val_top5_err": val["top5_err"], "lr": lr,
                   "images_per_s": stats["images"] / max(stats["seconds"], 1e-9), "seconds": stats["seconds"]}
            run["rows"].append(row)
            run["epochs_done"] = epoch + 1
            if run["is_main"]:
                _append_jsonl(run_dir / "metrics.jsonl", row)
                checkpoint.save(run_dir, {
                    "model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                    "epoch": epoch + 1, "iteration": run["iteration"], "schedule": sched,
                    "curve_acc": run["curve_acc"], "iters_to_target": run["iters_to_target"],
                    "best_val": run["best_val"], "config_hash": run["config_hash"]})

    if run.get("final") is None:  # resumed after the last epoch's checkpoint
        run["final"], run["logits"] = evaluate(model, loaders.val, val_tf, crop=cfg.model.input_size,
                                               ten_crop=t.ten_crop, dtype=run["dtype"], count=val_count)
    logits = run["logits"]
    if run["is_main"]:
        tmp = run_dir / "val_logits.npy.tmp"
        with open(tmp, "wb") as f:
            np.save(f, logits.numpy().astype(np.float16))
        os.replace(tmp, run_dir / "val_logits.npy")


def _record(run: dict, status: str, error: str | None) -> dict:
    last = run["rows"][-1] if run["rows"] else {}
    final = run.get("final") or {}
    metrics = {
        "top1_err": final.get("top1_err", last.get("val_top1_err")),
        "top5_err": final.get("top5_err", last.get("val_top5_err")),
        "top1_err_10crop": final.get("top1_err_10crop"), "top5_err_10crop": final.get("top5_err_10crop"),
        "train_loss": last.get("train_loss"), "train_top1_err": last.get("train_top1_err"),
        "best_val_top1_err": run["best_val"], "iters_to_target": run["iters_to_target"],
    }
    prov = dict(run.get("prov") or {})
    wall = time.perf_counter() - run["t0"]
    prov.update(wall_time_s=wall, images_per_s=run["train_images"] / run["train_seconds"] if run["train_seconds"] else None,
                started=run["started"], finished=_now())
    return {"format": RESULT_FORMAT, "status": status, "error": error, "config": to_dict(run["cfg"]),
            "config_hash": run["config_hash"], "epochs_done": run["epochs_done"], "iterations": run["iteration"],
            "metrics": {k: _clean(v) for k, v in metrics.items()},
            "provenance": {k: _clean(v) for k, v in prov.items()}}


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def fit(cfg: RunConfig, run_dir: Path, *, progress: bool = True) -> dict:
    """Train (or resume, or return the finished result of) the run `cfg` in `run_dir`; returns the run record,
    also written as `run_dir/result.json`. Divergence is recorded, not raised; SIGINT/SIGTERM record
    "interrupted" and re-raise KeyboardInterrupt; any other error records "failed" and re-raises."""
    run_dir = Path(run_dir)
    rank, world = distributed.rank_world()
    is_main = rank == 0
    run_dir.mkdir(parents=True, exist_ok=True)
    chash = config_hash(cfg)
    done = _check_run_dir(run_dir, cfg, chash, is_main)
    if done is not None:
        return done
    run = {"cfg": cfg, "dir": run_dir, "config_hash": chash, "rank": rank, "world": world, "is_main": is_main,
           "iteration": 0, "epochs_done": 0, "curve_acc": [0.0, 0.0, 0.0], "iters_to_target": None,
           "best_val": math.inf, "rows": [], "train_images": 0.0, "train_seconds": 0.0,
           "t0": time.perf_counter(), "started": _now()}

    def finish(status: str, error: str | None) -> dict:
        record = _record(run, status, error)
        if is_main:
            write_json(run_dir / "result.json", record)
        return record

    with signals_interrupt():
        try:
            _run(cfg, run_dir, run, progress)
        except Diverged as e:
            return finish("diverged", _one_line(e))
        except KeyboardInterrupt:
            finish("interrupted", "interrupted by a signal; run again to resume from the last checkpoint")
            raise
        except Exception as e:
            finish("failed", _one_line(e))
            raise
    return finish("done", None)

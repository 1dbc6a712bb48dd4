"""`repro status --watch`: a live table of every run training now, refreshed until Ctrl-C, then the counts of the
others. It reads only the run folders (the lease says a run is held, its progress file where it is, its placement
where it trains), so it shows the same from any machine that sees the runs folder, for the local pool and Slurm.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from repro import io
from repro.rundir import RunDir, iter_links
from repro.views import Column, to_table

WATCH_COLUMNS = (Column("experiment"), Column("variant"), Column("seed", kind="num"), Column("where", drop=4),
                 Column("epoch", kind="num"), Column("step", kind="num", drop=3),
                 Column("images_per_s", "img/s", kind="num", fmt=lambda x: f"{x:,.0f}"),
                 Column("left", "time left", kind="num", drop=2),
                 Column("train_err", "train err", kind="num", fmt=lambda x: f"{x:.1f}", drop=1),
                 Column("val_err", "val err", kind="num", fmt=lambda x: f"{x:.1f}", drop=1))
COUNTED = ("done", "pending", "failed", "did not learn", "diverged", "interrupted", "preempted")


def _left(p: dict[str, Any]) -> str:
    rate, steps = p.get("images_per_s") or 0, p.get("iterations", 0) - p.get("iteration", 0)
    per_step = p.get("images_per_step")
    if not rate or steps <= 0:
        return ""
    seconds = steps * (per_step or 0) / rate if per_step else None
    if seconds is None:
        return ""
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _where(run: RunDir) -> str:
    place = run.read_placement() or {}
    holder = run.holder() or {}
    host = place.get("host") or holder.get("host") or "?"
    gpus = place.get("gpus")
    job = place.get("slurm_job_id") or holder.get("job_id")
    return host + (f" GPU {gpus}" if gpus else "") + (f" job {job}" if job else "")


def watch_rows(runs_dir: Path | str) -> tuple[list[dict[str, Any]], Counter]:
    """(one row per run training now, with where it is; the counts of every run by status), each run once."""
    rows, counts, seen = [], Counter(), set()
    for experiment, variant, seed, chash, link in iter_links(runs_dir):
        if chash in seen:
            continue  # a run several experiments share is one run
        seen.add(chash)
        run = RunDir(link.resolve())
        status = run.own_status()
        counts[status] += 1
        if status != "running":
            continue
        p = io.read_json(run.progress) or {}
        cfg = (run.planned_config() or {}).get("train", {})
        p["images_per_step"] = cfg.get("batch_size")
        rows.append({"experiment": experiment, "variant": variant, "seed": seed, "where": _where(run),
                     "epoch": f"{p['epoch']}/{p['epochs']}" if p.get("epoch") else "starting",
                     "step": f"{p.get('batch', 0)}/{p.get('steps_per_epoch', '?')}" if p else "",
                     "images_per_s": p.get("images_per_s"), "left": _left(p),
                     "train_err": p.get("train_top1_err"), "val_err": p.get("val_top1_err")})
    return rows, counts


def counts_line(counts: Counter) -> str:
    parts = [f"{counts.get(s, 0)} {'queued' if s == 'pending' else s}" for s in COUNTED if counts.get(s)]
    return f"{counts.get('running', 0)} training; " + (", ".join(parts) or "no other runs")


def render(runs_dir: Path | str, width: int) -> Group:
    rows, counts = watch_rows(runs_dir)
    title = Text(f"runs training under {runs_dir} at {time.strftime('%H:%M:%S')} (Ctrl-C quits)", style="italic")
    return Group(title, to_table(rows, WATCH_COLUMNS, width, caption=counts_line(counts)))


def watch(runs_dir: Path | str, console: Console, interval: float = 5.0) -> None:
    """Refresh the table every `interval` seconds until Ctrl-C."""
    with Live(render(runs_dir, console.width), console=console, refresh_per_second=4, screen=False) as live:
        try:
            while True:
                time.sleep(interval)
                live.update(render(runs_dir, console.width))
        except KeyboardInterrupt:
            return

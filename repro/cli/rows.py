"""The rows of `repro list` and `repro status`: what the registry and the runs folder say, for repro.views.

`repro status` reads every run's status from its folder (`RunDir.status`), with the launcher's job state folded in
where `repro run --launcher slurm` submitted it (repro.launch.slurm.run_jobs asks Slurm once for all of them); a
run held by a live lease is running, under the job its lease names.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from repro.claims import get_kind
from repro.record import finite
from repro.experiments import load_registry, scale_settings
from repro.rundir import RunDir, iter_links
from repro.runs import collect
from repro.views import Column

LIST_COLUMNS = (Column("name"), Column("section"), Column("kind"),
                Column("claim", kind="prose", drop=3), Column("paper", kind="prose", drop=2),
                Column("runs_done", "runs done", kind="num"))


def list_rows(runs_dir: Path | str, scale: str, experiments_dir=None) -> list[dict]:
    """`repro list`: every experiment with section, claim, paper number and runs done at `scale`."""
    registry = load_registry(experiments_dir)
    df = collect(runs_dir)
    rows = []
    for name, e in registry.items():
        paper = ", ".join(f"{k} {v:+g}" if get_kind(e.kind).signed_paper else f"{k} {v:g}"
                          for k, v in e.paper.items() if k != "note") or "qualitative"
        expected = len(e.variants) * scale_settings(e, scale, experiments_dir).seeds
        sub = df[(df.experiment == name) & (df.scale == scale)] if not df.empty else df
        done = int((sub.status == "done").sum()) if not sub.empty else 0
        rows.append({"name": name, "section": e.section, "kind": e.kind, "claim": e.claim, "paper": paper,
                     "runs_done": f"{done}/{expected}"})
    return rows


STATUS_COLOUR = {"done": "green", "diverged": "yellow", "did not learn": "yellow", "failed": "red", "interrupted": "yellow", "running": "cyan",
                 "stale": "magenta", "pending": "blue", "requeued": "blue", "cancelled": "red", "preempted": "yellow"}
STATUS_COLUMNS = (Column("experiment"), Column("variant"), Column("seed", kind="num"), Column("scale", drop=1),
                  Column("hash"), Column("status", style=lambda s: STATUS_COLOUR.get(s, "white")),
                  Column("job", drop=2), Column("host", drop=4), Column("gpus", drop=5),
                  Column("epochs", kind="num", drop=3, fmt=lambda n: f"{n:.0f}"),
                  Column("top1_err", "top-1", kind="num", fmt=lambda x: f"{x:.2f}"),
                  Column("log", kind="prose", drop=6), Column("error", kind="prose", drop=7))


def _text(x: Any) -> str:
    return x if isinstance(x, str) else ""


def status_rows(runs_dir: Path | str) -> list[dict[str, Any]]:
    """`repro status` data: one dict per run with its state, Slurm job (id, state, reason), host, GPUs, log."""
    from repro.launch.slurm import run_jobs  # only `repro status` asks the scheduler

    runs = {RunDir(link.resolve()) for *_, link in iter_links(runs_dir)}
    df = collect(runs_dir, jobs=run_jobs(sorted(runs, key=str)))
    rows = []
    for _, r in df.iterrows():
        live = RunDir(Path(r.run_dir).resolve()).holder() or {}
        error = " ".join(x for x in (_text(r.get("job.reason")), _text(r.error)) if x)
        # a live lease names the job that trains the run, whatever job was submitted last (a duplicate, say)
        job = str(live.get("job_id") or "") if r.status == "running" else ""
        rows.append({
            "experiment": r.experiment, "variant": r.variant, "seed": int(r.seed), "scale": r.scale or "",
            "hash": r.config_hash, "status": r.status, "job": job or _text(r.get("job.id")),
            "host": r.get("placement.host") or live.get("host") or "", "gpus": r.get("placement.gpus") or "",
            "log": r.get("placement.log") or _text(r.get("launch.log")),
            "epochs": None if not finite(r.epochs_done) else int(r.epochs_done),
            "top1_err": r.top1_err if finite(r.top1_err) else None, "error": error})
    return rows


def status_caption(rows: list[dict]) -> str:
    if not rows:
        return "no runs yet: `repro run all --scale demo`"
    counts = defaultdict(int)
    for r in rows:
        counts[r["status"]] += 1
    return ", ".join(f"{n} {s}" for s, n in sorted(counts.items(), key=lambda kv: -kv[1]))

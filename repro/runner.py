"""`repro run`, `repro list`, `repro status`: plan every run of the chosen experiments, train what is missing, analyse.

Runs are planned per experiment, then deduplicated by config hash so that a run several experiments share is
trained once. A done or diverged run is reused, an interrupted one resumes (the engine continues from its
checkpoint), a failed one is tried again. Training goes to a launcher (repro.launch): in this process, a local
pool of worker processes, or Slurm jobs. Every launcher claims a run's lease before training it, so two
`repro run` processes (or hosts) never train one run twice; a run held elsewhere is waited for.
"""

from __future__ import annotations

import socket
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from repro import io, lease
from repro import runs as store
from repro.analysis import analyse
from repro.claims import get_kind
from repro.config import parse_set
from repro.engine.record import finite
from repro.errors import UserError
from repro.launch import LaunchOptions
from repro.launch.worker import BUSY, REUSED, placement, train_claimed
from repro.hints import prepare_command
from repro.views import Column, cli_console, show
from repro.experiments import (PlannedRun, get_experiment, load_registry, load_scales, manifest_facts, resolve,
                               scale_settings)

# Rough images/s of one 2-core CPU per scale, used by --dry-run until this machine has finished a run.
GUESS_IMAGES_PER_S = {"smoke": 1500.0, "demo": 2000.0, "subset": 40.0, "full": 10.0}
WAIT_POLL_S = 2.0


def plan(names: list[str], scale: str, *, data_dir, seeds, sets, experiments_dir=None, without_data=False):
    """Resolve every experiment; returns (registry, {experiment: [PlannedRun]}).

    without_data: plan from the scale's nominal sizes where the data is not prepared yet (a dry run)."""
    registry = load_registry(experiments_dir)
    scales = load_scales(experiments_dir)
    if names == ["all"]:
        names = list(registry)
    exps = [get_experiment(registry, n) for n in names]
    overrides = parse_set(list(sets or []))
    return registry, {e.name: resolve(e, scale, data_dir, seeds, overrides, scales=scales, without_data=without_data)
                      for e in exps}


def unique_runs(planned: dict[str, list[PlannedRun]]) -> list[PlannedRun]:
    """The first PlannedRun of each config hash, in plan order."""
    seen: dict[str, PlannedRun] = {}
    for runs in planned.values():
        for r in runs:
            seen.setdefault(r.config_hash, r)
    return list(seen.values())


def _images_per_run(run: PlannedRun) -> int:
    num_train = run.train_images or manifest_facts(run.cfg.data.dir)[2]
    n = min(run.cfg.data.train_limit, num_train) if run.cfg.data.train_limit else num_train
    return n * run.cfg.train.epochs


def measured_rates(runs_dir: Path) -> dict[tuple, float]:
    """images/s of finished runs on this host, keyed by (model, width, input size, stem) and by scale."""
    df = store.collect(runs_dir)
    if df.empty or "prov.images_per_s" not in df or "prov.host" not in df:
        return {}
    df = df[(df.status == "done") & (df["prov.host"] == socket.gethostname())]
    out: dict[tuple, float] = {}
    for _, r in df.iterrows():
        key = (r.get("model.name"), r.get("model.width"), r.get("model.input_size"), r.get("model.stem"))
        if finite(r["prov.images_per_s"]):
            out.setdefault(key, r["prov.images_per_s"])
            out.setdefault(("scale", r["scale"]), r["prov.images_per_s"])
    return out


def estimate(run: PlannedRun, rates: dict[tuple, float]) -> tuple[int, float, str]:
    """(images to process, seconds, where the rate came from) for one run."""
    images = _images_per_run(run)
    m = run.cfg.model
    rate = rates.get((m.name, m.width, m.input_size, m.stem))
    source = "measured"
    if rate is None:
        rate, source = rates.get(("scale", run.scale)), "measured at this scale"
    if rate is None:
        rate, source = GUESS_IMAGES_PER_S[run.scale], "rough guess"
    return images, images / rate, source


def _fmt_time(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


PLAN_COLUMNS = (Column("experiment"), Column("variant"), Column("seed", kind="num"),
                Column("hash", missing="after data"),
                Column("status"), Column("images", kind="num", fmt=lambda n: f"{n:,}"),
                Column("est_time", "est. time", kind="num", drop=1))


def plan_rows(planned: dict[str, list[PlannedRun]], runs_dir: Path) -> tuple[list[dict], dict]:
    """One row per planned run, and the totals (images and seconds to train, where the rates came from)."""
    rates = measured_rates(runs_dir)
    rows, total_images, total_s, sources, counted = [], 0, 0.0, set(), set()
    for exp, runs in planned.items():
        for r in runs:
            status = store.run_status(store.store_dir(runs_dir, r.config_hash)) if r.data_ready else "no data"
            images, seconds, source = estimate(r, rates)
            shared = r.config_hash in counted
            if status not in REUSED and not shared:
                total_images, total_s = total_images + images, total_s + seconds
                sources.add(source)
            counted.add(r.config_hash)
            note = "shared" if shared else ("reused" if status in REUSED else _fmt_time(seconds))
            rows.append({"experiment": exp, "variant": r.variant, "seed": r.seed,
                         "hash": r.config_hash if r.data_ready else None,
                         "status": status, "images": images, "est_time": note})
    totals = {"planned": len(rows), "distinct": len(counted), "images": total_images, "seconds": total_s,
              "sources": sorted(sources)}
    return rows, totals


def print_plan(planned: dict[str, list[PlannedRun]], runs_dir: Path, console: Console, fmt: str = "table") -> int:
    rows, t = plan_rows(planned, runs_dir)
    show(console, rows, PLAN_COLUMNS, fmt, title="planned runs")
    missing = sorted({(r.scale, r.cfg.data.dir) for runs in planned.values() for r in runs if not r.data_ready})
    notes = [f"{folder} is not prepared yet: planned from the {scale} scale's nominal dataset sizes "
             f"({_nominal_text(planned, folder)}); run hashes cover the data, so they are shown after "
             f"`{prepare_command(folder)}`, and these runs are not recorded under {runs_dir}."
             for scale, folder in missing]
    summary = (f"{t['planned']} planned runs, {t['distinct']} distinct; to train: {t['images']:,} training images, "
               f"about {_fmt_time(t['seconds'])} ({', '.join(t['sources']) or 'nothing to do'}; "
               "evaluation not included).")
    # plain and json are for scripts: the prose goes to stderr so that stdout parses
    out = console if fmt == "table" else cli_console(stderr=True)
    for line in notes + [summary]:
        out.print(line, markup=False)
    return 0


def _nominal_text(planned: dict[str, list[PlannedRun]], folder: str) -> str:
    r = next(r for runs in planned.values() for r in runs if r.cfg.data.dir == folder)
    return f"{r.train_images:,} training images, {r.cfg.model.num_classes} classes"


def _label(r: PlannedRun, users: dict[str, list[str]]) -> str:
    others = [u for u in users[r.config_hash] if u != r.experiment]
    extra = f" (shared with {', '.join(others)})" if others else ""
    return escape(f"{r.experiment}/{r.variant} seed {r.seed} ({r.config_hash}){extra}")


def _users(planned: dict[str, list[PlannedRun]]) -> dict[str, list[str]]:
    users: dict[str, list[str]] = defaultdict(list)
    for exp, runs in planned.items():
        for r in runs:
            if exp not in users[r.config_hash]:
                users[r.config_hash].append(exp)
    return users


def train_all(planned: dict[str, list[PlannedRun]], runs_dir: Path, *, progress: bool, console: Console,
              launch: LaunchOptions | None = None) -> dict[str, str]:
    """Train every distinct run not done yet with the chosen launcher; returns {config_hash: final status}.
    With Slurm and no --wait, the statuses are those at submission ("submitted", "pending", "running", ...)."""
    launch = launch or LaunchOptions()
    for runs in planned.values():
        for r in runs:
            store.ensure_run(runs_dir, r)
    users = _users(planned)
    todo = unique_runs(planned)
    if launch.launcher == "slurm":
        from repro.launch import slurm

        return slurm.submit_and_wait(todo, runs_dir, launch, labels={r.config_hash: _label(r, users) for r in todo},
                                     console=console, progress=progress)
    if launch.parallel > 1:
        from repro.launch.local import run_pool

        items = [(f"[{i}/{len(todo)}] {_label(r, users)}", store.store_dir(runs_dir, r.config_hash))
                 for i, r in enumerate(todo, 1)]
        return run_pool(items, launch.parallel, console=console, progress=progress)
    statuses: dict[str, str] = {}
    waiting: list[PlannedRun] = []
    for i, r in enumerate(todo, 1):
        status = _run_one(r, runs_dir, f"[{i}/{len(todo)}] {_label(r, users)}", progress, console)
        if status == BUSY:
            console.print(f"[{i}/{len(todo)}] {_label(r, users)}: running in another process; will wait")
            waiting.append(r)
        else:
            statuses[r.config_hash] = status
    while waiting:  # another process had them: wait for it, then finish them here if it stopped early
        r = waiting[0]
        run_dir = store.store_dir(runs_dir, r.config_hash)
        if store.is_locked(run_dir) or lease.holder(run_dir) is not None:
            time.sleep(WAIT_POLL_S)
            continue
        status = _run_one(r, runs_dir, _label(r, users), progress, console)
        if status != BUSY:
            statuses[r.config_hash] = status
            waiting.pop(0)
    return statuses


def _run_one(r: PlannedRun, runs_dir: Path, label: str, progress: bool, console: Console) -> str:
    """Train one run in this process under its claim; BUSY when another process holds it."""
    t0, trained = time.time(), []

    def started(status: str) -> None:
        trained.append(status)
        console.print(f"{label}: {'resuming' if status in ('interrupted', 'preempted') else 'training'}")

    run_dir = store.store_dir(runs_dir, r.config_hash)
    status = train_claimed(r.cfg, run_dir, progress=progress, where=placement("local"), on_start=started)
    if status == BUSY:
        return status
    record = store.read_result(run_dir)
    if not trained:
        console.print(f"{label}: {status}, reused")
        return status
    top1 = record.metrics.get("top1_err") if record else None
    extra = f", top-1 err {top1:.2f}%" if finite(top1) else ""
    if status == "failed":
        console.print(f"[red]failed[/] {escape(str(run_dir))}: {escape(str(record.error if record else None))}")
    console.print(f"{label}: {status} in {time.time() - t0:.1f} s{extra}")
    return status


def run_experiments(name_or_all: str, scale: str, *, data_dir=None, runs_dir=Path("runs"), seeds=None, sets=(),
                    dry_run: bool = False, progress: bool = True, console: Console | None = None,
                    experiments_dir=None, launch: LaunchOptions | None = None, fmt: str = "table") -> int:
    """Plan, train, analyse and summarise; returns the exit code (0 ok, 1 when a run failed). With Slurm and no
    wait, it returns once the jobs are submitted; the analyses run on a later `repro run` once the runs are done."""
    console = console or cli_console()
    runs_dir = Path(runs_dir)
    registry, planned = plan([name_or_all], scale, data_dir=data_dir, seeds=seeds, sets=sets,
                             experiments_dir=experiments_dir, without_data=dry_run)
    if dry_run:
        # Record each planned run's config (planned.json, status "pending") so that a run can also be trained
        # on several GPUs: `torchrun --nproc_per_node N -m repro.engine.distributed runs/store/<hash>`.
        # A run planned without its data has no hash yet: nothing to record.
        for r in (r for runs in planned.values() for r in runs if r.data_ready):
            store.ensure_run(runs_dir, r)
        return print_plan(planned, runs_dir, console, fmt)
    t0 = time.time()
    launch = launch or LaunchOptions()
    statuses = train_all(planned, runs_dir, progress=progress, console=console, launch=launch)
    if launch.launcher == "slurm" and not launch.wait and set(statuses.values()) - set(REUSED):
        console.print("runs are queued or running as Slurm jobs: `repro status` shows where they are; run this "
                      "command again (or with --wait) once they have ended to run the analyses")
        return 0
    for exp_name, runs in planned.items():
        try:
            summary = analyse(registry[exp_name], runs, runs_dir)
        except (KeyboardInterrupt, UserError):
            raise
        except Exception as e:  # an analysis bug must not hide the runs that did finish
            console.print(f"[red]analysis of {exp_name} failed[/]: {escape(f'{type(e).__name__}: {e}')}")
            statuses[f"analysis:{exp_name}"] = "failed"
            continue
        if summary:
            console.print(escape(f"{exp_name}: {summary}"))
    counts = defaultdict(int)
    for s in statuses.values():
        counts[s] += 1
    console.print(f"{len(statuses)} runs in {time.time() - t0:.0f} s: "
                  + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + f"; results under {runs_dir}")
    return 1 if set(counts) - set(REUSED) else 0  # anything not done or diverged: failed, cancelled, preempted, ...


LIST_COLUMNS = (Column("name"), Column("section"), Column("kind"),
                Column("claim", kind="prose", drop=3), Column("paper", kind="prose", drop=2),
                Column("runs_done", "runs done", kind="num"))


def list_rows(runs_dir: Path | str, scale: str, experiments_dir=None) -> list[dict]:
    """`repro list`: every experiment with section, claim, paper number and runs done at `scale`."""
    registry = load_registry(experiments_dir)
    scales = load_scales(experiments_dir)
    df = store.collect(runs_dir)
    rows = []
    for name, e in registry.items():
        paper = ", ".join(f"{k} {v:+g}" if get_kind(e.kind).signed_paper else f"{k} {v:g}"
                          for k, v in e.paper.items() if k != "note") or "qualitative"
        settings = scale_settings(e, scale, scales)
        expected = len(e.variants) * settings["seeds"]
        sub = df[(df.experiment == name) & (df.scale == scale)] if not df.empty else df
        done = int((sub.status == "done").sum()) if not sub.empty else 0
        rows.append({"name": name, "section": e.section, "kind": e.kind, "claim": e.claim, "paper": paper,
                     "runs_done": f"{done}/{expected}"})
    return rows


STATUS_COLOUR = {"done": "green", "diverged": "yellow", "failed": "red", "interrupted": "yellow", "running": "cyan",
                 "stale": "magenta", "pending": "blue", "requeued": "blue", "cancelled": "red", "preempted": "yellow"}
STATUS_COLUMNS = (Column("experiment"), Column("variant"), Column("seed", kind="num"), Column("scale", drop=1),
                  Column("hash"), Column("status", style=lambda s: STATUS_COLOUR.get(s, "white")),
                  Column("job", drop=2), Column("host", drop=4), Column("gpus", drop=5),
                  Column("epochs", kind="num", drop=3, fmt=lambda n: f"{n:.0f}"),
                  Column("top1_err", "top-1", kind="num", fmt=lambda x: f"{x:.2f}"),
                  Column("log", kind="prose", drop=6), Column("error", kind="prose", drop=7))


def status_rows(runs_dir: Path | str) -> list[dict[str, Any]]:
    """`repro status` data: one dict per run with its state, Slurm job (id, state, reason), host, GPUs, log."""
    df = store.collect(runs_dir)
    if df.empty:
        return []
    store_root = Path(runs_dir) / "store"
    slurm_jobs: dict[str, dict[str, str]] = {}
    recs = {h: io.read_json(store_root / h / "launch.json") for h in df.config_hash.unique()}
    if any(isinstance(r, dict) and r.get("job_id") for r in recs.values()):
        from repro.launch import slurm

        slurm_jobs = slurm.job_states([r["job_id"] for r in recs.values() if isinstance(r, dict) and r.get("job_id")])
    rows = []
    for _, r in df.iterrows():
        rec = recs.get(r.config_hash) if isinstance(recs.get(r.config_hash), dict) else {}
        status, reason = r.status, None
        if rec.get("job_id"):
            from repro.launch.slurm import run_state

            status, reason = run_state(store_root / r.config_hash, slurm_jobs)
        live = lease.holder(store_root / r.config_hash) or {}
        error = " ".join(x for x in (reason, r.error if isinstance(r.error, str) else None) if x)
        rows.append({
            "experiment": r.experiment, "variant": r.variant, "seed": int(r.seed), "scale": r.scale or "",
            "hash": r.config_hash, "status": status, "job": rec.get("job_id") or live.get("job_id") or "",
            "host": r.get("placement.host") or live.get("host") or "", "gpus": r.get("placement.gpus") or "",
            "log": r.get("placement.log") or rec.get("log") or "",
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

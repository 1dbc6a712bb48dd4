"""`repro run`, `repro list`, `repro status`: plan every run of the chosen experiments, train what is missing, analyse.

Runs are planned per experiment, then deduplicated by config hash so that a run several experiments share is
trained once. A done or diverged run is reused, an interrupted one resumes (the engine continues from its
checkpoint), a failed one is tried again. A run whose lock another process holds is skipped and waited for at the
end, so two `repro run` processes on the same experiments never train one run twice.
"""

from __future__ import annotations

import socket
import time
import traceback
from collections import defaultdict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from repro import runs as store
from repro.analysis import analyse
from repro.claims import get_kind
from repro.config import parse_set
from repro.errors import UserError
from repro.experiments import (PlannedRun, get_experiment, load_registry, load_scales, manifest_facts, resolve,
                               scale_settings)

# Rough images/s of one 2-core CPU per scale, used by --dry-run until this machine has finished a run.
GUESS_IMAGES_PER_S = {"smoke": 1500.0, "demo": 2000.0, "subset": 40.0, "full": 10.0}
REUSED = ("done", "diverged")


def plan(names: list[str], scale: str, *, data_dir, seeds, sets, experiments_dir=None):
    """Resolve every experiment; returns (registry, {experiment: [PlannedRun]})."""
    registry = load_registry(experiments_dir)
    scales = load_scales(experiments_dir)
    if names == ["all"]:
        names = list(registry)
    exps = [get_experiment(registry, n) for n in names]
    overrides = parse_set(list(sets or []))
    return registry, {e.name: resolve(e, scale, data_dir, seeds, overrides, scales=scales) for e in exps}


def unique_runs(planned: dict[str, list[PlannedRun]]) -> list[PlannedRun]:
    """The first PlannedRun of each config hash, in plan order."""
    seen: dict[str, PlannedRun] = {}
    for runs in planned.values():
        for r in runs:
            seen.setdefault(r.config_hash, r)
    return list(seen.values())


def _images_per_run(run: PlannedRun) -> int:
    _, _, num_train = manifest_facts(run.cfg.data.dir)
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
        if store.finite(r["prov.images_per_s"]):
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


def print_plan(planned: dict[str, list[PlannedRun]], runs_dir: Path, console: Console) -> int:
    table = Table(title="planned runs", show_lines=False)
    for col in ("experiment", "variant", "seed", "hash", "status", "images", "est. time"):
        table.add_column(col, justify="right" if col in ("seed", "images", "est. time") else "left")
    rates = measured_rates(runs_dir)
    total_images, total_s, sources, counted = 0, 0.0, set(), set()
    for exp, runs in planned.items():
        for r in runs:
            status = store.run_status(store.store_dir(runs_dir, r.config_hash))
            images, seconds, source = estimate(r, rates)
            shared = r.config_hash in counted
            if status not in REUSED and not shared:
                total_images, total_s = total_images + images, total_s + seconds
                sources.add(source)
            counted.add(r.config_hash)
            note = "shared" if shared else ("reused" if status in REUSED else _fmt_time(seconds))
            table.add_row(exp, r.variant, str(r.seed), r.config_hash, status, f"{images:,}", note)
    console.print(table)
    n_unique = len(counted)
    console.print(f"{sum(map(len, planned.values()))} planned runs, {n_unique} distinct; to train: "
                  f"{total_images:,} training images, about {_fmt_time(total_s)} "
                  f"({', '.join(sorted(sources)) or 'nothing to do'}; evaluation not included).")
    return 0


def _train(run: PlannedRun, run_dir: Path, progress: bool, console: Console) -> str:
    """Train one run under its lock (already held); returns its final status."""
    # the engine loads torch: only when something trains, not for `repro list` or `--dry-run` (start-up time)
    from repro.engine import fit

    try:
        record = fit(run.cfg, run_dir, progress=progress)
        return record.get("status", "failed") if isinstance(record, dict) else "failed"
    except (KeyboardInterrupt, UserError):
        raise
    except Exception as e:  # a bug or a resource error in one run must not take down the sweep
        (run_dir / "error.log").write_text(traceback.format_exc())
        result = store.read_result(run_dir) or {}
        if result.get("status") != "failed":
            store.write_json(run_dir / "result.json", {
                "format": store.RESULT_FORMAT, "status": "failed",
                "error": f"{type(e).__name__}: {e}".splitlines()[0][:300] + f" (traceback in {run_dir}/error.log)",
                "config": result.get("config") or store.read_json(run_dir / "planned.json").get("config"),
                "config_hash": run.config_hash, "epochs_done": result.get("epochs_done", 0),
                "iterations": result.get("iterations", 0), "metrics": {}, "provenance": {}})
        console.print(f"[red]failed[/] {escape(str(run_dir))}: {escape(f'{type(e).__name__}: {e}')}")
        return "failed"


def _label(r: PlannedRun, users: dict[str, list[str]]) -> str:
    others = [u for u in users[r.config_hash] if u != r.experiment]
    extra = f" (shared with {', '.join(others)})" if others else ""
    return escape(f"{r.experiment}/{r.variant} seed {r.seed} ({r.config_hash}){extra}")


def train_all(planned: dict[str, list[PlannedRun]], runs_dir: Path, *, progress: bool,
              console: Console) -> dict[str, str]:
    """Train every distinct run not done yet; returns {config_hash: final status}."""
    for runs in planned.values():
        for r in runs:
            store.ensure_run(runs_dir, r)
    users: dict[str, list[str]] = defaultdict(list)
    for exp, runs in planned.items():
        for r in runs:
            if exp not in users[r.config_hash]:
                users[r.config_hash].append(exp)
    todo = unique_runs(planned)
    statuses: dict[str, str] = {}
    waiting: list[PlannedRun] = []
    for i, r in enumerate(todo, 1):
        run_dir = store.store_dir(runs_dir, r.config_hash)
        with store.run_lock(run_dir) as got:
            if not got:
                console.print(f"[{i}/{len(todo)}] {_label(r, users)}: running in another process; will wait")
                waiting.append(r)
                continue
            statuses[r.config_hash] = _run_one(r, run_dir, f"[{i}/{len(todo)}] {_label(r, users)}", progress,
                                               console)
    for r in waiting:  # another process had them: wait for it, then finish them here if it stopped early
        run_dir = store.store_dir(runs_dir, r.config_hash)
        with store.run_lock(run_dir, wait=True):
            statuses[r.config_hash] = _run_one(r, run_dir, _label(r, users), progress, console)
    return statuses


def _run_one(r: PlannedRun, run_dir: Path, label: str, progress: bool, console: Console) -> str:
    status = store.run_status(run_dir, check_lock=False)  # we hold the lock
    if status in REUSED:
        console.print(f"{label}: {status}, reused")
        return status
    verb = "resuming" if status == "interrupted" else "training"
    console.print(f"{label}: {verb}")
    t0 = time.time()
    status = _train(r, run_dir, progress, console)
    result = store.read_result(run_dir) or {}
    top1 = (result.get("metrics") or {}).get("top1_err")
    extra = f", top-1 err {top1:.2f}%" if store.finite(top1) else ""
    console.print(f"{label}: {status} in {time.time() - t0:.1f} s{extra}")
    return status


def run_experiments(name_or_all: str, scale: str, *, data_dir=None, runs_dir=Path("runs"), seeds=None, sets=(),
                    dry_run: bool = False, progress: bool = True, console: Console | None = None,
                    experiments_dir=None) -> int:
    """Plan, train, analyse and summarise; returns the exit code (0 ok, 1 when a run failed)."""
    console = console or Console()
    runs_dir = Path(runs_dir)
    registry, planned = plan([name_or_all], scale, data_dir=data_dir, seeds=seeds, sets=sets,
                             experiments_dir=experiments_dir)
    if dry_run:
        # Record each planned run's config (planned.json, status "pending") so that a run can also be trained
        # on several GPUs: `torchrun --nproc_per_node N -m repro.engine.distributed runs/store/<hash>`.
        for r in (r for runs in planned.values() for r in runs):
            store.ensure_run(runs_dir, r)
        return print_plan(planned, runs_dir, console)
    t0 = time.time()
    statuses = train_all(planned, runs_dir, progress=progress, console=console)
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
    return 1 if counts.get("failed") or counts.get("interrupted") else 0


def list_table(runs_dir: Path | str, scale: str, experiments_dir=None) -> Table:
    """`repro list`: every experiment with section, claim, paper number and runs done at `scale`."""
    registry = load_registry(experiments_dir)
    scales = load_scales(experiments_dir)
    df = store.collect(runs_dir)
    table = Table(title=f"experiments (runs done at scale {scale})")
    for col in ("name", "section", "kind", "claim", "paper", "runs done"):
        table.add_column(col, overflow="fold")
    for name, e in registry.items():
        paper = ", ".join(f"{k} {v:+g}" if get_kind(e.kind).signed_paper else f"{k} {v:g}"
                          for k, v in e.paper.items() if k != "note") or "qualitative"
        settings = scale_settings(e, scale, scales)
        expected = len(e.variants) * settings["seeds"]
        sub = df[(df.experiment == name) & (df.scale == scale)] if not df.empty else df
        done = int((sub.status == "done").sum()) if not sub.empty else 0
        table.add_row(name, e.section, e.kind, e.claim, paper, f"{done}/{expected}")
    return table


def status_table(runs_dir: Path | str) -> Table:
    """`repro status`: every run with its state, and the error of those that failed."""
    df = store.collect(runs_dir)
    table = Table(title=f"runs under {runs_dir}")
    for col in ("experiment", "variant", "seed", "scale", "hash", "status", "epochs", "top-1 err", "error"):
        table.add_column(col, overflow="fold")
    if df.empty:
        table.caption = "no runs yet: `repro run all --scale demo`"
        return table
    colour = {"done": "green", "diverged": "yellow", "failed": "red", "interrupted": "yellow", "running": "cyan",
              "stale": "magenta"}
    for _, r in df.iterrows():
        st = r.status
        table.add_row(r.experiment, r.variant, str(r.seed), str(r.scale or ""), r.config_hash,
                      f"[{colour.get(st, 'white')}]{st}[/]",
                      "" if not store.finite(r.epochs_done) else f"{r.epochs_done:.0f}",
                      f"{r.top1_err:.2f}" if store.finite(r.top1_err) else "",
                      str(r.error) if isinstance(r.error, str) else "")
    counts = df.status.value_counts().to_dict()
    table.caption = ", ".join(f"{n} {s}" for s, n in counts.items())
    return table

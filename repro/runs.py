"""The run store: one directory per resolved config, seen by each experiment through a symlink, and read back as pandas.

Layout under a runs folder:
    store/<config_hash>/                         the real run directory (engine files + planned.json + .lock)
    <experiment>/<variant>/seed<k>-<hash>        -> ../../store/<hash>  (relative symlink)
    <experiment>/analysis-<scale>.json, .npz     post-training analyses, one per scale
A run shared by several experiments (the baseline) therefore exists, and is trained, once. A lease file
(`store/<hash>/.lease`, see repro.lease) keeps two processes, also on two hosts over a shared filesystem, off one
run; `fcntl.flock` on `store/<hash>/.lock` adds a fast path on one machine. A live lease or a held lock is how
`status` tells "running". `launch.json` says how the run was submitted (launcher, Slurm job id, log) and
`placement.json` where it trained (host, GPUs, Slurm job id, log).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd

from repro import io, lease
from repro.config import flatten, from_dict, to_dict
from repro.engine.record import METRICS, RESULT_FILE, STATUSES as RECORD_STATUSES, RunRecord
from repro.errors import UserError

STATUSES = (*RECORD_STATUSES, "running", "pending", "stale")
LINK_RE = re.compile(r"^seed(\d+)-([0-9a-f]+)$")
BASE_COLUMNS = ["experiment", "variant", "seed", "scale", "status", "error", "run_dir", "config_hash",
                "epochs_done", "iterations"]
METRIC_COLUMNS = list(METRICS)  # the record's final metrics, one column each
PLACEMENT_KEYS = ("launcher", "host", "gpus", "slurm_job_id", "log", "tasks", "threads")


def store_dir(runs_dir: Path, config_hash: str) -> Path:
    return Path(runs_dir) / "store" / config_hash


def link_path(runs_dir: Path, experiment: str, variant: str, seed: int, config_hash: str) -> Path:
    return Path(runs_dir) / experiment / variant / f"seed{seed}-{config_hash}"


def ensure_run(runs_dir: Path, run, *, planned: dict[str, Any] | None = None) -> Path:
    """Create the store directory and the experiment's symlink for a PlannedRun; return the store directory.

    `planned.json` records the resolved config and scale so that a run that never started still shows up with
    its settings. Creating the link with `os.symlink` is atomic, so two processes can race here safely.
    """
    real = store_dir(runs_dir, run.config_hash)
    real.mkdir(parents=True, exist_ok=True)
    if not (real / "planned.json").exists():
        io.write_json(real / "planned.json", planned or {"scale": run.scale, "config": to_dict(run.cfg),
                                                      "config_hash": run.config_hash})
    link = link_path(runs_dir, run.experiment, run.variant, run.seed, run.config_hash)
    link.parent.mkdir(parents=True, exist_ok=True)
    target = os.path.relpath(real, link.parent)
    try:
        os.symlink(target, link, target_is_directory=True)
    except FileExistsError:
        if os.readlink(link) != target:
            raise UserError(f"{link} exists and does not point to {target}; remove it and run again") from None
    return real


@contextmanager
def run_lock(run_dir: Path, *, wait: bool = False) -> Iterator[bool]:
    """Hold the run's lock for the block; yields False (without waiting) when another process holds it. Where the
    filesystem refuses locks (some NFS mounts: ENOLCK) it yields True unlocked: the lease is what keeps runs apart."""
    fd = os.open(Path(run_dir) / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        except OSError:
            yield True
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def is_locked(run_dir: Path) -> bool:
    """True when some process (this one included, through another open) holds the run's lock."""
    if not (Path(run_dir) / ".lock").exists():
        return False
    with run_lock(run_dir) as got:
        return not got


def read_result(run_dir: Path) -> RunRecord | None:
    """The run's record, or None when it has none of the current format."""
    return RunRecord.read(run_dir)


def run_status(run_dir: Path, *, check_lock: bool = True) -> str:
    """done / diverged / failed / interrupted / preempted / running / pending / stale for one run directory."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return "pending"
    if check_lock and (is_locked(run_dir) or lease.holder(run_dir) is not None):
        return "running"
    raw = io.read_json(run_dir / RESULT_FILE)  # None when missing or cut short by a kill
    if raw is not None:
        record = RunRecord.from_dict(raw)
        return record.status if record is not None else "stale"  # a record of another format
    if any((run_dir / f).exists() for f in ("checkpoint.pt", "checkpoint.prev.pt", "metrics.jsonl")):
        return "interrupted"  # killed without a record (kill -9): the checkpoint lets it resume
    return "pending"


def iter_links(runs_dir: Path) -> Iterator[tuple[str, str, int, str, Path]]:
    """(experiment, variant, seed, config_hash, link) for every run link, in a stable order."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return
    for exp in sorted(p for p in runs_dir.iterdir() if p.is_dir() and p.name != "store"):
        for variant in sorted(p for p in exp.iterdir() if p.is_dir() and not p.is_symlink()):
            for link in sorted(variant.iterdir()):
                m = LINK_RE.match(link.name)
                if m:
                    yield exp.name, variant.name, int(m.group(1)), m.group(2), link


def _config_columns(config: Any) -> dict[str, Any]:
    try:
        return flatten(from_dict(config))
    except Exception:  # a config from another format version: keep what is there, never crash
        if isinstance(config, dict):
            return {f"{s}.{k}": v for s, d in config.items() if isinstance(d, dict) for k, v in d.items()}
        return {}


def _row(experiment: str, variant: str, seed: int, config_hash: str, link: Path) -> dict[str, Any]:
    real = link.resolve()
    status = run_status(real)
    record = read_result(real)
    result = record.to_dict() if record is not None else {}
    planned = io.read_json(real / "planned.json") or {}
    row: dict[str, Any] = {"experiment": experiment, "variant": variant, "seed": seed,
                           "scale": planned.get("scale"), "status": status, "error": result.get("error"),
                           "run_dir": str(link), "config_hash": config_hash,
                           "epochs_done": result.get("epochs_done"), "iterations": result.get("iterations")}
    metrics = result.get("metrics") if status == "done" and isinstance(result.get("metrics"), dict) else {}
    for key in METRIC_COLUMNS:
        row[key] = metrics.get(key)
    row.update({k: v for k, v in metrics.items() if k not in row})
    lrn = result.get("lrn_strength") if status == "done" else None
    for layer, stats in (lrn or {}).items():  # lrn.conv1.mean, lrn.conv1.p99, ..., lrn.alpha_mode
        if isinstance(stats, dict):
            row.update({f"lrn.{layer}.{k}": v for k, v in stats.items()})
        else:
            row[f"lrn.{layer}"] = stats
    config = result.get("config") if status != "stale" and result.get("config") else planned.get("config")
    row.update(_config_columns(config))
    placement = io.read_json(real / "placement.json") or {}
    for key in PLACEMENT_KEYS:
        row[f"placement.{key}"] = placement.get(key)
    prov = result.get("provenance") if isinstance(result.get("provenance"), dict) else {}
    for key, value in prov.items():
        row[f"prov.{key}"] = json.dumps(value, sort_keys=True) if isinstance(value, dict) else value
    return row


def collect(runs_dir: Path | str) -> pd.DataFrame:
    """One row per (experiment, variant, seed) link; metrics are NaN unless the run is done."""
    rows = [_row(*item) for item in iter_links(Path(runs_dir))]
    df = pd.DataFrame(rows, columns=None if rows else BASE_COLUMNS + METRIC_COLUMNS)
    for col in BASE_COLUMNS + METRIC_COLUMNS:
        if col not in df:
            df[col] = None
    for col in METRIC_COLUMNS + ["epochs_done", "iterations"]:
        df[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
    first = BASE_COLUMNS + METRIC_COLUMNS
    return df[first + [c for c in df.columns if c not in first]]


def write_results(runs_dir: Path | str, out: Path | str, format: str = "csv") -> Path:
    """Write `collect(runs_dir)` as CSV or Parquet, atomically; returns the path written."""
    runs_dir, out = Path(runs_dir), Path(out)
    if not runs_dir.is_dir():
        raise UserError(f"{runs_dir}: no runs folder; run `repro run all --scale demo` first or pass --runs")
    if format not in ("csv", "parquet"):
        raise UserError(f"--format {format!r}: choose csv or parquet")
    if format == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise UserError("--format parquet needs pyarrow: `.venv/bin/pip install pyarrow`, or use --format csv")
    df = collect(runs_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    with io.atomic_path(out) as tmp:
        if format == "csv":
            df.to_csv(tmp, index=False)
        else:
            df.to_parquet(tmp, index=False)
    return out


def load_curves(run_dir: Path | str) -> pd.DataFrame:
    """The training curve (`curve.jsonl`): iteration, epoch, train_loss, train_top1_err."""
    rows = io.read_jsonl(Path(run_dir) / "curve.jsonl")
    return pd.DataFrame(rows, columns=None if rows else ["iteration", "epoch", "train_loss", "train_top1_err"])


def load_metrics(run_dir: Path | str) -> pd.DataFrame:
    """Per-epoch metrics (`metrics.jsonl`)."""
    rows = io.read_jsonl(Path(run_dir) / "metrics.jsonl")
    return pd.DataFrame(rows, columns=None if rows else ["epoch", "iteration", "train_loss", "train_top1_err",
                                                         "val_top1_err", "val_top5_err", "lr", "images_per_s",
                                                         "seconds", "data_wait_s"])


def analysis_paths(exp_dir: Path, scale: str | None) -> tuple[Path, Path]:
    """The JSON (numbers) and npz (figure arrays) of an experiment's analysis at one scale."""
    stem = f"analysis-{scale}" if scale else "analysis"
    return exp_dir / f"{stem}.json", exp_dir / f"{stem}.npz"


def load_analyses(runs_dir: Path | str) -> dict[str, dict[str, dict[str, Any]]]:
    """`{experiment: {scale: analysis}}` for every analysis under `runs_dir`."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    runs_dir = Path(runs_dir)
    if runs_dir.is_dir():
        for path in sorted(runs_dir.glob("*/analysis*.json")):
            data = io.read_json(path)
            if isinstance(data, dict):
                out.setdefault(path.parent.name, {})[str(data.get("scale"))] = data
    return out


def load_analysis_arrays(runs_dir: Path | str, experiment: str, scale: str | None = None) -> dict[str, np.ndarray]:
    """Figure data an analysis saved beside its JSON, loaded without pickle (empty when absent or unreadable)."""
    try:
        with np.load(analysis_paths(Path(runs_dir) / experiment, scale)[1], allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError):
        return {}

"""The runs folder read back as pandas: one row per (experiment, variant, seed) with its status, final metrics,
config, placement, provenance and, for an imported run, its origin; the per-run curves and metrics; the experiments'
analyses.

Where each file lies is repro.rundir's; this module only reads. A run `repro import` kept beside a local run of its
config (repro.bundle_merge) is a row of status `conflict`, with its numbers, unless no folder before it holds a
finished run: one seed of one config never counts twice.
"""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from repro import io
from repro.config import flatten, from_dict
from repro.record import METRICS
from repro.errors import UserError
from repro.rundir import Job, RunDir, analysis_files, analysis_paths, iter_links

BASE_COLUMNS = ["experiment", "variant", "seed", "scale", "status", "error", "run_dir", "config_hash",
                "epochs_done", "iterations"]
METRIC_COLUMNS = list(METRICS)  # the record's final metrics, one column each
PLACEMENT_KEYS = ("launcher", "host", "gpus", "slurm_job_id", "log", "tasks", "threads")
ORIGIN_KEYS = ("bundle", "bundle_sha256", "host", "created", "imported", "beside")  # an imported run's origin record
ORIGIN_COLUMNS = [f"origin.{key}" for key in ORIGIN_KEYS]


def _config_columns(config: Any) -> dict[str, Any]:
    try:
        return flatten(from_dict(config))
    except Exception:  # a config from another format version: keep what is there, never crash
        if isinstance(config, dict):
            return {f"{s}.{k}": v for s, d in config.items() if isinstance(d, dict) for k, v in d.items()}
        return {}


def _row(experiment: str, variant: str, seed: int, config_hash: str, link: Path,
         jobs: dict[RunDir, Job] | None) -> dict[str, Any]:
    real = RunDir(link.resolve())
    job = (jobs or {}).get(real)
    status, reason = real.status(job)
    record = real.read_record()
    result = record.to_dict() if record is not None else {}
    planned = real.read_planned() or {}
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
    placement = real.read_placement()
    for key in PLACEMENT_KEYS:
        row[f"placement.{key}"] = placement.get(key)
    if jobs is not None:
        launch = real.read_launch()
        row["job.id"], row["job.reason"] = (job.id if job else launch.get("job_id")), reason
        row["launch.log"] = launch.get("log")
    prov = result.get("provenance") if isinstance(result.get("provenance"), dict) else {}
    for key, value in prov.items():
        row[f"prov.{key}"] = json.dumps(value, sort_keys=True) if isinstance(value, dict) else value
    _origin_columns(real, row)
    return row


def _judged_instead(real: RunDir, main_hash: str) -> RunDir | None:
    """For a run kept beside others of its config: the first folder before it (the local run's, then the kept ones
    by name) that holds a finished run, which is judged instead; None when this run is the first."""
    store = real.path.parent
    for folder in [store / main_hash, *sorted(store.glob(f"{main_hash}@*"))]:
        if folder == real.path:
            return None
        record = RunDir(folder).read_record()
        if record is not None and record.finished:
            return RunDir(folder)
    return None


def _origin_columns(real: RunDir, row: dict[str, Any]) -> None:
    """origin.* from an imported run's origin record; a kept-beside run that is not judged becomes `conflict`."""
    origin = io.read_json(real.origin)
    origin = origin if isinstance(origin, dict) else {}
    row.update({col: origin.get(key) for key, col in zip(ORIGIN_KEYS, ORIGIN_COLUMNS)})
    beside = origin.get("beside")
    if isinstance(beside, str) and row["status"] == "done" and (other := _judged_instead(real, beside)):
        row["status"] = "conflict"
        row["error"] = (f"same config as store/{other.path.name} with other results (from {origin.get('bundle')}, "
                        f"bundled on {origin.get('host')}); not judged: delete store/{real.path.name} or "
                        f"store/{other.path.name}, with its links, to choose")


def collect(runs_dir: Path | str, jobs: dict[RunDir, Job] | None = None) -> pd.DataFrame:
    """One row per (experiment, variant, seed) link; metrics are NaN unless the run is done. With `jobs` (a
    launcher's job per run), each status folds its job in and the rows gain `job.id` and `job.reason`."""
    rows = [_row(*item, jobs) for item in iter_links(Path(runs_dir))]
    df = pd.DataFrame(rows, columns=None if rows else BASE_COLUMNS + METRIC_COLUMNS + ORIGIN_COLUMNS)
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
            import pyarrow  # noqa: F401  (a dependency of repro; missing only from a broken installation)
        except ImportError as e:
            raise UserError(f"--format parquet: pyarrow does not import ({e}); reinstall with "
                            f"`.venv/bin/pip install -e .`, or use --format csv") from None
    df = collect(runs_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    with io.atomic_path(out) as tmp:
        if format == "csv":
            df.to_csv(tmp, index=False)
        else:
            _one_type_per_column(df).to_parquet(tmp, index=False)
    return out


def _one_type_per_column(df: pd.DataFrame) -> pd.DataFrame:
    """Parquet holds one type per column: a column whose runs recorded a value as text in one and as a number or
    flag in another (records of other versions, metrics a kind adds) is written as text."""
    def kind(v: Any) -> str:
        return "number" if isinstance(v, (int, float)) and not isinstance(v, bool) else type(v).__name__

    out = df.copy()
    for col in out.columns[out.dtypes == object]:
        present = out[col][out[col].notna()]
        if len({kind(v) for v in present}) > 1:
            out[col] = out[col].map(lambda v: v if v is None or (isinstance(v, float) and math.isnan(v)) else str(v))
    return out


def load_curves(run_dir: Path | str) -> pd.DataFrame:
    """The training curve: iteration, epoch, train_loss, train_top1_err."""
    rows = RunDir(run_dir).curve_rows()
    return pd.DataFrame(rows, columns=None if rows else ["iteration", "epoch", "train_loss", "train_top1_err"])


def load_metrics(run_dir: Path | str) -> pd.DataFrame:
    """Per-epoch metrics."""
    rows = RunDir(run_dir).metric_rows()
    return pd.DataFrame(rows, columns=None if rows else ["epoch", "iteration", "train_loss", "train_top1_err",
                                                         "val_top1_err", "val_top5_err", "lr", "images_per_s",
                                                         "seconds", "data_wait_s"])


def load_analyses(runs_dir: Path | str) -> dict[str, dict[str, dict[str, Any]]]:
    """`{experiment: {scale: analysis}}` for every analysis under `runs_dir`."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for experiment, path in analysis_files(runs_dir):
        data = io.read_json(path)
        if isinstance(data, dict):
            out.setdefault(experiment, {})[str(data.get("scale"))] = data
    return out


def load_analysis_arrays(runs_dir: Path | str, experiment: str, scale: str | None = None) -> dict[str, np.ndarray]:
    """Figure data an analysis saved beside its JSON, loaded without pickle (empty when absent or unreadable)."""
    try:
        with np.load(analysis_paths(runs_dir, experiment, scale)[1], allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError):
        return {}

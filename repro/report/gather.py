"""Read what the figures need from run directories: per-epoch metrics, training curves, analysis arrays.

The run table itself comes from `repro.runs.collect`; this module only opens the files named in the run record
contract (metrics.jsonl, curve.jsonl, runs/<experiment>/analysis.npz) and tolerates runs that lack them.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd


def run_path(run_dir, runs_dir: Path) -> Path | None:
    if not isinstance(run_dir, str) or not run_dir:
        return None
    p = Path(run_dir)
    if p.is_absolute() or p.exists():
        return p
    return Path(runs_dir) / p


def read_jsonl(path: Path) -> pd.DataFrame:
    """Lines of a JSON-lines file; a torn last line (a run killed mid-write) is skipped, not fatal."""
    rows = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    except OSError:
        return pd.DataFrame()
    return pd.DataFrame([r for r in rows if isinstance(r, dict)])


def stack(rows: pd.DataFrame, runs_dir: Path, filename: str, label_col: str = "variant") -> pd.DataFrame:
    """Concatenate `filename` (metrics.jsonl or curve.jsonl) over the runs in `rows`, tagged by variant and seed."""
    parts = []
    for _, r in rows.iterrows():
        p = run_path(r.get("run_dir"), runs_dir)
        if p is None:
            continue
        d = read_jsonl(p / filename)
        if d.empty:
            continue
        d[label_col] = r.get(label_col)
        d["seed"] = r.get("seed")
        parts.append(d)
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def load_npz(path: Path) -> dict | None:
    """Arrays of an analysis.npz, loaded without pickle; None when absent or unreadable."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError):
        return None


def pick(arrays: dict | None, *names: str):
    """The first array of `arrays` whose key is one of `names`."""
    for n in names:
        if arrays and n in arrays:
            return arrays[n]
    return None

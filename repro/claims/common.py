"""Helpers every claim kind uses: the claim's per-seed values, the best variant of a sweep group, paper numbers."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from repro import runs as store

ERROR_METRICS = ("top1_err", "top5_err", "top1_err_10crop", "top5_err_10crop", "best_val_top1_err",
                 "train_top1_err", "train_loss")


def paper_numbers(exp) -> dict[str, float]:
    return {k: float(v) for k, v in (exp.paper or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def by_seed(rows: pd.DataFrame, variants, metric: str) -> pd.Series:
    """Values of `metric` of finished runs of `variants`, indexed by seed (NaN when the column is absent)."""
    sub = rows[rows["variant"].isin(list(variants)) & (rows["status"] == "done")]
    if metric not in sub:
        return pd.Series(dtype=float)
    s = pd.to_numeric(sub[metric], errors="coerce")
    s.index = pd.to_numeric(sub["seed"], errors="coerce")
    return s.groupby(level=0).mean()


def groups_of(exp) -> dict[str, tuple[str, ...]]:
    groups = getattr(exp, "groups", None) or {}
    return {g: tuple(v) for g, v in groups.items()} or {v: (v,) for v in exp.variants}


def best_variant(rows: pd.DataFrame, members, metric: str) -> str:
    """Of a sweep group, the variant with the lowest median `metric` over finished runs (never-reached = worst)."""
    if len(members) == 1:
        return members[0]
    scores = {}
    for v in members:
        s = by_seed(rows, [v], metric)
        scores[v] = float(s.fillna(np.inf).median()) if len(s) else math.inf
    return min(members, key=lambda v: (scores[v], members.index(v)))


def first_below(curve: pd.DataFrame, threshold: float, strict: bool = True) -> float:
    """The first iteration of one run's curve whose training error is below (not strict: at or below) `threshold`
    (NaN: never)."""
    err = pd.to_numeric(curve["train_top1_err"], errors="coerce")
    hit = curve[err < threshold] if strict else curve[err <= threshold]
    return float(hit["iteration"].iloc[0]) if len(hit) else math.nan


def iters_below(curves: pd.DataFrame, variant: str, threshold: float, strict: bool = True) -> pd.Series:
    """Per seed of `variant` in stacked curves: `first_below`."""
    sub = curves[curves["variant"] == variant] if len(curves) else curves
    out = {seed: first_below(c, threshold, strict) for seed, c in (sub.groupby("seed") if len(sub) else [])}
    return pd.Series(out, dtype=float)


def judge_setting(exp, key: str, default=None):
    """A value of the claim's `[judge]` table (its TOML), or `default`."""
    return (getattr(exp, "judge", None) or {}).get(key, default)


def run_path(run_dir, runs_dir) -> Path | None:
    """The directory of a run-table row's `run_dir` (relative ones are under `runs_dir`)."""
    if not isinstance(run_dir, str) or not run_dir:
        return None
    p = Path(run_dir)
    if p.is_absolute() or p.exists() or runs_dir is None:
        return p
    return Path(runs_dir) / p


def stack(rows: pd.DataFrame, runs_dir, what: str) -> pd.DataFrame:
    """The training curves (`what` "curve") or per-epoch metrics ("metrics") of the runs in `rows`, concatenated
    and tagged by variant and seed."""
    load = {"curve": store.load_curves, "metrics": store.load_metrics}[what]
    parts = []
    for _, r in rows.iterrows():
        p = run_path(r.get("run_dir"), runs_dir)
        d = load(p) if p is not None else pd.DataFrame()
        if d.empty:
            continue
        d["variant"] = r.get("variant")
        d["seed"] = r.get("seed")
        parts.append(d)
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()

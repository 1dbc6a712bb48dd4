"""Tables laid out like the paper's Tables 1 and 2, published reproductions beside them, and provenance per run.

Published numbers are transcribed from the paper and from the reproductions listed in PAPER.md (accuracies turned
into error rates: error = 100 - accuracy). Every function returns plain lists of dicts for the template.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pandas as pd

from repro.claims import verdicts as V
from repro.scales import largest_first

# (model, top-1 err, top-5 err, source) -- the paper's Table 2, ILSVRC-2012 validation unless noted
TABLE2_PAPER = [
    ("SIFT + FVs [7]", None, 26.2, "paper, Table 2 (test set)"),
    ("1 CNN", 40.7, 18.2, "paper, Table 2"),
    ("5 CNNs", 38.1, 16.4, "paper, Table 2"),
    ("1 CNN* (pre-trained on Fall 2011)", 39.0, 16.6, "paper, Table 2"),
    ("7 CNNs*", 36.7, 15.4, "paper, Table 2"),
]
REPRODUCTIONS = [
    ("torchvision AlexNet weights (one tower, no LRN)", 100 - 56.522, 100 - 79.066, "torchvision, 1 crop"),
    ("Caffe bvlc_alexnet", 100 - 57.1, 100 - 80.2, "Caffe model zoo, centre crop 227"),
    ("cuda-convnet2, one GPU", 100 - 57.45, 100 - 80.19, "cuda-convnet2, 1 crop"),
    ("cuda-convnet2, one GPU, 10 views", 100 - 59.58, 100 - 81.85, "cuda-convnet2, 10 views"),
]
# the paper's Table 1, ILSVRC-2010 test
TABLE1_PAPER = [
    ("Sparse coding [2]", 47.1, 28.2, "paper, Table 1"),
    ("SIFT + FVs [24]", 45.7, 25.7, "paper, Table 1"),
    ("CNN", 37.5, 17.0, "paper, Table 1 (ten-crop averaging)"),
]
PROVENANCE_COLUMNS = [
    ("run", "run_dir"), ("variant", "variant"), ("seed", "seed"), ("status", "status"),
    ("config hash", "config_hash"), ("trained on", "prov.device"), ("finished", "prov.finished"),
    ("bundle", "origin.bundle"), ("git commit", "prov.git_commit"), ("packages", "prov.packages"),
    ("data manifest", "prov.data_manifest_hash"), ("backend", "prov.data_backend"),
    ("wall time (s)", "prov.wall_time_s"),
]


def fmt(x, digits: int = 1) -> str:
    """A number for the page; missing values are shown as an em dash, never as 0."""
    if x is None:
        return "\u2014"
    try:
        v = float(x)
    except (TypeError, ValueError):
        return str(x)
    return "\u2014" if not math.isfinite(v) else f"{v:.{digits}f}"


def _measured(df: pd.DataFrame, experiment: str, metric: str) -> tuple[str, str]:
    """Mean and seed count of a metric over finished runs of one experiment, at its largest scale with one."""
    rows = df[(df["experiment"] == experiment) & (df["status"] == "done")] if "experiment" in df else df.iloc[0:0]
    present = set(rows["scale"].dropna().astype(str)) if len(rows) else set()
    scale = next(iter(largest_first(present)), "")
    rows = rows[rows["scale"] == scale] if scale else rows.iloc[0:0]
    if metric not in rows or rows[metric].notna().sum() == 0:
        return "\u2014", "not run"
    vals = pd.to_numeric(rows[metric], errors="coerce").dropna()
    return fmt(vals.mean()), f"measured, {scale} scale, mean of {len(vals)} run(s)"


def _interval(iv: V.Interval) -> str:
    return f"[{iv.lo:.1f}, {iv.hi:.1f}]" if iv.n >= 2 and math.isfinite(iv.lo) else "no interval"


def _judged_rows(baseline) -> list[dict]:
    """The single-CNN rows from the baseline's judged comparisons at its summary scale (centre crop, ten-crop):
    every run of its config, with n and the interval's method."""
    by_metric = {c.metric: c for c in baseline.comparisons}
    out = []
    for suffix, crop in (("", "centre crop"), ("_10crop", "ten-crop")):
        top1, top5 = by_metric.get("top1_err" + suffix), by_metric.get("top5_err" + suffix)
        if top1 is None or top1.measured.n == 0:
            continue
        iv = top1.measured
        five = top5.measured if top5 is not None else V.Interval()
        src = (f"measured, {baseline.scale} scale, mean of {iv.n} run(s); 95% {iv.method}: top-1 "
               f"{_interval(iv)}, top-5 {_interval(five)}")
        out.append(dict(model=f"1 CNN, {crop} (this harness)", top1=fmt(iv.mean), top5=fmt(five.mean), source=src,
                        kind="measured"))
    return out


def table2(df: pd.DataFrame, ensemble_analysis: dict | None, baseline=None) -> list[dict]:
    """Rows like the paper's Table 2, with this harness's single-model and ensemble numbers and reproductions.

    `baseline`: the baseline claim's judged result at its summary scale (repro.claims.ScaleResult), when judged."""
    rows = [dict(model=m, top1=fmt(a), top5=fmt(b), source=s, kind="paper") for m, a, b, s in TABLE2_PAPER]
    measured = _judged_rows(baseline) if baseline is not None else []
    if not measured:
        t1, src = _measured(df, "baseline", "top1_err")
        t5, _ = _measured(df, "baseline", "top5_err")
        measured = [dict(model="1 CNN, centre crop (this harness)", top1=t1, top5=t5, source=src, kind="measured")]
    rows += measured
    ens = (ensemble_analysis or {}).get("ensemble", {})
    n = len((ensemble_analysis or {}).get("members", []))
    keys = (ensemble_analysis or {}).get("judged_keys") or {}  # ten-crop where the scale scores ten crops
    top1, top5 = keys.get("top1_err", "top1_err"), keys.get("top5_err", "top5_err")
    crop = "ten-crop" if top1.endswith("_10crop") else "centre crop"
    rows.append(dict(model=f"{n or 5} CNNs averaged, {crop} (this harness)", top1=fmt(ens.get(top1)),
                     top5=fmt(ens.get(top5)),
                     source=(f"measured, {ensemble_analysis.get('scale', '?')} scale, one ensemble of {n} run(s)"
                             if ens else "not run"), kind="measured"))
    rows += [dict(model=m, top1=fmt(a, 2), top5=fmt(b, 2), source=s, kind="reproduction")
             for m, a, b, s in REPRODUCTIONS]
    return rows


def table1(ten_crop_analysis: dict | None) -> list[dict]:
    """Rows like the paper's Table 1 (ILSVRC-2010 test), with this harness's ten-crop numbers (its analysis)."""
    rows = [dict(model=m, top1=fmt(a), top5=fmt(b), source=s, kind="paper") for m, a, b, s in TABLE1_PAPER]
    runs = [r for r in (ten_crop_analysis or {}).get("runs", []) if isinstance(r, dict)]
    top1, top5 = (V.mean_ci([r.get(k) for r in runs]) for k in ("top1_err_10crop", "top5_err_10crop"))
    src = (f"measured, {ten_crop_analysis.get('scale', '?')} scale, mean of {top1.n} run(s); 95% t interval over "
           f"runs: top-1 {_interval(top1)}, top-5 {_interval(top5)}" if runs else "not run")
    rows.append(dict(model="CNN, ten-crop (this harness)", top1=fmt(top1.mean if top1.n else None),
                     top5=fmt(top5.mean if top5.n else None), source=src, kind="measured"))
    return rows


def _packages(value) -> str:
    if isinstance(value, str) and value.startswith("{"):  # collect() stores dicts as JSON text
        try:
            value = json.loads(value)
        except ValueError:
            pass
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items())
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def _blank(v) -> bool:
    if v is None or isinstance(v, (list, dict)):
        return v is None
    return bool(pd.isna(v)) or v == ""


def _trained_on(r, device):
    """Host, device and GPU ids in one cell ('lab-a: NVIDIA H200 (GPU 0)'): the launcher's placement, else the run
    record's host."""
    host = next((h for h in (r.get("placement.host"), r.get("prov.host")) if not _blank(h)), "")
    gpus = r.get("placement.gpus")
    where = ": ".join(str(x) for x in (host, "" if _blank(device) else device) if x)
    return where + (f" (GPU {gpus})" if not _blank(gpus) else "")


def _date(r, v):
    """When it finished, to the minute ('2026-11-26 05:12 UTC' from the record's ISO time)."""
    text = "" if _blank(v) else str(v)
    return f"{text[:10]} {text[11:16]} UTC" if len(text) >= 16 and text[10] == "T" and text.endswith("+00:00") else text


def _bundle(r, v):
    """An imported run's bundle with its digest's first 8 hex digits; kept beside a local run, said so."""
    if _blank(v):
        return ""
    sha, beside = r.get("origin.bundle_sha256"), r.get("origin.beside")
    text = f"{v} ({str(sha)[:8]})" if not _blank(sha) else str(v)
    return text + (f"; kept beside {beside}" if not _blank(beside) else "")


_WHERE = {"prov.device": _trained_on, "prov.finished": _date, "origin.bundle": _bundle}


def provenance(rows: pd.DataFrame, runs_dir: Path) -> list[dict]:
    """One dict per run with every provenance field (blank when the run record lacks it)."""
    out = []
    for _, r in rows.sort_values([c for c in ("variant", "seed") if c in rows]).iterrows():
        item = {}
        for title, col in PROVENANCE_COLUMNS:
            v = r.get(col)
            if col == "prov.packages" and v is None:
                pk = {c.split(".", 2)[2]: r[c] for c in rows.columns if c.startswith("prov.packages.")}
                v = pk or None
            if col == "run_dir" and isinstance(v, str):
                try:
                    # abspath, not resolve: the experiment/variant/seed link is the name users know
                    v = os.path.relpath(os.path.abspath(v), os.path.abspath(runs_dir))
                except ValueError:
                    pass
            if col == "prov.wall_time_s":
                v = fmt(v)
            if col in _WHERE:
                v = _WHERE[col](r, v)
            item[title] = _packages(v)
        item["error"] = "" if pd.isna(r.get("error")) or r.get("error") is None else str(r.get("error"))
        out.append(item)
    return out

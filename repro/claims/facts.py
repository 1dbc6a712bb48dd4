"""Facts a claim's section states beside its verdict, measured from the runs and their data, never assumed.

data_facts: what the data can show (from the data folder's manifest.json: colour or greyscale, image size, counts).
lrn_strength: how strongly LRN normalised in the runs that had it (the engine's `lrn_strength` result field).
parameter_counts: parameters and fc6's input width of each variant (built from the run's config with repro.models).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pandas as pd

from data_prep.sources import SOURCES
from repro.rundir import RunDir
from repro.claims.common import run_path
from repro.config import from_dict
from repro.record import finite

# the second PCA eigenvalue of the RGB pixels over the first: below this, the three channels carry one signal
COLOUR_RATIO = 1e-6
NEAR_CONSTANT = 0.01  # alpha'*sum(a^2)/k below this at p99: (k + x)^-beta changes by under 0.75%: a fixed gain


def has_colour(manifest: dict) -> bool:
    """Whether the data's pixels vary in colour: the second PCA eigenvalue of the RGB pixels is not ~0."""
    eig = [float(x) for x in ((manifest.get("pca") or {}).get("eigval") or [])]
    return len(eig) >= 2 and eig[0] > 0 and eig[1] / eig[0] > COLOUR_RATIO


@functools.lru_cache(maxsize=16)
def _read_manifest(path: str) -> dict | None:
    try:
        m = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) else None


def data_facts(data_dir) -> dict | None:
    """{'name', 'source', 'colour', 'px', 'train', 'classes'} of a prepared data folder (None: unreadable)."""
    if not isinstance(data_dir, str) or not data_dir:
        return None
    m = _read_manifest(str(Path(data_dir) / "manifest.json"))
    if not m:
        return None
    source = str(m.get("source", "?"))
    image = m.get("image") or {}
    px = image.get("height") or (m.get("settings") or {}).get("res")
    name = SOURCES[source].display_name if source in SOURCES else source  # a source no longer registered: its id
    return {"source": source, "name": name, "colour": has_colour(m), "px": px,
            "train": int(((m.get("splits") or {}).get("train") or {}).get("count", 0)),
            "classes": len((m.get("classes") or {}).get("ids") or [])}


def rows_data_facts(rows: pd.DataFrame) -> dict | None:
    """data_facts of the first readable data folder the rows used."""
    for d in rows.get("data.dir", pd.Series(dtype=object)).dropna().unique():
        facts = data_facts(str(d))
        if facts:
            return facts
    return None


def lrn_strength(rows: pd.DataFrame, runs_dir) -> list[str]:
    """Lines on alpha'*sum(a^2)/k per LRN layer, mean over the finished runs that recorded it."""
    per_layer: dict[str, dict[str, list[float]]] = {}
    modes = set()
    for _, r in rows[rows["status"] == "done"].iterrows():
        d = run_path(r.get("run_dir"), runs_dir)
        record = RunDir(d).read_record() if d is not None else None
        rec = record.lrn_strength if record is not None else None
        if not isinstance(rec, dict):
            continue
        modes.add(str(rec.get("alpha_mode", "?")))
        for layer, v in rec.items():
            if isinstance(v, dict) and finite(v.get("mean")) and finite(v.get("p99")):
                per_layer.setdefault(layer, {"mean": [], "p99": []})
                per_layer[layer]["mean"].append(float(v["mean"]))
                per_layer[layer]["p99"].append(float(v["p99"]))
    if not per_layer:
        return []
    out = []
    for layer, v in sorted(per_layer.items()):
        mean, p99 = float(np.mean(v["mean"])), float(np.mean(v["p99"]))
        gain = " (acts as a near-constant gain, not as a normalisation)" if p99 < NEAR_CONSTANT else ""
        out.append(f"Measured LRN strength in {layer}, alpha'*sum(a^2)/k on a validation batch: mean {mean:.2g}, "
                   f"99th percentile {p99:.2g} ({len(v['mean'])} run(s), alpha mode: {', '.join(sorted(modes))})"
                   f"{gain}.")
    return out


def parameter_counts(rows: pd.DataFrame, runs_dir) -> list[str]:
    """One line per variant: parameters and fc6's input width, from a model built from the run's config."""
    # torch and the models load only for a section that asks for this: the rest of the report needs neither
    from repro.models import build_model, count_params

    out = []
    for variant, sub in rows.groupby("variant", sort=False):
        for _, r in sub.iterrows():
            d = run_path(r.get("run_dir"), runs_dir)
            config = RunDir(d).planned_config() if d is not None else None
            if not config:
                continue
            cfg = from_dict(config)
            model = build_model(cfg.model)
            fc6 = model.layer("fc6").in_features
            out.append(f"{variant}: {count_params(model):,} parameters; fc6 takes {fc6:,} inputs "
                       f"({cfg.model.input_size} px input, width {cfg.model.width:g}).")
            break
    return out


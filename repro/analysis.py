"""Post-training analyses: after `repro run` trains, each experiment whose kind has an analysis gets one.

What an analysis computes is its kind's (repro.claims.<kind>.analyse): the ensemble's averaged softmax, the
convergence speed-ups, conv1's colour specificity, nearest-neighbour retrieval, ten-crop scoring of the trained
weights. This module runs it on the experiment's finished runs under a lock and writes
the experiment's analysis files at that scale (numbers, and arrays for figures; repro.rundir says where,
`repro.runs.load_analyses` reads them). An analysis is skipped when its inputs (the runs' config hashes and finish times) have not
changed and it is stored in the format its kind writes now (the kind module's `ANALYSIS_VERSION`, where it has one).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import numpy as np

from repro import io
from repro.rundir import analysis_paths, folder_lock, store_dir
from repro.claims import get_kind
from repro.experiments import Experiment
from repro.plan import PlannedRun


def finished(runs: list[PlannedRun], runs_dir: Path) -> list[tuple[PlannedRun, Path, dict]]:
    """(run, its directory, its result as a dict) of every done run among `runs`."""
    out = []
    for r in runs:
        d = store_dir(runs_dir, r.config_hash)
        record = d.read_record()  # None unless of the current format
        if record is not None and record.finished:
            out.append((r, d, record.to_dict()))
    return out


def _inputs(done) -> dict[str, str]:
    return {f"{r.variant}/seed{r.seed}": f"{r.config_hash}@{res.get('provenance', {}).get('finished')}"
            for r, _, res in done}


def _write(json_path: Path, npz_path: Path, data: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    if arrays:
        with io.atomic_path(npz_path) as tmp, open(tmp, "wb") as f:  # a path would get ".npz" added
            np.savez_compressed(f, **arrays)
        data["npz"] = npz_path.name
    else:  # an older analysis' figures must not be shown beside this one
        npz_path.unlink(missing_ok=True)
    io.write_json(json_path, data)


def analyse(exp: Experiment, runs: list[PlannedRun], runs_dir: Path) -> str | None:
    """Run the analysis of `exp` (if its kind has one) under a lock; returns a one-line summary or None."""
    kind = get_kind(exp.kind)
    if kind.analyse is None:
        return None
    done = finished(runs, Path(runs_dir))
    inputs = _inputs(done)
    # an analysis stored in an older format is redone, not shown as if it were of the current one
    version = getattr(inspect.getmodule(kind.analyse), "ANALYSIS_VERSION", None)
    scale = runs[0].scale if runs else None  # one analysis per scale: each scale is evidence of its own
    json_path, npz_path = analysis_paths(runs_dir, exp.name, scale)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    with folder_lock(json_path.parent, wait=True):  # two processes never write one analysis
        old = io.read_json(json_path) or {}
        if old.get("inputs") == inputs and old.get("kind") == exp.kind and old.get("version") == version:
            return None
        data, arrays = kind.analyse(exp, done)
        data.update({"kind": exp.kind, "experiment": exp.name, "inputs": inputs, "scale": scale})
        if version is not None:
            data["version"] = version
        _write(json_path, npz_path, data, arrays)
    return summary_line(exp.kind, data)


def summary_line(kind: str, d: dict[str, Any]) -> str:
    if "status" in d:
        return str(d["status"])
    summary = get_kind(kind).summary
    return summary(d) if summary else ""

"""Read the arrays an analysis saved for the figures (runs/<experiment>/analysis.npz), tolerating their absence.

Per-run curves and metrics come from `repro.claims.common.stack`; the run table from `repro.runs.collect`.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np


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

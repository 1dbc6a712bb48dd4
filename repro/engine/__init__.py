"""Training and evaluation: `fit` trains or resumes a run in its folder and returns its `RunRecord`; `evaluate`,
`predict`, `extract_features` and `load_model` score and reuse trained runs; `preempt` stops a run cleanly.

The names are loaded on first use (PEP 562), so that a module of the package that needs no torch (`preempt`, read by
the launchers) can be imported without torch and the data pipelines.
"""

from __future__ import annotations

import importlib

_WHERE = {"fit": "repro.engine.train", "RunRecord": "repro.record", "evaluate": "repro.engine.scoring",
          "extract_features": "repro.engine.scoring", "load_model": "repro.engine.scoring",
          "predict": "repro.engine.scoring"}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'repro.engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value  # once loaded, a plain attribute (so tests can patch it)
    return value

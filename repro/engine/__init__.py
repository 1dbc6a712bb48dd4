"""Training and evaluation: `fit` trains or resumes a run in its folder and returns its `RunRecord`; `evaluate`,
`predict`, `extract_features` and `load_model` score and reuse trained runs; `preempt` stops a run cleanly.

The names are loaded on first use (PEP 562), so that reading a run record (`repro.engine.record`, which the run
store and `repro status` need) does not import torch and the data pipelines.
"""

from __future__ import annotations

import importlib

_WHERE = {"fit": "repro.engine.train", "RunRecord": "repro.engine.record", "evaluate": "repro.engine.evaluate",
          "extract_features": "repro.engine.evaluate", "load_model": "repro.engine.evaluate",
          "predict": "repro.engine.evaluate"}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'repro.engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value  # once loaded, a plain attribute (so tests can patch it)
    return value

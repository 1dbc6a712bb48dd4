"""Training and evaluation: `fit` trains or resumes a run in its folder; `evaluate`, `predict`,
`extract_features` and `load_model` score and reuse trained runs."""

from repro.engine.evaluate import evaluate, extract_features, load_model, predict
from repro.engine.train import fit

__all__ = ["evaluate", "extract_features", "fit", "load_model", "predict"]

"""The models: the AlexNet family and the four-layer CIFAR net, built from a `ModelConfig` through a registry.

The registry is light (`repro.config` reads its names); what builds or counts models imports torch, so it is
loaded on first use.
"""

from __future__ import annotations

import importlib

from repro.models.registry import default_overrides, list_models, model_summary, register_model

_ON_FIRST_USE = {"build_model": "build", "default_config": "build", "ModelSize": "summary", "count_macs": "summary",
                 "count_params": "summary", "model_size": "summary", "models_table": "summary"}

__all__ = sorted(["default_overrides", "list_models", "model_summary", "register_model", *_ON_FIRST_USE])


def __getattr__(name: str):
    if name in _ON_FIRST_USE:  # torch takes seconds to import; planning a run needs only the registry
        return getattr(importlib.import_module(f"repro.models.{_ON_FIRST_USE[name]}"), name)
    raise AttributeError(f"module 'repro.models' has no attribute {name!r}")

"""Model registry, timm-style: every model name, what it is, its published settings and the function that builds it.

The names live here and nowhere else: `repro.config` checks `model.name` against `list_models()`. This module
imports neither torch nor the config, so planning a run (which validates names) starts fast; a builder's module
is imported when a model is first built. `register_model(name)` adds a model from outside this package.

Each entry records the overrides that make it the network as published (`default_config(name)`): `alexnet-owt` is
torchvision's net only with `towers = "one-full"` and `lrn = false`, and `cifar4` is cuda-convnet's net at 32 px,
10 classes, no dropout.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

from repro.errors import UserError


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: str | Callable  # "module:function" (imported on first use) or the function, `(ModelConfig) -> nn.Module`
    summary: str
    defaults: dict[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, ModelEntry] = {e.name: e for e in (
    ModelEntry("alexnet-paper", "repro.models.alexnet:alexnet_paper",
               "section 3.5: two towers as groups=2 convolutions, LRN"),
    ModelEntry("alexnet-owt", "repro.models.alexnet:alexnet_owt",
               "torchvision's one-tower 64-192-384-256-256 AlexNet", {"towers": "one-full", "lrn": False}),
    ModelEntry("cifar4", "repro.models.cifar4:cifar4", "section 3.1: four-layer CIFAR-10 net (layers-18pct)",
               {"num_classes": 10, "input_size": 32, "dropout": 0.0}),
)}


def register_model(name: str, *, summary: str = "", defaults: dict[str, Any] | None = None):
    """Decorator registering a builder `(ModelConfig) -> nn.Module` under `name`; `defaults` are the ModelConfig
    overrides of the published net."""
    def wrap(fn: Callable):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = ModelEntry(name, fn, summary or (fn.__doc__ or "").strip().split("\n")[0],
                                     dict(defaults or {}))
        return fn
    return wrap


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def _entry(name: str) -> ModelEntry:
    if name not in _REGISTRY:
        raise UserError(f"model.name = {name!r} is not a registered model; choose one of {', '.join(list_models())}")
    return _REGISTRY[name]


def model_summary(name: str) -> str:
    return _entry(name).summary


def default_overrides(name: str) -> dict[str, Any]:
    """The ModelConfig fields that differ for the published network `name` (e.g. alexnet-owt: no LRN)."""
    return dict(_entry(name).defaults)


def builder(name: str) -> Callable:
    """The function that builds model `name` (importing its module, and so torch, the first time)."""
    target = _entry(name).builder
    if callable(target):
        return target
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)

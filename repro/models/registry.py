"""Model registry, timm-style: `@register_model(name)` on a function `(ModelConfig) -> nn.Module`.

`build_model(cfg)` honours every field of the config literally. Each entry also records the overrides that make
it the network as published (`default_config(name)`): `alexnet-owt` is torchvision's net only with
`towers = "one-full"` and `lrn = false`, and `cifar4` is cuda-convnet's net at 32 px, 10 classes, no dropout.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from repro.config import ModelConfig
from repro.errors import UserError


@dataclass(frozen=True)
class ModelEntry:
    name: str
    fn: Callable[[ModelConfig], nn.Module]
    summary: str
    defaults: dict[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, *, summary: str = "", defaults: dict[str, Any] | None = None):
    """Decorator registering a builder under `name`; `defaults` are the ModelConfig overrides of the published net."""
    def wrap(fn: Callable[[ModelConfig], nn.Module]):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        bad = set(defaults or {}) - {f.name for f in dataclasses.fields(ModelConfig)}
        if bad:
            raise ValueError(f"model {name!r}: defaults name unknown ModelConfig fields {sorted(bad)}")
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


def default_config(name: str, **overrides: Any) -> ModelConfig:
    """The ModelConfig of the published network `name`, with `overrides` on top."""
    return ModelConfig(**{"name": name, **_entry(name).defaults, **overrides})


def _check_common(cfg: ModelConfig) -> None:
    if cfg.num_classes < 1:
        raise UserError(f"model.num_classes = {cfg.num_classes} must be at least 1")
    if not cfg.width > 0:
        raise UserError(f"model.width = {cfg.width} must be > 0 (1.0 is the paper's widths)")
    if not 0.0 <= cfg.dropout < 1.0:
        raise UserError(f"model.dropout = {cfg.dropout} must be in [0, 1); 0 disables dropout")


def build_model(cfg: ModelConfig) -> nn.Module:
    """Build the registered model `cfg.name` with every switch of `cfg` applied."""
    entry = _entry(cfg.name)
    _check_common(cfg)
    return entry.fn(cfg)

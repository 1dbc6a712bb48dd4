"""`build_model(cfg)`: the registered model `cfg.name` with every switch of `cfg` applied, each value checked first;
`default_config(name)`: the ModelConfig of the network as published."""

from __future__ import annotations

from typing import Any

from torch import nn

from repro.config import ModelConfig, check_section
from repro.models.registry import builder, default_overrides


def default_config(name: str, **overrides: Any) -> ModelConfig:
    """The ModelConfig of the published network `name`, with `overrides` on top."""
    return ModelConfig(**{"name": name, **default_overrides(name), **overrides})


def build_model(cfg: ModelConfig) -> nn.Module:
    """Build the registered model `cfg.name` with every switch of `cfg` applied."""
    check_section("model", cfg)
    return builder(cfg.name)(cfg)

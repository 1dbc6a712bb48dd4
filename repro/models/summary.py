"""Parameter and multiply-add counts of the registered models, as a rich table (`repro models`), and the size of
one configured variant (`model_size`: what the page says about each layer-removal variant)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from rich.table import Table
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from repro.config import ModelConfig
from repro.models.layers import LRN
from repro.models.build import build_model, default_config
from repro.models.registry import default_overrides, list_models, model_summary


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_size: int) -> int:
    """Multiply-adds of one forward pass on one image in the conv and linear layers (torch counts 2 flops per MAC).

    LRN computes its window sums as a 1x1 convolution; that is normalisation, not a layer of the paper's table,
    so its flops are left out.
    """
    device = next(model.parameters()).device
    was_training = model.training
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(torch.zeros(1, 3, input_size, input_size, device=device))
    model.train(was_training)
    by_module = counter.get_flop_counts()
    lrn = [f"{type(model).__name__}.{name}" for name, m in model.named_modules() if isinstance(m, LRN)]
    lrn_flops = sum(sum(by_module.get(name, {}).values()) for name in lrn)
    return (counter.get_total_flops() - lrn_flops) // 2


class ModelSize(NamedTuple):
    params: int        # every weight and bias
    fc6_inputs: int    # inputs of the first fully connected layer (fc6; the only FC layer of cifar4)


def model_size(cfg: ModelConfig) -> ModelSize:
    """Parameters and fc6 input width of the model `cfg` builds (on the meta device: no memory, no time)."""
    with torch.device("meta"):
        model = build_model(cfg)
    first_fc = next(m for m in model.modules() if isinstance(m, nn.Linear))
    return ModelSize(count_params(model), first_fc.in_features)


def describe(cfg: ModelConfig) -> dict:
    """Name, parameters and MACs of the model `cfg` builds; built on the meta device, so it costs no memory."""
    with torch.device("meta"):
        model = build_model(cfg)
    return {"name": cfg.name, "params": count_params(model), "macs": count_macs(model, cfg.input_size),
            "input_size": cfg.input_size, "num_classes": cfg.num_classes}


def models_table() -> Table:
    """One row per registered model at its published configuration (the overrides are shown with the name)."""
    table = Table(title="Registered models", caption="(in brackets: the settings of the published net); "
                  "choose one with --set model.name=NAME")
    table.add_column("name", no_wrap=True)
    for col in ("params", "MACs", "input", "classes"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("description")
    for name in list_models():
        cfg = default_config(name)
        row = describe(cfg)
        overrides = ", ".join(f"{k}={v}" for k, v in default_overrides(name).items() if k not in
                              ("num_classes", "input_size"))
        text = model_summary(name) + (f" [dim]({overrides})[/dim]" if overrides else "")
        table.add_row(name, f"{row['params']:,}", f"{row['macs'] / 1e6:,.0f} M", str(row["input_size"]),
                      str(row["num_classes"]), text)
    return table

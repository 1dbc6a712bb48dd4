"""The four-layer CIFAR-10 net of sections 3.1 and 3.3: cuda-convnet's `layers-18pct` configuration.

conv 32 5x5 -> max-pool 3/2 -> act -> LRN(3) -> conv 32 5x5 -> act -> avg-pool 3/2 -> LRN(3)
-> conv 64 5x5 -> act -> avg-pool 3/2 -> FC. 32 px in gives 16, 8, 4 (cuda-convnet's ceil rule), so the FC layer
sees 64 * 4 * 4 = 1024 values.

The LRN is the paper's across-channel form (the same switch as in AlexNet) with layer-params-18pct's constants:
size 3, scale 5e-5, pow 0.75; k = 2 as section 3.3. Honoured switches: activation, lrn, lrn_alpha_mode, lrn_form,
pooling (all three pools), dropout (before the FC layer; layers-18pct has none, so the published config sets 0),
width, input_size, num_classes, init. The net has no towers and no conv4/conv5, so `towers` and `remove_layer` other
than their defaults are refused; its conv1 is already 5x5 stride 1, so `stem` does not change it.
"""

from __future__ import annotations

import torch
from torch import nn

from repro.config import ModelConfig
from repro.errors import UserError
from repro.models.layers import activation, avg_pool, dropout, init_weights, lrn_layer, max_pool, pool_out

WIDTHS = (32, 32, 64)
LRN_SIZE, LRN_ALPHA = 3, 5e-5
INIT_STD = {"conv1": 1e-4, "conv2": 0.01, "conv3": 0.01, "fc": 0.01}  # initW of layers-18pct


class Cifar4(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        c1, c2, c3 = (max(1, round(c * cfg.width)) for c in WIDTHS)

        def lrn() -> list[nn.Module]:
            return [lrn_layer(cfg.lrn_form, LRN_SIZE, LRN_ALPHA, alpha_mode=cfg.lrn_alpha_mode)] if cfg.lrn else []

        act = cfg.activation
        self.features = nn.Sequential(
            nn.Conv2d(3, c1, 5, 1, 2), max_pool(cfg.pooling), activation(act), *lrn(),
            nn.Conv2d(c1, c2, 5, 1, 2), activation(act), avg_pool(cfg.pooling), *lrn(),
            nn.Conv2d(c2, c3, 5, 1, 2), activation(act), avg_pool(cfg.pooling),
        )
        n = cfg.input_size
        if n // 4 < 3:
            raise UserError(f"model.input_size = {n} is too small for cifar4 (three 3x3 pools need >= 12 px)")
        grid = pool_out(pool_out(pool_out(n)))
        self.features_dim = c3 * grid * grid
        self.classifier = nn.Sequential(dropout(cfg.dropout), nn.Linear(self.features_dim, cfg.num_classes))
        conv_at = [i for i, m in enumerate(self.features) if isinstance(m, nn.Conv2d)]
        self.layer_paths = {name: f"features.{i}" for name, i in zip(("conv1", "conv2", "conv3"), conv_at)}
        self.layer_paths["fc"] = "classifier.1"
        init_weights(self.named_layers(), cfg.init, act, std=INIT_STD)

    def layer(self, name: str) -> nn.Module:
        return self.get_submodule(self.layer_paths[name])

    def named_layers(self) -> dict[str, nn.Module]:
        return {name: self.layer(name) for name in self.layer_paths}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last hidden layer: the pooled conv3 maps, flattened."""
        return torch.flatten(self.features(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))

    def conv1_weight(self) -> tuple[torch.Tensor, None]:
        return self.layer("conv1").weight.detach(), None


def cifar4(cfg: ModelConfig) -> Cifar4:
    for key, default in (("towers", "two"), ("remove_layer", "none")):
        value = getattr(cfg, key)
        if value != default:
            raise UserError(f"model.{key} = {value!r} does not apply to cifar4 (one tower, three conv layers); "
                            f"leave it at {default!r} or use model.name=alexnet-paper")
    return Cifar4(cfg)

"""The AlexNet family: the paper's two-tower net (section 3.5) and torchvision's one-tower variant, one builder.

Module layout follows torchvision's `AlexNet` (`features`, `avgpool`, `classifier`). Dropout sits where each
source puts it: `alexnet-paper` drops the outputs of fc6 and fc7 (section 4.2; Caffe's bvlc_alexnet: fc6 -> relu6 ->
drop6 -> fc7 -> relu7 -> drop7 -> fc8), `alexnet-owt` the inputs of fc6 and fc7 (torchvision: pool5 -> drop -> fc6
-> relu -> drop -> fc7 -> relu -> fc8), so that with `towers="one-full"`, `lrn=False` it has torchvision's
state-dict keys. The two GPUs of
the paper become groups=2 convolutions in conv2, conv4, conv5 (within a tower); conv3 and the FC layers see both
towers. conv1 is one ordinary convolution whose first half of kernels is tower 1 (each tower sees the image).

LRN (section 3.3) follows the ReLU of conv1 and conv2 when `lrn` is set; with `lrn_form = "gain"` a division by
k^beta (LRNGain) takes each LRN's place, so the layer indices and state-dict keys are the same in both forms.

Layer removal (section 7) takes a conv layer out and keeps every pool, so the maps keep their sizes: without
conv2 (and its LRN), conv1's pooled maps are pooled again and conv3 sees conv1's channels; without conv5, fc6 sees
conv4's 384 maps (13,824 inputs at full size instead of 9,216).

conv1 geometry: "cuda-convnet" (alexnet-paper) pads the input on the bottom/right just enough that the output
follows `1 + ceil((n - 11) / 4)`, the author's rule: 224 -> 55 (3 px of padding) and 227 -> 55 (none, Caffe's
choice); its ZeroPad2d is `features.0` even when empty, so state-dict keys do not depend on the input size.
"torchvision" (alexnet-owt) pads 2 px on every side. The tiny stem (5x5, stride 1, pad 2) keeps the
input size, for 24-64 px images; three pools then give n // 8.
"""

from __future__ import annotations

import torch
from torch import nn

from repro.config import ModelConfig
from repro.errors import UserError
from repro.models.layers import activation, dropout, init_weights, lrn_layer, max_pool, pool_out

CONV_NAMES = ("conv1", "conv2", "conv3", "conv4", "conv5")
PAPER_WIDTHS = (96, 256, 384, 384, 256)
OWT_WIDTHS = (64, 192, 384, 256, 256)
FC_WIDTH = 4096
# kernel, stride, padding of conv2..conv5 (section 3.5; the paddings keep 27 and 13).
CONV_GEOMETRY = {"conv2": (5, 1, 2), "conv3": (3, 1, 1), "conv4": (3, 1, 1), "conv5": (3, 1, 1)}
WITHIN_TOWER = ("conv2", "conv4", "conv5")  # connected only to the kernel maps on the same GPU
BIAS_ONE = ("conv2", "conv4", "conv5", "fc6", "fc7")  # section 5
POOLED = ("conv1", "conv2")  # LRN (section 3.3) and a max-pool follow these; one more pool follows the last conv
DROPOUT_LAYOUTS = ("paper", "torchvision")  # dropout on the outputs of fc6, fc7 / on the inputs of fc6, fc7


class AlexNet(nn.Module):
    """features -> avgpool (identity at the configured input) -> classifier; layers reachable by paper name."""

    def __init__(self, features: nn.Sequential, layer_paths: dict[str, str], grid: int, channels: int,
                 fc_width: int, num_classes: int, p: float, act: str, towers: int, dropout_layout: str):
        super().__init__()
        self.features = features
        # torchvision keeps this adaptive pool; at the configured input size the grid is already `grid` x `grid`.
        self.avgpool = nn.AdaptiveAvgPool2d((grid, grid))
        fc6, fc7 = nn.Linear(channels * grid * grid, fc_width), nn.Linear(fc_width, fc_width)
        if dropout_layout == "paper":
            hidden = [fc6, activation(act), dropout(p), fc7, activation(act), dropout(p)]
            self.layer_paths = {**layer_paths, "fc6": "classifier.0", "fc7": "classifier.3"}
            self.hidden_end = 5  # classifier[:5] ends with fc7's activation, before drop7
        elif dropout_layout == "torchvision":
            hidden = [dropout(p), fc6, activation(act), dropout(p), fc7, activation(act)]
            self.layer_paths = {**layer_paths, "fc6": "classifier.1", "fc7": "classifier.4"}
            self.hidden_end = 6
        else:
            raise ValueError(f"dropout_layout {dropout_layout!r} is not one of {', '.join(DROPOUT_LAYOUTS)}")
        self.classifier = nn.Sequential(*hidden, nn.Linear(fc_width, num_classes))
        self.layer_paths["fc8"] = "classifier.6"
        self.features_dim = fc_width
        self.towers = towers

    def layer(self, name: str) -> nn.Module:
        """The module of a paper layer name (conv1..conv5, fc6..fc8); KeyError for a removed layer."""
        return self.get_submodule(self.layer_paths[name])

    def named_layers(self) -> dict[str, nn.Module]:
        return {name: self.layer(name) for name in self.layer_paths}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last hidden layer (fc7 after its activation), the 4096-d code of section 6.1 at full width."""
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier[:self.hidden_end](x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier[self.hidden_end:](self.forward_features(x))

    def conv1_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """conv1 kernels split by tower (figure 3); one-tower nets return (all kernels, None)."""
        w = self.layer("conv1").weight.detach()
        if self.towers == 2:
            half = w.shape[0] // 2
            return w[:half], w[half:]
        return w, None


def _even(x: float) -> int:
    """Round a width to an even number >= 2, so two towers always split it evenly."""
    return max(2, 2 * round(x / 2))


def conv_widths(base: tuple[int, ...], cfg: ModelConfig) -> dict[str, int]:
    """Output channels of every kept conv layer under the width multiplier, towers and layer removal.

    one-half (section 3.2 and its footnote): half the kernels in every conv layer except the last one, whose
    output feeds the big fc6, and the FC layers; they keep full size.
    """
    kept = [n for n in CONV_NAMES if n != cfg.remove_layer]
    widths = {n: _even(c * cfg.width) for n, c in zip(CONV_NAMES, base) if n in kept}
    if cfg.towers == "one-half":
        widths = {n: w if n == kept[-1] else w // 2 for n, w in widths.items()}
    return widths


def _stem(cfg: ModelConfig, out: int, conv1_padding: str) -> tuple[list[nn.Module], int]:
    """conv1 (and its input padding) and the spatial size it outputs."""
    n = cfg.input_size
    if cfg.stem == "tiny":
        return [nn.Conv2d(3, out, 5, 1, 2)], n
    if n < 11:
        raise UserError(f"model.input_size = {n} is smaller than conv1's 11x11 kernel; use model.stem=tiny")
    if conv1_padding == "torchvision":
        return [nn.Conv2d(3, out, 11, 4, 2)], (n + 4 - 11) // 4 + 1
    pad = -(n - 11) % 4  # bottom/right zeros so that the last window fits: cuda-convnet's ceil rule
    return [nn.ZeroPad2d((0, pad, 0, pad)), nn.Conv2d(3, out, 11, 4)], (n + pad - 11) // 4 + 1


def build_alexnet(cfg: ModelConfig, base_widths: tuple[int, ...], conv1_padding: str, dropout_layout: str) -> AlexNet:
    """One AlexNet from `cfg`, every switch applied; `conv1_padding` is "cuda-convnet" or "torchvision",
    `dropout_layout` "paper" or "torchvision"."""
    widths = conv_widths(base_widths, cfg)
    towers = 2 if cfg.towers == "two" else 1
    layers: list[nn.Module] = []
    paths: dict[str, str] = {}
    in_ch, size, pool_inputs = 3, cfg.input_size, []
    for name in CONV_NAMES:
        if name in widths:
            out = widths[name]
            if name == "conv1":
                stem, size = _stem(cfg, out, conv1_padding)
                layers += stem[:-1]
                conv = stem[-1]
            else:
                k, s, p = CONV_GEOMETRY[name]
                conv = nn.Conv2d(in_ch, out, k, s, p, groups=towers if name in WITHIN_TOWER else 1)
            paths[name] = f"features.{len(layers)}"
            layers += [conv, activation(cfg.activation)]
            if name in POOLED and cfg.lrn:
                layers.append(lrn_layer(cfg.lrn_form, alpha_mode=cfg.lrn_alpha_mode, towers=towers))
            in_ch = out
        if name in POOLED:  # kept when the layer is removed, so later maps keep their sizes
            layers.append(max_pool(cfg.pooling))
            pool_inputs.append(size)
            size = pool_out(size)
    layers.append(max_pool(cfg.pooling))  # after conv5, or whichever conv layer is last
    pool_inputs.append(size)
    if min(pool_inputs) < 3:
        hint = "a larger model.input_size" + (" or model.stem=tiny" if cfg.stem != "tiny" else "")
        raise UserError(f"model.input_size = {cfg.input_size} leaves {min(pool_inputs)}x{min(pool_inputs)} maps "
                        f"before a 3x3 pool with stem {cfg.stem!r}; use {hint}")
    fc = max(1, round(FC_WIDTH * cfg.width))
    model = AlexNet(nn.Sequential(*layers), paths, pool_out(size), in_ch, fc, cfg.num_classes, cfg.dropout,
                    cfg.activation, towers, dropout_layout)
    init_weights(model.named_layers(), cfg.init, cfg.activation, std=0.01, bias_one=BIAS_ONE)
    return model


def alexnet_paper(cfg: ModelConfig) -> AlexNet:
    """The builder of `alexnet-paper` (see repro.models.registry)."""
    return build_alexnet(cfg, PAPER_WIDTHS, conv1_padding="cuda-convnet", dropout_layout="paper")


def alexnet_owt(cfg: ModelConfig) -> AlexNet:
    """The builder of `alexnet-owt`: torchvision's widths, padding and dropout layout."""
    return build_alexnet(cfg, OWT_WIDTHS, conv1_padding="torchvision", dropout_layout="torchvision")

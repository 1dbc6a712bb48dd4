"""Building blocks shared by the AlexNet family and the four-layer CIFAR net: LRN and its fixed-gain control,
activations, pooling, sizes.

Pooling follows cuda-convnet's output rule, `1 + ceil((n - z) / s)`: an overlapping 3/2 pool then gives
`n // 2` for every n, which is exactly what a non-overlapping 2/2 pool (floor rule) gives, so the two
pooling schemes of section 3.4 always produce the same output size. For the odd sizes of AlexNet at 224/227
(55, 27, 13) the ceil and floor rules agree, so nothing changes against torchvision there.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from repro.config import check_value
from repro.data.order import rank_world
from repro.errors import UserError

# Section 3.3: "k = 2, n = 5, alpha = 1e-4, and beta = 0.75".
LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K = 5, 1e-4, 0.75, 2.0


def _autocast_off(device: torch.device):
    """Autocast off on `device` (nothing to turn off on others, such as "meta"). A plain comparison, which
    torch.compile folds away, rather than torch.amp.is_autocast_available."""
    if device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


class _LRNFunction(torch.autograd.Function):
    """`b = a * s^-beta` with `s = k + band(a^2)`, and its gradient written out, so that each step takes one power
    instead of autograd's two: torch's CPU `pow` with a fractional exponent cost about 20 multiplications' worth of
    time, and LRN's two `pow`s were the largest cost of a demo-scale training step after the convolutions.

    Gradient (the band is symmetric): `da = g * s^-beta - 2 beta a * band(g * b / s)`.

    Always computed in float32 (at least), with autocast off inside: in bfloat16, `s = 2 + (a small sum)` rounds in
    steps of 0.8% (outputs up to 1.2% off float64; at small activations more than the normalisation's whole
    effect), and under CUDA autocast the window sum (a convolution, run in bf16) and the power (log/exp, run in
    float32) mixed dtypes, which failed in the backward. The output and the gradient come back in the input's dtype.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, band: torch.Tensor, k: float, beta: float) -> torch.Tensor:
        with _autocast_off(x.device):
            a = x if x.dtype in (torch.float32, torch.float64) else x.float()
            s = F.conv2d(a * a, band, torch.full((band.shape[0],), k, dtype=a.dtype, device=a.device))
            gain = torch.exp(torch.log(s).mul_(-beta))  # s >= k > 0; exp(log) is vectorised where pow is not
            out = a * gain
        ctx.save_for_backward(x, band, s, gain, out)
        ctx.beta = beta
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, band, s, gain, out = ctx.saved_tensors
        with _autocast_off(x.device):
            g = g.to(s.dtype)
            spread = F.conv2d(g * out / s, band)
            grad = torch.addcmul(g * gain, x.to(s.dtype), spread, value=-2.0 * ctx.beta)
        return grad.to(x.dtype), None, None, None


class LRN(nn.Module):
    """Local response normalisation across channels, section 3.3, applied within each of `towers` channel groups.

    `b_i = a_i / (k + alpha' * sum_{j=max(0, i-n/2)}^{min(N-1, i+n/2)} a_j^2)^beta` with
    `alpha' = alpha` for alpha_mode "paper" (the formula as printed) and `alpha' = alpha / n` for "per-size"
    (Caffe, torch.nn.LocalResponseNorm and the author's cuda-convnet2 all divide by the window size).
    Each GPU of the paper normalised only its own kernel maps (cuda-convnet2's two-GPU net has rnorm1a and
    rnorm1b), so with `towers=2` the window never crosses from one tower's channels into the other's.

    The window sum is a 1x1 convolution of `a^2` with a fixed banded (block-diagonal for two towers) matrix:
    the same numbers as torch's LocalResponseNorm, whose avg_pool3d forward and backward took about 40% of a CPU
    training step at demo width; the convolution runs in oneDNN/cuDNN and follows channels_last.
    """

    def __init__(self, size: int = LRN_SIZE, alpha: float = LRN_ALPHA, beta: float = LRN_BETA,
                 k: float = LRN_K, alpha_mode: str = "per-size", towers: int = 1):
        super().__init__()
        check_value("model.lrn_alpha_mode", alpha_mode)
        self.size, self.alpha, self.beta, self.k = size, alpha, beta, k
        self.alpha_mode, self.towers = alpha_mode, towers
        self.scale = alpha if alpha_mode == "paper" else alpha / size

    def band(self, channels: int, like: torch.Tensor) -> torch.Tensor:
        """(C, C, 1, 1) weights: `scale` where channels i, j are within n/2 of each other in one tower, else 0."""
        if channels % self.towers:
            raise UserError(f"LRN over {channels} channels cannot split into {self.towers} towers")
        i = torch.arange(channels, device=like.device)
        group = channels // self.towers
        near = (i[:, None] - i[None, :]).abs() <= self.size // 2
        same = (i[:, None] // group) == (i[None, :] // group)
        dtype = torch.promote_types(like.dtype, torch.float32)  # alpha / n in bf16 would be off by up to 0.4%
        return ((near & same).to(dtype) * self.scale)[:, :, None, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _LRNFunction.apply(x, self.band(x.shape[1], x), self.k, self.beta)

    def extra_repr(self) -> str:
        return (f"size={self.size}, alpha={self.alpha}, beta={self.beta}, k={self.k}, "
                f"alpha_mode={self.alpha_mode}, towers={self.towers}")


class LRNGain(nn.Module):
    """The control for LRN (model.lrn_form "gain"): `b = a / k^beta`, the fixed gain LRN reduces to when
    `alpha' * sum(a^2) << k`, with no normalisation. Put where LRN would be, it keeps the scale the next layer sees
    (k^-beta = 0.59 at k = 2), so LRN minus this control is what the normalisation itself does, and this control
    minus no LRN at all is what the change of scale does. Like LRN, it computes in float32 (at least) with autocast
    off and returns the input's dtype; plain tensor operations, so torch.compile traces it whole."""

    def __init__(self, k: float = LRN_K, beta: float = LRN_BETA):
        super().__init__()
        self.k, self.beta = k, beta
        self.divisor = k ** beta  # a Python float: a constant in the traced graph

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with _autocast_off(x.device):
            a = x if x.dtype in (torch.float32, torch.float64) else x.float()
            return (a / self.divisor).to(x.dtype)

    def extra_repr(self) -> str:
        return f"k={self.k}, beta={self.beta} (divides by k^beta = {self.divisor:.6g})"


def lrn_layer(form: str, size: int = LRN_SIZE, alpha: float = LRN_ALPHA, alpha_mode: str = "per-size",
              towers: int = 1) -> nn.Module:
    """The module at an LRN place for model.lrn_form: "full" LRN, or "gain", its fixed gain only (`LRNGain`; the
    window, alpha and towers do not enter it)."""
    check_value("model.lrn_form", form)
    if form == "gain":
        return LRNGain()
    return LRN(size, alpha, alpha_mode=alpha_mode, towers=towers)


def activation(name: str) -> nn.Module:
    """ReLU (in place, as torchvision) or tanh, section 3.1."""
    check_value("model.activation", name)
    return nn.ReLU(inplace=True) if name == "relu" else nn.Tanh()


def _pool(cls: type[nn.Module], pooling: str) -> nn.Module:
    check_value("model.pooling", pooling)
    if pooling == "overlap":
        return cls(kernel_size=3, stride=2, ceil_mode=True)
    return cls(kernel_size=2, stride=2)


def max_pool(pooling: str) -> nn.MaxPool2d:
    """Overlapping 3/2 (cuda-convnet's ceil rule) or non-overlapping 2/2 max-pool, same output size."""
    return _pool(nn.MaxPool2d, pooling)


def avg_pool(pooling: str) -> nn.AvgPool2d:
    """Average-pool counterpart of `max_pool` (the four-layer CIFAR net pools by averaging after conv2, conv3)."""
    return _pool(nn.AvgPool2d, pooling)


def pool_out(n: int) -> int:
    """Spatial size after either pool above (3/2 ceil rule or 2/2 floor rule: both are n // 2)."""
    return n // 2


class GlobalBatchDropout(nn.Dropout):
    """Dropout whose mask is drawn for the whole global batch, then cut to this process's share of it.

    Every rank is seeded alike before a step (repro.engine.recipe.step_seed), so each draws the same global mask:
    a sample's mask is the same whether 1 or 8 processes share the batch (torch's dropout would draw each rank's
    own). The process group is read when the layer is built: models are built after it is joined."""

    def __init__(self, p: float):
        super().__init__(p)
        self.rank, self.world = rank_world()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        n = x.shape[0]
        keep = torch.empty((n * self.world, *x.shape[1:]), device=x.device, dtype=x.dtype).bernoulli_(1 - self.p)
        return x * keep[self.rank * n:(self.rank + 1) * n] / (1 - self.p)


def dropout(p: float) -> nn.Module:
    """Dropout, or an Identity in its place so state-dict indices stay those of torchvision's AlexNet."""
    check_value("model.dropout", p)
    return GlobalBatchDropout(p) if p > 0 else nn.Identity()


def init_weights(layers: dict[str, nn.Module], scheme: str, act: str, *,
                 std: float | dict[str, float] = 0.01, bias_one: tuple[str, ...] = ()) -> None:
    """Initialise named conv/linear layers in place; the last entry of `layers` is the classifier output.

    paper: weights N(0, std) (section 5), biases 1 for the layers in `bias_one`, 0 elsewhere.
    kaiming: He-normal fan-in weights for the activation used, zero biases; trains fast at small scales.
    """
    check_value("model.init", scheme)
    last = list(layers)[-1]
    for name, m in layers.items():
        if scheme == "paper":
            nn.init.normal_(m.weight, 0.0, std[name] if isinstance(std, dict) else std)
            nn.init.constant_(m.bias, 1.0 if name in bias_one else 0.0)
        else:
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="linear" if name == last else act)
            nn.init.zeros_(m.bias)

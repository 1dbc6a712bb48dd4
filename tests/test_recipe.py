"""Recipe details of the engine: which parameters weight decay touches, and the measured strength of LRN."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from repro.config import RunConfig, apply_overrides, config_hash
from repro.engine import fit
from repro.engine.scoring import lrn_strength
from repro.engine.recipe import make_optimizer
from repro.models import build_model
from repro.models.layers import LRN



def one_step_with_zero_gradient(decay_biases: bool) -> nn.Linear:
    layer = nn.Linear(3, 2)
    with torch.no_grad():
        layer.weight.fill_(2.0)
        layer.bias.fill_(1.0)
    t = apply_overrides(RunConfig(), {"train.lr": 0.5, "train.weight_decay": 0.25, "train.momentum": 0.9,
                                      "train.decay_biases": decay_biases}).train
    opt = make_optimizer(layer, t)
    for p in layer.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    return layer


def test_biases_are_not_decayed_by_default():
    layer = one_step_with_zero_gradient(decay_biases=False)
    assert torch.equal(layer.bias, torch.ones(2))  # exactly 1: no gradient, no decay
    # w <- w - lr * (g + wd * w) = 2 - 0.5 * 0.25 * 2 = 1.75, exact in binary
    assert torch.equal(layer.weight, torch.full((2, 3), 1.75))


def test_decay_biases_decays_them_like_weights():
    layer = one_step_with_zero_gradient(decay_biases=True)
    assert torch.equal(layer.bias, torch.full((2,), 0.875))  # 1 - 0.5 * 0.25 * 1
    assert torch.equal(layer.weight, torch.full((2, 3), 1.75))


def test_the_switch_changes_the_run_hash_and_groups_every_bias():
    cfg = apply_overrides(RunConfig(), {"model.num_classes": 4, "model.width": 0.25})
    assert config_hash(cfg) != config_hash(apply_overrides(cfg, {"train.decay_biases": True}))
    model = build_model(cfg.model)
    opt = make_optimizer(model, cfg.train)
    decayed, plain = opt.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decayed["weight_decay"] == 5e-4 and plain["weight_decay"] == 0.0
    assert all(names[id(p)].endswith("weight") for p in decayed["params"])
    assert sorted(names[id(p)] for p in plain["params"]) == sorted(n for n in names.values() if n.endswith("bias"))


def lrn_terms_numpy(a: np.ndarray, size: int, alpha: float, k: float, towers: int) -> np.ndarray:
    """alpha * sum over the window of channels (within a tower) of a_j^2, divided by k, per activation."""
    n, c, h, w = a.shape
    group, out = c // towers, np.zeros_like(a, dtype=np.float64)
    for i in range(c):
        lo, hi = max(i - size // 2, (i // group) * group), min(i + size // 2, (i // group + 1) * group - 1)
        out[:, i] = alpha * (a[:, lo:hi + 1].astype(np.float64) ** 2).sum(1) / k
    return out


@pytest.mark.parametrize("alpha_mode", ["paper", "per-size"])
def test_lrn_strength_is_the_formula_on_each_lrn_input(alpha_mode):
    torch.manual_seed(0)
    conv1, conv2 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3)
    lrn1, lrn2 = LRN(alpha=0.3, alpha_mode=alpha_mode), LRN(size=3, alpha=0.05, k=1.5, alpha_mode=alpha_mode, towers=2)
    model = nn.Sequential(conv1, nn.ReLU(), lrn1, conv2, nn.ReLU(), lrn2)
    x = 3 * torch.randn(4, 3, 9, 9)
    got = lrn_strength(model, x, alpha_mode=alpha_mode)

    a1 = torch.relu(conv1(x)).detach()
    a2 = torch.relu(conv2(lrn1(a1))).detach()
    for name, a, lrn in (("conv1", a1, lrn1), ("conv2", a2, lrn2)):
        alpha = lrn.alpha if alpha_mode == "paper" else lrn.alpha / lrn.size
        want = lrn_terms_numpy(a.numpy(), lrn.size, alpha, lrn.k, lrn.towers)
        assert got[name]["mean"] == pytest.approx(want.mean(), rel=1e-5)
        assert got[name]["p99"] == pytest.approx(np.percentile(want, 99), rel=1e-5)
    assert got["alpha_mode"] == alpha_mode and set(got) == {"conv1", "conv2", "alpha_mode"}
    assert got["conv1"]["p99"] > got["conv1"]["mean"] > 0
    assert lrn_strength(nn.Sequential(conv1, nn.ReLU()), x, alpha_mode=alpha_mode) is None




@pytest.mark.parametrize("lrn", [True, False])
def test_a_run_records_its_lrn_strength(tmp_path, small_betons, lrn):
    torch.set_num_threads(1)
    cfg = apply_overrides(RunConfig(), {
        "data.dir": str(small_betons), "data.backend": "torch", "data.workers": 1, "model.name": "cifar4",
        "model.num_classes": 4, "model.input_size": 28, "model.stem": "tiny", "model.lrn": lrn,
        "model.lrn_alpha_mode": "paper", "train.epochs": 1, "train.batch_size": 16, "train.device": "cpu",
        "train.ten_crop": False})
    record = fit(cfg, tmp_path, progress=False)
    assert record.status == "done"
    if not lrn:
        assert record.lrn_strength is None
        return
    assert set(record.lrn_strength) == {"conv1", "conv2", "alpha_mode"} and record.lrn_strength["alpha_mode"] == "paper"
    for layer in ("conv1", "conv2"):
        stats = record.lrn_strength[layer]
        assert 0 < stats["mean"] <= stats["p99"] and np.isfinite(stats["p99"])

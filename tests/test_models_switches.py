"""Every ModelConfig switch changes what it should and nothing else; bad values are one-line UserErrors."""

import math

import pytest
import torch
from torch import nn

from repro.config import ModelConfig, RunConfig, apply_overrides, config_hash
from repro.errors import UserError
from repro.models import build_model, default_config
from repro.models.layers import LRN, LRNGain

SMALL = dict(input_size=32, stem="tiny", width=0.25, num_classes=10)


def small(**kw):
    return build_model(ModelConfig(**{**SMALL, **kw}))


def meta(**kw):
    with torch.device("meta"):
        return build_model(ModelConfig(**kw))


def of_type(model, cls):
    return [m for m in model.modules() if isinstance(m, cls)]


def spatial_sizes(model, size):
    sizes = []
    for m in of_type(model, (nn.MaxPool2d, nn.AvgPool2d)):
        m.register_forward_hook(lambda m, i, o: sizes.append(o.shape[-1]))
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, size, size, device=next(model.parameters()).device))
    return sizes


def forwards(model, size=32):
    with torch.no_grad():
        out = model.eval()(torch.randn(2, 3, size, size))
    return out.shape == (2, model.classifier[-1].out_features) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["alexnet-paper", "cifar4"])
def test_activation(name):
    base = {**SMALL, "name": name}
    relu, tanh = build_model(ModelConfig(**base)), build_model(ModelConfig(**base, activation="tanh"))
    n = 7 if name == "alexnet-paper" else 3  # after every conv and hidden FC layer
    assert (len(of_type(relu, nn.ReLU)), len(of_type(relu, nn.Tanh))) == (n, 0)
    assert (len(of_type(tanh, nn.ReLU)), len(of_type(tanh, nn.Tanh))) == (0, n)
    assert forwards(tanh)


@pytest.mark.parametrize("name", ["alexnet-paper", "alexnet-owt", "cifar4"])
def test_lrn_switch_and_mode(name):
    base = {**SMALL, "name": name}
    assert of_type(build_model(ModelConfig(**base, lrn=False)), LRN) == []
    for mode in ("paper", "per-size"):
        lrns = of_type(build_model(ModelConfig(**base, lrn=True, lrn_alpha_mode=mode)), LRN)
        assert len(lrns) == 2 and {m.alpha_mode for m in lrns} == {mode}
    assert [m.size for m in lrns] == ([3, 3] if name == "cifar4" else [5, 5])


@pytest.mark.parametrize("name", ["alexnet-paper", "alexnet-owt", "cifar4"])
def test_gain_form_takes_each_lrns_place_and_divides_by_k_to_the_beta(name):
    base = {**SMALL, "name": name, "lrn": True}
    full, gain = build_model(ModelConfig(**base)), build_model(ModelConfig(**base, lrn_form="gain"))

    def at(model, cls):
        return [i for i, m in enumerate(model.features) if isinstance(m, cls)]

    assert len(at(full, LRN)) == 2 and at(gain, LRNGain) == at(full, LRN) and at(gain, LRN) == []
    assert gain.layer_paths == full.layer_paths and gain.state_dict().keys() == full.state_dict().keys()
    seen = []
    for i in at(gain, LRNGain):  # in place, on the activations of a two-tower (alexnet-paper) or one-tower net
        gain.features[i].register_forward_hook(lambda m, inp, out: seen.append(torch.equal(out, inp[0] / 2 ** 0.75)))
    assert forwards(gain) and seen == [True, True]


def test_gain_form_without_lrn_is_refused_however_the_config_is_layered():
    cfg = apply_overrides(RunConfig(), {"model.lrn_form": "gain"})
    assert cfg.model.lrn and config_hash(cfg) != config_hash(RunConfig())
    for attempt in (lambda: apply_overrides(cfg, {"model.lrn": "false"}),  # a --set on top of a gain variant
                    lambda: apply_overrides(apply_overrides(RunConfig(), {"model.lrn": False}),
                                            {"model.lrn_form": "gain"}),
                    lambda: default_config("alexnet-owt", lrn_form="gain")):  # torchvision's net has no LRN
        with pytest.raises(UserError, match=r"model.lrn_form = 'gain' needs model.lrn = true") as e:
            attempt()
        assert "\n" not in str(e.value)
    assert of_type(build_model(default_config("alexnet-owt", lrn=True, lrn_form="gain")), LRNGain)


def test_lrn_follows_relu_in_conv1_and_conv2():
    kinds = [type(m).__name__ for m in small().features]
    assert kinds[:6] == ["Conv2d", "ReLU", "LRN", "MaxPool2d", "Conv2d", "ReLU"]
    assert kinds[6:8] == ["LRN", "MaxPool2d"]


@pytest.mark.parametrize("cfg, size, conv1_out", [
    # conv1 output by cuda-convnet's rule 1 + ceil((n - 11) / 4), torchvision's pad 2, or the tiny stem's n
    ({}, 224, 55), ({"input_size": 227}, 227, 55), ({"input_size": 128}, 128, 31), ({"input_size": 96}, 96, 23),
    ({"stem": "tiny", "input_size": 28}, 28, 28), ({"stem": "tiny", "input_size": 32}, 32, 32),
    ({"stem": "tiny", "input_size": 64}, 64, 64), ({"stem": "tiny", "input_size": 45}, 45, 45),
    ({"name": "alexnet-owt"}, 224, 55), ({"name": "alexnet-owt", "input_size": 227}, 227, 56),
    ({"name": "cifar4", "input_size": 32}, 32, 32), ({"name": "cifar4", "input_size": 28}, 28, 28),
])
def test_non_overlapping_pools_keep_the_output_size(cfg, size, conv1_out):
    overlap = meta(**cfg, width=0.25)
    plain = meta(**cfg, width=0.25, pooling="non-overlap")
    pools = of_type(plain, (nn.MaxPool2d, nn.AvgPool2d))
    assert len(pools) == 3 and all(p.kernel_size in (2, (2, 2)) and p.stride in (2, (2, 2)) for p in pools)
    assert all(p.kernel_size == 3 and p.stride == 2 for p in of_type(overlap, (nn.MaxPool2d, nn.AvgPool2d)))
    expected, n = [], conv1_out
    for _ in range(3):  # cuda-convnet's pooling rule: 1 + ceil((n - 3) / 2)
        n = 1 + math.ceil((n - 3) / 2)
        expected.append(n)
    assert spatial_sizes(overlap, size) == expected
    assert spatial_sizes(plain, size) == expected


def test_pool_sizes_at_224_are_the_papers():
    assert spatial_sizes(meta(), 224) == [27, 13, 6]


@pytest.mark.parametrize("towers, widths", [
    ("two", [96, 256, 384, 384, 256]), ("one-full", [96, 256, 384, 384, 256]),
    ("one-half", [48, 128, 192, 192, 256]),
])
def test_towers_widths(towers, widths):
    model = meta(towers=towers)
    assert [model.layer(f"conv{i}").out_channels for i in range(1, 6)] == widths
    assert (model.layer("fc6").out_features, model.layer("fc7").out_features) == (4096, 4096)
    assert forwards(small(towers=towers))


@pytest.mark.parametrize("removed", ["conv2", "conv3", "conv4", "conv5"])
@pytest.mark.parametrize("towers", ["two", "one-half"])
def test_removed_layer_still_forwards(removed, towers):
    model = small(remove_layer=removed, towers=towers)
    assert removed not in model.layer_paths and forwards(model)


def test_dropout_probability():
    model = meta(dropout=0.3)
    assert [m.p for m in of_type(model, nn.Dropout)] == [0.3, 0.3]
    assert of_type(meta(dropout=0.0), nn.Dropout) == []
    assert [m.p for m in of_type(build_model(default_config("cifar4", dropout=0.5)), nn.Dropout)] == [0.5]


@pytest.mark.parametrize("width", [0.5, 0.3, 0.1])
def test_width_multiplier_scales_conv_and_fc_and_keeps_towers_even(width):
    model = meta(width=width)
    for i, full in enumerate([96, 256, 384, 384, 256], start=1):
        out = model.layer(f"conv{i}").out_channels
        assert out % 2 == 0 and abs(out - full * width) <= 1
    assert model.layer("fc6").out_features == round(4096 * width) == model.features_dim
    half = meta(width=width, towers="one-half")
    assert half.layer("conv1").out_channels == model.layer("conv1").out_channels // 2


def test_tiny_stem():
    conv1 = small().layer("conv1")
    assert (conv1.kernel_size, conv1.stride, conv1.padding) == ((5, 5), (1, 1), (2, 2))
    big = meta().layer("conv1")
    assert (big.kernel_size, big.stride) == ((11, 11), (4, 4))


def test_num_classes():
    assert meta(num_classes=17).layer("fc8").out_features == 17
    assert build_model(default_config("cifar4", num_classes=3)).layer("fc").out_features == 3


def test_paper_init_statistics():
    model = build_model(ModelConfig())  # full size: the paper's layers, N(0, 0.01), biases 1 where section 5 says
    for name, layer in model.named_layers().items():
        w = layer.weight.detach()
        assert abs(w.std().item() - 0.01) < 0.01 * 0.03 and abs(w.mean().item()) < 1e-3, name
        expected_bias = 1.0 if name in ("conv2", "conv4", "conv5", "fc6", "fc7") else 0.0
        assert torch.equal(layer.bias.detach(), torch.full_like(layer.bias, expected_bias)), name


def test_kaiming_init_statistics():
    model = build_model(ModelConfig(init="kaiming", width=0.5))
    for name, layer in model.named_layers().items():
        w = layer.weight.detach()
        fan_in = w[0].numel()
        gain = 1.0 if name == "fc8" else math.sqrt(2.0)
        assert abs(w.std().item() - gain / math.sqrt(fan_in)) < 0.05 * gain / math.sqrt(fan_in), name
        assert torch.count_nonzero(layer.bias) == 0


def test_cifar4_paper_init_uses_layers_18pct_scales():
    model = build_model(default_config("cifar4"))
    assert abs(model.layer("conv1").weight.std().item() - 1e-4) < 1e-5
    assert abs(model.layer("conv3").weight.std().item() - 1e-2) < 1e-3


@pytest.mark.parametrize("name, cfg, match", [
    ("alexnet-paper", {"width": 0.0}, "model.width"),
    ("alexnet-paper", {"num_classes": 0}, "model.num_classes"),
    ("alexnet-paper", {"dropout": 1.0}, "model.dropout"),
    ("alexnet-paper", {"input_size": 32}, "model.input_size"),
    ("alexnet-paper", {"input_size": 11, "stem": "tiny"}, "model.input_size"),  # 11 -> 5 -> 2: no 3x3 pool
    ("cifar4", {"towers": "one-half"}, "model.towers"),
    ("cifar4", {"remove_layer": "conv4"}, "model.remove_layer"),
    ("cifar4", {"input_size": 8}, "model.input_size"),
    ("cifar4", {"lrn_form": "none"}, "model.lrn_form"),
    ("alexnet-paper", {"lrn": False, "lrn_form": "gain"}, "model.lrn_form"),
])
def test_bad_values_are_user_errors(name, cfg, match):
    with pytest.raises(UserError, match=match) as e:
        build_model(ModelConfig(name=name, **cfg))
    assert "\n" not in str(e.value)


def _layout(model) -> list[str]:
    """The classifier's layers by kind (every dropout layer is a torch Dropout, whatever draws its mask)."""
    return ["Dropout" if isinstance(m, torch.nn.Dropout) else type(m).__name__ for m in model.classifier]


def test_paper_drops_the_outputs_of_fc6_and_fc7_owt_their_inputs():
    # the paper and Caffe's bvlc_alexnet: fc6 -> relu6 -> drop6 -> fc7 -> relu7 -> drop7 -> fc8
    assert _layout(meta()) == ["Linear", "ReLU", "Dropout", "Linear", "ReLU", "Dropout", "Linear"]
    # torchvision's AlexNet: drop -> fc6 -> relu -> drop -> fc7 -> relu -> fc8
    owt = meta(**vars(default_config("alexnet-owt")))
    assert _layout(owt) == ["Dropout", "Linear", "ReLU", "Dropout", "Linear", "ReLU", "Linear"]
    assert _layout(meta(dropout=0.0)) == ["Linear", "ReLU", "Identity", "Linear", "ReLU", "Identity", "Linear"]


def _fc_inputs_and_outputs(model, x):
    """In train mode: the input of fc6, fc7 and fc8, and the outputs of the features and fc6, fc7 after ReLU."""
    seen = {}
    for name in ("fc6", "fc7", "fc8"):
        model.layer(name).register_forward_pre_hook(lambda m, i, name=name: seen.__setitem__(name + "_in", i[0]))
        model.layer(name).register_forward_hook(
            lambda m, i, o, name=name: seen.__setitem__(name + "_act", torch.relu(o)))
    model.features.register_forward_hook(lambda m, i, o: seen.__setitem__("pool5", o.flatten(1)))
    with torch.no_grad():
        model.train()(x)
    return seen


@pytest.mark.parametrize("name", ["alexnet-paper", "alexnet-owt"])
def test_dropout_masks_land_where_each_layout_puts_them(name):
    torch.manual_seed(0)
    model = build_model(default_config(name, **SMALL, dropout=0.5))
    s = _fc_inputs_and_outputs(model, torch.randn(8, 3, 32, 32))

    def dropped(before, after):
        """Share of positive units zeroed, checking the rest are scaled by 1 / (1 - p) = 2."""
        on = before > 0
        kept = after[on] != 0
        torch.testing.assert_close(after[on][kept], 2 * before[on][kept])
        return 1 - kept.float().mean().item()

    if name == "alexnet-paper":
        torch.testing.assert_close(s["fc6_in"], s["pool5"])  # pool5 is not dropped
        assert 0.4 < dropped(s["fc6_act"], s["fc7_in"]) < 0.6
        assert 0.4 < dropped(s["fc7_act"], s["fc8_in"]) < 0.6  # fc7's output is
    else:
        assert 0.4 < dropped(s["pool5"], s["fc6_in"]) < 0.6
        assert 0.4 < dropped(s["fc6_act"], s["fc7_in"]) < 0.6
        torch.testing.assert_close(s["fc8_in"], s["fc7_act"])  # torchvision never drops fc7's output


def test_dropout_masks_are_drawn_for_the_global_batch_and_cut_per_process():
    # one process with the whole batch, and each of two processes with its half, seeded alike before the step:
    # every sample gets the same mask (torch's own dropout would draw each process's half anew)
    from repro.models.layers import GlobalBatchDropout

    x = torch.randn(8, 32)
    whole = GlobalBatchDropout(0.5).train()
    torch.manual_seed(3)
    full = whole(x)
    halves = []
    for rank in (0, 1):
        layer = GlobalBatchDropout(0.5).train()
        layer.rank, layer.world = rank, 2
        torch.manual_seed(3)
        halves.append(layer(x[4 * rank:4 * (rank + 1)]))
    assert torch.equal(torch.cat(halves), full)
    assert ((full == 0).float().mean() - 0.5).abs() < 0.15 and torch.equal(full[full != 0], 2 * x[full != 0])
    assert torch.equal(whole.eval()(x), x)
    torch.manual_seed(3)
    assert not torch.equal(torch.nn.functional.dropout(x[4:], 0.5), halves[1])  # the per-process draw differs

"""The AlexNet family and the CIFAR net: parameter counts (PAPER.md), shapes, towers, torchvision equivalence."""

import pytest
import torch
import torchvision
from rich.console import Console
from torch import nn

from repro.config import ModelConfig, RunConfig, apply_overrides
from repro.models import (build_model, count_macs, count_params, default_config, list_models, model_size,
                          models_table)


def conv(c_out, c_in, k, groups=1):
    return c_out * (c_in // groups) * k * k + c_out


def fc(n_in, n_out):
    return n_in * n_out + n_out


def meta_model(**kw):
    """Built on the meta device: parameter counts and shapes without allocating 60M floats."""
    with torch.device("meta"):
        return build_model(ModelConfig(**kw))


def pool_sizes(model, size, device="meta"):
    """Spatial size after conv1 and after every pool, recorded by forward hooks."""
    sizes = []
    hooks = [m.register_forward_hook(lambda m, i, o: sizes.append(o.shape[-1]))
             for m in [model.layer("conv1")] + [m for m in model.modules()
                                                 if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d))]]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, size, size, device=device))
    for h in hooks:
        h.remove()
    return sizes


# ---- parameter counts against PAPER.md --------------------------------------------------------------------

PAPER_CONV = conv(96, 3, 11) + conv(256, 96, 5, 2) + conv(384, 256, 3) + conv(384, 384, 3, 2) + conv(256, 384, 3, 2)
PAPER_FC = fc(256 * 6 * 6, 4096) + fc(4096, 4096) + fc(4096, 1000)


def test_paper_net_has_the_papers_parameter_count():
    assert PAPER_CONV == 2_334_080 and PAPER_FC == 58_631_144  # PAPER.md's split, by hand
    model = meta_model()
    conv_params = sum(p.numel() for p in model.features.parameters())
    assert (conv_params, count_params(model)) == (2_334_080, 60_965_224)


def test_same_widths_without_grouping_has_62_378_344():
    assert count_params(meta_model(towers="one-full")) == 62_378_344


def test_owt_has_torchvisions_count():
    assert count_params(meta_model(**vars(default_config("alexnet-owt")))) == 61_100_840
    assert count_params(torchvision.models.alexnet(weights=None)) == 61_100_840


def test_one_half_halves_every_conv_but_the_last():
    expected = (conv(48, 3, 11) + conv(128, 48, 5) + conv(192, 128, 3) + conv(192, 192, 3) + conv(256, 192, 3)
                + PAPER_FC)
    assert count_params(meta_model(towers="one-half")) == expected


@pytest.mark.parametrize("removed, convs, fc_in", [
    # conv3 sees conv1's 96 maps (conv3 connects both towers), pooled twice: 27 -> 13 as with conv2
    ("conv2", conv(96, 3, 11) + conv(384, 96, 3) + conv(384, 384, 3, 2) + conv(256, 384, 3, 2), 256),
    ("conv3", conv(96, 3, 11) + conv(256, 96, 5, 2) + conv(384, 256, 3, 2) + conv(256, 384, 3, 2), 256),
    ("conv4", conv(96, 3, 11) + conv(256, 96, 5, 2) + conv(384, 256, 3) + conv(256, 384, 3, 2), 256),
    ("conv5", conv(96, 3, 11) + conv(256, 96, 5, 2) + conv(384, 256, 3) + conv(384, 384, 3, 2), 384),
])
def test_removing_a_layer_reconnects_its_neighbours(removed, convs, fc_in):
    model = meta_model(remove_layer=removed)
    expected = convs + fc(fc_in * 36, 4096) + fc(4096, 4096) + fc(4096, 1000)
    assert count_params(model) == expected
    with pytest.raises(KeyError):
        model.layer(removed)
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 4


@pytest.mark.parametrize("removed, params, fc6_inputs", [
    # by hand from the conv and fc sizes above (see test_paper_net_has_the_papers_parameter_count for "none")
    ("none", 60_965_224, 9_216),
    ("conv2", 60_965_224 - 307_456 - 885_120 + 332_160, 9_216),        # conv3 from 96 maps: 384*96*9 + 384
    ("conv3", 60_965_224 - 885_120 - 663_936 + 442_752, 9_216),        # conv4 from 2 x 128: 384*128*9 + 384
    ("conv4", 60_965_224 - 663_936, 9_216),                            # conv5 still sees 2 x 192
    ("conv5", 60_965_224 - 442_624 - 37_752_832 + 56_627_200, 13_824),  # fc6 from 384*6*6: 13,824*4096 + 4096
])
def test_model_size_of_each_layer_removal_variant(removed, params, fc6_inputs):
    assert model_size(ModelConfig(remove_layer=removed)) == (params, fc6_inputs)
    assert model_size(ModelConfig(remove_layer="conv2")).params == 60_104_808
    assert model_size(ModelConfig(remove_layer="conv5")).params == 79_396_968


def test_removing_conv2_keeps_the_map_sizes():
    model = meta_model(remove_layer="conv2")
    assert pool_sizes(model, 224) == [55, 27, 13, 6]  # conv1, its pool, conv2's pool (kept), pool5
    assert model.layer("conv3").in_channels == 96 and model.layer("conv3").groups == 1


def test_one_half_keeps_the_last_remaining_conv_full():
    model = meta_model(towers="one-half", remove_layer="conv5")
    assert [model.layer(n).out_channels for n in ("conv1", "conv2", "conv3", "conv4")] == [48, 128, 192, 384]


def test_cifar4_parameter_count():
    expected = conv(32, 3, 5) + conv(32, 32, 5) + conv(64, 32, 5) + fc(64 * 4 * 4, 10)
    assert count_params(meta_model(**vars(default_config("cifar4")))) == expected


# ---- shapes -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size, pad", [(224, 3), (227, 0)])
def test_paper_input_rules_both_give_55(size, pad):
    model = build_model(ModelConfig(input_size=size)).eval()
    assert model.features[0].padding == (0, pad, 0, pad)  # cuda-convnet's rule at 224, Caffe's 227 needs none
    assert pool_sizes(model, size, device="cpu") == [55, 27, 13, 6]
    with torch.no_grad():
        feats = model.forward_features(torch.randn(1, 3, size, size))
        assert feats.shape == (1, 4096) and model.features_dim == 4096
        assert model.classifier[-1](feats).shape == (1, 1000)


@pytest.mark.parametrize("size, expected", [(28, [28, 14, 7, 3]), (32, [32, 16, 8, 4]), (24, [24, 12, 6, 3])])
def test_tiny_stem_small_inputs(size, expected):
    model = build_model(ModelConfig(input_size=size, stem="tiny", width=0.25, num_classes=10))
    assert pool_sizes(model, size, device="cpu") == expected
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, size, size)).shape == (2, 10)
        assert model.forward_features(torch.randn(2, 3, size, size)).shape == (2, 1024)


def test_cifar4_shapes():
    model = build_model(default_config("cifar4"))
    assert pool_sizes(model, 32, device="cpu") == [32, 16, 8, 4]
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)
        assert model.forward_features(torch.randn(2, 3, 32, 32)).shape == (2, model.features_dim) == (2, 1024)


def test_forward_features_is_the_fc7_activation():
    model = build_model(ModelConfig(input_size=32, stem="tiny", width=0.25, num_classes=7)).eval()
    seen = []
    model.classifier[4].register_forward_hook(lambda m, i, o: seen.append(o.clone()))  # the ReLU after fc7
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats, logits = model.forward_features(x), model(x)
    torch.testing.assert_close(feats, seen[0])
    torch.testing.assert_close(logits, feats @ model.layer("fc8").weight.T + model.layer("fc8").bias)


def test_conv1_weight_by_tower():
    model = meta_model()
    t1, t2 = model.conv1_weight()
    assert t1.shape == t2.shape == (48, 3, 11, 11)
    w = model.layer("conv1").weight
    assert t1.data_ptr() == w.data_ptr() and t2.shape[0] + t1.shape[0] == w.shape[0]
    one, none = meta_model(towers="one-full").conv1_weight()
    assert one.shape == (96, 3, 11, 11) and none is None
    assert build_model(default_config("cifar4")).conv1_weight()[0].shape == (32, 3, 5, 5)


# ---- towers -----------------------------------------------------------------------------------------------

def _slice(model, first: str, last: str) -> nn.Sequential:
    """features from just after layer `first` up to and including layer `last`."""
    i = int(model.layer_paths[first].split(".")[1])
    j = int(model.layer_paths[last].split(".")[1])
    return model.features[i + 1:j + 1]


def _tower1_unchanged(model, first, last, watch, channels, size):
    """Perturb the tower-2 half of `first`'s output; return whether tower 1's half of each watched layer moved."""
    outs = {}
    hooks = [model.layer(n).register_forward_hook(lambda m, i, o, n=n: outs.setdefault(n, []).append(o))
             for n in watch]
    x = torch.rand(1, channels, size, size) * 5
    y = x.clone()
    y[:, channels // 2:] += torch.randn(1, channels - channels // 2, size, size)
    net = _slice(model, first, last)
    with torch.no_grad():
        net(x), net(y)
    for h in hooks:
        h.remove()
    result = {}
    for n in watch:
        a, b = outs[n]
        half = a.shape[1] // 2
        result[n] = (torch.equal(a[:, :half], b[:, :half]), torch.equal(a[:, half:], b[:, half:]))
    return result


def test_tower_2_inputs_never_reach_tower_1_in_conv2_conv4_conv5():
    model = build_model(ModelConfig(width=0.5)).eval()  # half width: the same wiring, faster
    c1, c3 = model.layer("conv1").out_channels, model.layer("conv3").out_channels
    # through ReLU, LRN and pool into conv2
    assert _tower1_unchanged(model, "conv1", "conv2", ["conv2"], c1, 55) == {"conv2": (True, False)}
    # conv3's output, split by tower, into conv4 and then conv5
    assert _tower1_unchanged(model, "conv3", "conv5", ["conv4", "conv5"], c3, 13) == \
        {"conv4": (True, False), "conv5": (True, False)}


def test_without_towers_the_perturbation_does_reach_tower_1():
    model = build_model(ModelConfig(width=0.5, towers="one-full")).eval()
    c1 = model.layer("conv1").out_channels
    assert _tower1_unchanged(model, "conv1", "conv2", ["conv2"], c1, 55) == {"conv2": (False, False)}


def test_grouping_per_layer():
    groups = {n: meta_model().layer(n).groups for n in ("conv1", "conv2", "conv3", "conv4", "conv5")}
    assert groups == {"conv1": 1, "conv2": 2, "conv3": 1, "conv4": 2, "conv5": 2}
    for towers in ("one-half", "one-full"):
        assert all(m.groups == 1 for m in meta_model(towers=towers).modules() if isinstance(m, nn.Conv2d))


# ---- torchvision equivalence -------------------------------------------------------------------------------

def test_owt_state_dict_loads_into_torchvision_with_identical_outputs():
    torch.manual_seed(0)
    ours = build_model(default_config("alexnet-owt", init="kaiming")).eval()
    theirs = torchvision.models.alexnet(weights=None).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        a, b = ours(x), theirs(x)
    assert a.abs().max() > 0
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


# ---- registry and table -----------------------------------------------------------------------------------

def test_macs_match_a_count_by_hand():
    # torchvision's one-tower net at 224: conv maps 55, 27, 13, 13, 13, then 6x6 into fc6
    by_hand = (55 * 55 * 64 * 3 * 121 + 27 * 27 * 192 * 64 * 25 + 13 * 13 * 384 * 192 * 9
               + 13 * 13 * 256 * 384 * 9 + 13 * 13 * 256 * 256 * 9 + 9216 * 4096 + 4096 * 4096 + 4096 * 1000)
    assert count_macs(meta_model(**vars(default_config("alexnet-owt"))), 224) == by_hand
    # grouping halves the within-tower MACs
    grouped = (55 * 55 * 96 * 3 * 121 + 27 * 27 * 256 * 48 * 25 + 13 * 13 * 384 * 256 * 9
               + 13 * 13 * 384 * 192 * 9 + 13 * 13 * 256 * 192 * 9 + 9216 * 4096 + 4096 * 4096 + 4096 * 1000)
    assert count_macs(meta_model(), 224) == grouped


def test_models_table_lists_every_model_with_its_count():
    console = Console(record=True, width=200)
    console.print(models_table())
    text = console.export_text()
    for name, params in [("alexnet-paper", "60,965,224"), ("alexnet-owt", "61,100,840"), ("cifar4", "89,578")]:
        assert any(name in line and params in line for line in text.splitlines())


def test_registry_builds_a_registered_function_and_refuses_unknown_names(monkeypatch):
    from repro.errors import UserError
    from repro.models import registry, register_model

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    @register_model("linear-probe", summary="a test model", defaults={"num_classes": 3})
    def linear_probe(cfg):
        return nn.Linear(4, cfg.num_classes)

    assert "linear-probe" in list_models()
    assert build_model(default_config("linear-probe")).out_features == 3
    # the config's check reads the registry: a registered model is a valid model.name, an unknown one is not
    assert apply_overrides(RunConfig(), {"model.name": "linear-probe"}).model.name == "linear-probe"
    with pytest.raises(UserError, match="model.name = 'vgg16' is not a registered model"):
        apply_overrides(RunConfig(), {"model.name": "vgg16"})
    with pytest.raises(UserError, match="not a registered model"):
        build_model(ModelConfig(name="vgg16"))

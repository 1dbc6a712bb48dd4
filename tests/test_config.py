"""Run configuration: defaults are the paper's recipe, overrides are checked, the hash covers results only."""

import dataclasses

import pytest

from repro.config import (RunConfig, apply_overrides, config_hash, flatten, from_dict, parse_set, to_dict)
from repro.errors import UserError


def test_defaults_are_the_papers_recipe():
    cfg = RunConfig()
    # Section 5 of the paper.
    assert (cfg.train.batch_size, cfg.train.momentum, cfg.train.weight_decay, cfg.train.lr) == (128, 0.9, 5e-4, 0.01)
    assert cfg.train.lr_drops == 3 and cfg.train.epochs == 90
    # Sections 3.3, 3.4, 4.1, 4.2.
    assert cfg.model.lrn and cfg.model.pooling == "overlap" and cfg.model.towers == "two"
    assert cfg.data.pca_lighting == 0.1 and cfg.model.dropout == 0.5


def test_overrides_coerce_strings_from_the_command_line():
    cfg = apply_overrides(RunConfig(), parse_set(["model.lrn=false", "train.lr=0.02", "train.epochs=3",
                                                  "model.activation=tanh"]))
    assert cfg.model.lrn is False and cfg.train.lr == 0.02 and cfg.train.epochs == 3
    assert cfg.model.activation == "tanh"
    assert RunConfig().model.lrn is True  # the default object is untouched


@pytest.mark.parametrize("overrides, fragment", [
    ({"model.lrm": "false"}, "did you mean model.lrn"),
    ({"train.epochs": "three"}, "not a valid int"),
    ({"train.epochs": 2.5}, "not a valid int"),
    ({"model.lrn": "maybe"}, "not a valid bool"),
    ({"model.activation": "gelu"}, "not one of relu, tanh"),
    ({"nosection": 1}, "unknown key"),
])
def test_bad_overrides_name_the_key(overrides, fragment):
    with pytest.raises(UserError) as e:
        apply_overrides(RunConfig(), overrides, source="exp.toml")
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_parse_set_needs_key_value():
    with pytest.raises(UserError, match="key=value"):
        parse_set(["train.lr"])


def test_hash_ignores_where_the_data_lives_but_not_what_it_is():
    base = RunConfig()
    moved = apply_overrides(base, {"data.dir": "/elsewhere", "data.workers": 8, "train.compile": True})
    assert config_hash(moved) == config_hash(base)
    for key, value in [("data.manifest_hash", "abc"), ("model.lrn", False), ("train.seed", 1),
                       ("data.pca_lighting", 0.0)]:
        assert config_hash(apply_overrides(base, {key: value})) != config_hash(base), key


def test_round_trip_through_dict():
    cfg = apply_overrides(RunConfig(), {"model.towers": "one-half", "train.seed": 3})
    again = from_dict(to_dict(cfg))
    assert again == cfg and config_hash(again) == config_hash(cfg)
    assert set(flatten(cfg)) == {f"{s.name}.{f.name}" for s in dataclasses.fields(RunConfig)
                                 for f in dataclasses.fields(getattr(cfg, s.name))}


def test_from_dict_rejects_unknown_sections():
    with pytest.raises(UserError, match="old.json: unknown config section 'optim'"):
        from_dict({"optim": {"lr": 1}}, source="old.json")

"""The claim registry: every real file loads and resolves; broken files name the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

import repro.experiments as ex
from repro.plan import resolve
from repro.scales import load_scales, scale_names
from repro.claims import get_kind, kind_names
from repro.cli import app
from repro.config import RunConfig, apply_overrides, config_hash
from repro.errors import UserError

PAPER_IDS = ["baseline", "ensemble", "relu-vs-tanh", "two-gpu-split", "ablation-lrn", "ablation-overlap-pool",
             "pca-lighting", "dropout", "layer-removal", "ten-crop", "first-layer-filters", "retrieval"]


def test_every_paper_claim_is_registered_and_valid():
    reg = ex.load_registry()
    assert set(PAPER_IDS) <= set(reg), set(PAPER_IDS) - set(reg)  # the claims table of the paper
    for name, e in reg.items():
        assert e.name == name and e.section and e.claim and e.kind in kind_names()
        if get_kind(e.kind).needs_arms:
            assert e.control in e.groups and all(t in e.groups for t in e.treatments)
    # the page order and the later re-measurements come from the files
    assert sorted(PAPER_IDS, key=lambda n: reg[n].order) == PAPER_IDS
    assert any("VGG" in line for line in reg["ablation-lrn"].context)


def test_paper_numbers_match_the_paper():
    reg = ex.load_registry()
    # the paper's single-CNN numbers are ten-crop (section 4.1), judged within the file's one tolerance
    assert reg["baseline"].paper["top1_err_10crop"] == 40.7 and reg["baseline"].paper["top5_err_10crop"] == 18.2
    assert reg["baseline"].metric == "top1_err_10crop"
    assert f"within {reg['baseline'].judge['tolerance']:g} points" in reg["baseline"].reproduced_if
    assert reg["ablation-lrn"].paper["top1_err"] == -1.4 and reg["ablation-lrn"].paper["top5_err"] == -1.2
    assert reg["two-gpu-split"].paper["top1_err"] == -1.7
    assert reg["ablation-overlap-pool"].paper["top5_err"] == -0.3
    assert reg["ensemble"].paper["top1_err"] == pytest.approx(38.1 - 40.7)
    assert reg["ten-crop"].paper["top1_err"] == pytest.approx(37.5 - 39.0)
    assert reg["relu-vs-tanh"].paper["speedup"] == 6.0


@pytest.mark.parametrize("scale", scale_names())
def test_every_experiment_resolves_and_the_baseline_is_shared(fake_manifest, scale):
    reg = ex.load_registry()
    scales = load_scales()
    # the baseline config computed by hand: paper defaults + the scale's table, seed 0
    table = scales[scale].overrides
    base = apply_overrides(RunConfig(), {**table, "data.dir": scales[scale].data, "train.seed": 0,
                                         "data.manifest_hash": fake_manifest[0], "model.num_classes": fake_manifest[1]})
    base_hash = config_hash(base)
    sharing = {"baseline": "baseline", "ensemble": "baseline", "ablation-lrn": "lrn", "ablation-overlap-pool": "overlap",
               "pca-lighting": "pca", "dropout": "dropout", "two-gpu-split": "two", "layer-removal": "full",
               "ten-crop": "baseline", "first-layer-filters": "baseline", "retrieval": "baseline"}
    for name, e in reg.items():
        runs = resolve(e, scale, scales=scales)
        assert runs and all(r.cfg.model.num_classes == fake_manifest[1] for r in runs)
        assert len({r.config_hash for r in runs}) == len(runs)  # no two variants collapse into one run
        if name in sharing:
            seed0 = [r for r in runs if r.variant == sharing[name] and r.seed == 0]
            own = {k: v for k, v in e.scales.get(scale, {}).items() if k not in ("seeds", "data")}
            if own:
                # a claim with its own sizes at this scale (dropout: a small subset trained long enough to overfit)
                assert seed0[0].cfg == apply_overrides(base, own), name
                continue
            # every other claim, ten-crop included (it scores the baseline's weights), trains the baseline once
            assert seed0[0].config_hash == base_hash, name


def test_relu_vs_tanh_is_the_unregularised_four_layer_net(fake_manifest):
    e = ex.load_registry()["relu-vs-tanh"]
    runs = resolve(e, "demo")
    assert {r.group for r in runs} == {"relu", "tanh"}
    assert len({r.cfg.train.lr for r in runs}) >= 2  # a learning-rate sweep per activation
    for r in runs:
        assert r.cfg.model.name == "cifar4" and r.cfg.train.weight_decay == 0 and r.cfg.model.dropout == 0
        assert r.cfg.data.pca_lighting == 0 and not r.cfg.data.flip
        assert r.cfg.model.activation == r.group


def _write(d: Path, name: str, text: str) -> Path:
    p = d / f"{name}.toml"
    p.write_text(text)
    return p


GOOD = """
title = "t"
section = "1"
claim = "c"
kind = "effect"
control = "a"
treatments = ["b"]
[base]
"train.lr" = 0.1
[variants.a]
[variants.b]
"train.lr" = 0.3
[scales.smoke]
seeds = 2
"train.lr" = 0.2
"""


@pytest.fixture
def exp_dir(tmp_path):
    d = tmp_path / "experiments"
    d.mkdir()
    (d / "_scales.toml").write_text("".join(f'[{s}]\ndata = "data/{s}"\nseeds = 1\n"train.epochs" = 7\n'
                                            for s in scale_names()))
    return d


def test_resolution_order(exp_dir, fake_manifest):
    e = ex.parse_experiment(_write(exp_dir, "x", GOOD))
    runs = resolve(e, "smoke", scales=load_scales(exp_dir))
    lr = {(r.variant, r.seed): r.cfg.train.lr for r in runs}
    # [base] 0.1 < [scales.smoke] 0.2 < variant 0.3; the experiment's scale sets 2 seeds
    assert lr == {("a", 0): 0.2, ("a", 1): 0.2, ("b", 0): 0.3, ("b", 1): 0.3}
    assert all(r.cfg.train.epochs == 7 and r.cfg.data.dir == "data/smoke" for r in runs)
    assert [r.cfg.train.seed for r in runs] == [0, 1, 0, 1]
    runs = resolve(e, "demo", data_dir="/elsewhere", seeds=3, sets={"train.lr": "0.4"},
                   scales=load_scales(exp_dir))
    assert {r.cfg.train.lr for r in runs} == {0.4} and len(runs) == 6
    assert {r.cfg.data.dir for r in runs} == {"/elsewhere"}
    assert {r.cfg.data.manifest_hash for r in runs} == {fake_manifest[0]}


def test_sweep_expansion_on_its_own():
    variants, groups = ex.expand_sweep({"relu": {"model.activation": "relu"}}, {"train.lr": [0.01, 0.02],
                                                                               "train.weight_decay": [0.0]})
    assert groups == {"relu": ("relu-lr0.01-wd0", "relu-lr0.02-wd0")}
    assert variants["relu-lr0.02-wd0"] == {"model.activation": "relu", "train.lr": 0.02, "train.weight_decay": 0.0}


def test_sweep_expands_variants_into_groups(exp_dir):
    text = GOOD.replace("[variants.a]", '[sweep]\n"train.lr" = [0.01, 0.02]\n[variants.a]')
    e = ex.parse_experiment(_write(exp_dir, "x", text))
    assert e.groups == {"a": ("a-lr0.01", "a-lr0.02"), "b": ("b-lr0.01", "b-lr0.02")}
    assert e.variants["b-lr0.02"]["train.lr"] == 0.02  # the sweep value wins over the variant's own


@pytest.mark.parametrize("edit, words", [
    (lambda t: t + 'colour = "red"\n', ["unknown key", "'colour'"]),               # unknown top-level key
    (lambda t: t.replace('[variants.b]\n', '[variants.b]\n"model.lrm" = true\n'), ["model.lrm", "variants.b"]),
    (lambda t: t.replace('"train.lr" = 0.3', '"model.lrn" = "maybe"'), ["model.lrn", "variants.b"]),  # bad value
    (lambda t: t.replace('"train.lr" = 0.3', '"model.towers" = "three"'), ["model.towers", "three"]),
    (lambda t: t.replace('claim = "c"\n', ''), ["missing", "'claim'"]),             # missing field
    (lambda t: t.replace('kind = "effect"', 'kind = "vibes"'), ["kind", "vibes"]),
    (lambda t: t.replace('title = "t"', 'title = "t'), ["TOML syntax error"]),      # syntax error
    (lambda t: t.replace('control = "a"', 'control = "zzz"'), ["zzz", "variants"]),
    (lambda t: t + '[paper]\ntop1_err = "big"\n', ["[paper] top1_err", "number"]),
    (lambda t: t + '[paper]\ntop9_err = 1.0\n', ["top9_err"]),
    (lambda t: t.replace('seeds = 2', 'seeds = 0'), ["seeds"]),
    (lambda t: t + '[judge]\ntolerance = 1.0\n', ["[judge]", "tolerance"]),       # not a key of kind effect
    (lambda t: t + '[judge.expect]\ntop1_err = "down"\n', ["[judge.expect] top1_err", "lower"]),
    (lambda t: t + '[page]\nshow = ["weather"]\n', ["[page] show", "weather"]),
    (lambda t: t + '[page]\norder = "first"\n', ["[page] order", "whole number"]),
    (lambda t: t.replace('kind = "effect"', 'kind = "absolute"'), ["[judge] tolerance"]),  # required by the kind
    (lambda t: t + '[scales.huge]\n', ["huge"]),
])
def test_broken_files_name_the_file_and_the_key(exp_dir, edit, words):
    path = _write(exp_dir, "broken", edit(GOOD))
    with pytest.raises(UserError) as e:
        ex.parse_experiment(path)
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg
    for w in words:
        assert w in msg


def test_broken_scales_file(exp_dir):
    (exp_dir / "_scales.toml").write_text('[smoke]\ndata = "x"\nseeds = 1\n"train.epoch" = 1\n')
    with pytest.raises(UserError, match=r"_scales.toml \[smoke\]: unknown key 'train.epoch'; did you mean train.epochs"):
        load_scales(exp_dir)


def test_cli_unknown_experiment_and_bad_set_exit_2(fake_manifest, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cases = [
        (["run", "ablation-lnr", "--scale", "smoke"], "unknown experiment 'ablation-lnr'; did you mean 'ablation-lrn'?"),
        (["run", "ablation-lrn", "--scale", "smoke", "--set", "model.lrm=false"], "unknown key 'model.lrm'"),
        (["run", "ablation-lrn", "--scale", "smoke", "--set", "model.lrn=maybe"], "model.lrn = 'maybe'"),
        (["run", "ablation-lrn", "--scale", "smoke", "--set", "train.epochs=two"], "train.epochs = 'two'"),
        (["run", "ablation-lrn", "--scale", "smoke", "--set", "novalue"], "key=value"),
    ]
    for args, text in cases:
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 2, (args, res.output)
        out = " ".join(res.output.split())
        assert text in out, (args, res.output)
        assert "Traceback" not in res.output
    assert not (tmp_path / "runs").exists()  # nothing half-written


def test_cli_experiment_file_with_syntax_error_exits_2(fake_manifest, tmp_path, monkeypatch, exp_dir):
    _write(exp_dir, "x", GOOD.replace('title = "t"', 'title = "t'))
    monkeypatch.setattr(ex, "EXPERIMENTS_DIR", exp_dir)
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["run", "x", "--scale", "smoke"])
    assert res.exit_code == 2 and "x.toml: TOML syntax error" in " ".join(res.output.split())


def test_missing_data_folder_is_one_line(tmp_path, monkeypatch):
    if not hasattr(pytest.importorskip("repro.data"), "read_manifest"):
        pytest.skip("repro.data.read_manifest not available")
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["run", "baseline", "--scale", "smoke", "--data", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "nope" in res.output and "Traceback" not in res.output


def _copy_data(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_missing_beton_is_one_line(synthetic_data, tmp_path, monkeypatch):
    data = _copy_data(synthetic_data, tmp_path / "data")
    (data / "train.beton").unlink()
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["run", "baseline", "--scale", "smoke", "--data", str(data), "--runs", "r"])
    assert res.exit_code == 2 and "train.beton" in " ".join(res.output.split()), res.output
    assert "Traceback" not in res.output and not (tmp_path / "r" / "store").exists()


def test_beton_not_matching_its_manifest_is_one_line(synthetic_data, tmp_path, monkeypatch):
    data = _copy_data(synthetic_data, tmp_path / "data")
    with open(data / "val.beton", "ab") as f:
        f.write(b"extra bytes")
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["run", "baseline", "--scale", "smoke", "--data", str(data), "--runs", "r"])
    assert res.exit_code == 2 and "val.beton" in " ".join(res.output.split()), res.output
    assert "Traceback" not in res.output and not (tmp_path / "r" / "store").exists()


@pytest.mark.parametrize("scale", scale_names())
def test_ablation_lrn_trains_its_fixed_gain_control_at_every_scale(fake_manifest, scale):
    e = ex.load_registry()["ablation-lrn"]
    runs = resolve(e, scale)
    by_variant = {v: [r for r in runs if r.variant == v] for v in ("lrn", "no-lrn", "lrn-gain")}
    assert {r.variant for r in runs} == set(by_variant)
    assert len(by_variant["lrn-gain"]) == len(by_variant["lrn"]) >= 1  # as many seeds as the claim's own arms
    for lrn, gain in zip(by_variant["lrn"], by_variant["lrn-gain"]):
        # the same net at the same seed, LRN replaced by its gain: nothing else differs
        assert gain.cfg.model.lrn and gain.cfg.model.lrn_form == "gain" and lrn.cfg.model.lrn_form == "full"
        assert gain.seed == lrn.seed and apply_overrides(lrn.cfg, {"model.lrn_form": "gain"}) == gain.cfg
    assert e.judge["contrasts"] == ("lrn - lrn-gain",)


def test_contrasts_name_variants_and_read_a_minus_b(exp_dir):
    from repro.claims.effect import contrast_arms

    for e in ex.load_registry().values():  # every real file's contrasts name its own variants
        for c in e.judge.get("contrasts", ()):
            assert all(arm in e.groups for arm in contrast_arms(e, c, e.groups)), (e.name, c)
    for bad in ('["a minus b"]', '["a - b - a"]', '"b - a"', '[" - b"]'):
        path = _write(exp_dir, "broken", GOOD + f"[judge]\ncontrasts = {bad}\n")
        with pytest.raises(UserError, match=r"broken.toml: \[judge\] contrasts = .* must be a list of"):
            ex.parse_experiment(path)
    e = ex.parse_experiment(_write(exp_dir, "typo", GOOD + '[judge]\ncontrasts = ["b - c"]\n'))
    with pytest.raises(UserError, match=r"typo.toml: \[judge\] contrasts 'b - c' names 'c', which is not a"):
        contrast_arms(e, "b - c", e.groups)

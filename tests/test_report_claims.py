"""What a claim's section states beyond its numbers: claims the data cannot test, dropout judged on its stated sign
and its iterations to converge, the measured LRN strength, and the parameters of each layer-removal variant."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fakes import make_run  # noqa: E402

from repro.claims import judge_claim  # noqa: E402
from repro.claims import verdicts as V  # noqa: E402
from repro.claims.facts import data_facts, has_colour, lrn_strength, parameter_counts  # noqa: E402
from repro.experiments import load_registry  # noqa: E402
from repro.report import build_report  # noqa: E402
from repro.runs import collect  # noqa: E402


def manifest(folder: Path, eigval, source="fashion-mnist", px=28) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps({
        "source": source, "image": {"height": px, "width": px}, "pca": {"eigval": eigval},
        "splits": {"train": {"count": 60000}}, "classes": {"ids": list(range(10)), "names": list("abcdefghij")}}))
    return folder


def test_colour_comes_from_the_manifests_pca_eigenvalues(tmp_path):
    # Fashion-MNIST's own manifest: the 2nd eigenvalue is 8.7e-18 (rounding), the 3rd exactly 0
    assert not has_colour({"pca": {"eigval": [0.3738, 8.7e-18, 0.0]}})
    assert has_colour({"pca": {"eigval": [0.05, 0.004, 0.001]}})
    facts = data_facts(str(manifest(tmp_path / "d", [0.37, 0.0, 0.0])))
    assert facts["name"] == "Fashion-MNIST" and facts["px"] == 28 and facts["colour"] is False


@pytest.mark.parametrize("claim", ["pca-lighting", "first-layer-filters"])
def test_colour_claims_are_not_testable_on_greyscale_data(tmp_path, claim):
    reg = load_registry()
    exp = reg[claim]
    runs = tmp_path / "runs"
    grey, colour = manifest(tmp_path / "grey", [0.37, 0.0, 0.0]), manifest(tmp_path / "rgb", [0.05, 0.01, 0.002],
                                                                             source="cifar10", px=32)
    for s in range(3):
        for v, ov in exp.variants.items():
            make_run(runs, claim, v, s, scale="demo", metrics={"top1_err": 30.0 - 2 * (v == "pca") + 0.1 * s},
                     overrides={**ov, "data.dir": str(grey), "data.manifest_hash": "grey"})
            make_run(runs, claim, v, s, scale="subset", metrics={"top1_err": 30.0 - 2 * (v == "pca") + 0.1 * s},
                     overrides={**ov, "data.dir": str(colour), "data.manifest_hash": "rgb"})
    # tower gaps 0.02, 0.03, 0.04: an interval whose lower end (+0.005) lies near zero
    analysis = {"scale": "demo", "runs": [{"variant": "baseline", "seed": s, "towers": [0.5, 0.52 + 0.01 * s]}
                                          for s in range(3)]}
    r = judge_claim(exp, collect(runs), analysis, runs)
    demo = next(s for s in r.scales if s.scale == "demo")
    assert demo.verdict == "not testable on this data"
    assert "Fashion-MNIST is greyscale" in demo.headline.reason
    # a claim the data cannot show has no boundary to be near, whatever its interval
    if claim == "first-layer-filters":
        assert V.near_boundary(demo.headline.measured, demo.headline.unit)
    assert not demo.headline.near and "near its boundary" not in demo.headline.reason
    assert "Fashion-MNIST: greyscale, 28 px" in demo.caveat
    subset = next(s for s in r.scales if s.scale == "subset")
    # colour data: judged as usual (the filter claim has no subset analysis here, so it is not run there)
    assert subset.verdict == {"pca-lighting": "reproduced", "first-layer-filters": "not run"}[claim]


def dropout_runs(runs: Path, val_gap: float) -> None:
    """Five seeds; dropout reaches 5% training error at iteration 80, no dropout at 40 (ratio 2)."""
    for s in range(5):
        for v, ov in (("dropout", {"model.dropout": 0.5}), ("no-dropout", {"model.dropout": 0.0})):
            reach = 80 if v == "dropout" else 40
            curve = [{"iteration": 10 * i, "epoch": 0, "train_loss": 1.0,
                      "train_top1_err": 50.0 if 10 * i < reach else 4.0} for i in range(1, 20)]
            val = 25.0 + 0.2 * s + (0.0 if v == "dropout" else val_gap + 0.1 * s)
            train = 4.0 if v == "dropout" else 0.5
            make_run(runs, "dropout", v, s, scale="demo", metrics={"top1_err": val, "train_top1_err": train},
                     overrides=ov, curve=curve)


def test_dropout_is_judged_on_its_stated_sign_with_the_iterations_to_converge(tmp_path):
    exp = load_registry()["dropout"]
    runs = tmp_path / "runs"
    dropout_runs(runs, val_gap=1.5)
    r = judge_claim(exp, collect(runs), None, runs)
    by_metric = {c.metric: c for c in r.comparisons}
    head = by_metric["top1_err"]
    assert r.verdict == "same direction" and r.headline is head and head.measured.mean < 0
    gap = by_metric["top1_err - train_top1_err"]
    assert not gap.context and gap.verdict == "same direction" and gap.measured.mean < 0
    it = by_metric["iters_to_converge"]
    assert it.measured.mean == pytest.approx(2.0) and it.paper == exp.paper["iters_ratio"]
    # dropout that made the validation error worse is the opposite of the claim
    worse = tmp_path / "worse"
    dropout_runs(worse, val_gap=-1.5)
    assert judge_claim(exp, collect(worse), None, worse).verdict == "opposite"


def test_lrn_strength_is_stated_from_the_run_records(tmp_path):
    runs = tmp_path / "runs"
    for s, (m1, p1) in enumerate([(1e-4, 4e-4), (2e-4, 6e-4)]):
        d = make_run(runs, "ablation-lrn", "lrn", s, scale="demo", metrics={"top1_err": 30.0})
        rec = json.loads((d / "result.json").read_text())
        rec["lrn_strength"] = {"conv1": {"mean": m1, "p99": p1}, "conv2": {"mean": 0.2, "p99": 0.9},
                               "alpha_mode": "paper"}
        (d / "result.json").write_text(json.dumps(rec))
        make_run(runs, "ablation-lrn", "no-lrn", s, scale="demo", metrics={"top1_err": 31.0},
                 overrides={"model.lrn": False})
    lines = lrn_strength(collect(runs), runs)
    assert len(lines) == 2
    assert "conv1" in lines[0] and "mean 0.00015" in lines[0] and "99th percentile 0.0005" in lines[0]
    assert "near-constant gain" in lines[0] and "near-constant gain" not in lines[1] and "paper" in lines[1]
    page = build_report(runs, tmp_path / "index.html", registry={"ablation-lrn": load_registry()["ablation-lrn"]})
    assert "near-constant gain" in page.read_text()


def test_layer_removal_states_parameters_and_fc6_inputs(tmp_path):
    runs = tmp_path / "runs"
    for v, layer in (("full", "none"), ("no-conv5", "conv5")):
        make_run(runs, "layer-removal", v, 0, scale="full", metrics={"top1_err": 40.0},
                 overrides={"model.remove_layer": layer})
    lines = parameter_counts(collect(runs), runs)
    full, no5 = (next(line for line in lines if line.startswith(v)) for v in ("full:", "no-conv5:"))
    # 256 x 6 x 6 = 9,216 inputs to fc6; without conv5 (no 256-wide layer) conv4's 384 x 6 x 6 = 13,824
    assert "fc6 takes 9,216 inputs" in full and "fc6 takes 13,824 inputs" in no5
    n_full, n_no5 = (int(line.split(":")[1].split("parameters")[0].replace(",", "")) for line in (full, no5))
    # conv5 (3x3x192 -> 256 per tower, 2 towers: 442,624 weights and biases) out; fc6 grows by 4,608 x 4,096 weights
    assert n_no5 - n_full == 4608 * 4096 - (3 * 3 * 192 * 256 + 256)


def test_the_baseline_is_judged_on_the_mean_of_every_run_of_its_config_each_once(tmp_path):
    """The ensemble's members are runs of the baseline's config: seeds 0 and 1 are linked under baseline, ensemble
    and ablation-lrn (one store folder each), seeds 2 and 3 under ensemble only. Missing those two (mean 41.5) or
    counting the shared ones once per link (mean 42.6) would both read as reproduced; the four runs give 43.5."""
    exp = load_registry()["baseline"]
    runs = tmp_path / "runs"
    ten_crop = {0: 41.0, 1: 42.0, 2: 45.0, 3: 46.0}
    for s, err in ten_crop.items():
        m = {"top1_err": err + 1.5, "top5_err": 20.0, "top1_err_10crop": err, "top5_err_10crop": 18.5}
        links = ["ensemble"] + (["baseline"] if s < 2 else [])
        for name in links:
            make_run(runs, name, "baseline", s, scale="full", metrics=m)
        if s == 0:
            make_run(runs, "ablation-lrn", "lrn", s, scale="full", metrics=m)
    make_run(runs, "ablation-lrn", "no-lrn", 0, scale="full", metrics={"top1_err": 50.0},
             overrides={"model.lrn": False})  # another config: never part of the baseline
    df = collect(runs)
    r = judge_claim(exp, df, None, runs)
    head = r.headline
    assert head.metric == "top1_err_10crop" and head.measured.n == 4
    assert sorted(head.values.values()) == [41.0, 42.0, 45.0, 46.0]
    assert head.measured.mean == pytest.approx(43.5) and head.verdict == "not reproduced"
    assert "2 of them linked under ensemble only" in head.reason
    assert r.summary.seeds == 4 and r.summary.status_counts == {"done": 4}
    # the baseline's own two runs alone: 41.5 is within 2 points of 40.7
    own = df[~((df["experiment"] == "ensemble") & (df["seed"] >= 2))]
    assert judge_claim(exp, own, None, runs).verdict == "reproduced"


def test_an_absolute_error_is_never_near_the_boundary_of_no_effect(tmp_path):
    exp = load_registry()["baseline"]
    runs = tmp_path / "runs"
    for s, err in enumerate((0.2, 0.3, 0.4)):  # an interval that starts just above zero: near it, were it an effect
        make_run(runs, "baseline", "baseline", s, scale="full",
                 metrics={"top1_err": err, "top5_err": 0.1, "top1_err_10crop": err, "top5_err_10crop": 0.1})
    head = judge_claim(exp, collect(runs), None, runs).headline
    assert V.near_boundary(head.measured, head.unit)
    assert head.verdict == "not reproduced" and not head.near and "near its boundary" not in head.reason


def baseline_demo_runs(runs: Path, data: Path, seeds: int = 5) -> dict[int, str]:
    """Demo-scale baseline runs scored on the centre crop only (train.ten_crop = false), each linked under baseline
    and ten-crop; returns their config hashes by seed."""
    hashes = {}
    for s in range(seeds):
        m = {"top1_err": 21.0 + 0.2 * s, "top5_err": 0.5}
        for name in ("baseline", "ten-crop"):
            d = make_run(runs, name, "baseline", s, scale="demo", metrics=m,
                         overrides={"train.ten_crop": False, "data.dir": str(data)})
        hashes[s] = d.name
    return hashes


def test_the_baseline_shows_the_ten_crop_analysis_where_its_runs_were_not_scored_on_ten_crops(tmp_path):
    from fakes import write_analysis

    exp = load_registry()["baseline"]
    runs, data = tmp_path / "runs", manifest(tmp_path / "fm", [0.37, 0.0, 0.0])
    hashes = baseline_demo_runs(runs, data)
    r = judge_claim(exp, collect(runs), None, runs)
    assert r.headline.measured.n == 0 and "repro run ten-crop --scale demo" in r.headline.reason
    write_analysis(runs, "ten-crop", {"scale": "demo", "runs": [
        {"variant": "baseline", "seed": s, "config_hash": h, "top1_err": 21.0 + 0.2 * s,
         "top1_err_10crop": 20.0 + 0.2 * s, "top5_err": 0.5, "top5_err_10crop": 0.4} for s, h in hashes.items()]})
    r = judge_claim(exp, collect(runs), None, runs)
    by_metric = {c.metric: c for c in r.comparisons}
    head, centre = by_metric["top1_err_10crop"], by_metric["top1_err"]
    assert r.headline is head and head.verdict == "not comparable"
    assert head.measured.n == 5 and head.measured.mean == pytest.approx(20.4)
    assert head.measured.lo < 20.4 < head.measured.hi and head.measured.method == "t interval over runs"
    assert "5 scored on ten crops by the analysis" in head.reason
    assert centre.context and centre.measured.n == 5 and centre.measured.mean == pytest.approx(21.4)


def manifest_classes(folder: Path, classes: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps({
        "source": "imagefolder", "image": {"height": 32, "width": 32}, "pca": {"eigval": [0.05, 0.01, 0.002]},
        "splits": {"train": {"count": 1000}}, "classes": {"ids": list(range(classes))}}))
    return folder


@pytest.mark.parametrize("classes", [10, 100])
def test_top5_is_judged_only_on_100_classes_or_more_whatever_the_kind(tmp_path, classes):
    reg = load_registry()
    runs, data = tmp_path / "runs", manifest_classes(tmp_path / "d", classes)
    for s in range(3):  # LRN lowers top-1 by 1.5 and raises top-5 by a steady 0.03 (the demo page's)
        for v, ov, top1, top5 in (("no-lrn", {"model.lrn": False}, 29.5, 0.40), ("lrn", {}, 28.0, 0.43)):
            m = {"top1_err": top1 + 0.1 * s, "top5_err": top5 + 0.01 * s}
            make_run(runs, "ablation-lrn", v, s, scale="subset", overrides={**ov, "data.dir": str(data)}, metrics=m)
        # the ensemble's members are the baseline's runs, which are also LRN's `lrn` runs (one config)
        make_run(runs, "ensemble", "baseline", s, scale="subset", overrides={"data.dir": str(data)}, metrics=m)
    df = collect(runs)
    lrn = judge_claim(reg["ablation-lrn"], df, None, runs)
    ens = judge_claim(reg["ensemble"], df, {"scale": "subset", "ensemble": {"top1_err": 25.0, "top5_err": 0.5},
                                            "members": [{"top1_err": 28.0 + s, "top5_err": 0.3 + 0.01 * s}
                                                        for s in range(3)]}, runs)
    for r in (lrn, ens):
        top5 = [c for c in r.comparisons if c.metric == "top5_err" and c.paper is not None]
        assert len(top5) == 1 and r.headline.metric == "top1_err"
        if classes < 100:
            assert all(c.context and c.verdict == "not judged" and "10 classes" in c.reason for c in top5)
        else:
            assert all(not c.context and c.verdict == "opposite" for c in top5)
    assert lrn.verdict == "reproduced"

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
    analysis = {"scale": "demo", "runs": [{"variant": "baseline", "seed": 0, "towers": [0.0, 0.0]}] * 3}
    r = judge_claim(exp, collect(runs), analysis, runs)
    demo = next(s for s in r.scales if s.scale == "demo")
    assert demo.verdict == "not testable on this data"
    assert "Fashion-MNIST is greyscale" in demo.headline.reason
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

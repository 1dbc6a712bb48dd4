"""ablation-lrn judged with its fixed-gain control: `[judge] contrasts` puts lrn - lrn-gain beside the claim, so the
page says whether LRN did more than change the scale (fabricated runs, no training)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fakes import make_run  # noqa: E402

from repro.claims import judge_claim  # noqa: E402
from repro.errors import UserError  # noqa: E402
from repro.experiments import load_registry  # noqa: E402
from repro.report import build_report  # noqa: E402
from repro.runs import collect  # noqa: E402

SEEDS = 4


def lrn_runs(runs: Path, gain_top1: float) -> None:
    """lrn at 30% top-1 error (+0.2 per seed), no-lrn 2 points worse (2.1 on seed 2), lrn-gain at `gain_top1`
    (+0.2 per seed, +0.1 on odd seeds); the spreads keep every paired difference from being a constant. Top-5 error
    is a third of top-1."""
    exp = load_registry()["ablation-lrn"]
    for s in range(SEEDS):
        top1 = {"lrn": 30.0, "no-lrn": 32.0 + 0.1 * (s == 2), "lrn-gain": gain_top1 + 0.1 * (s % 2)}
        for v, err in top1.items():
            err += 0.2 * s
            make_run(runs, "ablation-lrn", v, s, metrics={"top1_err": err, "top5_err": err / 3},
                     overrides=exp.variants[v])


def by_label(r) -> dict[tuple[str, str], object]:
    return {(c.label, c.metric): c for c in r.comparisons}


def test_lrn_minus_its_gain_is_a_context_row_in_both_metrics(tmp_path):
    exp = load_registry()["ablation-lrn"]
    lrn_runs(tmp_path / "runs", gain_top1=31.5)
    r = judge_claim(exp, collect(tmp_path / "runs"), None, tmp_path / "runs")
    rows = by_label(r)
    # the claim itself is still lrn - no-lrn: -2 points, the paper's sign
    assert r.headline.label == "lrn - no-lrn" and r.verdict == "same direction"
    top1, top5 = rows[("lrn - lrn-gain", "top1_err")], rows[("lrn - lrn-gain", "top5_err")]
    # per seed: 30 - 31.5 = -1.5 on even seeds, -1.6 on odd ones
    assert top1.measured.mean == pytest.approx(-1.55) and top1.values == pytest.approx({0: -1.5, 1: -1.6, 2: -1.5,
                                                                                       3: -1.6})
    assert top5.measured.mean == pytest.approx(-1.55 / 3)
    assert top1.context and top5.context and top1.paper is None
    assert top1.verdict == "no paper number" and top1.reason.startswith("context")  # the interval excludes zero
    # the change of scale alone, against the control
    assert rows[("lrn-gain - no-lrn", "top1_err")].measured.mean == pytest.approx(-0.475)
    page = build_report(tmp_path / "runs", tmp_path / "index.html", registry={"ablation-lrn": exp}).read_text()
    assert "lrn - lrn-gain" in page and "lrn-gain - no-lrn" in page


def test_when_lrn_is_only_its_gain_the_contrast_spans_zero(tmp_path):
    exp = load_registry()["ablation-lrn"]
    lrn_runs(tmp_path / "runs", gain_top1=29.95)  # lrn-gain within 0.05 points of lrn, either side
    rows = by_label(judge_claim(exp, collect(tmp_path / "runs"), None, tmp_path / "runs"))
    assert rows[("lrn - lrn-gain", "top1_err")].verdict == "inconclusive"
    assert rows[("lrn-gain - no-lrn", "top1_err")].measured.mean < -1.5  # the scale alone did the work


def test_a_contrast_naming_no_variant_is_a_user_error(tmp_path):
    exp = load_registry()["ablation-lrn"]
    lrn_runs(tmp_path / "runs", gain_top1=31.5)
    typo = dataclasses.replace(exp, judge={"contrasts": ("lrn - lrn-gian",)})
    with pytest.raises(UserError, match=r"ablation-lrn.toml: \[judge\] contrasts 'lrn - lrn-gian' names 'lrn-gian'"):
        judge_claim(typo, collect(tmp_path / "runs"), None, tmp_path / "runs")

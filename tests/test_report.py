"""Claims judged from a run table, and the page: summary per claim, CSV beside it, no zeros for missing runs,
escaping of hostile names, old run formats, no runs, and atomic writes."""

from __future__ import annotations

import html.parser
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fakes import fabricate_all, make_run, write_analysis  # noqa: E402

import repro.report as report  # noqa: E402
from repro.errors import UserError  # noqa: E402
from repro.experiments import Experiment, load_registry  # noqa: E402
from repro.claims import judge_claim  # noqa: E402
from repro.report import build  # noqa: E402
from repro.runs import collect  # noqa: E402


def experiment(name="ablation-lrn", kind="effect", control="no-lrn", treatments=("lrn",), paper=None, **kw):
    variants = kw.pop("variants", {v: {} for v in (control, *treatments) if v})
    return Experiment(name=name, title=kw.pop("title", "Local response normalisation"), section="3.3",
                      claim=kw.pop("claim", "LRN helps."), kind=kind, variants=variants,
                      groups=kw.pop("groups", {v: (v,) for v in variants}), control=control,
                      treatments=tuple(treatments), paper=paper if paper is not None else {"top1_err": -1.4}, **kw)


def table(rows) -> pd.DataFrame:
    cols = ["experiment", "variant", "seed", "scale", "status", "top1_err", "top5_err", "iters_to_target",
            "iterations"]
    return pd.DataFrame([dict(zip(cols, r)) for r in rows], columns=cols)


def test_effect_is_paired_by_seed_and_skips_runs_that_did_not_finish():
    df = table([
        ("ablation-lrn", "lrn", 0, "demo", "done", 30.0, 10.0, None, 100),
        ("ablation-lrn", "lrn", 1, "demo", "done", 31.0, 10.5, None, 100),
        ("ablation-lrn", "lrn", 2, "demo", "diverged", None, None, None, 40),   # never a zero
        ("ablation-lrn", "lrn", 3, "demo", "done", 29.0, 9.0, None, 100),
        ("ablation-lrn", "no-lrn", 0, "demo", "done", 31.5, 10.2, None, 100),
        ("ablation-lrn", "no-lrn", 1, "demo", "done", 32.0, 11.0, None, 100),
        ("ablation-lrn", "no-lrn", 2, "demo", "done", 31.0, 10.0, None, 100),
        ("ablation-lrn", "no-lrn", 3, "demo", "failed", None, None, None, 0),
        ("ablation-lrn", "no-lrn", 0, "smoke", "done", 90.0, 80.0, None, 10),   # a smaller scale: not judged
        ("other", "lrn", 0, "demo", "done", 0.0, 0.0, None, 1),
    ])
    r = judge_claim(experiment(), df)
    assert r.scale == "demo"
    top1 = r.comparisons[0]
    # only seeds 0 and 1 have both variants done: differences -1.5 and -1.0
    assert top1.values == {0: -1.5, 1: -1.0}
    assert top1.measured.n == 2 and top1.measured.paired
    assert top1.measured.mean == pytest.approx(-1.25)
    half = 12.7062047 * 0.25 / math.sqrt(2) * math.sqrt(2)  # t(0.975, 1) * s / sqrt(2), s = 0.3536
    assert top1.measured.lo == pytest.approx(-1.25 - half, rel=1e-4)
    assert top1.verdict == "inconclusive"  # the interval spans zero with two seeds
    assert r.summary.status_counts == {"done": 6, "diverged": 1, "failed": 1}
    # the smaller scale is evidence of its own, not overridden and not mixed in
    assert [s.scale for s in r.scales] == ["demo", "smoke"] and r.scales[1].seeds == 1


def test_each_scale_is_judged_and_the_summary_is_the_largest_with_two_seeds():
    rows = [("ablation-lrn", v, s, "demo", "done", 30.0 + s + (1.0 if v == "no-lrn" else 0.0) + 0.1 * s * (v == "lrn"),
             10.0, None, 100) for v in ("lrn", "no-lrn") for s in range(5)]
    rows += [("ablation-lrn", v, 0, "full", "done", 40.0, 18.0, None, 100) for v in ("lrn", "no-lrn")]
    r = judge_claim(experiment(), table(rows))
    assert [(s.scale, s.seeds) for s in r.scales] == [("full", 1), ("demo", 5)]
    assert r.scale == "demo" and r.verdict == "same direction"   # one full-scale seed does not replace five
    assert r.scales[0].verdict == "inconclusive"


def test_claim_without_runs_is_not_run():
    r = judge_claim(experiment(), table([("baseline", "baseline", 0, "demo", "done", 30.0, 10.0, None, 1)]))
    assert r.verdict == "not run" and r.scale == "" and all(c.measured.n == 0 for c in r.comparisons)


def test_several_treatments_take_the_weakest_verdict_and_context_variants_do_not_count():
    rows = []
    for s in range(3):
        rows += [("layer-removal", "full", s, "subset", "done", 30.0 + s, 10.0, None, 100),
                 ("layer-removal", "no-conv3", s, "subset", "done", 32.5 + s + 0.1 * s, 10.0, None, 100),
                 ("layer-removal", "no-conv4", s, "subset", "done", 30.05 + s + 0.02 * s, 10.0, None, 100),
                 ("layer-removal", "extra", s, "subset", "done", 20.0 + s * 0.3, 10.0, None, 100)]
    exp = experiment("layer-removal", control="full", treatments=("no-conv3", "no-conv4"), paper={"top1_err": 2.0},
                     variants={"full": {}, "no-conv3": {}, "no-conv4": {}, "extra": {}})
    r = judge_claim(exp, table(rows))
    verdicts = {c.label: c.verdict for c in r.comparisons}
    assert verdicts["no-conv3 - full"] == "reproduced"
    assert verdicts["no-conv4 - full"] == "same direction, smaller"  # +0.05..+0.09, far below 1.0
    assert verdicts["extra - full"] == "no paper number"
    assert r.verdict == "same direction, smaller" and r.headline.label == "no-conv4 - full"


def test_convergence_uses_the_best_learning_rate_of_each_group():
    rows = []
    iters = {"relu-lr0.01": [50, 60], "relu-lr0.02": [20, 30], "tanh-lr0.01": [150, 180], "tanh-lr0.02": [np.nan, 400]}
    for v, its in iters.items():
        for s, it in enumerate(its):
            rows.append(("relu-vs-tanh", v, s, "demo", "done", 30.0, 10.0, it, 500))
    exp = experiment("relu-vs-tanh", kind="convergence", control="tanh", treatments=("relu",),
                     paper={"speedup": 6.0}, variants={v: {} for v in iters},
                     groups={"relu": ("relu-lr0.01", "relu-lr0.02"), "tanh": ("tanh-lr0.01", "tanh-lr0.02")})
    r = judge_claim(exp, table(rows))
    assert r.best_variants == {"tanh": "tanh-lr0.01", "relu": "relu-lr0.02"}
    c = r.comparisons[0]
    assert c.values == {0: pytest.approx(7.5), 1: pytest.approx(6.0)}
    assert c.measured.mean == pytest.approx(math.sqrt(7.5 * 6.0))  # geometric mean
    assert c.unit == "x"


def test_ten_crop_and_ensemble_effects():
    rows = [("ten-crop", "baseline", s, "subset", "done", 30.0 + s, 10.0, None, 1) for s in range(3)]
    df = table(rows)
    exp = experiment("ten-crop", kind="ten-crop", control=None, treatments=(), paper={"top1_err": -1.5},
                     variants={"baseline": {}}, metric="top1_err_10crop", compare="top1_err")
    scored = {"scale": "subset", "runs": [{"variant": "baseline", "seed": s, "top1_err": 30.0 + s,
                                           "top1_err_10crop": t} for s, t in enumerate([29.0, 29.6, 30.8])]}
    c = judge_claim(exp, df, scored).comparisons[0]
    assert c.measured.mean == pytest.approx(-1.2) and c.verdict == "reproduced"  # -1.0, -1.4, -1.2 within runs
    assert judge_claim(exp, df.assign(scale="demo"), {**scored, "scale": "demo"}).verdict == "same direction"
    assert judge_claim(exp, df, None).verdict == "not run"

    ens = experiment("ensemble", kind="ensemble", control=None, treatments=(), paper={"top1_err": -2.6},
                     variants={"baseline": {}})
    analysis = {"scale": "subset", "ensemble": {"top1_err": 27.0},
                "members": [{"top1_err": 30.0}, {"top1_err": 29.0}, {"top1_err": 29.6}]}
    c = judge_claim(ens, df.assign(experiment="ensemble"), analysis).comparisons[0]
    assert c.values == {0: -3.0, 1: -2.0, 2: pytest.approx(-2.6)}
    assert c.verdict == "reproduced"
    assert judge_claim(ens, df, None).verdict == "not run"
    status_only = judge_claim(ens, df, {"scale": "subset", "status": "needs at least 2 done members", "members": 1})
    assert status_only.verdict == "not run" and "needs at least 2" in status_only.comparisons[0].reason
    # one analysis per scale: a demo analysis beside the subset one is judged at demo, and leaves subset's alone
    demo = {**analysis, "scale": "demo", "ensemble": {"top1_err": 31.0}}
    both = judge_claim(ens, pd.concat([df.assign(experiment="ensemble"), df.assign(experiment="ensemble",
                                                                                   scale="demo")]), [analysis, demo])
    by_scale = {sr.scale: sr for sr in both.scales}
    assert set(by_scale) == {"demo", "subset"} and both.summary.scale == "subset"
    assert by_scale["subset"].comparisons[0].values == c.values
    assert by_scale["demo"].comparisons[0].values == {0: 1.0, 1: 2.0, 2: pytest.approx(1.4)}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    registry = load_registry()
    runs = tmp / "runs"
    fabricate_all(runs, registry, scale="demo", seeds=2)
    # a failed and a stale (older record format) run of the LRN claim
    make_run(runs, "ablation-lrn", "no-lrn", 7, scale="demo", status="failed", error="CUDA out of memory",
             overrides={"model.lrn": False})
    old = make_run(runs, "ablation-lrn", "lrn", 8, scale="demo", metrics={"top1_err": 0.0})
    record = json.loads((old / "result.json").read_text())
    record["format"] = 0
    (old / "result.json").write_text(json.dumps(record))
    # a finished run whose config comes from an older config format (a key that no longer exists, one missing)
    older = make_run(runs, "dropout", "dropout", 9, scale="demo", metrics={"top1_err": 31.0},
                     overrides={"model.dropout": 0.5})
    record = json.loads((older / "result.json").read_text())
    record["config"]["model"]["norm_layer"] = "lrn"
    del record["config"]["train"]["target_train_err"]
    (older / "result.json").write_text(json.dumps(record))
    out = report.build_report(runs, tmp / "out" / "index.html", registry=registry)
    return registry, runs, out


class Tags(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.attrs = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += [(tag, k, v) for k, v in attrs]


def parse(text: str) -> Tags:
    p = Tags()
    p.feed(text)
    return p


def test_page_has_a_summary_row_per_claim_and_the_csv_beside_it(rendered):
    registry, runs, out = rendered
    text = out.read_text()
    rows = [v for tag, k, v in parse(text).attrs if tag == "tr" and k == "data-claim"]
    assert sorted(rows) == sorted(registry)
    csv = pd.read_csv(out.with_name("results.csv"))
    assert len(csv) == len(collect(runs)) and set(csv["experiment"]) == set(collect(runs)["experiment"])
    older = csv[(csv["experiment"] == "dropout") & (csv["seed"] == 9)]
    assert len(older) == 1 and older["model.norm_layer"].iloc[0] == "lrn"  # kept, not a crash
    assert not list(out.parent.glob("*.tmp"))


def test_page_is_self_contained(rendered):
    _, _, out = rendered
    tags = parse(out.read_text())
    assert "script" not in tags.tags and "link" not in tags.tags
    srcs = [v for tag, k, v in tags.attrs if k == "src"]
    assert srcs and all(v.startswith("data:image/png;base64,") for v in srcs)
    assert not [v for _, k, v in tags.attrs if k == "href" and not v.startswith("#")]
    assert "@media print" in out.read_text()


def test_failed_and_stale_runs_appear_as_such_never_as_zeros(rendered):
    registry, runs, out = rendered
    text = out.read_text()
    assert "CUDA out of memory" in text and "stale" in text
    df = collect(runs)
    r = judge_claim(registry["ablation-lrn"], df)
    assert r.summary.status_counts.get("failed") == 1 and r.summary.status_counts.get("stale") == 1
    # the stale record's 0.0 never enters the comparison: only the two fabricated seeds are paired
    assert r.comparisons[0].measured.n == 2 and 8 not in r.comparisons[0].values


def test_no_runs_is_one_clear_error_and_writes_nothing(tmp_path):
    out = tmp_path / "out" / "index.html"
    for runs in (tmp_path / "absent", tmp_path / "empty"):
        if runs.name == "empty":
            runs.mkdir()
        with pytest.raises(UserError, match=r"no runs under .*; run `repro run all --scale demo` first"):
            report.build_report(runs, out, registry=load_registry())
    assert not out.parent.exists()


def test_failed_render_keeps_the_previous_page(tmp_path, monkeypatch):
    runs, exp = tmp_path / "runs", experiment(paper={"top1_err": -1.4}, variants={"lrn": {}, "no-lrn": {}})
    registry = {exp.name: exp}
    for s in range(2):
        make_run(runs, exp.name, "lrn", s, metrics={"top1_err": 30.0 + s})
    out = report.build_report(runs, tmp_path / "index.html", registry=registry)
    before = out.read_bytes()

    def boom(context):
        raise RuntimeError("template bug")

    monkeypatch.setattr(build, "render", boom)
    with pytest.raises(RuntimeError):
        report.build_report(runs, out, registry=registry)
    assert out.read_bytes() == before and not list(out.parent.glob("*.tmp"))


HOSTILE = "<script>alert('x')</script><img src=x onerror=alert(1)>"


def test_hostile_names_notes_and_class_names_are_escaped(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps({"classes": {"ids": ["a", "b"],
                                                                "names": [HOSTILE, "$\\frac{1}{0}$ boot"]}}))
    exp = experiment("evil", title="Evil " + HOSTILE, claim="claim " + HOSTILE,
                     paper={"top1_err": -1.0, "note": "note " + HOSTILE}, reproduced_if="if " + HOSTILE,
                     control="ctl$x^$", treatments=(HOSTILE.replace("/", "|"),))
    retr = experiment("retrieval-evil", kind="retrieval", control=None, treatments=(), paper={},
                      variants={"baseline": {}}, title="R " + HOSTILE)
    runs = tmp_path / "runs"
    for s in range(2):
        for v in exp.variants:
            make_run(runs, "evil", v, s, scale="demo", metrics={"top1_err": 30.0 + s + (v == "ctl$x^$")},
                     overrides={"data.dir": str(data)})
        make_run(runs, "retrieval-evil", "baseline", s, scale="demo", metrics={"top1_err": 30.0},
                 overrides={"data.dir": str(data)}, error=HOSTILE)
    write_analysis(runs, "retrieval-evil", {"scale": "demo", "k": 2, "queries": 2, "feature_agreement": 1.0,
                                            "note": HOSTILE},
                   {"query_images": np.zeros((2, 8, 8, 3), np.uint8),
                    "neighbour_images": np.zeros((2, 2, 8, 8, 3), np.uint8),
                    "query_labels": np.array([0, 1]), "neighbour_labels": np.array([[0, 1], [1, 1]])})
    out = report.build_report(runs, tmp_path / "index.html", registry={"evil": exp, "retrieval-evil": retr})
    text = out.read_text()
    tags = parse(text)
    assert "script" not in tags.tags
    assert not [a for a in tags.attrs if a[1].startswith("on")]
    assert "<script>alert" not in text and "&lt;script&gt;alert(" in text
    # the figures with the hostile class names and variant names still rendered
    assert sum(1 for tag, k, v in tags.attrs if tag == "img" and k == "src") >= 3


def test_provenance_and_published_reproductions_on_the_page(rendered):
    _, runs, out = rendered
    text = out.read_text()
    failed = collect(runs).query("status == 'failed'").iloc[0]
    # the run is named by its experiment/variant/seed link, not the store directory it points to
    assert f"ablation-lrn/no-lrn/seed7-{failed['config_hash']}" in text
    assert "torch 2.14.1" in text and "numpy 2.4.6" in text and "feedbeef00112233" in text and "abc1234" in text
    # published reproductions as error rates: 100 - 56.522 (torchvision), 100 - 57.45 (cuda-convnet2)
    assert f"{100 - 56.522:.2f}" in text and f"{100 - 57.45:.2f}" in text


def test_convergence_judges_only_the_seeds_that_did_not_choose_the_rates():
    # seed 0 chose the learning rates (the analysis's select_seeds); seeds 1 and 2 alone are judged
    iters = {"relu-lr0.02": [10, 20, 30], "tanh-lr0.02": [100, 120, 90]}
    rows = [("relu-vs-tanh", v, s, "demo", "done", 30.0, 10.0, it, 500) for v, its in iters.items()
            for s, it in enumerate(its)]
    exp = experiment("relu-vs-tanh", kind="convergence", control="tanh", treatments=("relu",),
                     paper={"speedup": 6.0}, variants={v: {} for v in iters},
                     groups={"relu": ("relu-lr0.02",), "tanh": ("tanh-lr0.02",)})
    analysis = {"scale": "demo", "best": {"relu": "relu-lr0.02", "tanh": "tanh-lr0.02"}, "select_seeds": [0],
                "judged_seeds": [1, 2], "edge": {"relu": True, "tanh": False}}
    c = judge_claim(exp, table(rows), analysis).comparisons[0]
    assert c.values == {1: pytest.approx(6.0), 2: pytest.approx(3.0)}  # seed 0's 10x is not evidence
    assert "chosen on seed(s) 0, not judged" in c.reason and "rate chosen for relu is at the edge" in c.reason
    # without a selection, the note says the judged seeds chose the rates themselves
    plain = judge_claim(exp, table(rows), {**analysis, "select_seeds": [0, 1, 2], "judged_seeds": [0, 1, 2]})
    assert set(plain.comparisons[0].values) == {0, 1, 2}


def test_cli_report_without_runs_exits_2_with_one_line(tmp_path):
    from typer.testing import CliRunner

    from repro.cli import app

    res = CliRunner().invoke(app, ["report", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "r.html")])
    assert res.exit_code == 2
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "no runs under" in lines[0] and "repro run all --scale demo" in lines[0]
    assert not (tmp_path / "r.html").exists() and "Traceback" not in res.output


def test_qualitative_effect_also_shows_the_generalisation_gap():
    df = table([("dropout", v, s, "demo", "done", val, 10.0, None, 100)
                for v, s, val in [("dropout", 0, 30.0), ("dropout", 1, 31.0), ("no-dropout", 0, 32.0),
                                  ("no-dropout", 1, 33.5)]])
    df["train_top1_err"] = [25.0, 26.5, 20.0, 21.0]  # gaps: dropout 5.0, 4.5; no-dropout 12.0, 12.5
    exp = experiment("dropout", control="no-dropout", treatments=("dropout",), paper={"note": "qualitative"})
    r = judge_claim(exp, df)
    head, gap = r.comparisons
    assert head.paper is None and head.values == {0: -2.0, 1: -2.5} and not head.context
    assert gap.context and gap.values == {0: -7.0, 1: -8.0}
    assert r.headline is head


def test_table_2s_ensemble_row_shows_the_crop_its_analysis_judged():
    from repro.report.tables import table2
    analysis = {"scale": "full", "members": [{"seed": s} for s in range(5)],
                "judged_keys": {"top1_err": "top1_err_10crop", "top5_err": "top5_err_10crop"},
                "ensemble": {"top1_err": 39.0, "top5_err": 17.0, "top1_err_10crop": 38.0, "top5_err_10crop": 16.5}}
    row = next(r for r in table2(pd.DataFrame(), analysis) if "averaged" in r["model"])
    assert (row["model"], row["top1"], row["top5"]) == ("5 CNNs averaged, ten-crop (this harness)", "38.0", "16.5")


def test_paper_tables_show_the_ensemble_and_ten_crop_analyses_of_the_largest_scale(tmp_path):
    # analyses are kept per scale; the paper's Tables 1 and 2 take the largest scale's (here demo over smoke)
    registry = load_registry()
    runs = tmp_path / "runs"
    fabricate_all(runs, registry, scale="demo", seeds=2)
    write_analysis(runs, "ensemble", {"kind": "ensemble", "scale": "smoke", "members": [],
                                      "ensemble": {"top1_err": 77.7, "top5_err": 66.6}})
    write_analysis(runs, "ten-crop", {"kind": "ten_crop", "scale": "demo", "runs": [
        {"variant": "baseline", "seed": 0, "top1_err": 30.0, "top1_err_10crop": 28.25, "top5_err_10crop": 9.5},
        {"variant": "baseline", "seed": 1, "top1_err": 30.5, "top1_err_10crop": 28.75, "top5_err_10crop": 9.75}]})
    text = report.build_report(runs, tmp_path / "index.html", registry=registry).read_text()
    cell = r"\s*<td[^>]*>([^<]*)</td>"
    cells = lambda model: re.search(rf"<td>{re.escape(model)}</td>{cell}{cell}{cell}", text)  # noqa: E731
    assert cells("2 CNNs averaged, centre crop (this harness)").groups()[:2] == ("28.0", "9.0")  # fabricate_all's
    assert cells("CNN, ten-crop (this harness)").groups()[:2] == ("28.5", "9.6")
    # Table 2's single CNN: the baseline's judged numbers, both crops, with n and the interval's method
    one = cells("1 CNN, ten-crop (this harness)").groups()[2]
    assert "demo scale, mean of 2 run(s); 95% t interval over runs: top-1 [" in one
    assert "mean of 2 run(s)" in cells("1 CNN, centre crop (this harness)").groups()[2]


def summary_cells(text: str) -> dict[str, list[str]]:
    """The summary table's cells per claim, tags stripped, `<br>` kept as a newline."""
    out = {}
    for name, row in re.findall(r'<tr class="claim-row" data-claim="([^"]+)">(.*?)</tr>', text, re.S):
        cells = re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)
        out[name] = [re.sub(r"<[^>]+>", "", c.replace("<br>", "\n")).strip() for c in cells]
    return out


SUMMARY_COLUMNS = ["claim", "section", "quantity", "paper", "mean", "ci", "n", "method", "verdict", "scale", "runs"]


def test_the_baseline_row_shows_ten_crop_and_centre_crop_errors_with_intervals_at_demo(tmp_path):
    """Demo runs are not scored on ten crops (train.ten_crop = false): the ten-crop analysis's scores of the same
    runs head the row, the centre crop beside them, each with its interval, n and method; never a bare dash."""
    from fakes import write_manifest

    registry = {k: v for k, v in load_registry().items() if k in ("baseline", "ten-crop")}
    runs, data = tmp_path / "runs", write_manifest(tmp_path / "fm")
    scored = []
    for s in range(5):
        for name in ("baseline", "ten-crop"):
            d = make_run(runs, name, "baseline", s, scale="demo", metrics={"top1_err": 21.0 + 0.2 * s, "top5_err": 0.5},
                         overrides={"train.ten_crop": False, "data.dir": str(data)})
        scored.append({"variant": "baseline", "seed": s, "config_hash": d.name, "top1_err": 21.0 + 0.2 * s,
                       "top1_err_10crop": 20.0 + 0.2 * s, "top5_err": 0.5, "top5_err_10crop": 0.4})
    write_analysis(runs, "ten-crop", {"kind": "ten_crop", "scale": "demo", "runs": scored})
    text = report.build_report(runs, tmp_path / "index.html", registry=registry).read_text()
    row = dict(zip(SUMMARY_COLUMNS, summary_cells(text)["baseline"]))
    assert row["quantity"].splitlines() == ["baseline (top1_err_10crop)", "centre crop (top1_err)"]
    assert row["mean"].splitlines() == ["20.40", "21.40"]
    assert row["n"].splitlines() == ["5", "5"] and row["runs"] == "5 done"
    assert row["method"].splitlines() == ["t interval over runs"] * 2
    lo, hi = (float(v) for v in re.findall(r"[\d.]+", row["ci"].splitlines()[0]))
    assert lo < 20.4 < hi and row["verdict"] == "not comparable"


def test_every_measured_cell_shows_n_and_the_intervals_method(rendered):
    _, _, out = rendered
    text = out.read_text()
    rows = summary_cells(text)
    measured = {k: dict(zip(SUMMARY_COLUMNS, v)) for k, v in rows.items()}
    assert len(measured) == len(rows) and all(len(v) == len(SUMMARY_COLUMNS) for v in rows.values())
    for name, row in measured.items():
        for n, method in zip(row["n"].splitlines(), row["method"].splitlines() or [""]):
            assert (n != "0") == bool(method.strip()), (name, n, method)  # an interval says how it was made
    assert measured["ablation-lrn"]["method"] == "paired by seed"
    assert measured["relu-vs-tanh"]["method"] == "paired by seed, log scale"
    # each claim's own table of scales too: one method cell per row with a measurement
    scale_rows = re.findall(r'<table class="scales">.*?</table>', text, re.S)
    assert scale_rows and all('class="method"' in t for t in scale_rows)


def test_the_page_counts_its_verdicts_made_without_a_multiple_comparison_correction(rendered):
    from repro.claims import verdicts as V

    _, _, out = rendered
    text = out.read_text()
    # a verdict cell may add "near its boundary" on a second line
    verdicts = [dict(zip(SUMMARY_COLUMNS, v))["verdict"].split("\n")[0] for v in summary_cells(text).values()]
    judged = sum(v in V.JUDGED for v in verdicts)
    assert 5 < judged < len(verdicts)  # not run / not comparable / not testable rows are not judgements
    line = re.search(r'<p id="multiplicity">(.*?)</p>', text, re.S).group(1)
    assert line.startswith(f"{judged} of the verdicts above") and "no correction for multiple comparisons" in line
    assert f"about {judged * 0.05:.1f} of them" in " ".join(line.split())


def test_differences_from_the_paper_are_generated_per_scale_from_the_runs_configs(tmp_path):
    from fakes import write_manifest

    from repro.report.differences import differences
    from repro.scales import get_scale

    runs, data = tmp_path / "runs", write_manifest(tmp_path / "fm")
    demo = {**get_scale("demo").overrides, "data.dir": str(data)}
    for s in range(2):
        make_run(runs, "ablation-lrn", "lrn", s, scale="demo", metrics={"top1_err": 20.0}, overrides=demo)
        make_run(runs, "dropout", "dropout", s, scale="demo", metrics={"top1_err": 20.0},
                 overrides={**demo, "train.epochs": 30})
        make_run(runs, "ablation-lrn", "lrn", s, scale="full", metrics={"top1_err": 40.0})
        # a recipe of its own, as relu-vs-tanh's four-layer CIFAR net: no flips, no weight decay
        make_run(runs, "relu-vs-tanh", "relu-lr0.04", s, scale="demo", metrics={"top1_err": 30.0},
                 overrides={**demo, "data.flip": False, "train.weight_decay": 0.0})
    tables = {d["scale"]: d for d in differences(collect(runs))}
    assert list(tables) == ["full", "demo"] and tables["demo"]["runs"] == 6
    rows = {r["field"]: r for r in tables["demo"]["rows"]}
    assert rows["model.init"]["paper"].startswith("N(0, 0.01)") and rows["model.init"]["used"] == "He normal"
    assert (rows["model.input_size"]["paper"], rows["model.input_size"]["used"]) == ("224", "24")
    assert (rows["train.warmup_epochs"]["paper"], rows["train.warmup_epochs"]["used"]) == ("0", "0.3")
    assert rows["train.epochs"]["used"] == "1 (ablation-lrn, relu-vs-tanh); 30 (dropout)"
    assert rows["data.flip"]["used"] == "on (ablation-lrn, dropout); off (relu-vs-tanh)"
    assert (rows["train.weight_decay"]["paper"], rows["train.weight_decay"]["used"]) == \
        ("0.0005", "0.0005 (ablation-lrn, dropout); 0 (relu-vs-tanh)")
    assert rows["manifest: source"]["used"] == "Fashion-MNIST" and rows["manifest: classes"]["used"] == "10"
    assert "train.plateau_patience" not in rows and "train.momentum" not in rows  # the paper's values
    assert rows["model.lrn_alpha_mode"]["paper"] == "alpha as written"
    # full scale keeps the paper's recipe, but for LRN's alpha (the author's code divides it by n) and precision:
    # bf16 autocast where the run's record names a GPU, fp32 (the paper's) on a CPU
    full = collect(runs)
    full = full[full["scale"] == "full"]
    assert [r["field"] for r in differences(full)[0]["rows"]] == ["model.lrn_alpha_mode"]  # fabricated on "cpu"
    gpu = [r for r in differences(full.assign(**{"prov.device": "NVIDIA H200"}))[0]["rows"]
           if r["field"] == "train.precision"]
    assert gpu == [dict(field="train.precision", what="precision", paper="fp32", used="bf16 autocast")]


def test_the_page_shows_the_differences_and_the_rules_with_their_upper_bound(rendered):
    _, _, out = rendered
    text = out.read_text()
    assert '<h2 id="differences">Differences from the paper</h2>' in text
    assert "<h3>At demo scale" in text.split('id="differences"')[1].split("<h2")[0]
    assert "same direction, larger" in text and "not judged" in text


def test_the_header_counts_each_run_folder_once(rendered):
    # the demo's claims share runs of one config (baseline, ensemble, ablation-lrn's lrn, ...): one folder, many links
    _, runs, out = rendered
    df = collect(runs)
    folders = df.assign(folder=[Path(p).resolve() for p in df["run_dir"]]).drop_duplicates("folder")
    assert len(df) > len(folders)
    header = " ".join(out.read_text().split("<header>")[1].split("</p>")[0].split())
    assert f"from {len(folders)} run(s)" in header and f"listed {len(df)} times" in header
    done = int((folders["status"] == "done").sum())
    assert f"{done} done" in header and done < int((df["status"] == "done").sum())

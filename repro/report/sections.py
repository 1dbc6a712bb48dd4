"""What the page shows per claim: its comparison rows per scale, its figures, the facts it states, its summary row.

Everything here is plain dicts and strings for the template; the judging itself is repro.claims.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from repro.claims import ClaimResult, ScaleResult, get_kind
from repro.claims import verdicts as V
from repro.claims.common import stack
from repro.claims.facts import lrn_strength, parameter_counts
from repro.report import figures

DASH = "\u2014"


def fmt_effect(iv: V.Interval, unit: str) -> tuple[str, str]:
    """('-1.2', '[-2.0, -0.4]') for the page; missing parts are an em dash, never 0."""
    if iv.n == 0 or not math.isfinite(iv.mean):
        return DASH, ""
    if unit == "x":
        f = lambda v: f"{v:.2f}x"  # noqa: E731
    elif unit == "%":
        f = lambda v: f"{v:.2f}"  # noqa: E731
    else:
        f = lambda v: f"{v:+.2f}"  # noqa: E731
    ci = f"[{f(iv.lo)}, {f(iv.hi)}]" if math.isfinite(iv.lo) else "no interval (one value)"
    bound = getattr(iv, "bound", "")  # a censored measurement is shown as the bound it is, never as the value
    return (f"{bound} {f(iv.mean)}" if bound else f(iv.mean)), ci


def paper_text(c: V.Comparison) -> str:
    if c.paper is None:
        return DASH
    return f"{c.paper:.1f}x" if c.unit == "x" else (f"{c.paper:.1f}" if c.unit == "%" else f"{c.paper:+.1f}")


def comparison_rows(s: ScaleResult) -> list[dict]:
    out = []
    for c in s.comparisons:
        mean, ci = fmt_effect(c.measured, c.unit)
        out.append(dict(label=c.label, metric=c.metric, unit=c.unit, paper=paper_text(c), mean=mean, ci=ci,
                        n=c.measured.n, paired=c.measured.method, verdict=c.verdict,
                        reason=("context: " if c.context and not c.reason.startswith("context") else "") + c.reason))
    return out


def crop_of(metric: str) -> str:
    return "ten-crop" if metric.endswith("_10crop") else "centre crop"


def beside(s: ScaleResult | None) -> list[dict]:
    """What a row shows under its headline: the same quantity on the other crop (the baseline's centre crop beside
    its ten-crop error), each with its interval, n and method."""
    head = s.headline if s else None
    if head is None:
        return []
    base = head.metric.replace("_10crop", "")
    out = []
    for c in s.comparisons:
        if c is not head and c.label == head.label and c.unit == head.unit and c.metric != head.metric \
                and c.metric.replace("_10crop", "") == base:
            mean, ci = fmt_effect(c.measured, c.unit)
            out.append(dict(what=crop_of(c.metric), metric=c.metric, mean=mean, ci=ci, n=c.measured.n,
                            method=c.measured.method if c.measured.n else ""))
    return out


def _headline(s: ScaleResult | None) -> dict:
    """The headline's cells: what, paper, mean, interval, n and the interval's method ('' when nothing measured)."""
    head = s.headline if s else None
    if head is None:
        return dict(label="", metric="", paper=DASH, mean=DASH, ci="", n=0, method="", beside=[])
    mean, ci = fmt_effect(head.measured, head.unit)
    others = beside(s)
    if head.measured.n == 0 and any(b["n"] for b in others):
        mean = f"not scored ({crop_of(head.metric)})"
    return dict(label=head.label, metric=head.metric, paper=paper_text(head), mean=mean, ci=ci, n=head.measured.n,
                method=head.measured.method if head.measured.n else "", beside=others)


def scale_rows(r: ClaimResult) -> list[dict]:
    """One row per scale with runs: its headline, verdict and comparisons."""
    return [dict(scale=s.scale, seeds=s.seeds, verdict=s.verdict, caveat=s.caveat, summary=s is r.summary,
                 comparisons=comparison_rows(s), best_variants=s.best_variants, **_headline(s)) for s in r.scales]


def summary_row(r: ClaimResult) -> dict:
    counts = r.summary.status_counts if r.summary else {}
    failed = {k: v for k, v in counts.items() if k != "done"}
    return dict(name=r.name, title=r.title, section=r.section, kind=r.kind, scale=r.scale or DASH,
                verdict=r.verdict, near=bool(r.headline and r.headline.near), done=counts.get("done", 0),
                problems=", ".join(f"{v} {k}" for k, v in sorted(failed.items())), **_headline(r.summary))


def judged_count(summary: list[dict]) -> int:
    """How many summary rows carry a verdict made from measurements (the page's multiple-comparison count)."""
    return sum(1 for s in summary if s["verdict"] in V.JUDGED)


def delta_rows(results: list[ClaimResult]) -> pd.DataFrame:
    rows = [dict(label=f"{r.name}: {c.label} ({c.metric})", paper=c.paper, mean=c.measured.mean,
                 lo=c.measured.lo, hi=c.measured.hi, verdict=c.verdict)
            for r in results for c in r.comparisons if c.unit == "points" and c.paper is not None and not c.context]
    return pd.DataFrame(rows, columns=["label", "paper", "mean", "lo", "hi", "verdict"])


def class_names(rows: pd.DataFrame) -> list | None:
    """Class names from the manifest of the data the claim's runs used (None when it cannot be read)."""
    for d in rows.get("data.dir", pd.Series(dtype=object)).dropna().unique():
        try:
            names = json.loads((Path(str(d)) / "manifest.json").read_text())["classes"]["names"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(names, list):
            return [str(n) for n in names]
    return None


def facts(exp, r: ClaimResult, runs_dir: Path) -> list[str]:
    """The measured facts the claim's TOML asks its section to state (`[page] show`), at the summary scale."""
    rows = r.runs[r.runs["scale"].astype(str) == r.scale] if r.scale and len(r.runs) else r.runs.iloc[0:0]
    out: list[str] = []
    if "lrn-strength" in exp.show:
        out += lrn_strength(rows, runs_dir) or ["No run recorded its LRN strength (lrn_strength in its run record)."]
    if "parameters" in exp.show and len(rows):
        out += parameter_counts(rows, runs_dir)
    return out


def _training_curves(r: ClaimResult, rows, runs_dir, analysis) -> dict | None:
    chosen = rows[rows["variant"].isin(list(r.best_variants.values()))]
    curves = stack(chosen, runs_dir, "curve")
    if curves.empty or not {"iteration", "train_top1_err"} <= set(curves.columns):
        return None
    group_of = {v: g for g, v in r.best_variants.items()}
    curves["arm"] = curves["variant"].map(lambda v: f"{group_of.get(v, v)} ({v})")
    target = pd.to_numeric(rows.get("train.target_train_err"), errors="coerce").dropna()
    head = r.headline
    speed = fmt_effect(head.measured, "x")[0] if head else ""
    if head and "dataset-relative" in head.label:
        speed += " to the dataset-relative threshold"
    return dict(title="Figure 1", src=figures.relu_tanh_curves(
        curves[["arm", "seed", "iteration", "train_top1_err"]], float(target.iloc[0]) if len(target) else 25.0,
        speed, (analysis or {}).get("relative_train_err")),
        caption="Training error against iterations, best learning rate per activation; band: 95% interval over "
                "seeds; dotted: the target error.")


def _learning_curves(r: ClaimResult, rows, runs_dir) -> dict | None:
    metrics = stack(rows[rows["status"].isin(["done", "diverged", "interrupted"])], runs_dir, "metrics")
    if metrics.empty or "epoch" not in metrics:
        return None
    for col in ("val_top1_err", "train_top1_err"):
        if col not in metrics:
            metrics[col] = float("nan")
    return dict(title="Learning curves", src=figures.learning_curves(
        metrics[["variant", "seed", "epoch", "val_top1_err", "train_top1_err"]], r.title),
        caption="Top-1 error per epoch for each variant; band: 95% interval over seeds.")


def claim_figures(r: ClaimResult, runs_dir: Path, analysis: dict | None, npz: dict | None) -> list[dict]:
    """The figures of one claim's section (the one its kind names), each {'title', 'src', 'caption'}."""
    rows = r.runs[r.runs["scale"].astype(str) == r.scale] if r.scale else r.runs.iloc[0:0]
    figure = get_kind(r.kind).figure
    out = None
    if figure == "training-curves":
        out = _training_curves(r, rows, runs_dir, analysis)
    elif figure == "learning-curves":
        out = _learning_curves(r, rows, runs_dir)
    elif figure == "filters" and npz:
        towers = [npz.get("tower1"), npz.get("tower2")]
        runs = (analysis or {}).get("runs") or [{}]
        out = dict(title="Figure 3", src=figures.filters_grid(towers, list(runs[0].get("towers") or [])),
                   caption="conv1 kernels of the first analysed run, by tower, each scaled to its own range; "
                           "score: colour-specificity (0 = grey, 1 = one colour).")
    elif figure == "retrieval" and npz:
        q, nb = npz.get("query_images"), npz.get("neighbour_images")
        if q is not None and nb is not None:
            out = dict(title="Figure 4", src=figures.retrieval_grid(
                q, nb, npz.get("query_labels"), npz.get("neighbour_labels"),
                class_names(r.runs)), caption="Nearest training images by Euclidean distance of the last hidden "
                                              "layer.")
    return [out] if out and out["src"] else []

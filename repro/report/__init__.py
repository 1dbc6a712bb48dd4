"""`repro report`: one self-contained HTML page that measures every registered claim against the paper.

build_report collects the run table (saved beside the page as results.csv), judges each claim (claims.py,
verdicts.py), draws its figures (figures.py) and tables (tables.py), and renders templates/report.html.j2 with
Jinja2 autoescaping, so names and notes from runs or TOML files can never inject markup. Both files are written
under a temporary name and renamed, so a failed render leaves the previous report intact.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path

import jinja2
import pandas as pd

from repro import io
from repro.errors import UserError
from repro.report import figures, tables
from repro.report import verdicts as V
from repro.report.claims import ClaimResult, evaluate
from repro.report.gather import load_npz, pick, stack

# the paper's order of claims; experiments not listed here follow in name order
PAPER_ORDER = ("baseline", "ensemble", "relu-vs-tanh", "two-gpu-split", "ablation-lrn", "ablation-overlap-pool",
               "pca-lighting", "dropout", "layer-removal", "ten-crop", "first-layer-filters", "retrieval")
NO_RUNS = "no runs under {runs}/; run `repro run all --scale demo` first"


def fmt_effect(iv: V.Interval, unit: str) -> tuple[str, str]:
    """('-1.2', '[-2.0, -0.4]') for the page; missing parts are an em dash, never 0."""
    if iv.n == 0 or not math.isfinite(iv.mean):
        return "\u2014", ""
    if unit == "x":
        f = lambda v: f"{v:.2f}x"  # noqa: E731
    elif unit == "%":
        f = lambda v: f"{v:.2f}"  # noqa: E731
    else:
        f = lambda v: f"{v:+.2f}"  # noqa: E731
    ci = f"[{f(iv.lo)}, {f(iv.hi)}]" if math.isfinite(iv.lo) else "no interval (one value)"
    return f(iv.mean), ci


def _paper_text(c: V.Comparison) -> str:
    if c.paper is None:
        return "\u2014"
    return f"{c.paper:.1f}x" if c.unit == "x" else (f"{c.paper:.1f}" if c.unit == "%" else f"{c.paper:+.1f}")


def _comparison_rows(r: ClaimResult) -> list[dict]:
    out = []
    for c in r.comparisons:
        mean, ci = fmt_effect(c.measured, c.unit)
        out.append(dict(label=c.label, metric=c.metric, unit=c.unit, paper=_paper_text(c), mean=mean, ci=ci,
                        n=c.measured.n, paired=c.measured.method,
                        verdict=c.verdict, reason=c.reason))
    return out


def _claim_figures(r: ClaimResult, runs_dir: Path, analysis: dict | None, npz: dict | None,
                   class_names) -> list[dict]:
    """The figures of one claim's section, each {'title', 'src', 'caption'}."""
    out = []
    rows = r.runs[r.runs["scale"].astype(str) == r.scale] if r.scale else r.runs.iloc[0:0]
    if r.kind == "convergence":
        chosen = rows[rows["variant"].isin(list(r.best_variants.values()))]
        curves = stack(chosen, runs_dir, "curve.jsonl")
        if not curves.empty and {"iteration", "train_top1_err"} <= set(curves.columns):
            group_of = {v: g for g, v in r.best_variants.items()}
            curves["arm"] = curves["variant"].map(lambda v: f"{group_of.get(v, v)} ({v})")
            target = pd.to_numeric(rows.get("train.target_train_err"), errors="coerce").dropna()
            head = r.headline
            speed = fmt_effect(head.measured, "x")[0] if head else ""
            if head and "dataset-relative" in head.label:
                speed += " to the dataset-relative threshold"
            out.append(dict(title="Figure 1", src=figures.relu_tanh_curves(
                curves[["arm", "seed", "iteration", "train_top1_err"]], float(target.iloc[0]) if len(target) else 25.0,
                speed, (analysis or {}).get("relative_train_err")), caption="Training error against iterations, best learning rate per activation; band: 95% "
                                "interval over seeds; dotted: the target error."))
    elif r.kind in ("effect", "absolute", "ten-crop", "ensemble"):
        metrics = stack(rows[rows["status"].isin(["done", "diverged", "interrupted"])], runs_dir, "metrics.jsonl")
        if not metrics.empty and "epoch" in metrics:
            for col in ("val_top1_err", "train_top1_err"):
                if col not in metrics:
                    metrics[col] = float("nan")
            out.append(dict(title="Learning curves", src=figures.learning_curves(
                metrics[["variant", "seed", "epoch", "val_top1_err", "train_top1_err"]], r.title),
                caption="Top-1 error per epoch for each variant; band: 95% interval over seeds."))
    elif r.kind == "filters" and npz:
        towers = [pick(npz, "tower1", "conv1_tower1"), pick(npz, "tower2", "conv1_tower2")]
        runs = (analysis or {}).get("runs") or [{}]
        scores = list(runs[0].get("towers") or [])
        out.append(dict(title="Figure 3", src=figures.filters_grid(towers, scores),
                        caption="conv1 kernels of the first analysed run, by tower, each scaled to its own range; "
                                "score: colour-specificity (0 = grey, 1 = one colour)."))
    elif r.kind == "retrieval" and npz:
        q, nb = pick(npz, "query_images"), pick(npz, "neighbor_images", "neighbour_images")
        if q is not None and nb is not None:
            out.append(dict(title="Figure 4", src=figures.retrieval_grid(
                q, nb, pick(npz, "query_labels"), pick(npz, "neighbor_labels", "neighbour_labels"), class_names),
                caption="Nearest training images by Euclidean distance of the last hidden layer."))
    return [f for f in out if f["src"]]


def _summary_row(r: ClaimResult) -> dict:
    head = r.headline
    mean, ci = fmt_effect(head.measured, head.unit) if head else ("\u2014", "")
    failed = {k: v for k, v in r.status_counts.items() if k != "done"}
    return dict(name=r.name, title=r.title, section=r.section, kind=r.kind, scale=r.scale or "\u2014",
                paper=_paper_text(head) if head else "\u2014", metric=head.metric if head else "",
                label=head.label if head else "", mean=mean, ci=ci, n=head.measured.n if head else 0,
                verdict=r.verdict, done=r.status_counts.get("done", 0),
                problems=", ".join(f"{v} {k}" for k, v in sorted(failed.items())))


def _delta_rows(results: list[ClaimResult]) -> pd.DataFrame:
    rows = [dict(label=f"{r.name}: {c.label} ({c.metric})", paper=c.paper, mean=c.measured.mean,
                 lo=c.measured.lo, hi=c.measured.hi, verdict=c.verdict)
            for r in results for c in r.comparisons if c.unit == "points" and c.paper is not None]
    return pd.DataFrame(rows, columns=["label", "paper", "mean", "lo", "hi", "verdict"])


def _class_names(rows: pd.DataFrame) -> list | None:
    """Class names from the manifest of the data the claim's runs used (None when it cannot be read)."""
    for d in rows.get("data.dir", pd.Series(dtype=object)).dropna().unique():
        try:
            names = json.loads((Path(str(d)) / "manifest.json").read_text())["classes"]["names"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(names, list):
            return [str(n) for n in names]
    return None


def render(context: dict) -> str:
    env = jinja2.Environment(loader=jinja2.PackageLoader("repro.report", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True)
    env.filters["slug"] = lambda s: "".join(ch if ch.isalnum() else "-" for ch in str(s)).lower()
    env.filters["vclass"] = lambda v: "v-" + "".join(ch if ch.isalnum() else "-" for ch in str(v))
    return env.get_template("report.html.j2").render(**context)


def build_report(runs_dir: Path | str, out_html: Path | str, *, registry: dict | None = None,
                 experiments_dir: Path | str | None = None) -> Path:
    """Render the report for the runs under `runs_dir` into `out_html` (and results.csv beside it)."""
    from repro.experiments import load_registry
    from repro.runs import collect, load_analyses

    runs_dir, out_html = Path(runs_dir), Path(out_html)
    if not runs_dir.is_dir():
        raise UserError(NO_RUNS.format(runs=runs_dir))
    if registry is None:
        registry = load_registry(experiments_dir) if experiments_dir else load_registry()
    df = collect(runs_dir)
    analyses = load_analyses(runs_dir)
    if df.empty and not analyses:
        raise UserError(NO_RUNS.format(runs=runs_dir))

    order = [n for n in PAPER_ORDER if n in registry] + sorted(n for n in registry if n not in PAPER_ORDER)
    results, sections = [], []
    for name in order:
        exp = registry[name]
        analysis = analyses.get(name)
        npz = load_npz(runs_dir / name / "analysis.npz")
        r = evaluate(exp, df, analysis, runs_dir)
        results.append(r)
        sections.append(dict(
            r=r, comparisons=_comparison_rows(r), figures=_claim_figures(r, runs_dir, analysis, npz,
                                                                      _class_names(r.runs)),
            context=tables.CONTEXT.get(name, []), provenance=tables.provenance(r.runs, runs_dir),
            other_scales=sorted({str(s) for s in r.runs.get("scale", pd.Series(dtype=str)).dropna()} - {r.scale}),
            analysis=json.dumps(analysis, indent=1, sort_keys=True, default=str)[:4000] if analysis else ""))
    unregistered = sorted(set(df["experiment"].dropna().astype(str)) - set(registry)) if len(df) else []

    context = dict(
        generated=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), runs_dir=str(runs_dir),
        summary=[_summary_row(r) for r in results], sections=sections, rules=V.RULES,
        caveats=[V.SCALE_CAVEATS[s] for s in ("smoke", "demo", "subset") if s in {r.scale for r in results}],
        deltas=figures.deltas_chart(_delta_rows(results)), table1=tables.table1(df),
        table2=tables.table2(df, analyses.get("ensemble")), unregistered=unregistered,
        n_runs=len(df), status_counts=df["status"].value_counts().to_dict() if len(df) else {},
        abs_tolerance=V.ABS_TOLERANCE, filter_gap=V.FILTER_GAP)
    html = render(context)

    out_html.parent.mkdir(parents=True, exist_ok=True)
    with io.atomic_path(out_html.with_name("results.csv")) as tmp:
        df.to_csv(tmp, index=False)
    io.write_text(out_html, html)
    return out_html

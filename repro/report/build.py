"""Build the page: collect the run table, judge every claim at every scale with runs, render, write atomically.

The run table is saved beside the page as results.csv. Jinja2 renders templates/report.html.j2 with autoescaping,
so names and notes from runs or TOML files can never inject markup. Both files are written under a temporary name
and renamed, so a failed render leaves the previous report intact.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import jinja2

from repro import io
from repro.claims import judge_claim
from repro.claims import verdicts as V
from repro.errors import UserError
from repro.experiments import load_registry
from repro.report import differences, figures, sections, tables
from repro.runs import collect, load_analyses, load_analysis_arrays
from repro.scales import largest_first

NO_RUNS = "no runs under {runs}/; run `repro run all --scale demo` first"


def render(context: dict) -> str:
    env = jinja2.Environment(loader=jinja2.PackageLoader("repro.report", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True)
    env.filters["slug"] = lambda s: "".join(ch if ch.isalnum() else "-" for ch in str(s)).lower()
    env.filters["vclass"] = lambda v: "v-" + "".join(ch if ch.isalnum() else "-" for ch in str(v))
    return env.get_template("report.html.j2").render(**context)


def page_order(registry: dict) -> list[str]:
    """Claims by their TOML's `[page] order`; those without one follow in name order."""
    return sorted(registry, key=lambda n: (registry[n].order is None, registry[n].order or 0, n))


def largest_scale(by_scale: dict | None) -> dict | None:
    """The analysis of the largest scale among `{scale: analysis}` (what the paper's tables are compared with)."""
    by_scale = by_scale or {}
    return next((by_scale[s] for s in largest_first(by_scale)), None)


def build_report(runs_dir: Path | str, out_html: Path | str, *, registry: dict | None = None,
                 experiments_dir: Path | str | None = None) -> Path:
    """Render the report for the runs under `runs_dir` into `out_html` (and results.csv beside it)."""
    runs_dir, out_html = Path(runs_dir), Path(out_html)
    if not runs_dir.is_dir():
        raise UserError(NO_RUNS.format(runs=runs_dir))
    if registry is None:
        registry = load_registry(experiments_dir) if experiments_dir else load_registry()
    df = collect(runs_dir)
    analyses = load_analyses(runs_dir)
    if df.empty and not analyses:
        raise UserError(NO_RUNS.format(runs=runs_dir))

    results, claim_sections = [], []
    for name in page_order(registry):
        exp = registry[name]
        by_scale = analyses.get(name, {})
        r = judge_claim(exp, df, list(by_scale.values()), runs_dir)
        results.append(r)
        # figures and the raw analysis: those of the summary's scale, else of any analysed scale
        shown = r.summary.scale if r.summary and r.summary.scale in by_scale else next(iter(by_scale), None)
        analysis = by_scale.get(shown) if shown else None
        claim_sections.append(dict(
            r=r, scales=sections.scale_rows(r),
            figures=sections.claim_figures(r, runs_dir, analysis, load_analysis_arrays(runs_dir, name, shown)),
            facts=sections.facts(exp, r, runs_dir), context=list(exp.context),
            provenance=tables.provenance(r.runs, runs_dir),
            analysis=json.dumps(analysis, indent=1, sort_keys=True, default=str)[:4000] if analysis else ""))
    unregistered = sorted(set(df["experiment"].dropna().astype(str)) - set(registry)) if len(df) else []
    caveats = {r.summary.scale: r.summary.caveat for r in results if r.summary and r.summary.caveat}
    summary = [sections.summary_row(r) for r in results]
    baseline = next((r.summary for r in results if r.kind == "absolute" and r.summary), None)
    # claims share runs of one config (one store folder, linked under each): the header counts each folder once
    distinct = df.loc[~df["run_dir"].map(lambda link: Path(link).resolve()).duplicated()] if len(df) else df

    context = dict(
        generated=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), runs_dir=str(runs_dir),
        summary=summary, judged=sections.judged_count(summary), sections=claim_sections, rules=V.RULES,
        caveats=[caveats[s] for s in reversed(largest_first(caveats))],
        deltas=figures.deltas_chart(sections.delta_rows(results)),
        differences=differences.differences(df),
        table1=tables.table1(largest_scale(analyses.get("ten-crop"))),
        table2=tables.table2(df, largest_scale(analyses.get("ensemble")), baseline), unregistered=unregistered,
        n_listed=len(df), n_runs=len(distinct),
        status_counts=distinct["status"].value_counts().to_dict() if len(distinct) else {})
    html = render(context)

    out_html.parent.mkdir(parents=True, exist_ok=True)
    with io.atomic_path(out_html.with_name("results.csv")) as tmp:
        df.to_csv(tmp, index=False)
    io.write_text(out_html, html)
    return out_html

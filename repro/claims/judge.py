"""Judge one registered claim: per scale that has runs, its comparisons and verdict, from the run table.

Scales are evidence side by side, not overrides: each scale with runs gets its own verdict, and the claim's headline
is the largest scale with at least two seeds (else the largest with a finished run). What each kind compares is its
module's `judge` (repro.claims.<kind>); analyses are per experiment and judged at the scale they were made at.
A claim whose TOML says `[judge] needs_colour = true` is `not testable on this data` when the data is greyscale.
Top-5 comparisons on fewer than 100 classes are context (`not judged`), whatever the kind. A claim of a kind that
measures one config (`absolute`) is judged on every finished run of that config, wherever the run store links it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from repro.claims import verdicts as V
from repro.claims.facts import rows_data_facts
from repro.claims.registry import Evidence, get_kind
from repro.config import all_keys
from repro.scales import largest_first

TOP5_MIN_CLASSES = 100  # below this, top-5 error is near zero and says little (5 of 10 classes is half of them)
# Kinds that measure one config rather than a difference between arms: every finished run of the config is evidence
# (the ensemble's members are the baseline's runs, seeds beyond the baseline's linked under `ensemble` only).
POOLED_KINDS = ("absolute",)


@dataclass
class ScaleResult:
    """The judgement of a claim at one scale."""

    scale: str
    comparisons: list[V.Comparison]
    verdict: str
    headline: V.Comparison | None
    seeds: int                                  # distinct seeds with a finished run
    status_counts: dict = field(default_factory=dict)
    best_variants: dict = field(default_factory=dict)   # group -> chosen variant (sweeps)
    caveat: str = ""
    data: dict | None = None                    # repro.claims.facts.data_facts of the runs' data


@dataclass
class ClaimResult:
    name: str
    title: str
    section: str
    claim: str
    kind: str
    scales: list[ScaleResult]                   # largest scale first
    summary: ScaleResult | None                 # the scale the summary table shows
    note: str = ""
    reproduced_if: str = ""
    runs: pd.DataFrame = field(default_factory=pd.DataFrame)   # every row of this claim, all scales

    @property
    def scale(self) -> str:
        return self.summary.scale if self.summary else ""

    @property
    def verdict(self) -> str:
        return self.summary.verdict if self.summary else "not run"

    @property
    def headline(self) -> V.Comparison | None:
        return self.summary.headline if self.summary else None

    @property
    def comparisons(self) -> list[V.Comparison]:
        return self.summary.comparisons if self.summary else []

    @property
    def best_variants(self) -> dict:
        return self.summary.best_variants if self.summary else {}


def _seeds_done(rows: pd.DataFrame) -> int:
    done = rows[rows["status"] == "done"] if "status" in rows else rows.iloc[0:0]
    return int(done["seed"].nunique()) if "seed" in done else 0


def summary_scale(results: list[ScaleResult]) -> ScaleResult | None:
    """The largest scale with at least two seeds, else the largest with a finished run, else the largest."""
    for ok in (lambda r: r.seeds >= 2, lambda r: r.seeds >= 1, lambda r: True):
        for r in results:
            if ok(r):
                return r
    return None


def headline_of(exp, comps: list[V.Comparison]) -> V.Comparison | None:
    """The comparison the claim's verdict comes from: the weakest judged one on the headline metric."""
    judged = [c for c in comps if not c.context]
    metrics = (exp.metric, *get_kind(exp.kind).headline_metrics)
    headline = [c for c in judged if c.metric in metrics] or judged
    headline = [c for c in headline if c.metric == headline[0].metric] if headline else []
    order = V.WEAKEST_FIRST
    return min(headline, key=lambda c: order.index(c.verdict) if c.verdict in order else 0) if headline else None


def _untestable(exp, data: dict | None) -> str:
    """Why the data cannot show this claim ('' when it can)."""
    if (getattr(exp, "judge", None) or {}).get("needs_colour") and data and not data["colour"]:
        return (f"{data['name']} is greyscale (the 2nd and 3rd PCA eigenvalues of its pixels are 0): colour noise "
                "is a brightness shift and conv1's colour weights get the same gradient in every channel")
    return ""


def _classes(rows: pd.DataFrame, data: dict | None) -> int | None:
    """The data's class count: its manifest's, else the runs' model.num_classes (set from the manifest)."""
    if data and data.get("classes"):
        return int(data["classes"])
    n = pd.to_numeric(rows.get("model.num_classes", pd.Series(dtype=float)), errors="coerce").dropna()
    return int(n.mode().iloc[0]) if len(n) else None


def top5_as_context(comps: list[V.Comparison], classes: int | None) -> None:
    """Top-5 comparisons on fewer than TOP5_MIN_CLASSES classes become context: shown, never a verdict."""
    if classes is None or classes >= TOP5_MIN_CLASSES:
        return
    for c in comps:
        if c.metric.startswith("top5"):
            c.context, c.verdict = True, V.NOT_JUDGED
            c.reason = (f"context: top-5 error on {classes} classes is not judged (top-5 picks {5 / classes:.0%} "
                        f"of the classes; judged from {TOP5_MIN_CLASSES} classes up)")


def _config_columns(table: pd.DataFrame) -> list[str]:
    """The run table's config columns that enter the config hash, but the seed: what makes two runs one config."""
    keys = all_keys()
    return sorted(c for c in table.columns
                  if c in keys and keys[c].metadata.get("hash", True) and c != "train.seed")


def pooled_rows(rows: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """`rows` (one claim's, at one scale) and every other finished run in `table` (all experiments at that scale) of
    the same config as one of them but another seed, each run (config hash) once, named by the claim's variant;
    `linked_from` says which experiment's link it came through."""
    cols = _config_columns(table)
    if not cols or rows.empty or "config_hash" not in table:
        return rows

    def signature(df: pd.DataFrame) -> pd.Series:
        return pd.Series([tuple(None if pd.isna(v) else v for v in r) for r in df[cols].itertuples(index=False)],
                         index=df.index, dtype=object)

    variant_of = dict(zip(signature(rows), rows["variant"]))
    others = table[(table["status"] == "done") & ~table["config_hash"].isin(set(rows["config_hash"]))]
    if others.empty:
        return rows
    sig = signature(others)
    others = others[sig.isin(variant_of)].drop_duplicates("config_hash")
    if others.empty:
        return rows
    others = others.assign(linked_from=others["experiment"], experiment=rows["experiment"].iloc[0],
                           variant=sig.loc[others.index].map(variant_of))
    return pd.concat([rows, others], ignore_index=True)


def judge_scale(exp, scale: str, rows: pd.DataFrame, analysis: dict | None, runs_dir) -> ScaleResult:
    data = rows_data_facts(rows)
    ev = Evidence(scale=scale, rows=rows, analysis=analysis, runs_dir=runs_dir, data=data)
    comps, best = get_kind(exp.kind).judge(exp, ev)
    top5_as_context(comps, _classes(rows, data))
    why = _untestable(exp, data)
    if why:
        for c in comps:
            if not c.context:
                c.verdict, c.reason = V.UNTESTABLE, why
    # after the data's verdict: a claim the data cannot show has no boundary to be near; nor has an absolute error,
    # whose verdict is about its distance from the paper's number, not from no effect
    for c in comps if exp.kind != "absolute" else ():
        if V.near_boundary(c.measured, c.unit) and c.verdict not in ("not run", V.UNTESTABLE):
            c.near = True
            c.reason += ("; near its boundary: the interval's nearer end is within a quarter of its half-width of "
                         "no effect, so another seed draw or another CPU type's floats can move this verdict")
    head = headline_of(exp, comps)
    counts = rows["status"].value_counts().to_dict() if "status" in rows else {}
    return ScaleResult(scale, comps, head.verdict if head else "not run", head, _seeds_done(rows),
                       {str(k): int(v) for k, v in counts.items()}, best, V.data_caveat(scale, data), data)


def judge_claim(exp, df: pd.DataFrame, analysis: dict | list | None = None, runs_dir=None) -> ClaimResult:
    """Judge `exp` from the run table `df` (all experiments) and its analyses (one dict, or one per scale, each
    with its "scale"), at every scale with runs or an analysis."""
    all_rows = df[df["experiment"] == exp.name] if "experiment" in df else df.iloc[0:0]
    if exp.kind in POOLED_KINDS and len(all_rows) and "scale" in df:
        # pooled scale by scale: the page judges each scale's runs on their own
        parts = [pooled_rows(g, df[df["scale"] == s]) for s, g in all_rows.groupby("scale", sort=False)]
        all_rows = pd.concat(parts + ([all_rows[all_rows["scale"].isna()]] if all_rows["scale"].isna().any() else []),
                             ignore_index=True)
    present = set(all_rows["scale"].dropna().astype(str)) if "scale" in all_rows else set()
    analyses = analysis if isinstance(analysis, list) else [analysis] if analysis else []
    by_scale = {str(a["scale"]): a for a in analyses if a.get("scale")}
    present |= set(by_scale)
    scales = largest_first(present)
    results = []
    for s in scales:
        rows = all_rows[all_rows["scale"].astype(str) == s] if "scale" in all_rows else all_rows
        results.append(judge_scale(exp, s, rows, by_scale.get(s), runs_dir))
    return ClaimResult(
        name=exp.name, title=exp.title, section=exp.section, claim=exp.claim, kind=exp.kind, scales=results,
        summary=summary_scale(results), note=str((exp.paper or {}).get("note", "")),
        reproduced_if=getattr(exp, "reproduced_if", ""), runs=all_rows)

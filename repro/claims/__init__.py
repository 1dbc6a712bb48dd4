"""Claims of the paper by kind: how each kind is planned, analysed and judged, and the verdict statistics.

One module per kind registers a `Kind` (repro.claims.registry); `judge_claim` judges a registered experiment from
the run table; `verdicts` holds the statistics and rules; `facts` what a section states beside its verdict.
Data flows one way: the report imports these modules, none of them imports the report.
"""

from repro.claims import absolute, convergence, effect, ensemble, filters, retrieval, ten_crop  # noqa: F401  (registers the kinds)
from repro.claims.judge import ClaimResult, ScaleResult, judge_claim
from repro.claims.registry import KINDS, Evidence, Kind, get_kind, kind_names, register_kind

__all__ = ["KINDS", "ClaimResult", "Evidence", "Kind", "ScaleResult", "get_kind", "judge_claim", "kind_names",
           "register_kind"]

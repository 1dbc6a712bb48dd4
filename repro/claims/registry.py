"""The registry of claim kinds: each kind module registers one `Kind` that says how to plan, analyse and judge it.

A claim (one `experiments/<name>.toml`) names its kind; `repro.experiments` checks the file against the kind's
needs, `repro.analysis` runs the kind's analysis after training, and `repro.claims.judge` asks the kind for its
comparisons. Adding a kind is one module under `repro/claims/` with a `register_kind(Kind(...))` call, imported
by `repro/claims/__init__.py`, as the models are registered in `repro/models/`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from repro.errors import UserError


@dataclass(frozen=True)
class Evidence:
    """What a kind judges: the claim's rows of the run table at one scale, and what was measured beside them."""

    scale: str
    rows: Any                       # pandas DataFrame: this claim's rows at `scale`
    analysis: dict | None = None    # the experiment's analysis at this scale (repro.analysis)
    runs_dir: Any = None            # for the per-run files (the training curves) a kind may read
    data: dict | None = None        # repro.claims.facts.data_facts of the runs' data, when readable


@dataclass(frozen=True)
class Kind:
    """How one kind of claim is planned, analysed and judged.

    judge(exp, evidence) -> (comparisons, {group: chosen variant}); analyse(exp, done) -> (numbers, arrays), run after
    training on the finished runs [(PlannedRun, run dir, result)]; summary(numbers) -> one line for the terminal.
    """

    name: str
    judge: Callable[[Any, Evidence], tuple[list, dict]]
    analyse: Callable[[Any, list], tuple[dict, dict]] | None = None
    summary: Callable[[dict], str] | None = None
    needs_arms: bool = False              # the TOML must name control and treatments
    signed_paper: bool = False            # [paper] numbers are differences (shown with a sign)
    judge_keys: tuple[str, ...] = ()      # keys of the TOML's [judge] table this kind reads
    figure: str = ""                      # the figure the report draws for it (repro.report.sections)
    headline_metrics: tuple[str, ...] = field(default_factory=tuple)  # extra metrics that may head the verdict


KINDS: dict[str, Kind] = {}


def register_kind(kind: Kind) -> Kind:
    if kind.name in KINDS:
        raise ValueError(f"claim kind {kind.name!r} is registered twice")
    KINDS[kind.name] = kind
    return kind


def kind_names() -> tuple[str, ...]:
    return tuple(KINDS)


def get_kind(name: str) -> Kind:
    if name not in KINDS:
        raise UserError(f"unknown claim kind {name!r}; one of {', '.join(KINDS)}")
    return KINDS[name]

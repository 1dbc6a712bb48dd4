"""The claim registry: one `experiments/<name>.toml` per claim of the paper, checked against its declared schema.

An experiment file names the claim (section, text, kind, the paper's numbers), the variants being compared
(dotted config overrides on a shared `[base]`) and per-scale settings; its tables are declared below
(`ExperimentFile`, `PaperNumbers`, `JudgeTable`, `PageTable`; a scale's data settings are `repro.scales.ScaleData`)
with the same field metadata as the config. `experiments/_scales.toml` holds what every experiment shares at a
scale (repro.scales); repro.plan resolves an experiment into runs.

Meaning of `[paper]` per kind (all error numbers in percentage points):
  absolute, ten-crop-less  : the paper's values (`top1_err = 40.7`).
  effect                   : treatment minus control (`top1_err = -1.4`).
  ensemble                 : ensemble minus one member (`top1_err = -2.6`).
  ten-crop                 : `metric` minus `compare` (10-crop minus centre crop).
  convergence              : `speedup` = control iterations / treatment iterations to the target error.
  filters, retrieval       : qualitative; `note` says what the paper shows.
A sweep (`[sweep]`, e.g. `"train.lr" = [0.01, 0.03]`) expands every variant into `<variant>-lr0.01`, ...; the
variants that came from one entry form a group (`Experiment.groups`) and the analysis keeps the best of each.
`[judge]` holds how the claim is judged (`needs_colour`, and what its kind reads: see repro.claims.<kind>);
`[page]` its place on the report (`order`), the later re-measurements shown beside it (`context`) and the measured
facts its section states (`show`: "lrn-strength", "parameters").
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from repro.claims import get_kind, kind_names
from repro.config import RunConfig, apply_overrides
from repro.record import METRICS
from repro.errors import UserError
from repro.scales import EXPERIMENTS_DIR, Scale, ScaleData, get_scale, load_scales, with_data
from repro.schema import read_table, spec, unknown_key

SHOW = ("lrn-strength", "parameters")
DIRECTIONS = ("lower", "higher")
EXPECTABLE = METRICS + ("gap",)
SWEEP_ABBREV = {"train.lr": "lr", "train.weight_decay": "wd", "model.dropout": "p"}
_NON_NEGATIVE = (lambda x: x >= 0, "must be a number >= 0")


# --- the schema of an experiment file, declared -------------------------------------------------------------------

@dataclass(frozen=True)
class ExperimentFile:
    """The top level of `experiments/<name>.toml`."""

    title: str = spec(help="the claim's title on the page")
    section: str = spec(help="where the paper makes the claim")
    claim: str = spec(help="the claim in the paper's words")
    kind: str = spec(choices=kind_names(), help="how it is analysed and judged (repro.claims.<kind>)")
    variants: dict = spec(help="[variants.<name>]: config overrides per variant")
    control: str | None = spec(None, help="the variant (group) the treatments are compared against")
    treatments: tuple = spec((), help="the variants (groups) compared against the control")
    metric: str = spec("top1_err", choices=METRICS, help="the headline metric")
    compare: str | None = spec(None, choices=METRICS, help="ten-crop: the metric `metric` is compared against")
    reproduced_if: str = spec("", help="what would count as reproduced, in words; may quote [judge] as {key}")
    paper: dict = spec(None, factory=dict, help="the paper's numbers (PaperNumbers)")
    base: dict = spec(None, factory=dict, help="config overrides every variant shares")
    sweep: dict = spec(None, factory=dict, help='key = [values]: every variant once per value, e.g. "train.lr"')
    scales: dict = spec(None, factory=dict, help="[scales.<scale>]: data, seeds and config overrides at a scale")
    judge: dict = spec(None, factory=dict, help="how the claim is judged (JudgeTable)")
    page: dict = spec(None, factory=dict, help="its place on the page (PageTable)")


PaperNumbers = dataclasses.make_dataclass(
    "PaperNumbers", [(m, float | None, spec(None, help="error points")) for m in METRICS]
    + [("speedup", float | None, spec(None, help="convergence: control / treatment iterations")),
       ("iters_ratio", float | None, spec(None, help="treatment / control iterations")),
       ("note", str | None, spec(None, help="what the paper shows, for qualitative claims"))], frozen=True)
PaperNumbers.__doc__ = "[paper]: the paper's numbers, in the kind's meaning (see the module docstring)."


@dataclass(frozen=True)
class JudgeTable:
    """[judge]: how the claim is judged. Every kind reads needs_colour; each kind allows the keys it reads."""

    needs_colour: bool = spec(False, help="not testable on greyscale data")
    tolerance: float = spec(None, valid=_NON_NEGATIVE, help="absolute: points from the paper that still count")
    expect: dict = spec(None, factory=dict, help='effect: metric = "lower" | "higher", for direction-only claims')
    converge_train_err: float = spec(None, valid=_NON_NEGATIVE, help="effect: training error for the iterations")
    select_seeds: int = spec(0, valid=(lambda n: n >= 0, "must be a whole number >= 0"),
                             help="convergence: the first N seeds choose each group's learning rate; the rest are "
                                  "judged (0: the judged seeds choose too)")
    contrasts: tuple = spec((), valid=(lambda c: len(c.split(" - ")) == 2 and all(a.strip() for a in c.split(" - ")),
                                       'must be a list of "<variant> - <variant>", e.g. ["lrn - lrn-gain"]'),
                            help='effect: context rows between two variants (groups) other than treatment - control, '
                                 'e.g. "lrn - lrn-gain"')


@dataclass(frozen=True)
class PageTable:
    """[page]: the claim's place on the report."""

    order: int = spec(None, help="position on the page")
    context: tuple = spec((), help="later re-measurements shown beside the claim")
    show: tuple = spec((), choices=SHOW, help="measured facts its section states")


@dataclass(frozen=True)
class Experiment:
    name: str                      # file stem
    title: str
    section: str
    claim: str
    kind: str
    variants: dict[str, dict[str, Any]]      # variant -> config overrides (sweeps expanded)
    groups: dict[str, tuple[str, ...]]       # group -> its variants (one per variant without a sweep)
    control: str | None = None               # a group name
    treatments: tuple[str, ...] = ()         # group names
    metric: str = "top1_err"                 # the headline metric
    compare: str | None = None               # ten-crop: the metric `metric` is compared against
    reproduced_if: str = ""                  # what would count as reproduced, in words
    paper: dict[str, Any] = field(default_factory=dict)
    base: dict[str, Any] = field(default_factory=dict)
    scales: dict[str, dict[str, Any]] = field(default_factory=dict)
    judge: dict[str, Any] = field(default_factory=dict)      # how the claim is judged ([judge])
    order: int | None = None                 # its place on the report page
    context: tuple[str, ...] = ()            # later re-measurements shown beside it
    show: tuple[str, ...] = ()               # measured facts its section states
    file: str = ""


def _load_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: TOML syntax error: {e}; fix the file") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None


def _check_config(path: Path, where: str, overrides: Any) -> dict[str, Any]:
    """Validate dotted config keys and values (names the file and table); return the overrides unchanged."""
    if not isinstance(overrides, dict):
        raise UserError(f"{path}: [{where}] = {overrides!r} must be a table")
    for key, value in overrides.items():
        if isinstance(value, dict):
            raise UserError(f"{path}: [{where}] {key!r} is a table; write dotted keys in quotes, e.g. \"model.lrn\" = false")
    try:
        apply_overrides(RunConfig(), overrides, source=f"{path} [{where}]")
    except UserError as e:  # value errors do not know the file: add it
        raise UserError(str(e) if str(path) in str(e) else f"{path} [{where}]: {e}") from None
    return dict(overrides)


def _config_key(key: str) -> bool:
    return "." in key


def _sweep_name(key: str, value: Any) -> str:
    short = SWEEP_ABBREV.get(key, key.split(".")[-1])
    return f"{short}{value:g}" if isinstance(value, float) else f"{short}{value}"


def expand_sweep(variants: dict[str, dict[str, Any]], sweep: dict[str, list]) -> tuple[dict, dict]:
    """Every variant crossed with every sweep value: ({variant-lr0.01: overrides}, {variant: (its members)})."""
    out: dict[str, dict[str, Any]] = {}
    groups: dict[str, tuple[str, ...]] = {}
    for name, overrides in variants.items():
        members: list[tuple[dict[str, Any], str]] = [({}, name)]
        for key, values in sweep.items():
            members = [({**o, key: v}, f"{n}-{_sweep_name(key, v)}") for o, n in members for v in values]
        for o, n in members:
            out[n] = {**overrides, **o}
        groups[name] = tuple(n for _, n in members)
    return out, groups


def _judge(path: Path, raw: Any, kind) -> dict[str, Any]:
    allowed = ("needs_colour", *kind.judge_keys)
    for key in raw if isinstance(raw, dict) else ():
        if key not in allowed:
            raise unknown_key(f"{path}: [judge] ", key, allowed)
    table = read_table(JudgeTable, raw, path=path, where="[judge] ")
    for metric, d in table.get("expect", {}).items():
        if metric not in EXPECTABLE:
            raise unknown_key(f"{path}: [judge.expect] ", metric, EXPECTABLE)
        if d not in DIRECTIONS:
            raise UserError(f"{path}: [judge.expect] {metric} = {d!r} must be \"lower\" or \"higher\"")
    if "tolerance" in kind.judge_keys and "tolerance" not in table:
        raise UserError(f"{path}: kind = {kind.name!r} needs [judge] tolerance (points from the paper's number that "
                        "still count as reproduced)")
    return table


def _variants(path: Path, raw: dict[str, Any]) -> tuple[dict, dict]:
    """Every variant's overrides checked, crossed with the sweep: (variants, groups)."""
    if not raw["variants"]:
        raise UserError(f"{path}: [variants] is empty; add at least one [variants.<name>] table")
    for key, values in raw.get("sweep", {}).items():
        if not isinstance(values, list) or not values:
            raise UserError(f"{path}: [sweep] {key!r} must be a non-empty list of values")
        for v in values:
            _check_config(path, "sweep", {key: v})
    for name, overrides in raw["variants"].items():
        _check_config(path, f"variants.{name}", overrides)
    return expand_sweep(raw["variants"], raw.get("sweep", {}))


def _arms(path: Path, raw: dict[str, Any], groups: dict, kind) -> None:
    for ref in ([raw["control"]] if raw.get("control") else []) + list(raw.get("treatments", ())):
        if ref not in groups:
            raise UserError(f"{path}: control/treatments name {ref!r}, which is not a [variants.<name>] table; "
                            f"variants: {', '.join(groups)}")
    if kind.needs_arms and not (raw.get("control") and raw.get("treatments")):
        raise UserError(f"{path}: kind = {kind.name!r} needs both control and treatments")


def _scale_tables(path: Path, raw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """[scales.<scale>]: a registered scale each; data settings (repro.scales.ScaleData) and config keys."""
    known = load_scales(path.parent)
    out = {}
    for scale, table in raw.items():
        if scale not in known:
            raise unknown_key(f"{path}: [scales] ", scale, known)
        out[scale] = read_table(ScaleData, table, path=path, where=f"[scales.{scale}] ", extra=_config_key,
                                partial=True)
        _check_config(path, f"scales.{scale}", {k: v for k, v in out[scale].items() if _config_key(k)})
    return out


def parse_experiment(path: Path) -> Experiment:
    """Read and check one experiment file against its declared schema; every problem is a one-line UserError
    naming the file and the key."""
    path = Path(path)
    raw = read_table(ExperimentFile, _load_toml(path), path=path,
                     hint="; see experiments/ablation-lrn.toml for an example")
    kind = get_kind(raw["kind"])
    base = _check_config(path, "base", raw.get("base", {}))
    variants, groups = _variants(path, raw)
    _arms(path, raw, groups, kind)
    paper = read_table(PaperNumbers, raw.get("paper", {}), path=path, where="[paper] ")
    scales = _scale_tables(path, raw.get("scales", {}))
    judge = _judge(path, raw.get("judge", {}), kind)
    page = read_table(PageTable, raw.get("page", {}), path=path, where="[page] ")
    try:  # `reproduced_if` may quote the [judge] settings, e.g. {tolerance:g}, so that each number is written once
        reproduced_if = raw.get("reproduced_if", "").format(**judge)
    except (KeyError, ValueError, IndexError) as e:
        raise UserError(f"{path}: reproduced_if names {e} in braces, which [judge] does not set") from None
    return Experiment(
        name=path.stem, title=raw["title"], section=raw["section"], claim=raw["claim"], kind=raw["kind"],
        variants=variants, groups=groups, control=raw.get("control"), treatments=raw.get("treatments", ()),
        metric=raw.get("metric", "top1_err"), compare=raw.get("compare"), reproduced_if=reproduced_if,
        paper=paper, base=base, scales=scales, judge=judge, order=page.get("order"),
        context=page.get("context", ()), show=page.get("show", ()), file=str(path))


def load_registry(directory: Path | str | None = None) -> dict[str, Experiment]:
    """Every `experiments/*.toml` except `_scales.toml`, by name (the file stem), validated."""
    directory = Path(directory or EXPERIMENTS_DIR)
    if not directory.is_dir():
        raise UserError(f"{directory}: no experiments folder; run from the repository root")
    load_scales(directory)
    return {p.stem: parse_experiment(p) for p in sorted(directory.glob("*.toml")) if not p.name.startswith("_")}


def get_experiment(registry: dict[str, Experiment], name: str) -> Experiment:
    if name in registry:
        return registry[name]
    close = difflib.get_close_matches(name, list(registry), n=1)
    hint = f"did you mean {close[0]!r}?" if close else "see `repro list`"
    raise UserError(f"unknown experiment {name!r}; {hint}")


def scale_settings(exp: Experiment, scale: str, directory: Path | str | None = None) -> Scale:
    """The scale with the experiment's own `[scales.<scale>]` data settings (which win)."""
    return with_data(get_scale(scale, directory), exp.scales.get(scale, {}))

"""The claim registry: one `experiments/<name>.toml` per claim of the paper, validated and resolved into runs.

An experiment file names the claim (section, text, kind, the paper's numbers), the variants being compared
(dotted config overrides on a shared `[base]`) and per-scale settings. `experiments/_scales.toml` holds what every
experiment shares at a scale (data folder, seeds, input size, width, epochs). A config is resolved in this order:
RunConfig defaults (the paper) -> `_scales.toml[scale]` -> `[base]` -> `[scales.<scale>]` -> variant -> `--set`;
then `data.manifest_hash` and `model.num_classes` come from the data's manifest.

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

import difflib
import functools
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from repro.claims import get_kind, kind_names
from repro.config import RunConfig, apply_overrides, config_hash
from repro.engine.record import METRICS
from repro.errors import UserError
from repro.hints import prepare_command

EXPERIMENTS_DIR = Path(__file__).resolve().parent.parent / "experiments"
SCALES = ("smoke", "demo", "subset", "full")
PAPER_KEYS = set(METRICS) | {"speedup", "iters_ratio", "note"}
REQUIRED = ("title", "section", "claim", "kind", "variants")
OPTIONAL = ("control", "treatments", "metric", "compare", "reproduced_if", "paper", "base", "sweep", "scales", "judge",
            "page")
JUDGE_KEYS = ("needs_colour",)  # read by repro.claims.judge for every kind; each kind adds its own
PAGE_KEYS = ("order", "context", "show")
SHOW = ("lrn-strength", "parameters")
DIRECTIONS = ("lower", "higher")
SCALE_REQUIRED = ("seeds", "data")
NOMINAL = ("nominal_train_images", "nominal_val_images", "nominal_classes")  # the data's sizes before it exists
SCALE_SPECIAL = SCALE_REQUIRED + ("prepare",) + NOMINAL  # keys of a scale table that are not config keys
SWEEP_ABBREV = {"train.lr": "lr", "train.weight_decay": "wd", "model.dropout": "p"}


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


@dataclass(frozen=True)
class PlannedRun:
    experiment: str
    variant: str
    group: str
    seed: int
    scale: str
    cfg: RunConfig
    config_hash: str               # without the data (data_ready false): a stand-in, not the run's hash
    data_ready: bool = True        # false: planned from the scale's nominal sizes, the data not prepared yet
    train_images: int = 0          # training images in the data (or its nominal count); 0: not looked up


def _load_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: TOML syntax error: {e}; fix the file") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None


def _unknown(path: Path, where: str, key: str, known) -> UserError:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; allowed: {', '.join(known)}"
    return UserError(f"{path}: unknown key {where}{key!r}{hint}")


def _want(path: Path, key: str, value: Any, typ: type | tuple, what: str) -> Any:
    if not isinstance(value, typ) or isinstance(value, bool) and typ is not bool:
        raise UserError(f"{path}: {key} = {value!r} must be {what}")
    return value


def _check_config(path: Path, where: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """Validate dotted config keys and values (names the file and table); return the overrides unchanged."""
    for key, value in overrides.items():
        if isinstance(value, dict):
            raise UserError(f"{path}: [{where}] {key!r} is a table; write dotted keys in quotes, e.g. \"model.lrn\" = false")
    try:
        apply_overrides(RunConfig(), overrides, source=f"{path} [{where}]")
    except UserError as e:  # value errors do not know the file: add it
        raise UserError(str(e) if str(path) in str(e) else f"{path} [{where}]: {e}") from None
    return dict(overrides)


def _check_scale_table(path: Path, where: str, table: Any) -> dict[str, Any]:
    _want(path, where, table, dict, "a table")
    for key in SCALE_SPECIAL:
        if key in ("seeds",) + NOMINAL and key in table:
            if not isinstance(table[key], int) or isinstance(table[key], bool) or table[key] < 1:
                raise UserError(f"{path}: [{where}] {key} = {table[key]!r} must be a whole number >= 1")
        if key in ("data", "prepare") and key in table:
            _want(path, f"[{where}] {key}", table[key], str, "a string")
    _check_config(path, where, {k: v for k, v in table.items() if k not in SCALE_SPECIAL})
    return dict(table)


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


def _check_judge(path: Path, raw: Any, kind) -> dict[str, Any]:
    table = _want(path, "[judge]", raw, dict, "a table")
    allowed = JUDGE_KEYS + kind.judge_keys
    for key, value in table.items():
        if key not in allowed:
            raise _unknown(path, "[judge] ", key, allowed)
        if key == "needs_colour":
            _want(path, "[judge] needs_colour", value, bool, "true or false")
        elif key == "expect":
            _want(path, "[judge.expect]", value, dict, "a table of metric = \"lower\" | \"higher\"")
            for metric, d in value.items():
                if metric not in METRICS + ("gap",):
                    raise _unknown(path, "[judge.expect] ", metric, METRICS + ("gap",))
                if d not in DIRECTIONS:
                    raise UserError(f"{path}: [judge.expect] {metric} = {d!r} must be \"lower\" or \"higher\"")
        elif not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
            raise UserError(f"{path}: [judge] {key} = {value!r} must be a number >= 0")
    if "tolerance" in kind.judge_keys and "tolerance" not in table:
        raise UserError(f"{path}: kind = {kind.name!r} needs [judge] tolerance (points from the paper's number that "
                        "still count as reproduced)")
    return dict(table)


def _check_page(path: Path, raw: Any) -> dict[str, Any]:
    table = _want(path, "[page]", raw, dict, "a table")
    for key, value in table.items():
        if key not in PAGE_KEYS:
            raise _unknown(path, "[page] ", key, PAGE_KEYS)
    if "order" in table:
        _want(path, "[page] order", table["order"], int, "a whole number")
    for key in ("context", "show"):
        value = table.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise UserError(f"{path}: [page] {key} = {value!r} must be a list of strings")
    for item in table.get("show", []):
        if item not in SHOW:
            raise _unknown(path, "[page] show ", item, SHOW)
    return table


def parse_experiment(path: Path) -> Experiment:
    """Read and validate one experiment file; every problem is a UserError naming the file and the key."""
    path = Path(path)
    raw = _load_toml(path)
    for key in raw:
        if key not in REQUIRED + OPTIONAL:
            raise _unknown(path, "", key, REQUIRED + OPTIONAL)
    for key in REQUIRED:
        if key not in raw:
            raise UserError(f"{path}: missing required key {key!r}; see experiments/ablation-lrn.toml for an example")
    for key in ("title", "section", "claim", "kind", "metric", "compare", "control", "reproduced_if"):
        if key in raw:
            _want(path, key, raw[key], str, "a string")
    if raw["kind"] not in kind_names():
        raise UserError(f"{path}: kind = {raw['kind']!r} is not one of {', '.join(kind_names())}")
    kind = get_kind(raw["kind"])
    for key in ("metric", "compare"):
        if key in raw and raw[key] not in METRICS:
            raise UserError(f"{path}: {key} = {raw[key]!r} is not one of {', '.join(METRICS)}")

    base = _check_config(path, "base", _want(path, "[base]", raw.get("base", {}), dict, "a table"))
    variants_raw = _want(path, "[variants]", raw["variants"], dict, "a table of [variants.<name>] tables")
    if not variants_raw:
        raise UserError(f"{path}: [variants] is empty; add at least one [variants.<name>] table")
    sweep = _want(path, "[sweep]", raw.get("sweep", {}), dict, "a table of key = [values]")
    for key, values in sweep.items():
        if not isinstance(values, list) or not values:
            raise UserError(f"{path}: [sweep] {key!r} must be a non-empty list of values")
        for v in values:
            _check_config(path, "sweep", {key: v})
    for name, overrides in variants_raw.items():
        _want(path, f"[variants.{name}]", overrides, dict, "a table")
        _check_config(path, f"variants.{name}", overrides)
    variants, groups = expand_sweep(variants_raw, sweep)

    control = raw.get("control")
    treatments = raw.get("treatments", [])
    if not isinstance(treatments, list) or not all(isinstance(t, str) for t in treatments):
        raise UserError(f"{path}: treatments = {treatments!r} must be a list of variant names")
    for ref in ([control] if control else []) + treatments:
        if ref not in groups:
            raise UserError(f"{path}: control/treatments name {ref!r}, which is not a [variants.<name>] table; "
                            f"variants: {', '.join(groups)}")
    if kind.needs_arms and not (control and treatments):
        raise UserError(f"{path}: kind = {raw['kind']!r} needs both control and treatments")

    paper = _want(path, "[paper]", raw.get("paper", {}), dict, "a table")
    for key, value in paper.items():
        if key not in PAPER_KEYS:
            raise _unknown(path, "[paper] ", key, sorted(PAPER_KEYS))
        if key == "note":
            _want(path, "[paper] note", value, str, "a string")
        elif not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise UserError(f"{path}: [paper] {key} = {value!r} must be a number")

    scales = _want(path, "[scales]", raw.get("scales", {}), dict, "a table of [scales.<scale>] tables")
    for scale, table in scales.items():
        if scale not in SCALES:
            raise _unknown(path, "[scales] ", scale, SCALES)
        _check_scale_table(path, f"scales.{scale}", table)

    judge = _check_judge(path, raw.get("judge", {}), kind)
    page = _check_page(path, raw.get("page", {}))
    try:  # `reproduced_if` may quote the [judge] settings, e.g. {tolerance:g}, so that each number is written once
        reproduced_if = raw.get("reproduced_if", "").format(**judge)
    except (KeyError, ValueError, IndexError) as e:
        raise UserError(f"{path}: reproduced_if names {e} in braces, which [judge] does not set") from None
    return Experiment(
        name=path.stem, title=raw["title"], section=raw["section"], claim=raw["claim"], kind=raw["kind"],
        variants=variants, groups=groups, control=control, treatments=tuple(treatments),
        metric=raw.get("metric", "top1_err"), compare=raw.get("compare"), reproduced_if=reproduced_if,
        paper=dict(paper), base=base, scales={k: dict(v) for k, v in scales.items()}, judge=judge,
        order=page.get("order"), context=tuple(page.get("context", ())), show=tuple(page.get("show", ())),
        file=str(path))


def load_scales(directory: Path | str | None = None) -> dict[str, dict[str, Any]]:
    """`_scales.toml`: one table per scale with `data`, `seeds` and config overrides."""
    path = Path(directory or EXPERIMENTS_DIR) / "_scales.toml"
    raw = _load_toml(path)
    for scale in raw:
        if scale not in SCALES:
            raise _unknown(path, "", scale, SCALES)
    for scale in SCALES:
        if scale not in raw:
            raise UserError(f"{path}: missing table [{scale}]; every scale needs one")
        table = _check_scale_table(path, scale, raw[scale])
        for key in SCALE_REQUIRED:
            if key not in table:
                raise UserError(f"{path}: [{scale}] is missing {key!r}")
    return raw


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


def scale_settings(exp: Experiment, scale: str, scales: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The scale's table merged with the experiment's own `[scales.<scale>]` (which wins)."""
    if scale not in SCALES:
        raise UserError(f"unknown scale {scale!r}; choose one of {', '.join(SCALES)}")
    return {**scales[scale], **exp.scales.get(scale, {})}


def data_dir_for(exp: Experiment, scale: str, data_dir: Path | str | None, scales) -> Path:
    return Path(data_dir) if data_dir is not None else Path(scale_settings(exp, scale, scales)["data"])


@functools.lru_cache(maxsize=16)
def _manifest(data_dir: str) -> tuple[str, int, int]:
    # repro.data loads torch and FFCV: only when a plan needs the data, not for `repro list` (start-up time)
    from repro.data import read_manifest

    m = read_manifest(Path(data_dir))
    return m["hash"], len(m["classes"]["ids"]), int(m["splits"]["train"]["count"])


def manifest_facts(data_dir: Path | str) -> tuple[str, int, int]:
    """(manifest hash, number of classes, training images) of a prepared data folder."""
    return _manifest(str(Path(data_dir).resolve()))


def nominal_facts(exp: Experiment, scale: str, data: Path, scales: dict[str, dict[str, Any]]) -> tuple[int, int]:
    """(classes, training images) the scale's data will have once prepared, from `_scales.toml`."""
    settings = scale_settings(exp, scale, scales)
    missing = [k for k in ("nominal_classes", "nominal_train_images") if k not in settings]
    if missing:
        raise UserError(f"no prepared data in {data} and _scales.toml [{scale}] gives no {', '.join(missing)} to "
                        f"plan from; add them there or run `{prepare_command(data)}`")
    return settings["nominal_classes"], settings["nominal_train_images"]


def resolve(exp: Experiment, scale: str, data_dir: Path | str | None = None, seeds: int | None = None,
            sets: dict[str, Any] | None = None, scales: dict[str, dict[str, Any]] | None = None,
            without_data: bool = False) -> list[PlannedRun]:
    """Every (variant, seed) run of `exp` at `scale`, with its fully resolved config and hash.

    without_data: when the data folder has no manifest yet, plan from the scale's nominal sizes; such runs have
    `data_ready` false and a stand-in hash (a run's hash covers the data's manifest hash).
    """
    scales = scales if scales is not None else load_scales(Path(exp.file).parent if exp.file else None)
    settings = scale_settings(exp, scale, scales)
    data = data_dir_for(exp, scale, data_dir, scales)
    n_seeds = seeds if seeds is not None else settings["seeds"]
    ready = not without_data or (data / "manifest.json").is_file()
    if ready:
        manifest_hash, num_classes, num_train = manifest_facts(data)
    else:
        manifest_hash, (num_classes, num_train) = "", nominal_facts(exp, scale, data, scales)
    cfg0 = apply_overrides(RunConfig(), {k: v for k, v in scales[scale].items() if k not in SCALE_SPECIAL},
                           source=f"_scales.toml [{scale}]")
    cfg0 = apply_overrides(cfg0, exp.base, source=f"{exp.file} [base]")
    cfg0 = apply_overrides(cfg0, {k: v for k, v in exp.scales.get(scale, {}).items() if k not in SCALE_SPECIAL},
                           source=f"{exp.file} [scales.{scale}]")
    group_of = {v: g for g, vs in exp.groups.items() for v in vs}
    out = []
    for variant, overrides in exp.variants.items():
        cfg = apply_overrides(cfg0, overrides, source=f"{exp.file} [variants.{variant}]")
        cfg = apply_overrides(cfg, sets or {}, source="--set")
        for seed in range(n_seeds):
            final = apply_overrides(cfg, {"train.seed": seed, "data.dir": str(data),
                                          "data.manifest_hash": manifest_hash, "model.num_classes": num_classes})
            out.append(PlannedRun(exp.name, variant, group_of[variant], seed, scale, final, config_hash(final),
                                  data_ready=ready, train_images=num_train))
    return out

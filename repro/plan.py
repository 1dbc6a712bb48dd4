"""Planning: every run of the chosen experiments at a scale, resolved into configs and hashes, with its cost.

A config is resolved in this order: RunConfig defaults (the paper) -> the scale's table (repro.scales) ->
the experiment's `[base]` -> its `[scales.<scale>]` -> the variant -> `--set`; then `data.manifest_hash` and
`model.num_classes` come from the data's manifest (or, for a dry run before the data exists, the scale's nominal
sizes, with a stand-in hash); `plan` records a prepared data folder as an absolute path, so that jobs and later
commands started elsewhere find it. Runs are then deduplicated by config hash, so a run several experiments share is
trained once. The cost of a plan (images to train, time) comes from the rates of runs finished on this host, else
the scale's rough guess; `repro run --dry-run` prints it.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from repro import runs as store
from repro.config import RunConfig, apply_overrides, config_hash, parse_set
from repro.record import finite
from repro.errors import UserError
from repro.experiments import Experiment, get_experiment, load_registry
from repro.hints import prepare_command
from repro.rundir import REUSED, store_dir
from repro.scales import Scale, get_scale, with_data
from repro.views import Column, cli_console, show

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


@functools.lru_cache(maxsize=16)
def _manifest(data_dir: str) -> tuple[str, int, int]:
    # repro.data loads torch and FFCV: only when a plan needs the data, not for `repro list` (start-up time)
    from repro.data import read_manifest

    m = read_manifest(Path(data_dir))
    return m["hash"], len(m["classes"]["ids"]), int(m["splits"]["train"]["count"])


def manifest_facts(data_dir: Path | str) -> tuple[str, int, int]:
    """(manifest hash, number of classes, training images) of a prepared data folder."""
    return _manifest(str(Path(data_dir).resolve()))


def nominal_facts(settings: Scale, data: Path) -> tuple[int, int]:
    """(classes, training images) the scale's data will have once prepared, from `_scales.toml`."""
    missing = [k for k in ("nominal_classes", "nominal_train_images") if getattr(settings, k) is None]
    if missing:
        raise UserError(f"no prepared data in {data} and _scales.toml [{settings.name}] gives no "
                        f"{', '.join(missing)} to plan from; add them there or run `{prepare_command(data)}`")
    return settings.nominal_classes, settings.nominal_train_images


def _scale(exp: Experiment, scale: str, scales: dict[str, Scale] | None) -> Scale:
    if scales is None:
        return get_scale(scale, Path(exp.file).parent if exp.file else None)
    if scale not in scales:
        raise UserError(f"unknown scale {scale!r}; choose one of {', '.join(scales)}")
    return scales[scale]


def resolve(exp: Experiment, scale: str, data_dir: Path | str | None = None, seeds: int | None = None,
            sets: dict[str, Any] | None = None, scales: dict[str, Scale] | None = None,
            without_data: bool = False) -> list[PlannedRun]:
    """Every (variant, seed) run of `exp` at `scale`, with its fully resolved config and hash.

    without_data: when the data folder has no manifest yet, plan from the scale's nominal sizes; such runs have
    `data_ready` false and a stand-in hash (a run's hash covers the data's manifest hash).
    """
    shared = _scale(exp, scale, scales)
    settings = with_data(shared, exp.scales.get(scale, {}))
    data = Path(data_dir) if data_dir is not None else Path(settings.data)
    n_seeds = seeds if seeds is not None else settings.seeds
    ready = not without_data or (data / "manifest.json").is_file()
    if ready:
        manifest_hash, num_classes, num_train = manifest_facts(data)
    else:
        manifest_hash, (num_classes, num_train) = "", nominal_facts(settings, data)
    cfg0 = apply_overrides(RunConfig(), shared.overrides, source=f"_scales.toml [{scale}]")
    cfg0 = apply_overrides(cfg0, exp.base, source=f"{exp.file} [base]")
    cfg0 = apply_overrides(cfg0, {k: v for k, v in exp.scales.get(scale, {}).items() if "." in k},
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


def plan(names: list[str], scale: str, *, data_dir, seeds, sets, experiments_dir=None, without_data=False):
    """Resolve every experiment; returns (registry, {experiment: [PlannedRun]}).

    without_data: plan from the scale's nominal sizes where the data is not prepared yet (a dry run)."""
    registry = load_registry(experiments_dir)
    get_scale(scale, experiments_dir)
    if names == ["all"]:
        names = list(registry)
    exps = [get_experiment(registry, n) for n in names]
    overrides = parse_set(list(sets or []))
    return registry, {e.name: [_absolute_data(r) for r in resolve(e, scale, data_dir, seeds, overrides,
                                                                  without_data=without_data)]
                      for e in exps}


def _absolute_data(run: PlannedRun) -> PlannedRun:
    """The run with its prepared data folder as an absolute path: the planned config is recorded in the run folder
    and read by jobs and later commands started from other folders. `data.dir` is not hashed, so the hash stays."""
    if not run.data_ready:  # nothing is recorded for it; its hint keeps the path as the user gave it
        return run
    return dataclasses.replace(run, cfg=apply_overrides(run.cfg, {"data.dir": os.path.abspath(run.cfg.data.dir)}))


def unique_runs(planned: dict[str, list[PlannedRun]]) -> list[PlannedRun]:
    """The first PlannedRun of each config hash, in plan order."""
    seen: dict[str, PlannedRun] = {}
    for runs in planned.values():
        for r in runs:
            seen.setdefault(r.config_hash, r)
    return list(seen.values())


def users(planned: dict[str, list[PlannedRun]]) -> dict[str, list[str]]:
    """{config hash: the experiments that plan it}, in plan order."""
    out: dict[str, list[str]] = {}
    for exp, runs in planned.items():
        for r in runs:
            if exp not in out.setdefault(r.config_hash, []):
                out[r.config_hash].append(exp)
    return out


# --- cost -----------------------------------------------------------------------------------------------------------

def _images_per_run(run: PlannedRun) -> int:
    num_train = run.train_images or manifest_facts(run.cfg.data.dir)[2]
    n = min(run.cfg.data.train_limit, num_train) if run.cfg.data.train_limit else num_train
    return n * run.cfg.train.epochs


def training_images(runs: list[PlannedRun]) -> int:
    """Training images the runs process in all (each run's training images x its epochs)."""
    return sum(_images_per_run(r) for r in runs)


def gpu_present() -> bool:
    # torch loads only for a dry run's estimate, not for planning (start-up time)
    import torch

    return torch.cuda.is_available()


def _kind(device: Any) -> str:
    """"gpu" or "cpu": what a run's recorded device name (prov.device) says it trained on."""
    return "cpu" if not isinstance(device, str) or device == "cpu" else "gpu"


def measured_rates(runs_dir: Path) -> dict[tuple, float]:
    """images/s of finished runs on this host, keyed by ("gpu" | "cpu", model, width, input size, stem) and by
    ("gpu" | "cpu", "scale", scale)."""
    df = store.collect(runs_dir)
    if df.empty or "prov.images_per_s" not in df or "prov.host" not in df:
        return {}
    df = df[(df.status == "done") & (df["prov.host"] == socket.gethostname())]
    out: dict[tuple, float] = {}
    for _, r in df.iterrows():
        kind = _kind(r.get("prov.device"))
        key = (kind, r.get("model.name"), r.get("model.width"), r.get("model.input_size"), r.get("model.stem"))
        if finite(r["prov.images_per_s"]):
            out.setdefault(key, r["prov.images_per_s"])
            out.setdefault((kind, "scale", r["scale"]), r["prov.images_per_s"])
    return out


def estimate(run: PlannedRun, rates: dict[tuple, float], gpu: bool = False) -> tuple[int, float, str]:
    """(images to process, seconds, where the rate came from) for one run. `gpu`: a GPU is present, so a run
    that may use it (train.device not "cpu") is timed at GPU rates: measured on this host's GPU, else the scale's
    `guess_images_per_s_gpu`."""
    images = _images_per_run(run)
    m = run.cfg.model
    kind = "gpu" if gpu and run.cfg.train.device != "cpu" else "cpu"
    on = " on this host's GPU" if kind == "gpu" else ""
    rate, source = rates.get((kind, m.name, m.width, m.input_size, m.stem)), f"measured{on}"
    if rate is None:
        rate, source = rates.get((kind, "scale", run.scale)), f"measured{on} at this scale"
    if rate is None:
        scale = get_scale(run.scale)
        if kind == "gpu" and scale.guess_images_per_s_gpu:
            rate, source = scale.guess_images_per_s_gpu, "rough guess of a GPU's rate (_scales.toml)"
        else:
            rate = scale.guess_images_per_s
            source = "rough guess" + (" (a CPU's: the scale has no GPU guess)" if kind == "gpu" else "")
    return images, images / rate, source


def fmt_time(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


PLAN_COLUMNS = (Column("experiment"), Column("variant"), Column("seed", kind="num"),
                Column("hash", missing="after data"),
                Column("status"), Column("images", kind="num", fmt=lambda n: f"{n:,}"),
                Column("est_time", "est. time", kind="num", drop=1))


def plan_rows(planned: dict[str, list[PlannedRun]], runs_dir: Path) -> tuple[list[dict], dict]:
    """One row per planned run, and the totals (images and seconds to train, where the rates came from)."""
    rates, gpu = measured_rates(runs_dir), gpu_present()
    rows, total_images, total_s, sources, counted = [], 0, 0.0, set(), set()
    for exp, runs in planned.items():
        for r in runs:
            status = store_dir(runs_dir, r.config_hash).own_status() if r.data_ready else "no data"
            images, seconds, source = estimate(r, rates, gpu)
            shared = r.config_hash in counted
            if status not in REUSED and not shared:
                total_images, total_s = total_images + images, total_s + seconds
                sources.add(source)
            counted.add(r.config_hash)
            note = "shared" if shared else ("reused" if status in REUSED else fmt_time(seconds))
            rows.append({"experiment": exp, "variant": r.variant, "seed": r.seed,
                         "hash": r.config_hash if r.data_ready else None,
                         "status": status, "images": images, "est_time": note})
    totals = {"planned": len(rows), "distinct": len(counted), "images": total_images, "seconds": total_s,
              "sources": sorted(sources)}
    return rows, totals


def print_plan(planned: dict[str, list[PlannedRun]], runs_dir: Path, console: Console, fmt: str = "table") -> int:
    rows, t = plan_rows(planned, runs_dir)
    show(console, rows, PLAN_COLUMNS, fmt, title="planned runs")
    missing = sorted({(r.scale, r.cfg.data.dir) for runs in planned.values() for r in runs if not r.data_ready})
    notes = [f"{folder} is not prepared yet: planned from the {scale} scale's nominal dataset sizes "
             f"({_nominal_text(planned, folder)}); run hashes cover the data, so they are shown after "
             f"`{prepare_command(folder)}`, and these runs are not recorded under {runs_dir}."
             for scale, folder in missing]
    summary = (f"{t['planned']} planned runs, {t['distinct']} distinct; to train: {t['images']:,} training images, "
               f"about {fmt_time(t['seconds'])} ({', '.join(t['sources']) or 'nothing to do'}; "
               "evaluation not included).")
    # plain and json are for scripts: the prose goes to stderr so that stdout parses
    out = console if fmt == "table" else cli_console(stderr=True)
    for line in notes + [summary]:
        out.print(line, markup=False)
    return 0


def _nominal_text(planned: dict[str, list[PlannedRun]], folder: str) -> str:
    r = next(r for runs in planned.values() for r in runs if r.cfg.data.dir == folder)
    return f"{r.train_images:,} training images, {r.cfg.model.num_classes} classes"

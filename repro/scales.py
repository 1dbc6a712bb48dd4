"""The scale registry: one table per scale in `experiments/_scales.toml`, read once, declared here.

A scale changes sizes only (data, resolution, width, epochs, seeds); the variants and the code path are the same at
every scale. Adding a scale is one table in that file, smallest first: the CLI's `--scale` choices, how verdicts
are judged there, the page's caveat, the dry run's rough rate and the `prepare-data` hints all come from it.
Keys of a scale's table that are not declared below are config keys (`repro keys` lists them).
"""

from __future__ import annotations

import dataclasses
import functools
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from repro.config import RunConfig, apply_overrides
from repro.errors import UserError
from repro.schema import read_table, spec, table_fields

EXPERIMENTS_DIR = Path(__file__).resolve().parent.parent / "experiments"
SCALES_FILE = "_scales.toml"
_POSITIVE = (lambda n: n >= 1, "must be a whole number >= 1")


@dataclass(frozen=True, kw_only=True)
class ScaleData:
    """What a scale trains on: also settable per experiment in its `[scales.<name>]` table."""

    data: str = spec(help="the default of repro run's --data: the folder that prepare-data makes")
    seeds: int = spec(valid=_POSITIVE, help="the default `--seeds`")
    prepare: str | None = spec(None, help="the arguments of `repro prepare-data` that make `data` (`...`: the "
                                          "dataset's own folder); every hint that suggests the command reads it")
    nominal_train_images: int | None = spec(None, valid=_POSITIVE, help="the data's size once prepared, from "
                                            "which a dry run (repro run --dry-run) plans before it is")
    nominal_val_images: int | None = spec(None, valid=_POSITIVE)
    nominal_classes: int | None = spec(None, valid=_POSITIVE)


@dataclass(frozen=True, kw_only=True)
class Scale(ScaleData):
    """One scale: its table, where it stands among the others, and its config overrides."""

    judge: str = spec("magnitude", choices=("direction", "magnitude"),
                      help="direction: only the direction of an effect is judged; magnitude: its size against the "
                           "paper's too")
    absolute: bool = spec(False, help="absolute errors are comparable with the paper's numbers")
    summary: str = spec("", help="what the scale is for, in a few words (for the --scale help)")
    caveat: str = spec("", help="what the scale's numbers can say, on the page beside its verdicts")
    guess_images_per_s: float = spec(100.0, valid=(lambda x: x > 0, "must be a number > 0"),
                                     help="rough images/s of a 2-core CPU, for --dry-run until a run has finished")
    guess_images_per_s_gpu: float | None = spec(None, valid=(lambda x: x > 0, "must be a number > 0"),
                                                help="rough images/s of one GPU, for --dry-run where a GPU is "
                                                     "present until a run has finished on it")
    name: str = spec(derived=True)
    rank: int = spec(derived=True, help="0 for the first (smallest) table in the file")
    overrides: dict[str, Any] = spec(derived=True, factory=dict, help="the table's config keys")

    @property
    def direction_only(self) -> bool:
        return self.judge == "direction"


def _config_key(key: str) -> bool:
    return "." in key


def parse_scales(path: Path) -> dict[str, Scale]:
    """Read and check a scales file; every problem is a one-line UserError naming the file, table and key."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: TOML syntax error: {e}; fix the file") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror}); run from the repository root") from None
    if not raw:
        raise UserError(f"{path}: no scale tables; add one, e.g. [demo] with data and seeds")
    out = {}
    for rank, (name, table) in enumerate(raw.items()):
        values = read_table(Scale, table, path=path, where=f"[{name}] ", extra=_config_key)
        overrides = {k: v for k, v in values.items() if _config_key(k)}
        apply_overrides(RunConfig(), overrides, source=f"{path} [{name}]")  # names the file and the key
        declared = {k: v for k, v in values.items() if not _config_key(k)}
        out[name] = Scale(name=name, rank=rank, overrides=overrides, **declared)
    return out


@functools.lru_cache(maxsize=8)
def _load(path: str, stamp: tuple) -> dict[str, Scale]:
    return parse_scales(Path(path))


def load_scales(directory: Path | str | None = None) -> dict[str, Scale]:
    """Every scale of `<directory>/_scales.toml` (default: the repository's `experiments/`), smallest first; read
    once while the file is unchanged."""
    path = (Path(directory or EXPERIMENTS_DIR) / SCALES_FILE).resolve()
    try:
        st = path.stat()
        stamp = (st.st_mtime_ns, st.st_size)
    except OSError:
        stamp = ()
    return dict(_load(str(path), stamp))


def scale_names() -> tuple[str, ...]:
    """The registered scales, smallest first (the CLI's choices)."""
    return tuple(load_scales())


def get_scale(name: str, directory: Path | str | None = None) -> Scale:
    scales = load_scales(directory)
    if name not in scales:
        raise UserError(f"unknown scale {name!r}; choose one of {', '.join(scales)}")
    return scales[name]


def find_scale(name: Any) -> Scale | None:
    """The registered scale of that name, or None (a run table may hold a scale no longer registered)."""
    return load_scales().get(name) if isinstance(name, str) else None


def largest_first(names) -> list[str]:
    """`names` ordered largest scale first; unregistered names last, alphabetically."""
    scales = load_scales()
    known = sorted((n for n in set(names) if n in scales), key=lambda n: -scales[n].rank)
    return known + sorted(n for n in set(names) if n not in scales)


def with_data(scale: Scale, table: dict[str, Any]) -> Scale:
    """`scale` with an experiment's own data settings (`[scales.<name>]`: data, seeds, prepare, nominal sizes)."""
    own = {k: v for k, v in table.items() if k in table_fields(ScaleData)}
    return dataclasses.replace(scale, **own)

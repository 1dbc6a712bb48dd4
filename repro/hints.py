"""The `repro prepare-data` command that makes a data folder, for every error and plan that suggests one.

One place knows each scale's source command: `experiments/_scales.toml`, whose `prepare` key holds the arguments
after `repro prepare-data` (without `--out`, which is the scale's `data` folder). A folder that was prepared before
has a manifest recording its source, root and settings, from which the exact command to rebuild it follows.
`...` stands for a path only the user knows (where ImageNet lives); everything else is pasted as it is.
"""

from __future__ import annotations

import shlex
import tomllib
from pathlib import Path

from data_prep.sources import DEFAULT_RES, DEFAULT_ROOTS
from repro import io

SCALES_FILE = Path(__file__).resolve().parent.parent / "experiments" / "_scales.toml"
PLACEHOLDER = "..."  # a path the user fills in
NO_ROOT = ("synthetic",)  # sources that need no --root (besides those with a default root)


def scale_sources(scales_file: Path | str | None = None) -> dict[str, tuple[str, str]]:
    """{scale: (data folder, prepare-data arguments)} for every scale whose table has both."""
    try:
        with open(scales_file or SCALES_FILE, "rb") as f:
            raw = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError):  # the registry reports a broken file itself, with the fix
        return {}
    return {scale: (t["data"], t["prepare"]) for scale, t in raw.items()
            if isinstance(t, dict) and isinstance(t.get("data"), str) and isinstance(t.get("prepare"), str)}


def _same(a: Path | str, b: Path | str) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def _needs_root(source: str) -> bool:
    return source not in DEFAULT_ROOTS and source not in NO_ROOT


def _from_manifest(manifest: dict) -> str | None:
    """The arguments that rebuild a prepared folder exactly, from its manifest's source, root and settings."""
    source, settings = manifest.get("source"), manifest.get("settings")
    if source not in DEFAULT_RES or not isinstance(settings, dict):
        return None
    args = [source]
    root = manifest.get("root")
    if root and root != DEFAULT_ROOTS.get(source):
        args += ["--root", root]
    elif _needs_root(source):
        args += ["--root", PLACEHOLDER]
    flags = (("res", "--res", None), ("classes", "--classes", None), ("train_per_class", "--train-per-class", None),
             ("val_per_class", "--val-per-class", None), ("write_mode", "--write-mode", None),
             ("jpeg_quality", "--jpeg-quality", 90), ("seed", "--seed", 0))
    for key, flag, default in flags:
        value = settings.get(key)
        if value is not None and value != default:
            args += [flag, str(value)]
    if settings.get("max_side"):
        args.append("--max-side")
    return shlex.join(args)


def _read_manifest(folder: Path | str) -> dict | None:
    manifest = io.read_json(Path(folder) / "manifest.json")
    return manifest if isinstance(manifest, dict) else None


def prepare_args(folder: Path | str, manifest: dict | None = None, scales_file: Path | str | None = None) -> str:
    """The arguments after `repro prepare-data` (without --out) that make `folder` (its manifest, when readable and
    not given, is read from the folder)."""
    manifest = manifest if manifest is not None else _read_manifest(folder)
    if manifest and (args := _from_manifest(manifest)):
        return args
    for data, args in scale_sources(scales_file).values():
        if _same(data, folder):
            return args
    name = Path(folder).name
    if name in DEFAULT_RES:
        return name + (f" --root {PLACEHOLDER}" if _needs_root(name) else "")
    return f"imagefolder --root {PLACEHOLDER}"  # a folder of class folders: the general source


def prepare_command(folder: Path | str, manifest: dict | None = None, *, force: bool = False,
                    scales_file: Path | str | None = None) -> str:
    """`repro prepare-data ... --out FOLDER`, ready to paste (but for `...`, the dataset's own folder)."""
    cmd = f"repro prepare-data {prepare_args(folder, manifest, scales_file)} --out {shlex.quote(str(folder))}"
    return cmd + (" --force" if force else "")

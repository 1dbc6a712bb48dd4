"""The `repro prepare-data` command that makes a data folder, for every error and plan that suggests one.

One place knows each scale's source command: the scale registry (`repro.scales`), whose `prepare` key holds the
arguments after `repro prepare-data` (without `--out`, which is the scale's `data` folder). A folder that was prepared
before has a manifest recording its source, root and settings, from which the exact command to rebuild it follows.
Which sources need `--root`, and their default roots, come from the source registry (`data_prep.sources`).
`...` stands for a path only the user knows (where ImageNet lives); everything else is pasted as it is.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from data_prep.sources import SOURCES, get_source
from repro import io
from repro.errors import UserError
from repro.scales import load_scales

PLACEHOLDER = "..."  # a path the user fills in


def scale_sources(directory: Path | str | None = None) -> dict[str, tuple[str, str]]:
    """{scale: (data folder, prepare-data arguments)} for every scale with both; `directory` holds _scales.toml."""
    try:
        scales = load_scales(directory)
    except UserError:  # a hint must not fail: the scale registry reports a broken file itself, with the fix
        return {}
    return {name: (s.data, s.prepare) for name, s in scales.items() if s.data and s.prepare}


def _same(a: Path | str, b: Path | str) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def _from_manifest(manifest: dict) -> str | None:
    """The arguments that rebuild a prepared folder exactly, from its manifest's source, root and settings."""
    source, settings = manifest.get("source"), manifest.get("settings")
    if source not in SOURCES or not isinstance(settings, dict):
        return None
    args = [source]
    root = manifest.get("root")
    if root and root != get_source(source).default_root:
        args += ["--root", root]
    elif get_source(source).root_required:
        args += ["--root", PLACEHOLDER]
    flags = (("res", "--res", None), ("classes", "--classes", None), ("train_per_class", "--train-per-class", None),
             ("val_per_class", "--val-per-class", None), ("write_mode", "--write-mode", None),
             ("jpeg_quality", "--jpeg-quality", 90), ("seed", "--seed", 0))
    for key, flag, default in flags:
        value = settings.get(key)
        if value is not None and value != default:
            # settings.classes holds a count or a class-list file (also a file from before --class-list existed)
            if key == "classes" and not str(value).isdigit():
                flag = "--class-list"
            args += [flag, str(value)]
    if settings.get("max_side"):
        args.append("--max-side")
    return shlex.join(args)


def _read_manifest(folder: Path | str) -> dict | None:
    manifest = io.read_json(Path(folder) / "manifest.json")
    return manifest if isinstance(manifest, dict) else None


def prepare_args(folder: Path | str, manifest: dict | None = None, scales_dir: Path | str | None = None) -> str:
    """The arguments after `repro prepare-data` (without --out) that make `folder` (its manifest, when readable and
    not given, is read from the folder)."""
    manifest = manifest if manifest is not None else _read_manifest(folder)
    if manifest and (args := _from_manifest(manifest)):
        return args
    for data, args in scale_sources(scales_dir).values():
        if _same(data, folder):
            return args
    name = Path(folder).name
    if name in SOURCES:
        return name + (f" --root {PLACEHOLDER}" if get_source(name).root_required else "")
    return f"imagefolder --root {PLACEHOLDER}"  # a folder of class folders: the general source


def prepare_command(folder: Path | str, manifest: dict | None = None, *, force: bool = False,
                    scales_dir: Path | str | None = None) -> str:
    """`repro prepare-data ... --out FOLDER`, ready to paste (but for `...`, the dataset's own folder)."""
    cmd = f"repro prepare-data {prepare_args(folder, manifest, scales_dir)} --out {shlex.quote(str(folder))}"
    return cmd + (" --force" if force else "")

"""`repro prepare-data`: read a source, pick classes and caps, write train/val betons and manifest.json.

Nothing is done when the output already matches the settings; otherwise betons are written under this process's
own temporary names (`train.beton.<pid>.tmp`) and renamed only when both are complete, the manifest last, so an
interrupted run never looks finished and two runs into one folder never write or remove each other's files.
"""

from __future__ import annotations

import datetime
import errno
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep import __version__, classes
from data_prep.manifest import FORMAT, content_hash, pixel_stats, read_existing, sha256_file
from data_prep.sources import SourceData, Split, get_source, load_source
from repro import io
from repro.errors import UserError

RAW_MAX_SIDE = 64  # stored side up to which images are kept raw (tiny sets decode fastest uncompressed)
MEAN_IMAGE_FILE = "mean_image.npy"  # float32 (res, res, 3), 0..255, beside the betons


@dataclass
class PrepareOptions:
    res: int | None = None
    max_side: bool = False
    classes: str | None = None  # a count N (`data_prep.classes` says which N)
    class_list: str | None = None  # a file of class ids
    train_per_class: int | None = None
    val_per_class: int | None = None
    write_mode: str = "auto"  # auto | jpg | raw
    jpeg_quality: int = 90
    workers: int = 0
    seed: int = 0
    force: bool = False


def resolve_settings(source: str, opts: PrepareOptions) -> dict:
    """The settings recorded in (and compared against) the manifest, defaults filled in."""
    spec = get_source(source)
    res = opts.res or spec.default_res
    write_mode = opts.write_mode if opts.write_mode != "auto" else "raw" if res <= RAW_MAX_SIDE else "jpg"
    settings = {"res": res, "max_side": opts.max_side, "classes": classes.recorded(opts.classes, opts.class_list),
                "train_per_class": opts.train_per_class, "val_per_class": opts.val_per_class,
                "jpeg_quality": opts.jpeg_quality, "write_mode": write_mode,
                "seed": opts.seed}
    if spec.settings is not None:
        settings.update(spec.settings(opts))
    return settings


def restrict(split: Split, keep: list[int], cap: int | None, rng: np.random.Generator) -> Split:
    """Keep the chosen classes (relabelled 0..K-1 in `keep` order) and at most `cap` images of each."""
    new_label = np.full(max(int(split.labels.max(initial=0)), max(keep)) + 1, -1, dtype=np.int64)
    new_label[keep] = np.arange(len(keep))
    index = []
    for old in keep:
        idx = np.flatnonzero(split.labels == old)
        if cap is not None and len(idx) > cap:
            idx = np.sort(rng.choice(idx, cap, replace=False))
        index.append(idx)
    index = np.sort(np.concatenate(index)) if index else np.zeros(0, np.int64)
    return split.subset(index, new_label[split.labels[index]])


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of `path` that does not exist yet (what we must remove if we fail)."""
    missing = None
    for p in [path, *path.parents]:
        if p.exists():
            break
        missing = p
    return missing


def check_output(out: Path, estimate: int) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"cannot write to output folder {out} ({e.strerror or e}); choose a writable --out") from None
    free = shutil.disk_usage(out).free
    if free < estimate:
        raise UserError(f"not enough space in {out}: about {estimate / 1e6:,.0f} MB needed, {free / 1e6:,.0f} MB "
                        f"free; free some space or choose another --out")


def _classes_unchanged(opts: PrepareOptions, manifest: dict) -> bool:
    """The kept classes still follow from the options: a --class-list file may have been edited since, and a
    folder whose manifest says nothing of how its classes were chosen kept the first N ids (the old --classes N)."""
    if opts.class_list is not None:
        try:
            return classes.read_class_file(Path(opts.class_list)) == manifest["classes"]["ids"]
        except (OSError, UnicodeDecodeError):
            return False
    return opts.classes is None or "chosen_by" in manifest["classes"]


def _resolve_root(source: str, root: Path | None) -> Path | None:
    spec = get_source(source)  # an unknown name is refused here, with the registered ones
    if root is None and spec.default_root is not None:
        root = Path(spec.default_root)
    if root is None and spec.needs_root:
        raise UserError(f"{source} needs --root: the folder holding the dataset")
    return root


def _up_to_date(out: Path, source: str, root_str: str | None, settings: dict, opts: PrepareOptions) -> str | None:
    """The summary line when `out` already holds this conversion (mean image included), else None."""
    old = read_existing(out)
    if not old or opts.force or old.get("source") != source or old.get("root") != root_str \
            or old.get("settings") != settings or not _classes_unchanged(opts, old) \
            or "mean_image" not in old or not (out / old["mean_image"].get("file", MEAN_IMAGE_FILE)).is_file():
        return None
    total = sum(s["count"] for s in old["splits"].values())
    return f"{out} is up to date ({total:,} images, hash {old.get('hash')}); use --force to rebuild"


def _select(data: SourceData, source: str, opts: PrepareOptions,
            root_str: str | None) -> tuple[list[int], str, dict]:
    """The kept class indices, how they were chosen, and the train/val splits restricted to them and to the
    per-class caps."""
    rng = np.random.default_rng(opts.seed)
    keep, chosen_by = classes.select(data, source, opts.classes, opts.class_list, opts.seed)
    splits = {"train": restrict(data.train, keep, opts.train_per_class, rng),
              "val": restrict(data.val, keep, opts.val_per_class, rng)}
    for name, split in splits.items():
        if not len(split):
            raise UserError(f"{root_str or source}: the {name} split is empty after selecting classes; "
                            f"check --root and the classes chosen")
    return keep, chosen_by, splits


def _target(out: Path, name: str) -> Path:
    """Where a split's beton (or, for "mean_image", the mean image) is published."""
    return out / (MEAN_IMAGE_FILE if name == "mean_image" else f"{name}.beton")


def _remove_own(tmp: dict, out: Path, created: Path | None) -> None:
    """This run's temporaries, then the folders it created if they are empty: another run's files stay."""
    for path in tmp.values():
        path.unlink(missing_ok=True)
    if created is None:
        return
    for folder in [out.absolute(), *out.absolute().parents]:
        try:
            folder.rmdir()
        except OSError:
            return
        if folder == created:
            return


def _write_splits(out: Path, splits: dict, settings: dict, opts: PrepareOptions, source: str,
                  progress: bool) -> tuple[dict, dict]:
    """Both betons under this process's temporary names, and the mean image; on any failure nothing of this run
    is left behind."""
    from data_prep.writer import make_progress, write_split  # imports ffcv (seconds): not on the up-to-date path

    res = settings["res"]
    bytes_per_image = res * res * 3 if settings["write_mode"] == "raw" else res * res * 3 // 5
    estimate = sum(len(s) for s in splits.values()) * bytes_per_image + 64 * (1 << 21)
    created = _first_missing(out.absolute())
    check_output(out, estimate)
    # FFCV's writer takes a file name and the files are renamed together in _publish, so io.atomic_path does not
    # fit; io.temp_name still gives each process names of its own.
    tmp = {name: io.temp_name(_target(out, name)) for name in [*splits, "mean_image"]}
    results = {}
    try:
        with make_progress(progress) as bar:
            for name, split in splits.items():
                # Train is stored shuffled: FFCV's quasi-random order shuffles within pages, and class-sorted
                # pages would give class-correlated batches. Val keeps the source order.
                order = np.arange(len(split))
                if name == "train":
                    order = np.random.default_rng([opts.seed, 7]).permutation(len(split))
                results[name] = write_split(str(tmp[name]), split, res=res, max_side=opts.max_side,
                                            write_mode=settings["write_mode"], jpeg_quality=opts.jpeg_quality,
                                            workers=opts.workers or os.cpu_count() or 1, order=order,
                                            stats=name == "train", progress=bar, name=f"{source} {name}")
        with open(tmp["mean_image"], "wb") as f:  # np.save on a path would append .npy to the .tmp name
            np.save(f, results["train"]["mean_image"])
    except BaseException as e:
        _remove_own(tmp, out, created)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT):
            raise UserError(f"writing to {out} failed ({e.strerror}); free space or choose a writable --out") from None
        raise
    return results, tmp


def _manifest(data: SourceData, source: str, root_str: str | None, settings: dict, opts: PrepareOptions,
              keep: list[int], chosen_by: str, splits: dict, results: dict, tmp: dict, start: float) -> dict:
    skipped = [{"path": d["path"], "reason": d["reason"]} for d in data.skipped]
    split_info = {}
    for name, split in splits.items():
        index = results[name]["index"]
        skipped += [{"path": split.paths[i], "split": name, "reason": r} for i, r in results[name]["skipped"]]
        split_info[name] = {"file": f"{name}.beton", "count": int(len(index)),
                            "per_class": np.bincount(split.labels[index], minlength=len(keep)).tolist(),
                            "content": results[name]["content"], "sha256": sha256_file(tmp[name]),
                            "bytes": tmp[name].stat().st_size}
    train, res = results["train"], settings["res"]
    return {
        "format": FORMAT, "source": source, "root": root_str, "settings": settings,
        "image": {"height": res, "width": res, "fixed_size": not opts.max_side},
        "classes": {"ids": [data.class_ids[i] for i in keep], "names": [data.class_names[i] for i in keep],
                    "chosen_by": chosen_by},
        "splits": split_info,
        **pixel_stats(train["sums"]),
        # Section 2 of the paper: the mean over the training images of each pixel, at the stored resolution.
        # Images stored with their aspect ratio kept enter as their centre square at res x res, as the loaders
        # show them; the train crops then take the matching window of it.
        "mean_image": {"file": MEAN_IMAGE_FILE, "shape": list(train["mean_image"].shape), "dtype": "float32",
                       "sha256": sha256_file(tmp["mean_image"]),
                       "of": "centre square at res x res" if opts.max_side else "stored image"},
        "stats_from": {"images": train["stat_images"], "of": split_info["train"]["count"],
                       "sampled": train["stat_images"] < split_info["train"]["count"]},
        "train_order": "shuffled",
        "skipped": skipped,
        "tool_version": __version__,
        "seconds": round(time.time() - start, 2),
        "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        # the images and labels in order, not the files: FFCV's workers lay pages out in whatever order they finish
        "hash": content_hash([split_info["train"]["content"], split_info["val"]["content"]], settings),
    }


def _publish(out: Path, tmp: dict, manifest: dict) -> None:
    """Old manifest out first (it must not describe the new files), then the files, the new manifest last."""
    (out / "manifest.json").unlink(missing_ok=True)
    for name, path in tmp.items():
        os.replace(path, _target(out, name))
    io.write_json(out / "manifest.json", manifest)


def _summary(out: Path, manifest: dict, seconds: float) -> str:
    split_info, skipped = manifest["splits"], manifest["skipped"]
    written = sum(s["count"] for s in split_info.values())
    size = sum(s["bytes"] for s in split_info.values())
    line = (f"wrote {split_info['train']['count']:,} train + {split_info['val']['count']:,} val images to {out} "
            f"({size / 1e6:,.1f} MB) in {seconds:.1f} s ({written / seconds:,.0f} images/s), skipped {len(skipped)}")
    if skipped:
        line += f" (listed in manifest.json; first: {skipped[0]['path']}: {skipped[0]['reason']})"
    return line


def prepare(source: str, root: Path | None, out: Path, opts: PrepareOptions, progress: bool = True) -> str:
    """Convert `source` at `root` into `out/{train,val}.beton`, `out/mean_image.npy` and `out/manifest.json`;
    return the summary line."""
    root = _resolve_root(source, root)
    classes.check_options(source, opts.classes, opts.class_list)
    root_str = os.path.abspath(root) if root is not None else None
    out = Path(out)
    settings = resolve_settings(source, opts)
    if (line := _up_to_date(out, source, root_str, settings, opts)) is not None:
        return line
    import data_prep.writer  # noqa: F401  ffcv takes seconds to import: not on the up-to-date path, nor in the rate
    start = time.time()
    data = load_source(source, root, opts)
    keep, chosen_by, splits = _select(data, source, opts, root_str)
    results, tmp = _write_splits(out, splits, settings, opts, source, progress)
    manifest = _manifest(data, source, root_str, settings, opts, keep, chosen_by, splits, results, tmp, start)
    _publish(out, tmp, manifest)
    return _summary(out, manifest, time.time() - start)

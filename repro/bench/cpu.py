"""`repro bench`: how fast the harness is on the CPU, as ratios against what a user would otherwise run.

Each row measures the harness and a plain baseline in the same run, on the same images, with the same
augmentation, one right after the other, so that the ratio survives a noisy shared machine:
1. loading: the FFCV pipelines of `repro.data` against torchvision's ImageFolder + DataLoader (PIL decode, random
   crop, flip), at demo resolution and at 224 px (betons stored as jpg, and raw: `prepare-data --write-mode raw`),
   both yielding uint8 crops; and once more with the mean image taken off as the paper's recipe does (float32,
   work the baseline does not do);
2. training: `repro.engine.fit` against a loop written as torchvision's reference train.py writes it (fp32, NCHW,
   DataLoader over the ImageFolder), for `alexnet-paper` at demo scale and at 224 px;
3. preparation: `repro prepare-data imagefolder` against a single-process PIL loop writing the same beton, and
   `--max-side` against ffcv-imagenet's `write_imagenet.py` (each side in a fresh process);
Results go to the console and to a Markdown file with the machine, date, versions and command. The GPU
measurements (`repro bench --device cuda`) are in repro.bench.gpu and write their own section of the same file.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from rich.console import Console
from rich.table import Table

from data_prep.prepare import PrepareOptions, prepare
from repro.bench.common import WARMUP_ITERS, fake_images, machine_lines, rate, reference_train, write_section
from repro.config import RunConfig, apply_overrides
from repro.data import make_loaders
from repro.engine import fit
from repro.scales import get_scale


def _torchvision_loader(root: Path, crop: int, batch_size: int, workers: int):
    from torchvision import datasets, transforms  # torchvision's datasets load only for the baseline rows

    tf = transforms.Compose([transforms.RandomCrop(crop), transforms.RandomHorizontalFlip(), transforms.PILToTensor()])
    ds = datasets.ImageFolder(str(root / "train"), transform=tf)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers,
                                       drop_last=True, persistent_workers=workers > 0)


def _time_epochs(loader, epochs: int = 3, set_epoch=None) -> float:
    """Images/s over passes 2..`epochs` (the first warms up workers and compiled code, and is not counted)."""
    n, seconds = 0, 0.0
    for epoch in range(epochs):
        if set_epoch is not None:
            set_epoch(epoch)
        count, t0 = 0, time.perf_counter()
        for images, _ in loader:
            count += images.shape[0]
        if epoch > 0:
            n, seconds = n + count, seconds + time.perf_counter() - t0
    return rate(n, seconds)


def _config(data_dir: Path, crop: int, demo: bool, batch_size: int, iters: int) -> RunConfig:
    overrides = {}
    if demo:
        overrides = {k: v for k, v in get_scale("demo").overrides.items() if not k.startswith("data.")}
    overrides.update({"data.dir": str(data_dir), "model.input_size": crop, "train.batch_size": batch_size,
                      "train.epochs": 1000, "train.max_iters": iters, "train.ten_crop": False, "model.num_classes": 10,
                      "data.pca_lighting": 0.1, "data.flip": True, "train.schedule": "constant",
                      "train.lr": 0.001})  # random images: a small lr keeps the loss finite; max_iters ends the run
    return apply_overrides(RunConfig(), overrides, source="bench")


def bench_loader(folder: Path, data_dir: Path, crop: int, batch_size: int,
                 normalize: str = "mean") -> tuple[float, float]:
    """torchvision's ImageFolder + DataLoader against `repro.data`'s train loader, both yielding crops and flips.
    With normalize "mean" both yield uint8 (the per-channel mean is taken off later, in the training step); with
    "mean-image" ours yields float32 with the mean image's window taken off, work the baseline does not do."""
    workers = os.cpu_count() or 1
    base = _time_epochs(_torchvision_loader(folder, crop, batch_size, workers))
    cfg = apply_overrides(_config(data_dir, crop, False, batch_size, 0), {"data.normalize": normalize})
    loaders = make_loaders(cfg, device="cpu")
    ours = _time_epochs(loaders.train, set_epoch=loaders.set_epoch)
    return base, ours


def bench_training(folder: Path, data_dir: Path, crop: int, demo: bool, batch_size: int, iters: int,
                   runs: Path) -> tuple[float, float]:
    cfg = _config(data_dir, crop, demo, batch_size, iters)
    base = reference_train(folder, cfg, iters)
    # a short run first compiles the FFCV pipeline (numba); the timed run reuses the cached Loader
    fit(apply_overrides(cfg, {"train.max_iters": WARMUP_ITERS}), runs / f"warmup-{crop}-{int(demo)}", progress=False)
    record = fit(cfg, runs / f"train-{crop}-{int(demo)}", progress=False)
    if not record.finished:
        raise RuntimeError(f"benchmark run ended {record.status}: {record.error}")
    return base, float(record.provenance["images_per_s"])


def _pil_loop_prepare(folder: Path, out: Path) -> float:
    """The plain way: one process, PIL decode + resize, ffcv's writer with one worker."""
    # ffcv and torchvision load only in the rows that use them (ffcv's import also sets torch's threads to 1)
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    from torchvision import datasets

    ds = datasets.ImageFolder(str(folder / "train"))

    class Items:
        def __len__(self):
            return len(ds)

        def __getitem__(self, i):
            im, label = ds[i]
            return np.asarray(im.convert("RGB")), label

    t0 = time.perf_counter()
    DatasetWriter(str(out), {"image": RGBImageField(write_mode="jpg", jpeg_quality=90), "label": IntField()},
                  num_workers=1).from_indexed_dataset(Items())
    return rate(len(ds), time.perf_counter() - t0)


def bench_prepare(folder: Path, out: Path, res: int) -> tuple[float, float]:
    out.mkdir(parents=True, exist_ok=True)
    base = _pil_loop_prepare(folder, out / "plain.beton")
    t0 = time.perf_counter()
    prepare("imagefolder", folder, out / "prepared", PrepareOptions(res=res, force=True), progress=False)
    n = sum(1 for _ in (folder / "train").rglob("*.jpg")) + sum(1 for _ in (folder / "val").rglob("*.jpg"))
    return base, rate(n, time.perf_counter() - t0)


def _photos(folder: Path, per_class: int) -> int:
    """An ImageFolder tree of photo-sized JPEGs (about 450x340, noise and shapes, 10 classes); returns how many."""
    rng = np.random.default_rng(1)
    counts = {"train": per_class, "val": max(per_class // 10, 1)}
    for split, count in counts.items() if not folder.exists() else ():
        for c in range(10):
            (folder / split / f"n{c:08d}").mkdir(parents=True, exist_ok=True)
            for i in range(count):
                w, h = int(rng.integers(400, 500)), int(rng.integers(300, 380))
                noise = rng.normal(128, 40, size=(h // 4, w // 4, 3)).clip(0, 255).astype(np.uint8)
                im = Image.fromarray(noise).resize((w, h), Image.BILINEAR)
                draw = ImageDraw.Draw(im)
                for _ in range(4):
                    x0, y0 = int(rng.integers(0, w - 60)), int(rng.integers(0, h - 60))
                    box = (x0, y0, x0 + int(rng.integers(20, 60)), y0 + int(rng.integers(20, 60)))
                    fill = tuple(int(v) for v in rng.integers(0, 256, 3))
                    (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
                im.save(folder / split / f"n{c:08d}" / f"{split}_{i:05d}.JPEG", quality=90)
    return 10 * sum(counts.values())


def write_like_ffcv_imagenet(folder: str, out: str, workers: int) -> None:
    """ffcv-imagenet's write_imagenet.py, once per split: torchvision ImageFolder into FFCV's DatasetWriter, jpg,
    max side 256, quality 90."""
    # imported here, in the fresh process that times this side only (see _seconds_in_fresh_python)
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    from torchvision.datasets import ImageFolder

    for split in ("train", "val"):
        fields = {"image": RGBImageField(write_mode="jpg", max_resolution=256, jpeg_quality=90), "label": IntField()}
        DatasetWriter(f"{out}/ffcv_{split}.beton", fields, num_workers=workers).from_indexed_dataset(
            ImageFolder(f"{folder}/{split}"), chunksize=100)


def prepare_max_side(folder: str, out: str, workers: int) -> None:
    """`repro prepare-data imagefolder --res 256 --max-side --write-mode jpg --jpeg-quality 90`."""
    prepare("imagefolder", Path(folder), Path(out), PrepareOptions(res=256, max_side=True, write_mode="jpg",
                                                                  jpeg_quality=90, workers=workers, force=True),
            progress=False)


def _seconds_in_fresh_python(function: str, imports: str, *args) -> float:
    """Time `repro.bench.cpu.<function>(*args)` in a new interpreter, after importing `imports`: each side starts as
    a user's command does, with nothing compiled or cached by the other (FFCV compiles numba code in each
    process), and neither side's imports count as conversion time."""
    code = (f"import time, repro.bench.cpu as b, {imports}\n"
            f"t = time.perf_counter(); b.{function}(*{args!r}); print(time.perf_counter() - t)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{function} failed:\n{done.stderr[-2000:]}")
    return float(done.stdout.split()[-1])


def bench_prepare_vs_ffcv_imagenet(tmp: Path, workers: int, per_class: int = 300) -> tuple[float, float]:
    """`repro prepare-data imagefolder --max-side` against ffcv-imagenet's `write_imagenet.py` on the same
    photo-sized JPEGs with the same `workers`, each in a fresh process; images/s over train + val."""
    n = _photos(tmp / "photos", per_class)
    base = _seconds_in_fresh_python("write_like_ffcv_imagenet", "ffcv.writer, ffcv.fields, torchvision.datasets",
                                    str(tmp / "photos"), str(tmp), workers)
    ours = _seconds_in_fresh_python("prepare_max_side", "data_prep.prepare, data_prep.writer",
                                    str(tmp / "photos"), str(tmp / "prepared-photos"), workers)
    return rate(n, base), rate(n, ours)


def run_bench(out: Path, *, quick: bool = False, console: Console | None = None) -> Path:
    console = console or Console()
    per_class = 20 if quick else 200
    rows: list[tuple[str, float, float, str]] = []
    with tempfile.TemporaryDirectory(prefix="repro-bench-") as tmp:
        tmp = Path(tmp)
        big, small = tmp / "jpeg256", tmp / "png28"
        with console.status("making benchmark images"):
            fake_images(big, 256, per_class, 10, "jpg")
            fake_images(small, 28, per_class * 3, 10, "png")
        with console.status("preparation: plain PIL loop vs repro prepare-data"):
            base, ours = bench_prepare(big, tmp / "prep", 256)
        rows.append(("prepare-data, 256 px JPEG", base, ours, "-"))
        with console.status("preparation: ffcv-imagenet's write_imagenet.py vs repro prepare-data --max-side"):
            base, ours = bench_prepare_vs_ffcv_imagenet(tmp / "photos", os.cpu_count() or 1, 30 if quick else 300)
        rows.append(("prepare-data --max-side 256, 450x340 JPEG vs ffcv-imagenet writer", base, ours, ">= 1.5x"))
        prepare("imagefolder", small, tmp / "small", PrepareOptions(res=28), progress=False)
        big_data, big_raw = tmp / "prep" / "prepared", tmp / "prep" / "raw"
        prepare("imagefolder", big, big_raw, PrepareOptions(res=256, write_mode="raw"), progress=False)
        with console.status("loading: torchvision DataLoader vs FFCV"):
            for label, folder, data, crop, normalize, target in [
                    ("loader, demo (24 of 28 px)", small, tmp / "small", 24, "mean", ">= 3x"),
                    ("loader, 224 of 256 px, jpg beton", big, big_data, 224, "mean", ">= 3x"),
                    ("loader, 224 of 256 px, raw beton", big, big_raw, 224, "mean", ">= 3x"),
                    ("loader, 224 of 256 px, raw beton, mean image taken off", big, big_raw, 224, "mean-image", "-")]:
                base, ours = bench_loader(folder, data, crop, 128 if crop < 100 else 64, normalize)
                rows.append((label, base, ours, target))
        with console.status("training: reference loop vs repro.engine"):
            iters = 4 if quick else 10
            base, ours = bench_training(small, tmp / "small", 24, True, 128, iters * 15, tmp / "runs")
            rows.append(("training, alexnet-paper demo scale", base, ours, ">= 1.3x"))
            base, ours = bench_training(big, big_data, 224, False, 32, iters, tmp / "runs")
            rows.append(("training, alexnet-paper 224 px", base, ours, "-"))

    table = Table(title="repro bench (images/s; ratio = repro / baseline, same run)")
    for col in ("measurement", "baseline", "repro", "ratio", "target"):
        table.add_column(col, justify="left" if col in ("measurement", "target") else "right")
    for label, base, ours, target in rows:
        table.add_row(label, f"{base:,.0f}", f"{ours:,.0f}", f"{ours / base:.2f}x", target)
    console.print(table)
    _write_markdown(out, rows, quick)
    return out


def _write_markdown(out: Path, rows, quick: bool) -> None:
    lines = [
        "# Benchmarks", "", *machine_lines(f"repro bench{' --quick' if quick else ''}"),
        "", "Every ratio compares two measurements taken one after the other in the same run on the same images "
            "(the ffcv-imagenet row runs each side in a fresh process).",
        "", "| measurement | baseline img/s | repro img/s | ratio | target |", "|---|---:|---:|---:|---|",
    ]
    lines += [f"| {a} | {b:,.0f} | {c:,.0f} | {c / b:.2f}x | {t} |" for a, b, c, t in rows]
    write_section(out, "cpu", lines)

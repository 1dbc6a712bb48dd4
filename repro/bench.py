"""`repro bench`: how fast the harness is, as ratios against what a user would otherwise run.

Each row measures the harness and a plain baseline in the same process, on the same images, with the same
augmentation, one right after the other, so that the ratio survives a noisy shared machine:
1. loading: the FFCV pipelines of `repro.data` against torchvision's ImageFolder + DataLoader (PIL decode, random
   crop, flip), at demo resolution and at 224 px (betons stored as jpg, and raw: `prepare-data --write-mode raw`);
2. training: `repro.engine.fit` against a loop written as torchvision's reference train.py writes it (fp32, NCHW,
   DataLoader over the ImageFolder), for `alexnet-paper` at demo scale and at 224 px;
3. preparation: `repro prepare-data imagefolder` against a single-process PIL loop writing the same beton;
4. on CUDA only: bf16 autocast, channels_last and torch.compile one by one and together, the end-to-end rate of
   `fit` at 224, the projected 90-epoch wall time and the fraction of the GPU's bf16 peak.
Results go to the console and to a Markdown file with the machine, date, versions and command.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.table import Table

from repro.config import RunConfig, apply_overrides

ILSVRC_TRAIN_IMAGES = 1_281_167
WARMUP_ITERS = 3  # training iterations run before the clock starts, on both sides
# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, by a substring of the device name.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0, "4090": 165.0}


def _fake_images(root: Path, size: int, per_class: int, classes: int, fmt: str) -> None:
    """An ImageFolder tree (train/ and val/) of smooth random images, so JPEG sizes resemble photographs."""
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("val", max(per_class // 4, 2))):
        for c in range(classes):
            folder = root / split / f"class{c:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                low = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
                im = Image.fromarray(low).resize((size, size), Image.BICUBIC)
                im.save(folder / f"{i:05d}.{fmt}", quality=90) if fmt == "jpg" else im.save(folder / f"{i:05d}.{fmt}")


def _rate(images: int, seconds: float) -> float:
    return images / max(seconds, 1e-9)


def _torchvision_loader(root: Path, crop: int, batch_size: int, workers: int):
    from torchvision import datasets, transforms

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
    return _rate(n, seconds)


def _config(data_dir: Path, crop: int, demo: bool, batch_size: int, iters: int) -> RunConfig:
    from repro.experiments import load_scales

    overrides = {}
    if demo:
        overrides = {k: v for k, v in load_scales()["demo"].items() if "." in k and not k.startswith("data.")}
    overrides.update({"data.dir": str(data_dir), "model.input_size": crop, "train.batch_size": batch_size,
                      "train.epochs": 1000, "train.max_iters": iters, "train.ten_crop": False, "model.num_classes": 10,
                      "data.pca_lighting": 0.1, "data.flip": True, "train.schedule": "constant",
                      "train.lr": 0.001})  # random images: a small lr keeps the loss finite; max_iters ends the run
    return apply_overrides(RunConfig(), overrides, source="bench")


def bench_loader(folder: Path, data_dir: Path, crop: int, batch_size: int) -> tuple[float, float]:
    from repro.data import make_loaders

    workers = os.cpu_count() or 1
    base = _time_epochs(_torchvision_loader(folder, crop, batch_size, workers))
    loaders = make_loaders(_config(data_dir, crop, False, batch_size, 0), device="cpu")
    ours = _time_epochs(loaders.train, set_epoch=loaders.set_epoch)
    return base, ours


def _reference_train(folder: Path, cfg: RunConfig, iters: int, warmup: int = WARMUP_ITERS) -> float:
    """torchvision references/classification/train.py's loop: fp32, NCHW, DataLoader; images/s after `warmup`
    iterations (as the engine's rate is taken after a warm-up run)."""
    from torchvision import datasets, transforms

    from repro.models import build_model

    torch.manual_seed(0)
    model = build_model(apply_overrides(cfg, {"model.num_classes": 10}).model)
    mean = [0.5, 0.5, 0.5]
    tf = transforms.Compose([transforms.RandomCrop(cfg.model.input_size), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor(), transforms.Normalize(mean, [1 / 255.0] * 3)])
    ds = datasets.ImageFolder(str(folder / "train"), transform=tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=cfg.train.batch_size, shuffle=True,
                                         num_workers=os.cpu_count() or 1, drop_last=True)
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.train.lr, momentum=0.9, weight_decay=5e-4)
    model.train()
    n, t0, step = 0, time.perf_counter(), 0
    while step < warmup + iters:
        for images, target in loader:
            output = model(images)
            loss = criterion(output, target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if step == warmup:
                t0 = time.perf_counter()
            elif step > warmup:
                n += images.shape[0]
            if step >= warmup + iters:
                break
    return _rate(n, time.perf_counter() - t0)


def bench_training(folder: Path, data_dir: Path, crop: int, demo: bool, batch_size: int, iters: int,
                   runs: Path) -> tuple[float, float]:
    from repro.engine import fit

    cfg = _config(data_dir, crop, demo, batch_size, iters)
    base = _reference_train(folder, cfg, iters)
    # a short run first compiles the FFCV pipeline (numba); the timed run reuses the cached Loader
    fit(apply_overrides(cfg, {"train.max_iters": WARMUP_ITERS}), runs / f"warmup-{crop}-{int(demo)}", progress=False)
    record = fit(cfg, runs / f"train-{crop}-{int(demo)}", progress=False)
    if record["status"] != "done":
        raise RuntimeError(f"benchmark run ended {record['status']}: {record['error']}")
    return base, float(record["provenance"]["images_per_s"])


def _pil_loop_prepare(folder: Path, out: Path) -> float:
    """The plain way: one process, PIL decode + resize, ffcv's writer with one worker."""
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
    return _rate(len(ds), time.perf_counter() - t0)


def bench_prepare(folder: Path, out: Path, res: int) -> tuple[float, float]:
    from data_prep.prepare import PrepareOptions, prepare

    out.mkdir(parents=True, exist_ok=True)
    base = _pil_loop_prepare(folder, out / "plain.beton")
    t0 = time.perf_counter()
    prepare("imagefolder", folder, out / "prepared", PrepareOptions(res=res, force=True), progress=False)
    n = sum(1 for _ in (folder / "train").rglob("*.jpg")) + sum(1 for _ in (folder / "val").rglob("*.jpg"))
    return base, _rate(n, time.perf_counter() - t0)


def bench_prepare_vs_ffcv_imagenet(tmp: Path, workers: int, per_class: int = 300) -> tuple[float, float]:
    """`repro prepare-data imagefolder --max-side` against ffcv-imagenet's `write_imagenet.py` (torchvision
    ImageFolder into FFCV's DatasetWriter, jpg, max side 256, quality 90), same `workers`, on photo-sized JPEGs
    (about 450x340, noise and shapes, 10 classes); images/s over train + val, each side once."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    from PIL import ImageDraw
    from torchvision.datasets import ImageFolder

    from data_prep.prepare import PrepareOptions, prepare

    folder, rng = tmp / "photos", np.random.default_rng(1)
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
    n = 10 * sum(counts.values())
    t0 = time.perf_counter()
    for split in ("train", "val"):  # write_imagenet.py, once per split
        fields = {"image": RGBImageField(write_mode="jpg", max_resolution=256, jpeg_quality=90), "label": IntField()}
        DatasetWriter(str(tmp / f"ffcv_{split}.beton"), fields, num_workers=workers).from_indexed_dataset(
            ImageFolder(str(folder / split)), chunksize=100)
    base = _rate(n, time.perf_counter() - t0)
    t0 = time.perf_counter()
    prepare("imagefolder", folder, tmp / "prepared-photos",
            PrepareOptions(res=256, max_side=True, write_mode="jpg", jpeg_quality=90, workers=workers, force=True),
            progress=False)
    return base, _rate(n, time.perf_counter() - t0)


def bench_gpu(data_dir: Path, runs: Path, console: Console) -> list[tuple[str, str]]:
    """CUDA only: the speed switches on synthetic batches, then `fit` end to end with the real loader."""
    from repro.engine import fit
    from repro.models import build_model

    rows, device = [], torch.device("cuda")
    cfg = RunConfig()
    x_all = torch.randn(256, 3, 224, 224, device=device)
    y_all = torch.randint(0, 1000, (256,), device=device)

    def step_rate(bf16: bool, channels_last: bool, compiled: bool, steps: int = 30) -> float:
        torch.manual_seed(0)
        model = build_model(cfg.model).to(device)
        x = x_all
        if channels_last:
            model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
        net = torch.compile(model) if compiled else model
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

        def one():
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                loss = torch.nn.functional.cross_entropy(net(x).float(), y_all)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        for _ in range(5):
            one()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            one()
        torch.cuda.synchronize()
        return _rate(steps * x.shape[0], time.perf_counter() - t0)

    base = step_rate(False, False, False)
    rows.append(("fp32, NCHW (synthetic batches)", f"{base:,.0f} img/s (1.00x)"))
    for name, flags in [("bf16 autocast", (True, False, False)), ("channels_last", (False, True, False)),
                        ("torch.compile", (False, False, True)), ("all three", (True, True, True))]:
        r = step_rate(*flags)
        rows.append((name, f"{r:,.0f} img/s ({r / base:.2f}x)"))
    run_cfg = apply_overrides(cfg, {"data.dir": str(data_dir), "train.batch_size": 256, "train.epochs": 2,
                                    "train.ten_crop": False, "train.compile": True, "model.num_classes": 1000})
    record = fit(run_cfg, runs / "gpu-e2e", progress=False)
    ips = float(record["provenance"]["images_per_s"])
    rows.append(("end to end, alexnet-paper 224, FFCV, fit()", f"{ips:,.0f} img/s ({record['provenance']['data_backend']})"))
    rows.append(("projected 90 epochs of ILSVRC-2012", f"{90 * ILSVRC_TRAIN_IMAGES / ips / 3600:.1f} h"))
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(cfg.model).to(device)
    with FlopCounterMode(display=False) as counter:
        model(x_all[:1]).sum().backward()
    flops = counter.get_total_flops()
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)
    rows.append(("fraction of bf16 peak", f"{flops * ips / (peak * 1e12):.1%} of {peak:.0f} TFLOP/s" if peak
                 else f"unknown peak for {name}"))
    return rows


def run_bench(out: Path, *, quick: bool = False, console: Console | None = None) -> Path:
    console = console or Console()
    per_class = 20 if quick else 200
    rows: list[tuple[str, float, float, str]] = []
    with tempfile.TemporaryDirectory(prefix="repro-bench-") as tmp:
        tmp = Path(tmp)
        big, small = tmp / "jpeg256", tmp / "png28"
        with console.status("making benchmark images"):
            _fake_images(big, 256, per_class, 10, "jpg")
            _fake_images(small, 28, per_class * 3, 10, "png")
        from data_prep.prepare import PrepareOptions, prepare

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
            for label, folder, data, crop in [("loader, demo (24 of 28 px)", small, tmp / "small", 24),
                                              ("loader, 224 of 256 px, jpg beton", big, big_data, 224),
                                              ("loader, 224 of 256 px, raw beton", big, big_raw, 224)]:
                base, ours = bench_loader(folder, data, crop, 128 if crop < 100 else 64)
                rows.append((label, base, ours, ">= 3x"))
        with console.status("training: reference loop vs repro.engine"):
            iters = 4 if quick else 10
            base, ours = bench_training(small, tmp / "small", 24, True, 128, iters * 15, tmp / "runs")
            rows.append(("training, alexnet-paper demo scale", base, ours, ">= 1.3x"))
            base, ours = bench_training(big, big_data, 224, False, 32, iters, tmp / "runs")
            rows.append(("training, alexnet-paper 224 px", base, ours, "-"))
        gpu_rows = bench_gpu(big_data, tmp / "runs", console) if torch.cuda.is_available() else []

    table = Table(title="repro bench (images/s; ratio = repro / baseline, same run)")
    for col in ("measurement", "baseline", "repro", "ratio", "target"):
        table.add_column(col, justify="left" if col in ("measurement", "target") else "right")
    for label, base, ours, target in rows:
        table.add_row(label, f"{base:,.0f}", f"{ours:,.0f}", f"{ours / base:.2f}x", target)
    console.print(table)
    for label, value in gpu_rows:
        console.print(f"{label}: {value}")
    _write_markdown(out, rows, gpu_rows, quick)
    return out


def _write_markdown(out: Path, rows, gpu_rows, quick: bool) -> None:
    import importlib.metadata as md

    def version(pkg: str) -> str:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return "not installed"

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    lines = [
        "# Benchmarks", "",
        f"- command: `repro bench{' --quick' if quick else ''}`",
        f"- date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores, {device}; Python {sys.version.split()[0]}",
        "- versions: " + ", ".join(f"{p} {version(p)}" for p in ("torch", "torchvision", "ffcv", "numpy", "Pillow")),
        "", "Every ratio compares two measurements taken one after the other in the same process on the same images.",
        "", "| measurement | baseline img/s | repro img/s | ratio | target |", "|---|---:|---:|---:|---|",
    ]
    lines += [f"| {a} | {b:,.0f} | {c:,.0f} | {c / b:.2f}x | {t} |" for a, b, c, t in rows]
    if gpu_rows:
        lines += ["", "## GPU", "", "| measurement | value |", "|---|---|"]
        lines += [f"| {a} | {b} |" for a, b in gpu_rows]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, out)

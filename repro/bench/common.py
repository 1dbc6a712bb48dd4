"""What the CPU and GPU benchmarks share: generated images, the torchvision reference training loop, the machine
lines that head each section, and writing one section of the results file."""

from __future__ import annotations

import datetime as dt
import importlib.metadata as md
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from repro import io
from repro.config import RunConfig, apply_overrides
from repro.models import build_model

WARMUP_ITERS = 3  # training iterations run before the clock starts, on both sides


def fake_images(root: Path, size: int, per_class: int, classes: int, fmt: str) -> None:
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


def rate(images: int, seconds: float) -> float:
    return images / max(seconds, 1e-9)


def reference_train(folder: Path, cfg: RunConfig, iters: int, warmup: int = WARMUP_ITERS,
                    device: str = "cpu") -> float:
    """torchvision references/classification/train.py's loop: fp32, NCHW, DataLoader with one worker per core;
    images/s after `warmup` iterations (as the engine's rate is taken after a warm-up run)."""
    from torchvision import datasets, transforms  # torchvision's datasets load only for the baseline rows

    torch.manual_seed(0)
    device = torch.device(device)
    model = build_model(apply_overrides(cfg, {"model.num_classes": 10}).model).to(device)
    mean = [0.5, 0.5, 0.5]
    tf = transforms.Compose([transforms.RandomCrop(cfg.model.input_size), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor(), transforms.Normalize(mean, [1 / 255.0] * 3)])
    ds = datasets.ImageFolder(str(folder / "train"), transform=tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=cfg.train.batch_size, shuffle=True,
                                         num_workers=os.cpu_count() or 1, drop_last=True,
                                         pin_memory=device.type == "cuda")
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.train.lr, momentum=0.9, weight_decay=5e-4)
    model.train()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    n, t0, step = 0, time.perf_counter(), 0
    while step < warmup + iters:
        for images, target in loader:
            images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
            output = model(images)
            loss = criterion(output, target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if step == warmup:
                sync()
                t0 = time.perf_counter()
            elif step > warmup:
                n += images.shape[0]
            if step >= warmup + iters:
                break
    sync()
    return rate(n, time.perf_counter() - t0)


def machine_lines(command: str) -> list[str]:
    """Command, date, machine and package versions: the first lines of every benchmark section."""
    def version(pkg: str) -> str:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return "not installed"

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return [
        f"- command: `{command}`",
        f"- date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores, {device}; Python {sys.version.split()[0]}",
        "- versions: " + ", ".join(f"{p} {version(p)}" for p in ("torch", "torchvision", "ffcv", "numpy", "Pillow")),
    ]


def write_section(out: Path, name: str, lines: list[str]) -> None:
    """Put `lines` between the `<!-- bench:name -->` markers of `out`, keeping the file's other sections (the CPU
    and GPU benchmarks run on different machines); appended when the file has no such section yet."""
    begin, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = "\n".join([begin, *lines, end])
    text = out.read_text() if out.exists() else ""
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + block + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    io.write_text(out, text)

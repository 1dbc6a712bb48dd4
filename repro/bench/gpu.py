"""`repro bench --device cuda`: what one GPU does with AlexNet, each row against a baseline of the same run.

1. model-bound: alexnet-paper forward and backward on batches already on the GPU, at each scale's crop and batch
   (`full`: 224 px, batch 128; `subset`: 112 px, batch 256): fp32 NCHW, bf16 autocast, + channels_last,
   + torch.compile (what `fit` runs on a GPU), and the fraction of the GPU's dense bf16 peak;
2. end to end: `repro.engine.fit` with each scale's recipe (its crop and batch, flips, PCA lighting, the mean image,
   bf16, channels_last and torch.compile, as a GPU run does by default) from betons of generated JPEGs stored at
   the scale's size (256 and 128 px), as JPEG and raw, through every data backend present. Each row's ratio is its
   share of the compiled model-bound rate at the same crop and batch; its note gives the loader wait and the
   start-up (the first epoch's time over the steady rate: workers, compiling, cuDNN's search), which the rate,
   taken over the later epochs, leaves out; the torchvision reference loop (ImageFolder, DataLoader on every core,
   fp32) runs at 224 px;
3. projections (repro.bench.projection): the paper's 90 epochs of ILSVRC-2012, and the GPU-hours of
   `repro run all --scale subset` and `--scale full`, from their training images as the dry run plans them.
The bench keeps to a time budget (REPRO_BENCH_BUDGET_S seconds, default 300; scripts/gpu-check sets it): a
measurement whose expected time is no longer left is reported as not measured, the least needed ones first.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from data_prep.prepare import PrepareOptions, prepare
from repro.bench.common import WARMUP_ITERS, fake_images, machine_lines, reference_train, write_section
from repro.bench.projection import NOT_MEASURED, Row, paper_row, peak_tflops, suite_row, suite_size
from repro.config import RunConfig, apply_overrides
from repro.engine import fit
from repro.engine.recipe import make_optimizer
from repro.errors import UserError
from repro.models import build_model
from repro.models.summary import describe
from repro.runs import load_metrics
from repro.scales import get_scale

SCALES = ("full", "subset")
STORED = {"full": 256, "subset": 128}  # the stored side (`repro prepare-data`'s --res): the paper's 224 of 256
COPIES = {"full": 8, "subset": 16}     # each generated training image this many times: ~100 steps an epoch
EPOCHS = 3                             # the first is start-up; the rate is taken over the others
DEFAULT_BUDGET_S = 300.0
SKIPPED = "not measured: the bench's time budget ({:.0f} s) ran out"


class Budget:
    """The bench's time: a measurement runs only while its expected time is left: the last of its kind (the first
    compiles from nothing, the later ones from torch's caches), else a guess."""

    def __init__(self, seconds: float):
        self.seconds, self.end, self.took = seconds, time.monotonic() + seconds, {}

    def allows(self, kind: str, guess: float) -> bool:
        return self.end - time.monotonic() >= self.took.get(kind, guess)

    def spent(self, kind: str, seconds: float) -> None:
        self.took[kind] = seconds


def budget_from_env() -> float:
    value = os.environ.get("REPRO_BENCH_BUDGET_S", "")
    return float(value) if value.strip() else DEFAULT_BUDGET_S


def scale_config(scale: str) -> RunConfig:
    """The scale's recipe (crop, batch, init) with the paper's 1000 classes."""
    return apply_overrides(RunConfig(), {**get_scale(scale).overrides, "model.num_classes": 1000},
                           source=f"_scales.toml [{scale}]")


def train_flops_per_image(cfg: RunConfig) -> float:
    """Forward + backward FLOPs of one training image: the backward pass costs twice the forward."""
    return 3 * 2 * float(describe(cfg.model)["macs"])


def model_rate(cfg: RunConfig, *, bf16: bool, channels_last: bool, compiled: bool, steps: int = 50,
               warmup: int = 5, device: str = "cuda") -> float:
    """Training images/s of the model at cfg's crop and batch on random batches already on the GPU: fit's step
    without its data."""
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # as fit sets it
    torch._dynamo.reset()
    torch.manual_seed(0)
    batch, size = cfg.train.batch_size, cfg.model.input_size
    model = build_model(cfg.model).to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, cfg.model.num_classes, (batch,), device=device)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    net = torch.compile(model, dynamic=False) if compiled else model
    opt = make_optimizer(model, cfg.train)  # fit's own update (fused on CUDA)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(net(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):  # with compile: the compilation happens here
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return steps * batch / (time.perf_counter() - t0)


def _link_copies(source: Path, dest: Path, copies: int) -> None:
    """An ImageFolder of `source`'s images with every training image `copies` times (hard links)."""
    for path in sorted(source.rglob("*.jpg")):
        split = path.relative_to(source).parts[0]
        for k in range(copies if split == "train" else 1):
            target = dest / path.relative_to(source).parent / f"{k}-{path.name}"
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path, target)
            except OSError:  # another filesystem
                shutil.copyfile(path, target)


def make_data(tmp: Path, per_class: int, copies: dict[str, int]) -> dict:
    """Generated 256 px JPEGs (10 classes); per scale an ImageFolder with each training image linked `copies`
    times and its betons at the scale's stored size, as jpg and raw."""
    source = tmp / "jpeg256"
    fake_images(source, 256, per_class, 10, "jpg")
    out: dict = {"folder": {}, "beton": {}}
    for scale in SCALES:
        out["folder"][scale] = tmp / f"images-{scale}"
        _link_copies(source, out["folder"][scale], copies[scale])
        for mode in ("jpg", "raw"):
            out["beton"][scale, mode] = tmp / f"beton-{scale}-{mode}"
            prepare("imagefolder", out["folder"][scale], out["beton"][scale, mode],
                    PrepareOptions(res=STORED[scale], write_mode=mode, val_per_class=10), progress=False)
    return out


def fit_config(scale: str, data_dir: Path, backend: str) -> RunConfig:
    """The scale's recipe on the bench's data, for its speed: lr 1e-4 keeps random images from diverging (at
    0.001 the bf16 nvjpeg run on an H200 reached a NaN loss), and no learn check (random labels never learn)."""
    return apply_overrides(scale_config(scale), {
        "data.dir": str(data_dir), "data.backend": backend, "train.epochs": EPOCHS, "train.lr": 1e-4,
        "train.schedule": "constant", "train.warmup_epochs": 0.0, "train.ten_crop": False, "train.learn_check": 0.0,
        "train.device": "cuda"})


@dataclass
class Measured:
    rate: float     # images/s over the epochs after the first
    wait: float     # the share of that time the loop waited for the loader
    startup: float  # seconds the first epoch took over the steady rate
    compile: str    # the run record's provenance: on, off, or failed and eager


def fit_rate(cfg: RunConfig, run_dir: Path) -> Measured:
    torch._dynamo.reset()  # each run compiles as a new process would (and no cache limit is reached)
    record = fit(cfg, run_dir, progress=False)
    if record.status != "done":
        raise RuntimeError(f"benchmark run ended {record.status}: {record.error}")
    rows = load_metrics(run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)  # its checkpoints: half a GB each
    timed, first = rows.iloc[1:], rows.iloc[0]
    seconds = float(timed["seconds"].sum())
    images = float((timed["images_per_s"] * timed["seconds"]).sum())
    startup = float(first["seconds"]) - float(first["images_per_s"] * first["seconds"]) * seconds / images
    return Measured(images / seconds, float(timed["data_wait_s"].sum()) / seconds, max(startup, 0.0),
                    str(record.provenance.get("compile")))


def backends_present() -> list[str]:
    return ["nvjpeg"] + (["ffcv"] if importlib.util.find_spec("ffcv") is not None else []) + ["torch"]


def _runs_root(tmp: Path) -> Path:
    """Run folders in memory where there is room (each run writes half-GB checkpoints at every epoch's end)."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 8 * 2**30:
        return Path(tempfile.mkdtemp(prefix="repro-bench-runs-", dir=shm))
    return tmp / "runs"


SETTINGS = {"fp32": ("fp32 NCHW", dict(bf16=False, channels_last=False, compiled=False)),
            "bf16": ("bf16 autocast", dict(bf16=True, channels_last=False, compiled=False)),
            "cl": ("bf16 + channels_last", dict(bf16=True, channels_last=True, compiled=False)),
            "compiled": ("bf16 + channels_last + torch.compile (as fit runs)",
                         dict(bf16=True, channels_last=True, compiled=True))}


class Measurements:
    """The bench's measurements, each a number or the reason it has none, taken in order of need while the
    budget lasts."""

    def __init__(self, data: dict, runs: Path, budget: Budget, console: Console):
        self.data, self.runs, self.budget, self.console = data, runs, budget, console
        self.model: dict[tuple[str, str], float | str] = {}
        self.e2e: dict[tuple[str, str, str], Measured | str] = {}
        self.reference: float | str = NOT_MEASURED

    def _take(self, kind: str, guess: float, label: str, fn):
        if not self.budget.allows(kind, guess):
            return SKIPPED.format(self.budget.seconds)
        t0 = time.monotonic()
        try:
            with self.console.status(label):
                out = fn()
        except Exception as e:  # one measurement that fails must not hide the others
            return f"failed: {type(e).__name__}: {' '.join(str(e).split())}"[:200]
        self.budget.spent(kind, time.monotonic() - t0)  # a success: how long the next of its kind should take
        return out

    def model_bound(self, scale: str, setting: str) -> None:
        name, flags = SETTINGS[setting]
        self.model[scale, setting] = self._take(f"model-{setting}", 90.0 if flags["compiled"] else 15.0,
                                                f"model-bound, {scale}: {name}",
                                                lambda: model_rate(scale_config(scale), **flags))

    def end_to_end(self, scale: str, backend: str, mode: str) -> None:
        cfg = fit_config(scale, self.data["beton"][scale, mode], backend)
        run_dir = self.runs / f"{scale}-{backend}-{mode}"
        self.e2e[scale, backend, mode] = self._take(f"e2e-{scale}", 90.0, f"end to end, {scale}: {backend}, {mode}",
                                                    lambda: fit_rate(cfg, run_dir))

    def reference_loop(self) -> None:
        cfg = fit_config("full", self.data["beton"]["full", "jpg"], "torch")
        images = sum(1 for _ in (self.data["folder"]["full"] / "train").rglob("*.jpg"))
        # timed within the DataLoader's first pass: a second pass would time the start of its workers
        iters = max(images // cfg.train.batch_size - WARMUP_ITERS - 1, 1)
        self.reference = self._take("reference", 60.0, "end to end: torchvision reference loop",
                                    lambda: reference_train(self.data["folder"]["full"], cfg, iters=iters,
                                                            device="cuda"))

    def run_all(self) -> None:
        """In order of need: the model-bound rates the end-to-end rows are shares of, the GPU's default backend
        (nvjpeg), the reference loop, the other backends (raw betons first), then the other model-bound settings."""
        for scale in SCALES:
            self.model_bound(scale, "cl")
            self.model_bound(scale, "compiled")
        for mode in ("raw", "jpg"):
            for scale in SCALES:
                self.end_to_end(scale, "nvjpeg", mode)
        self.reference_loop()
        for mode in ("raw", "jpg"):
            for scale in SCALES:
                for backend in backends_present()[1:]:
                    self.end_to_end(scale, backend, mode)
        for setting in ("fp32", "bf16"):
            self.model_bound("full", setting)


def _rate(value) -> float | None:
    return value if isinstance(value, float) else None


def _why(value) -> str:
    return value if isinstance(value, str) else ""


def model_rows(m: Measurements) -> list[Row]:
    rows = []
    for scale in SCALES:
        cfg = scale_config(scale)
        where = f"model-bound, {cfg.model.input_size} px, batch {cfg.train.batch_size}"
        first = "fp32" if scale == "full" else "cl"
        base = _rate(m.model.get((scale, first)))
        for setting in (("fp32", "bf16", "cl", "compiled") if scale == "full" else ("cl", "compiled")):
            value = m.model.get((scale, setting), NOT_MEASURED)
            name = f"{where}, {SETTINGS[setting][0]}" + (" (baseline)" if setting == first else "")
            rows.append(Row(name, base, _rate(value), _why(value)))
    full = scale_config("full")
    best = max((r.value for r in rows[:4] if r.value), default=None)
    peak, flops = peak_tflops(torch.cuda.get_device_name()), train_flops_per_image(full)
    note = (f"{flops * best / (peak * 1e12):.1%} of the {peak:.0f} TFLOP/s dense bf16 peak "
            f"({flops / 1e9:.2f} GFLOP per training image)" if peak and best else "peak unknown, or no rate")
    rows.append(Row("model-bound, 224 px, best setting: fraction of bf16 peak", None, best, note))
    return rows


def end_to_end_rows(m: Measurements) -> list[Row]:
    """The reference loop, then per scale, beton and backend `fit`'s rate as a share of the compiled model-bound
    rate at the same crop and batch."""
    ref = _rate(m.reference)
    bound = {s: _rate(m.model.get((s, "compiled"))) for s in SCALES}
    full = scale_config("full")
    rows = [Row(f"end to end, torchvision reference loop, {full.model.input_size} px, batch {full.train.batch_size} "
                "(ImageFolder, fp32, all cores)", bound["full"], ref, _why(m.reference))]
    for scale in SCALES:
        cfg = scale_config(scale)
        where = f"{cfg.model.input_size} px of {STORED[scale]}, batch {cfg.train.batch_size}"
        for mode in ("jpg", "raw"):
            for backend in backends_present():
                got = m.e2e.get((scale, backend, mode), NOT_MEASURED)
                label = f"{backend} backend, {mode} beton"
                if isinstance(got, str):
                    rows.append(Row(f"end to end, fit(), {where}, {label}", bound[scale], None, got, scale, label))
                    continue
                note = f"waiting for data {got.wait:.0%}; start-up {got.startup:.0f} s"
                if scale == "full" and ref:
                    note += f"; {got.rate / ref:.2f}x the reference loop (target >= 3x and >= 20,000 img/s)"
                if got.compile != "on":
                    note += f"; compile: {got.compile}"
                rows.append(Row(f"end to end, fit(), {where}, {label}", bound[scale], got.rate, note, scale, label))
    if "ffcv" not in backends_present():
        rows.append(Row("end to end, fit(), ffcv backend", None, None, "FFCV not installed"))
    return rows


def projection_rows(m: Measurements, e2e: list[Row]) -> list[Row]:
    rows = [paper_row(e2e)]
    for scale in ("subset", "full"):
        try:
            runs, images = suite_size(scale)
        except Exception as e:  # the measurements are kept whatever planning says
            rows.append(Row(f"`repro run all --scale {scale}`, projected", None, None,
                            f"failed to plan: {type(e).__name__}: {e}"[:200]))
            continue
        rows.append(suite_row(scale, runs, images, e2e, _rate(m.model.get((scale, "compiled")))))
    return rows


def markdown(rows: list[Row], command: str, gpu: str, budget: float) -> list[str]:
    lines = [f"## GPU: {gpu}", "", *machine_lines(command), "",
             "Each ratio is against its row's baseline, measured in the same run on the same GPU: a model-bound "
             "setting against the first of its group; `fit` and the reference loop against the compiled "
             "model-bound rate at the same crop and batch (the share of it that training end to end reaches). "
             f"The bench's time budget was {budget:.0f} s.", "",
             "| measurement | baseline img/s | img/s | ratio | note |", "|---|---:|---:|---:|---|"]
    return lines + ["| " + " | ".join(r.cells()) + " |" for r in rows]


def run_gpu_bench(out: Path, *, quick: bool = False, console: Console | None = None,
                  budget_s: float | None = None) -> Path:
    """All GPU rows, printed and written as the "gpu" section of `out`."""
    console = console or Console()
    if not torch.cuda.is_available():
        raise UserError("repro bench --device cuda: no CUDA device is visible; run it on a GPU machine, or "
                        "run `repro bench` for the CPU measurements")
    budget = Budget(budget_s if budget_s is not None else budget_from_env())
    with tempfile.TemporaryDirectory(prefix="repro-bench-gpu-") as tmp:
        tmp = Path(tmp)
        with console.status("making benchmark images and betons"):
            data = make_data(tmp, per_class=80 if quick else 160,
                             copies={k: max(v // (4 if quick else 1), 2) for k, v in COPIES.items()})
        runs = _runs_root(tmp)
        try:
            m = Measurements(data, runs, budget, console)
            m.run_all()
        finally:
            shutil.rmtree(runs, ignore_errors=True)
    e2e = end_to_end_rows(m)
    rows = model_rows(m) + e2e + projection_rows(m, e2e)
    table = Table(title=f"repro bench --device cuda ({torch.cuda.get_device_name()})")
    for col in ("measurement", "baseline img/s", "img/s", "ratio", "note"):
        table.add_column(col, justify="left" if col in ("measurement", "note") else "right")
    for r in rows:
        table.add_row(*r.cells())
    console.print(table)
    write_section(out, "gpu", markdown(rows, f"repro bench --device cuda{' --quick' if quick else ''}",
                                       torch.cuda.get_device_name(), budget.seconds))
    return out

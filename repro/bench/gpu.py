"""`repro bench --device cuda`: what one GPU does with AlexNet, each row a ratio against a baseline of the same run.

1. model-bound: alexnet-paper at 224, forward and backward on batches already on the GPU: fp32 NCHW (baseline),
   bf16 autocast, + channels_last, + torch.compile; and the fraction of the GPU's dense bf16 peak that the
   model's FLOPs (3 x 2 x the multiply-adds of `repro models`, forward plus backward) reach at the best setting;
2. end to end: `repro.engine.fit` with the paper's recipe at 224 (batch 128, flips, PCA lighting, bf16 and
   channels_last as a GPU run does by default) from a 256 px JPEG beton and a raw beton, through every data
   backend present, against torchvision's reference loop (ImageFolder + DataLoader on every core, fp32, NCHW);
3. the projected wall time of the paper's 90 epochs of ILSVRC-2012 at the best end-to-end rate, next to the
   paper's "five to six days on two GTX 580 3GB GPUs".
The data is generated here (smooth random 256 px JPEGs), small enough for a few minutes on a 16-core host.
"""

from __future__ import annotations

import importlib.util
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from data_prep.prepare import PrepareOptions, prepare
from repro.bench.common import WARMUP_ITERS, fake_images, machine_lines, reference_train, write_section
from repro.config import RunConfig, apply_overrides
from repro.engine import fit
from repro.errors import UserError
from repro.models import build_model
from repro.models.summary import describe
from repro.runs import load_metrics

ILSVRC_TRAIN_IMAGES = 1_281_167
PAPER_DAYS = "5-6 days on two GTX 580 3GB"
# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, by a substring of the device name; the
# H200 is the H100's chip with more memory. PCIe H100s are slower (756) and matched first.
BF16_PEAK_TFLOPS = {"H100 PCIe": 756.0, "H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0,
                    "A10": 125.0, "4090": 165.0}
NOT_MEASURED = "not measured"


@dataclass
class Row:
    measurement: str
    baseline: float | None   # img/s of the row's baseline, same run
    value: float | None      # img/s of the measured setting
    note: str = ""

    def cells(self) -> list[str]:
        def rate(x):
            return f"{x:,.0f}" if x is not None else NOT_MEASURED
        ratio = f"{self.value / self.baseline:.2f}x" if self.value and self.baseline else "-"
        baseline = rate(self.baseline) if self.baseline is not None or self.value is None else "-"
        return [self.measurement, baseline, rate(self.value), ratio, self.note]


def peak_tflops(name: str) -> float | None:
    return next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)


def train_flops_per_image(cfg: RunConfig) -> float:
    """Forward + backward FLOPs of one training image: the backward pass costs twice the forward."""
    return 3 * 2 * float(describe(cfg.model)["macs"])


def model_rate(cfg: RunConfig, *, bf16: bool, channels_last: bool, compiled: bool, batch: int = 256,
               steps: int = 30, warmup: int = 5, device: str = "cuda") -> float:
    """Training images/s of alexnet-paper on random batches that are already on the GPU (no data loading)."""
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device)
    x = torch.randn(batch, 3, cfg.model.input_size, cfg.model.input_size, device=device)
    y = torch.randint(0, cfg.model.num_classes, (batch,), device=device)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    net = torch.compile(model) if compiled else model
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

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


def model_bound_rows(cfg: RunConfig, console: Console) -> list[Row]:
    settings = [("bf16 autocast", dict(bf16=True, channels_last=False, compiled=False)),
                ("bf16 + channels_last", dict(bf16=True, channels_last=True, compiled=False)),
                ("bf16 + channels_last + torch.compile", dict(bf16=True, channels_last=True, compiled=True))]
    with console.status("model-bound: fp32 NCHW"):
        base = model_rate(cfg, bf16=False, channels_last=False, compiled=False)
    rows = [Row("model-bound, alexnet-paper 224, fp32 NCHW (baseline)", base, base)]
    for name, flags in settings:
        with console.status(f"model-bound: {name}"):
            rows.append(Row(f"model-bound, {name}", base, model_rate(cfg, **flags)))
    best = max(r.value for r in rows)
    peak = peak_tflops(torch.cuda.get_device_name())
    flops = train_flops_per_image(cfg)
    note = (f"{flops * best / (peak * 1e12):.1%} of the {peak:.0f} TFLOP/s dense bf16 peak "
            f"({flops / 1e9:.2f} GFLOP per training image)" if peak else "peak unknown for this GPU")
    rows.append(Row("model-bound, best setting: fraction of bf16 peak", base, best, note))
    return rows


def make_data(tmp: Path, per_class: int, val_limit: int) -> dict[str, Path]:
    """An ImageFolder of 256 px JPEGs and the same images as a jpg beton and a raw beton."""
    folder = tmp / "jpeg256"
    fake_images(folder, 256, per_class, 10, "jpg")
    out = {"folder": folder}
    for mode in ("jpg", "raw"):
        out[mode] = tmp / f"beton-{mode}"
        prepare("imagefolder", folder, out[mode], PrepareOptions(res=256, write_mode=mode, val_per_class=val_limit),
                progress=False)
    return out


def paper_config(data_dir: Path, backend: str, epochs: int) -> RunConfig:
    """The paper's recipe at 224 on the bench data, for its speed: lr 1e-4 keeps random images from diverging
    (at 0.001 the bf16 nvjpeg run on an H200 reached a NaN loss in its second epoch)."""
    return apply_overrides(RunConfig(), {
        "data.dir": str(data_dir), "data.backend": backend, "model.num_classes": 10, "train.batch_size": 128,
        "train.epochs": epochs, "train.lr": 1e-4, "train.schedule": "constant", "train.ten_crop": False,
        "train.device": "cuda", "train.log_every": 1000})


def fit_rate(cfg: RunConfig, run_dir: Path) -> tuple[float, float]:
    """Training images/s of `fit`, over every epoch but the first (worker start-up, numba and cuDNN warm-up), and
    the fraction of that time the training loop waited for the loader."""
    record = fit(cfg, run_dir, progress=False)
    if record.status != "done":
        raise RuntimeError(f"benchmark run ended {record.status}: {record.error}")
    rows = load_metrics(run_dir).iloc[1:]
    seconds = float(rows["seconds"].sum())
    images = float((rows["images_per_s"] * rows["seconds"]).sum())
    return images / seconds, float(rows["data_wait_s"].sum()) / seconds


def backends_present() -> list[str]:
    return ["nvjpeg", "torch"] + (["ffcv"] if importlib.util.find_spec("ffcv") is not None else [])


def end_to_end_rows(data: dict[str, Path], runs: Path, epochs: int, console: Console) -> list[Row]:
    with console.status("end to end: torchvision reference loop"):
        ref_cfg = paper_config(data["jpg"], "torch", epochs)
        images = sum(1 for _ in (data["folder"] / "train").rglob("*.jpg"))
        # timed within the DataLoader's first pass: a second pass would time the start of 16 new workers
        iters = max(images // ref_cfg.train.batch_size - WARMUP_ITERS - 1, 1)
        base = reference_train(data["folder"], ref_cfg, iters=iters, device="cuda")
    rows = [Row("end to end, torchvision reference loop (ImageFolder, fp32, all cores) (baseline)", base, base)]
    for mode in ("jpg", "raw"):
        for backend in backends_present():
            name = f"end to end, fit(), {backend} backend, 256 px {mode} beton"
            try:  # one backend that fails must not hide the others' rows
                with console.status(f"end to end: {backend} backend, {mode} beton"):
                    rate, wait = fit_rate(paper_config(data[mode], backend, epochs), runs / f"{backend}-{mode}")
            except Exception as e:
                rows.append(Row(name, base, None, f"failed: {type(e).__name__}: {e}"[:200]))
                continue
            target = "; target >= 20,000 img/s and >= 3x" if mode == "jpg" else ""
            rows.append(Row(name, base, rate, f"waiting for data {wait:.0%} of the time{target}"))
    if "ffcv" not in backends_present():
        rows.append(Row("end to end, fit(), ffcv backend", None, None, "FFCV not installed"))
    return rows


def projection_row(rows: list[Row]) -> Row:
    e2e = [r for r in rows if r.measurement.startswith("end to end, fit()") and r.value]
    if not e2e:
        return Row("paper's 90 epochs of ILSVRC-2012 (1.28M images), projected", None, None, "no end-to-end rate")
    best = max(e2e, key=lambda r: r.value)
    hours = 90 * ILSVRC_TRAIN_IMAGES / best.value / 3600
    return Row("paper's 90 epochs of ILSVRC-2012 (1.28M images), projected", None, best.value,
               f"{hours:.1f} h at the best end-to-end rate ({', '.join(best.measurement.split(', ')[2:])}); "
               f"the paper: {PAPER_DAYS}")


def markdown(rows: list[Row], command: str, gpu: str) -> list[str]:
    lines = [f"## GPU: {gpu}", "", *machine_lines(command), "",
             "Each ratio is against the first row of its group, measured in the same run on the same GPU.", "",
             "| measurement | baseline img/s | img/s | ratio | note |", "|---|---:|---:|---:|---|"]
    return lines + ["| " + " | ".join(r.cells()) + " |" for r in rows]


def run_gpu_bench(out: Path, *, quick: bool = False, console: Console | None = None) -> Path:
    """All GPU rows, printed and written as the "gpu" section of `out`."""
    console = console or Console()
    if not torch.cuda.is_available():
        raise UserError("repro bench --device cuda: no CUDA device is visible; run it on a GPU machine, or "
                        "run `repro bench` for the CPU measurements")
    cfg = RunConfig()
    rows = model_bound_rows(cfg, console)
    with tempfile.TemporaryDirectory(prefix="repro-bench-gpu-") as tmp:
        tmp = Path(tmp)
        with console.status("making benchmark images and betons"):
            data = make_data(tmp, per_class=150 if quick else 300, val_limit=10)
        e2e = end_to_end_rows(data, tmp / "runs", epochs=3, console=console)
    rows += e2e + [projection_row(e2e)]
    table = Table(title=f"repro bench --device cuda ({torch.cuda.get_device_name()})")
    for col in ("measurement", "baseline img/s", "img/s", "ratio", "note"):
        table.add_column(col, justify="left" if col in ("measurement", "note") else "right")
    for r in rows:
        table.add_row(*r.cells())
    console.print(table)
    write_section(out, "gpu", markdown(rows, f"repro bench --device cuda{' --quick' if quick else ''}",
                                       torch.cuda.get_device_name()))
    return out

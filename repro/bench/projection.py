"""The GPU bench's rows and what it projects from them: the paper's 90 epochs of ILSVRC-2012, and the GPU-hours of a
whole suite (`repro run all --scale subset|full`), its training images counted as the dry run plans them
(repro.plan), at the best end-to-end rate measured at the suite's crop and batch."""

from __future__ import annotations

from dataclasses import dataclass

from repro.plan import plan, training_images, unique_runs

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
    scale: str | None = None  # end-to-end rows: the scale whose crop and batch they ran
    label: str = ""           # end-to-end rows: backend and beton, as the projections name them

    def cells(self) -> list[str]:
        def rate(x):
            return f"{x:,.0f}" if x is not None else NOT_MEASURED
        ratio = f"{self.value / self.baseline:.2f}x" if self.value and self.baseline else "-"
        baseline = rate(self.baseline) if self.baseline is not None or self.value is None else "-"
        return [self.measurement, baseline, rate(self.value), ratio, self.note]


def peak_tflops(name: str) -> float | None:
    return next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)


def best_end_to_end(rows: list[Row], scale: str) -> Row | None:
    """The fastest measured end-to-end row of `fit` at the scale's crop and batch."""
    return max((r for r in rows if r.scale == scale and r.label and r.value), key=lambda r: r.value, default=None)


def paper_row(rows: list[Row]) -> Row:
    name = "paper's 90 epochs of ILSVRC-2012 (1.28M images), projected"
    best = best_end_to_end(rows, "full")
    if best is None:
        return Row(name, None, None, "no end-to-end rate at 224 px")
    hours = 90 * ILSVRC_TRAIN_IMAGES / best.value / 3600
    return Row(name, None, best.value, f"{hours:.1f} h at the best end-to-end rate ({best.label}); "
                                       f"the paper: {PAPER_DAYS}")


def suite_row(scale: str, runs: int, images: int, rows: list[Row], model_bound: float | None) -> Row:
    """GPU-hours of `repro run all --scale <scale>` (`runs` distinct runs, `images` training images in all) at the
    best end-to-end rate of that scale's crop and batch, and at the model-bound rate (the most the loader and
    the engine could be made to give); evaluation not included, as in the dry run."""
    name = f"`repro run all --scale {scale}`: {runs} runs, {images:,} training images, projected"
    best = best_end_to_end(rows, scale)
    if best is None:
        return Row(name, model_bound, None, "no end-to-end rate at this crop and batch")
    note = f"{images / best.value / 3600:,.1f} GPU-hours at the best end-to-end rate ({best.label})"
    if model_bound:
        note += f", {images / model_bound / 3600:,.1f} at the model-bound rate"
    return Row(name, model_bound, best.value, note + "; training only, every run at the baseline model's rate")


def suite_size(scale: str) -> tuple[int, int]:
    """(distinct runs, training images) of `repro run all --scale <scale>`, as its dry run plans them (from the
    scale's nominal sizes where its data is not prepared here)."""
    _, planned = plan(["all"], scale, data_dir=None, seeds=None, sets=[], without_data=True)
    runs = unique_runs(planned)
    return len(runs), training_images(runs)

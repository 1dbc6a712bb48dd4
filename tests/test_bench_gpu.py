"""The parts of `repro bench --device cuda` that need no GPU: its refusal without one, the peak table, its rows and
projections against hand computations (the measurements faked), its time budget, and the Markdown sections it
shares with the CPU bench."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import repro.bench.gpu as gpu
from repro.bench.common import write_section
from repro.bench.gpu import Budget, Measured
from repro.bench.projection import Row, paper_row, peak_tflops, suite_row, suite_size
from repro.cli import app
from repro.plan import plan, plan_rows


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_refuses_cleanly_without_a_gpu(tmp_path):
    res = CliRunner().invoke(app, ["bench", "--device", "cuda", "--out", str(tmp_path / "r.md")])
    assert res.exit_code == 2 and "no CUDA device" in res.output
    assert not (tmp_path / "r.md").exists()
    res = CliRunner().invoke(app, ["bench", "--device", "tpu"])
    assert res.exit_code == 2 and "--device 'tpu'" in res.output


def test_peak_by_device_name():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA H200") == 989.0
    assert peak_tflops("Tesla K80") is None


def e2e_rows() -> list[Row]:
    return [Row("end to end, torchvision reference loop", 20000.0, 4000.0),
            Row("a", 20000.0, 9000.0, "", "full", "torch backend, jpg beton"),
            Row("b", 20000.0, 12500.0, "", "full", "nvjpeg backend, raw beton"),
            Row("c", 60000.0, 45000.0, "", "subset", "nvjpeg backend, raw beton"),
            Row("d", 60000.0, 30000.0, "", "subset", "torch backend, raw beton"),
            Row("e", 60000.0, None, "failed: RuntimeError", "subset", "ffcv backend, raw beton")]


def test_the_paper_projection_uses_the_best_rate_at_224():
    row = paper_row(e2e_rows())
    assert row.value == 12500.0  # not the subset's faster 112 px rows
    assert row.note.startswith("2.6 h at the best end-to-end rate (nvjpeg backend, raw beton)")  # 90*1281167/12500/3600
    assert row.cells()[1:4] == ["-", "12,500", "-"]
    assert paper_row(e2e_rows()[:1]).cells()[2] == "not measured"


def test_suite_projection_by_hand():
    # 298,986,040 images: at 45,000 img/s 1.845... h; at the model-bound 60,000 img/s 1.384... h
    row = suite_row("subset", 67, 298_986_040, e2e_rows(), 60000.0)
    assert row.measurement == "`repro run all --scale subset`: 67 runs, 298,986,040 training images, projected"
    assert row.note.startswith("1.8 GPU-hours at the best end-to-end rate (nvjpeg backend, raw beton), 1.4 at the "
                               "model-bound rate")
    assert row.cells()[1:4] == ["60,000", "45,000", "0.75x"]
    row = suite_row("full", 67, 6_495_516_690, e2e_rows(), None)  # 6,495,516,690 / 12,500 / 3600 = 144.3
    assert row.note.startswith("144.3 GPU-hours at the best end-to-end rate (nvjpeg backend, raw beton);")
    assert suite_row("full", 1, 10, e2e_rows()[:1], 5.0).value is None


def test_suite_size_is_what_the_dry_run_counts(tmp_path):
    for scale in ("subset", "full"):
        _, planned = plan(["all"], scale, data_dir=None, seeds=None, sets=[], without_data=True)
        _, totals = plan_rows(planned, tmp_path)
        assert suite_size(scale) == (totals["distinct"], totals["images"])
    runs, images = suite_size("full")
    assert runs > 0 and images % 1_281_167 == 0  # whole epochs of ILSVRC-2012


def test_the_budget_runs_what_still_fits():
    budget = Budget(100.0)
    assert budget.allows("e2e", 90.0) and not budget.allows("e2e", 101.0)
    budget.spent("e2e", 150.0)
    assert not budget.allows("e2e", 1.0)  # the last measured time of its kind, not the guess
    budget.spent("e2e", 20.0)
    assert budget.allows("e2e", 1000.0)


@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    """Everything the GPU bench measures, faked: model-bound rates by setting and crop, fit's by backend."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    monkeypatch.setattr(gpu, "backends_present", lambda: ["nvjpeg", "torch"])
    data = {"folder": {s: tmp_path / s for s in gpu.SCALES},
            "beton": {(s, m): tmp_path / f"{s}-{m}" for s in gpu.SCALES for m in ("jpg", "raw")}}
    monkeypatch.setattr(gpu, "make_data", lambda *a, **k: data)
    rates = {"fp32": 10000.0, "bf16": 14000.0, "cl": 15000.0, "compiled": 20000.0}

    def model_rate(cfg, **flags):
        setting = next(k for k, (_, f) in gpu.SETTINGS.items() if f == flags)
        return rates[setting] * (3 if cfg.model.input_size == 112 else 1)

    def fit_rate(cfg, run_dir):
        rate = {"nvjpeg": 12000.0, "torch": 6000.0}[cfg.data.backend] * (3 if cfg.model.input_size == 112 else 1)
        return Measured(rate, 0.25, 12.0, "on")

    monkeypatch.setattr(gpu, "model_rate", model_rate)
    monkeypatch.setattr(gpu, "fit_rate", fit_rate)
    monkeypatch.setattr(gpu, "reference_train", lambda *a, **k: 4000.0)
    monkeypatch.setattr(gpu, "suite_size", lambda scale: (67, {"subset": 298_986_040, "full": 6_495_516_690}[scale]))


def table(path: Path) -> dict[str, list[str]]:
    lines = [line for line in path.read_text().splitlines() if line.startswith("| ") and "---" not in line]
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines)}


def test_rows_are_shares_of_the_model_bound_rate_at_the_same_batch(tmp_path, fake_gpu):
    gpu.run_gpu_bench(tmp_path / "r.md", budget_s=600)
    rows = table(tmp_path / "r.md")
    assert rows["model-bound, 224 px, batch 128, fp32 NCHW (baseline)"][:3] == ["10,000", "10,000", "1.00x"]
    assert rows["model-bound, 224 px, batch 128, bf16 + channels_last + torch.compile (as fit runs)"][:3] == \
        ["10,000", "20,000", "2.00x"]
    assert rows["model-bound, 112 px, batch 256, bf16 + channels_last + torch.compile (as fit runs)"][:3] == \
        ["45,000", "60,000", "1.33x"]
    full = rows["end to end, fit(), 224 px of 256, batch 128, nvjpeg backend, raw beton"]
    assert full[:3] == ["20,000", "12,000", "0.60x"]  # the share of the compiled model-bound rate, same batch
    assert full[3] == ("waiting for data 25%; start-up 12 s; 3.00x the reference loop (target >= 3x and >= "
                       "20,000 img/s)")
    subset = rows["end to end, fit(), 112 px of 128, batch 256, torch backend, jpg beton"]
    assert subset[:4] == ["60,000", "18,000", "0.30x", "waiting for data 25%; start-up 12 s"]
    # 298,986,040 / 36,000 / 3600 = 2.31 h; / 60,000 / 3600 = 1.38 h
    suite = rows["`repro run all --scale subset`: 67 runs, 298,986,040 training images, projected"]
    assert suite[:3] == ["60,000", "36,000", "0.60x"]
    assert suite[3].startswith("2.3 GPU-hours at the best end-to-end rate (nvjpeg backend, jpg beton), 1.4 at")
    assert rows["paper's 90 epochs of ILSVRC-2012 (1.28M images), projected"][3].startswith("2.7 h at the best")


def test_what_the_budget_leaves_out_is_said(tmp_path, fake_gpu):
    gpu.run_gpu_bench(tmp_path / "r.md", budget_s=0)
    rows = table(tmp_path / "r.md")
    skipped = "not measured: the bench's time budget (0 s) ran out"
    assert rows["end to end, fit(), 224 px of 256, batch 128, nvjpeg backend, raw beton"][1:4] == \
        ["not measured", "-", skipped]
    assert rows["model-bound, 224 px, batch 128, fp32 NCHW (baseline)"][3] == skipped
    assert rows["paper's 90 epochs of ILSVRC-2012 (1.28M images), projected"][3] == "no end-to-end rate at 224 px"


def test_sections_replace_only_themselves(tmp_path):
    out = tmp_path / "RESULTS.md"
    write_section(out, "cpu", ["cpu one"])
    write_section(out, "gpu", ["gpu one"])
    write_section(out, "cpu", ["cpu two"])
    text = out.read_text()
    assert "cpu two" in text and "gpu one" in text and "cpu one" not in text
    assert text.index("cpu two") < text.index("gpu one")

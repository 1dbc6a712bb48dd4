"""The parts of `repro bench --device cuda` that need no GPU: its refusal without one, the peak table, the
projection and the Markdown sections it shares with the CPU bench."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from repro.bench.common import write_section
from repro.bench.gpu import Row, peak_tflops, projection_row
from repro.cli import app


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


def test_projection_uses_the_best_end_to_end_rate():
    rows = [Row("end to end, torchvision reference loop (baseline)", 4000.0, 4000.0),
            Row("end to end, fit(), torch backend, 256 px jpg beton", 4000.0, 9000.0),
            Row("end to end, fit(), nvjpeg backend, 256 px jpg beton", 4000.0, 25000.0),
            Row("end to end, fit(), ffcv backend", None, None, "FFCV not installed")]
    row = projection_row(rows)
    assert row.value == 25000.0
    assert row.note.startswith("1.3 h at the best end-to-end rate (nvjpeg backend, 256 px jpg beton)")  # 90*1281167/25000/3600
    assert row.cells()[1:4] == ["-", "25,000", "-"]
    assert rows[2].cells()[3] == "6.25x" and rows[3].cells()[1:4] == ["not measured", "not measured", "-"]


def test_sections_replace_only_themselves(tmp_path):
    out = tmp_path / "RESULTS.md"
    write_section(out, "cpu", ["cpu one"])
    write_section(out, "gpu", ["gpu one"])
    write_section(out, "cpu", ["cpu two"])
    text = out.read_text()
    assert "cpu two" in text and "gpu one" in text and "cpu one" not in text
    assert text.index("cpu two") < text.index("gpu one")

"""The benchmark's quick mode runs end to end, so the script cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_quick_benchmark_prints_the_table_and_writes_json(real_data, tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "benchmark.py"), "--quick",
                           "--data", str(real_data), "--json", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| course | 0 |" in done.stdout and "| default | 0 |" in done.stdout
    assert "speed-up" in done.stdout
    report = json.loads(out.read_text())
    assert report["quick"] and len(report["runs"]) == 2
    default = next(r for r in report["runs"] if r["recipe"] == "default")
    assert default["phases"]["extract_images"] > 0 and default["phases"]["fine-tune"] > 0
    assert [r["phase"] for r in default["history"]] == ["linear probe", "fine-tune", "fine-tune"]
    assert 0.0 <= report["summary"]["test_top1_mean"] <= 1.0
    assert report["summary"]["peak_rss_mb_max"] > 100
    exports = report["exports"]
    assert set(exports) == {"pytorch fp32", "onnx fp32", "onnx int8"}
    # the network in int8; the known verdict's whitening (6.6 MB for Lite0) stays float
    assert exports["onnx int8"]["mb"] < exports["onnx fp32"]["mb"] * 0.6
    # the PyTorch row measures the checkpoint file (Lite0: ~14 MB), not its folder
    assert exports["pytorch fp32"]["mb"] > exports["onnx fp32"]["mb"] / 2
    assert "| onnx int8 |" in done.stdout

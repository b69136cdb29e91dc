"""The GPU check's dry run: the prepared script works end to end on a CPU, so it cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_gpu_check_dry_run_prints_the_table(real_data, tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "BUILD": str(tmp_path),
           "FLOWERS_DIR": str(real_data), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "4 classes, 32 images" in done.stdout  # the tiny subset, made from the real data
    for row in ("| gpu-recipe |", "| cpu-recipe |", "| notebook |"):
        assert row in done.stdout
    report = json.loads((tmp_path / "gpu_check_dry" / "gpu_check.json").read_text())
    assert report["dry_run"] and [r["name"] for r in report["runs"]] == ["gpu-recipe",
                                                                         "cpu-recipe"]
    for run in report["runs"]:
        assert 0 <= run["test_top1"] <= 1 and run["images_per_s"] > 0
        assert run["course_split_estimate_s"] > run["phases_s"]["extract"]
    assert (tmp_path / "gpu_check_dry" / "notebook" / "build" / "notebook" /
            "checkpoint.pth").is_file()

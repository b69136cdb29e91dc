"""The README's command lines run as written (after the main job), against a tiny checkpoint.

Those that train or download are left to the main job and the slow tests; every other line
of the "Command lines" block runs here with the data folder, the checkpoint and `.venv/bin/
python` replaced by a tiny synthetic folder, a tiny model and this interpreter.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, isolated_env, make_image_folder
from helpers.model.classifier import build_model
from helpers.serve import inference

README = ROOT / "README.md"
DATA = "../shared/data/flowers"
LONG = ("train.py", "pipeline", "--serve", " app ")  # training, downloads, servers


def command_lines() -> list[str]:
    """The lines of the README's "Command lines" block, continuation lines joined."""
    text = README.read_text()
    section = text[text.index("## Command lines"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    lines, current = [], ""
    for raw in block.splitlines():
        line = raw.split("  #")[0].rstrip()
        current += line.rstrip("\\").strip() + " "
        if not line.endswith("\\"):
            if current.strip():
                lines.append(current.strip())
            current = ""
    return lines


def test_the_readme_has_command_lines_that_run_after_the_main_job():
    lines = command_lines()
    assert any("predict.py" in ln for ln in lines) and any("evaluate" in ln for ln in lines)
    assert all(ln.startswith((".venv/bin/python", "FLOWERS_DIR=")) for ln in lines), lines
    assert all("checkpoints/" not in ln for ln in lines)  # the main job writes build/main/


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A tiny folder shaped like the flowers data and a tiny model saved as the main job's."""
    root = tmp_path_factory.mktemp("readme")
    data = make_image_folder(root / "flowers", ["1", "10", "2"], per_class=2)
    for line in command_lines():  # photos the README names get a synthetic stand-in
        for path in re.findall(rf"{re.escape(DATA)}/(\S+\.jpg)", line):
            target = data / path
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(next((data / "test" / "1").glob("*.jpg")), target)
    torch.manual_seed(0)
    clf = build_model("test_efficientnet", {"1": 0, "10": 1, "2": 2}, hidden_units=0)
    ckpt = inference.save_model(clf, root / "build" / "main" / "checkpoint.pth")
    return {"data": data, "ckpt": ckpt, "out": root / "build" / "main"}


@pytest.mark.slow  # each line is a process of its own
@pytest.mark.parametrize("line", [ln for ln in command_lines() if not any(w in ln for w in LONG)])
def test_each_command_line_runs_as_written(line, tiny, tmp_path):
    line = (line.replace(".venv/bin/python", shlex.quote(sys.executable))
            .replace(DATA, str(tiny["data"]))
            .replace("build/main/", f"{tiny['out']}/"))
    done = subprocess.run(line, shell=True, cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=isolated_env(PYTHONPATH=str(ROOT),
                                                         FLOWERS_CACHE=str(tmp_path / "cache")))
    assert done.returncode == 0, f"{line}\n{done.stderr}"

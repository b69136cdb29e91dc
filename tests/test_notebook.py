"""The notebook: committed without outputs, and runs top to bottom on a small real subset."""

from __future__ import annotations

import json
import os

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import ROOT
from helpers.config import TUNED

NOTEBOOK = ROOT / "Image_Classifier_Project.ipynb"


def test_notebook_is_committed_without_outputs():
    nb = json.loads(NOTEBOOK.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and all(c["outputs"] == [] and c["execution_count"] is None for c in code)


def test_code_cells_are_thin():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert len(cell.source.strip().splitlines()) <= 6, cell.source


def _subset(real_data, dest, classes: int = 6, per_class: int = 6):
    for split in ("train", "valid", "test"):
        for cls in sorted(os.listdir(real_data / "train"), key=int)[:classes]:
            (dest / split / cls).mkdir(parents=True)
            for image in sorted((real_data / split / cls).iterdir())[:per_class]:
                (dest / split / cls / image.name).symlink_to(image)
    return dest


@pytest.mark.slow
def test_notebook_runs_top_to_bottom_and_draws_the_sanity_check(real_data, tmp_path,
                                                                monkeypatch):
    monkeypatch.setenv("FLOWERS_DIR", str(_subset(real_data, tmp_path / "flowers")))
    monkeypatch.setenv("NB_EPOCHS", "1")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    for call in ("plot_prediction_grid", "plot_gradcam", "plot_confusion", "plot_reliability"):
        cell = next(c for c in nb.cells if c.cell_type == "code" and call in c.source)
        assert any("image/png" in o.get("data", {}) for o in cell.outputs), call
    assert (tmp_path / "build" / "notebook" / "checkpoint.pth").is_file()
    printed = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "recipe: cached" in printed and "reloaded test top-1" in printed
    # 6 images a class: the views follow the data, the epochs chosen (NB_EPOCHS) stay
    assert f"6 training images a class: {TUNED[0][1]} augmented views, 1 epochs" in printed
    assert "test ECE" in printed and "unsure below" in printed
    # Check your data: the doctor's counts, the review grid drawn, no fixes file yet
    assert "suspected label errors:" in printed and "strangers and unusable files:" in printed
    grid = next(c for c in nb.cells if c.cell_type == "code" and "review.review(" in c.source)
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {})
               for o in grid.outputs)
    assert "no fixes file at build/notebook/fixes.json yet: the data as loaded" in printed

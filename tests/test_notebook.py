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
    """At most six lines of code a cell (imports aside): each step calls a helper."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            lines = [line for line in cell.source.strip().splitlines()
                     if not line.startswith(("import ", "from "))]
            assert len(lines) <= 6, cell.source


def test_the_notebook_shows_the_course_steps_in_order():
    """ImageFolder and its transforms, a DataLoader batch, the new head, the parameters that
    train, the optimizer, an epoch loop of train_one_epoch and validate, then testing,
    saving, loading, process_image, imshow, predict and the sanity check; the data doctor
    after them; no module name reused as a variable."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    steps = ["train_transform(", "eval_transform(", "load_data(", "class_to_idx",
             "make_loaders(", "next(iter(", "new_model(", ".head", "parameter_counts()",
             "build_plan(", ".optimizer", "train_one_epoch(", "validate(", "run.finish()",
             "calibrate_on(", "evaluate_model(", "save_model(", "load_checkpoint(",
             "process_image(", "imshow(", "prediction.predict(", "plot_prediction_grid(",
             "shift_image(",
             "doctor.examine("]
    where = [next((i for i, c in enumerate(code) if step in c), None) for step in steps]
    assert None not in where, [s for s, w in zip(steps, where, strict=True) if w is None]
    assert where == sorted(where), list(zip(steps, where, strict=True))
    loop_cell = code[where[steps.index("train_one_epoch(")]]
    assert "for epoch in range(" in loop_cell and "validate(" in loop_cell
    modules = set()
    for source in code:
        for line in source.splitlines():
            if line.startswith("from helpers") and " import " in line:
                imported = line.split(" import ")[1].split(",")
                modules |= {n.strip().split(" as ")[-1] for n in imported}
    assigned = {line.split("=")[0].strip() for source in code for line in source.splitlines()
                if "=" in line.split("(")[0] and not line.startswith((" ", "#"))}
    names = {n.strip() for a in assigned for n in a.split(",")}
    assert not modules & names, modules & names


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
    assert "an ImageFolder: True, 6 classes" in printed
    assert "Compose(" in printed and "torch.Size([32, 3, 224, 224])" in printed
    assert "fine-tune: train loss" in printed and "valid accuracy" in printed
    assert "linear probe: train loss" in printed and "kept epoch" in printed
    shown = "".join(str(o.get("data", {}).get("text/plain", "")) for o in outputs)
    assert "OneCycleLR over" in shown and "AdamW" in shown
    # 6 images a class: the views follow the data, the epochs chosen (NB_EPOCHS) stay
    assert f"6 training images a class: {TUNED[0][1]} augmented views, 1 epochs" in printed
    assert "test ECE" in printed and "unsure below" in printed
    # Check your data: the doctor's counts, the review grid drawn, no fixes file yet
    assert "suspected label errors:" in printed and "strangers and unusable files:" in printed
    grid = next(c for c in nb.cells if c.cell_type == "code" and "review.review(" in c.source)
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {})
               for o in grid.outputs)
    assert "no fixes file at build/notebook/fixes.json yet: the data as loaded" in printed

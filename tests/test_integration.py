"""The whole pipeline: the main job on synthetic data, and real flowers beating 80 %."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import make_image_folder, write_checkpoint
from helpers import cli
from helpers.config import TUNED, TrainConfig
from helpers.data import splits
from helpers.model import backbones, checkpoint
from helpers.model.classifier import new_model
from helpers.train import evaluate, recipes


@pytest.mark.slow
def test_pipeline_command_trains_saves_predicts_and_charts(tmp_path, capsys):
    folder = make_image_folder(tmp_path / "flowers", ["1", "2", "10"], per_class=10)  # 30 valid
    out = tmp_path / "out"
    status = cli.main(["pipeline", "--data_dir", str(folder), "--out", str(out), "--epochs", "2",
                       "--batch_size", "6", "--hidden_units", "16", "--learning_rate", "0.01",
                       "--arch", "test_efficientnet"])
    assert status == 0
    printed = capsys.readouterr().out
    assert "valid: top-1" in printed and "test: top-1" in printed and "top-5 chart" in printed
    assert (out / "top5.png").stat().st_size > 0 and (out / "history.png").is_file()
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["class_to_idx"] == {"1": 0, "10": 1, "2": 2}
    assert ckpt["class_names"] == ["1", "10", "2"]  # a user's numbered folders keep their names
    assert (out / "checkpoint.engine.onnx").is_file()  # predict.py's engine, beside it
    summary = json.loads((out / "metrics.json").read_text())
    assert [r["phase"] for r in summary["history"]] == ["linear probe", "fine-tune", "fine-tune"]
    assert summary["calibration"]["fitted_on"] == "valid"  # 30 images: enough to calibrate
    assert summary["test"] == ckpt["metrics"]["test"] and summary["test"]["n"] == 30
    assert f"test: top-1 {summary['test']['top1']:.2%}" in printed


def test_pipeline_reports_a_missing_folder_in_one_line(tmp_path, capsys):
    folder = tmp_path / "flowers"
    folder.mkdir()
    (folder / "readme.txt").write_text("not data")
    assert cli.main(["pipeline", "--data_dir", str(folder), "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def _subset(root: Path, link_root: Path, classes: list[str]) -> Path:
    """Symbolic links to some classes of the read-only real data."""
    for split in ("train", "valid"):
        (link_root / split).mkdir(parents=True)
        for cls in classes:
            (link_root / split / cls).symlink_to(root / split / cls)
    return link_root


@pytest.mark.slow
def test_ten_real_flower_classes_beat_80_percent(real_data, tmp_path):
    valid_counts = Counter(p.parent.name for p in (real_data / "valid").glob("*/*.jpg"))
    classes = sorted((c for c, n in valid_counts.items() if n >= 5), key=int)[:10]
    folder = _subset(real_data, tmp_path / "ten", classes)
    config = TrainConfig(recipe="course", epochs=2, batch_size=32, learning_rate=2e-3,
                         hidden_units=512)
    spec = backbones.get_backbone(config.arch).preprocess
    found = splits.load_data(folder, spec, test_fraction=0)
    clf = new_model(found.sets, config, names=found.names)
    recipes.run_recipe(clf, found.sets, config, torch.device("cpu"), log=None)
    result = evaluate.evaluate_model(clf, found.sets["valid"].samples)
    assert result["n"] >= 50 and result["top1"] > 0.80
    path = write_checkpoint(clf, tmp_path / "ten.pth", config=config)
    reloaded, _ = checkpoint.load_checkpoint(path)
    assert evaluate.evaluate_model(reloaded, found.sets["valid"].samples)["top1"] == result["top1"]


@pytest.mark.slow
def test_final_model_on_all_labels_from_a_plain_folder(tmp_path, capsys):
    """A plain folder of class folders: valid and test carved out, then --final trains on
    train+valid with the first run's epochs, temperature and threshold."""
    plain = tmp_path / "photos"
    made = make_image_folder(tmp_path / "made", ["rose", "tulip", "daisy"], per_class=10,
                             splits=("train",))
    (made / "train").rename(plain)
    out = tmp_path / "out"
    status = cli.main(["train", str(plain), "--save_dir", str(out), "--epochs", "2",
                       "--batch_size", "6", "--arch", "test_efficientnet", "--final"])
    assert status == 0
    printed = capsys.readouterr().out
    assert "no valid/ folder:" in printed and "no test/ folder:" in printed
    assert "final model: train+valid" in printed and "final test: top-1" in printed
    # about 6 training images a class: more views; the epochs typed stay
    assert f"training images a class: views {TUNED[0][1]} (type an option" in printed
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["config"]["views"] == TUNED[0][1] and ckpt["config"]["epochs"] == 2
    metrics = ckpt["metrics"]
    assert ckpt["class_names"] == ["daisy", "rose", "tulip"]  # the folders' own names
    assert metrics["final"]["trained_on"] == "train+valid"
    assert ckpt["temperature"] == metrics["first_run"]["calibration"]["temperature"]
    held = metrics["held_out"]
    assert held["valid"] and held["test"] and not set(held["valid"]) & set(held["test"])
    assert 0.0 <= metrics["final"]["test"]["ece"] <= 1.0

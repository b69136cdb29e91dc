"""Photos as a phone takes them: the benchmark's shifts (seeded, every one at every severity)
and the camera augmentation of training (shapes, seeding, the cached views' keys)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, make_image_folder, synthetic_image
from helpers.data.augment import CameraShake, ZoomOut
from helpers.data.transforms import train_transform
from helpers.insight.shifts import SEVERITIES, SHIFTS, seed_of, shift_image, shifted_copies
from helpers.model.backbones import get_backbone

LITE0 = get_backbone("efficientnet_lite0").preprocess


def _photo(seed: int = 0, size=(160, 120)) -> Image.Image:
    return synthetic_image(seed % 3, np.random.default_rng(seed), size)


@pytest.mark.parametrize("shift", list(SHIFTS))
def test_every_shift_keeps_the_size_changes_the_photo_and_is_seeded(shift):
    photo = _photo()
    before = np.asarray(photo, np.float32)
    changes = []
    for severity in SEVERITIES:
        a = shift_image(photo, shift=shift, severity=severity, seed=7)
        b = shift_image(photo, shift=shift, severity=severity, seed=7)
        assert a.size == photo.size and a.mode == "RGB"
        assert np.array_equal(np.asarray(a), np.asarray(b)), "the same seed, the same copy"
        changes.append(np.abs(np.asarray(a, np.float32) - before).mean())
    assert min(changes) > 0.5, changes  # every severity shifts the photo
    assert changes[2] >= changes[0] * 0.9, changes  # the strongest is not the mildest


def test_unknown_shift_or_severity_is_refused():
    with pytest.raises(ValueError, match="unknown shift"):
        shift_image(_photo(), shift="fog", severity=1, seed=0)
    with pytest.raises(ValueError, match="severity 4"):
        shift_image(_photo(), shift="jpeg", severity=4, seed=0)


def test_shifted_copies_are_made_once_and_seeded_by_name(tmp_path):
    folder = make_image_folder(tmp_path / "d", ["a", "b"], 2, splits=("valid",))
    samples = sorted((str(p), 0) for p in (folder / "valid").rglob("*.jpg"))
    out = tmp_path / "copies"
    first = shifted_copies(samples, folder=out, shift="zoomed_out", severity=2)
    stamps = [Path(p).stat().st_mtime_ns for p, _ in first]
    again = shifted_copies(samples, folder=out, shift="zoomed_out", severity=2)
    assert first == again and stamps == [Path(p).stat().st_mtime_ns for p, _ in again]
    assert seed_of(samples[0][0], shift="jpeg", severity=1) != seed_of(
        samples[1][0], shift="jpeg", severity=1)
    assert seed_of("x/a/1.jpg", shift="jpeg", severity=1) == seed_of(
        "elsewhere/a/1.jpg", shift="jpeg", severity=1)


def test_camera_augmentation_shapes_range_and_seeding():
    t = train_transform(LITE0, augmentation="camera")
    photo = _photo(size=(300, 220))
    torch.manual_seed(5)
    a = t(photo)
    torch.manual_seed(5)
    b = t(photo)
    torch.manual_seed(6)
    c = t(photo)
    assert a.shape == (3, 224, 224) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= -1.0001 and a.max() <= 1.0001  # in 0..1 before normalising by 0.5
    shake = CameraShake(blur=1, motion=1, low_res=1, jpeg=1, noise=1, light=1, colour=1)
    x = torch.rand(3, 64, 48)
    y = shake(x)
    assert y.shape == x.shape and 0 <= y.min() and y.max() <= 1 and not torch.equal(x, y)
    zoomed = ZoomOut(p=1.0)(photo)
    assert zoomed.size == photo.size


def test_the_augmentation_changes_the_cached_views_keys(tmp_path, monkeypatch):
    """Views extracted under one augmentation are never served for another."""
    from helpers.data.folders import image_folder
    from helpers.train.cache import ActivationCache

    monkeypatch.setenv("FLOWERS_CACHE", str(tmp_path / "cache"))
    folder = make_image_folder(tmp_path / "d", ["a", "b"], 2, splits=("train",))
    spec = get_backbone("test_efficientnet")
    ds = image_folder(folder / "train")
    keys, backbone = {}, spec.build(False)
    for augmentation in ("crop", "camera", "mixed"):
        cache = ActivationCache(spec, backbone, tail_stages=1,
                                device=torch.device("cpu"), engine="torch",
                                augmentation=augmentation)
        keys[augmentation] = (cache.key(ds, "aug1", 0), cache.key(ds, "centre", 0),
                              cache.key(ds, "aug2", 0))
    assert keys["crop"][0] != keys["camera"][0]  # an augmented view: another key
    assert keys["crop"][1] == keys["camera"][1]  # the centre crop is the same view
    # mixed: odd views are the crop views, even views the camera views (cached once each)
    assert keys["mixed"][0] == keys["crop"][0] and keys["mixed"][2] == keys["camera"][2]


def test_an_unknown_augmentation_is_one_line(tmp_path):
    from helpers import cli

    folder = make_image_folder(tmp_path / "d", ["a", "b"], 2)
    done = subprocess.run([sys.executable, "train.py", str(folder), "--augmentation", "fog"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and "invalid choice: 'fog'" in done.stderr
    with pytest.raises(Exception, match="augmentation must be crop, camera or mixed"):
        from helpers.config import settle

        settle({"augmentation": "fog"}, device_type="cpu")
    assert cli  # the command line module imports


@pytest.mark.slow
def test_the_benchmark_prints_every_shift_for_a_trained_model(tmp_path, real_data):
    from helpers import cli

    out = tmp_path / "run"
    subset = make_image_folder(tmp_path / "d", ["a", "b", "c"], 4)
    assert cli.main(["train", str(subset), "--save_dir", str(out), "--arch", "test_efficientnet",
                     "--epochs", "1", "--batch_size", "6"]) == 0
    done = subprocess.run([sys.executable, "benchmarks/robustness.py", str(out / "checkpoint.pth"),
                           "--data", str(subset), "--split", "valid",
                           "--json", str(tmp_path / "r.json")], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    for shift in SHIFTS.values():
        assert f"| {shift.what} |" in done.stdout
    assert "mean over the 42 shifted copies" in done.stdout and "flags" in done.stdout

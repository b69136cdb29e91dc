"""Reliability: bad files and folders, interrupted and killed training, killed saves."""

from __future__ import annotations

import io
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import ROOT, make_image_folder
from helpers import backbones, checkpoint, cli, data, images
from helpers.predict import process_image

LITE0 = backbones.get_backbone("efficientnet_lite0")
MODES = ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "I;16", "I", "F", "YCbCr"]


def _jpeg_bytes(size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, "orange").save(buffer, "JPEG")
    return buffer.getvalue()


@pytest.mark.parametrize(("content", "message"), [
    (b"", "not an image"),
    (b"hello, I am text", "not an image"),
    (_jpeg_bytes()[:200], "damaged or truncated"),
    (_jpeg_bytes()[:30] + bytes(300), "not an image|damaged"),
])
def test_bad_image_files_are_one_line_errors_naming_the_file(content, message, tmp_path):
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    with pytest.raises(images.ImageError, match=message) as info:
        images.open_image(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert images.check_image(path) is not None


def test_decompression_bomb_guard_is_kept(tmp_path, monkeypatch):
    Image.new("L", (300, 300)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200 * 200)
    with pytest.raises(images.ImageError, match="too large"):
        images.open_image(tmp_path / "big.png")


@pytest.mark.parametrize("size", [(1, 1), (3000, 2000), (5, 900)])
def test_tiny_and_large_images(size, tmp_path):
    Image.new("RGB", size, "green").save(tmp_path / "x.png")
    assert process_image(tmp_path / "x.png").shape == (3, 224, 224)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animated_images_use_the_first_frame(fmt, tmp_path):
    frames = [Image.new("RGB", (32, 32), c) for c in ("red", "blue", "blue")]
    path = tmp_path / f"a.{fmt.lower()}"
    frames[0].save(path, fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    r, g, b = images.open_image(path).getpixel((16, 16))
    assert r > 200 and b < 60


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(width=st.integers(1, 400), height=st.integers(1, 400), mode=st.sampled_from(MODES),
       seed=st.integers(0, 2**16))
def test_any_size_and_mode_gives_a_valid_input(width, height, mode, seed):
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    image = rgb.convert("L").convert(mode) if mode in ("I;16", "I", "F") else rgb.convert(mode)
    upright = images.to_rgb(image)
    assert upright.mode == "RGB" and upright.size == (width, height)
    array = process_image(image)
    assert array.shape == (3, 224, 224) and np.isfinite(array).all()
    assert -1.0 <= array.min() and array.max() <= 1.0


def test_corrupt_training_images_are_listed_and_left_out(tmp_path):
    folder = make_image_folder(tmp_path / "f", ["1", "2"], per_class=3)
    (folder / "train" / "1" / "broken.jpg").write_bytes(_jpeg_bytes()[:150])
    (folder / "train" / "2" / "text.jpg").write_text("not an image")
    with pytest.warns(data.BadImageWarning, match=r"left out 2 unreadable.*broken\.jpg"):
        sets = data.load_datasets(folder, LITE0)
    assert len(sets["train"]) == 6 and len(sets["train"].targets) == 6
    assert all("broken" not in p for p, _ in sets["train"].samples)


def test_folder_problems_are_clear(tmp_path):
    folder = make_image_folder(tmp_path / "f", ["1", "2"], per_class=2)
    with pytest.warns(UserWarning, match="no name for class folder"):
        assert data.class_names({"1": 0, "77": 1}, {"1": "one"}) == ["one", "77"]
    (folder / "train" / "3").mkdir()
    with pytest.raises(data.DataError, match="3"):
        data.load_datasets(folder, LITE0)
    empty = tmp_path / "empty" / "train"
    empty.mkdir(parents=True)
    with pytest.raises(data.DataError, match="empty"):
        data.image_folder(empty)


def _train(folder, out, *extra, epochs=40):
    return [sys.executable, str(ROOT / "train.py"), str(folder), "--save_dir", str(out),
            "--epochs", str(epochs), "--batch_size", "4", "--seed", "7", *extra]


def _wait_for_epoch(path, epoch, process, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if path.is_file():
            try:
                if checkpoint.read_resume(path)["epoch"] >= epoch:
                    return
            except checkpoint.CheckpointError:
                pass  # being replaced this instant
        time.sleep(0.05)
    raise AssertionError("training ended before it could be interrupted")


@pytest.fixture
def train_env(tmp_path, monkeypatch):
    folder = make_image_folder(tmp_path / "flowers", ["1", "2", "3"], per_class=6)
    env = {"FLOWERS_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin",
           "OMP_NUM_THREADS": "1"}  # one thread: the same arithmetic in every run
    return folder, env


def test_sigkill_then_resume_gives_bitwise_the_same_weights(train_env, tmp_path):
    folder, env = train_env
    reference = subprocess.run(_train(folder, tmp_path / "a"), env=env, capture_output=True,
                               text=True, timeout=600)
    assert reference.returncode == 0, reference.stderr
    killed = subprocess.Popen(_train(folder, tmp_path / "b"), env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_epoch(tmp_path / "b" / "last.pth", 3, killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "b" / "checkpoint.pth").exists()
    resumed = subprocess.run(_train(folder, tmp_path / "b", "--resume",
                                    str(tmp_path / "b" / "last.pth")),
                             env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    a = torch.load(tmp_path / "a" / "checkpoint.pth", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "b" / "checkpoint.pth", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_saves_and_says_how_to_resume(train_env, tmp_path):
    folder, env = train_env
    run = subprocess.Popen(_train(folder, tmp_path / "c"), env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    _wait_for_epoch(tmp_path / "c" / "last.pth", 1, run)
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 130
    assert "Traceback" not in err and "--resume" in err.strip().splitlines()[-1]
    state = checkpoint.read_resume(tmp_path / "c" / "last.pth")
    assert state["epoch"] >= 1 and state["rng"]["torch"].dtype == torch.uint8


def test_resume_from_the_wrong_file_is_a_clear_error(train_env, tmp_path, capsys):
    folder, _ = train_env
    torch.save({"format_version": 1}, tmp_path / "checkpoint.pth")
    assert cli.main(["train", str(folder), "--resume", str(tmp_path / "checkpoint.pth")]) == 1
    assert "not a resumable state" in capsys.readouterr().err


KILL_DURING_SAVE = """
import sys, torch
from helpers.checkpoint import atomic_save
big = {"weights": torch.ones(40_000_000)}
while True:
    atomic_save(big, sys.argv[1])
"""


def test_killed_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    target = tmp_path / "model.pth"
    checkpoint.atomic_save({"weights": torch.zeros(3)}, target)
    writer = subprocess.Popen([sys.executable, "-c", KILL_DURING_SAVE, str(target)], cwd=ROOT)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".model.pth.*.tmp")) and time.time() < deadline:
        time.sleep(0.01)
    writer.send_signal(signal.SIGKILL)  # in the middle of writing the temporary file
    writer.wait()
    loaded = torch.load(target, weights_only=True)["weights"]
    assert loaded.shape in {(3,), (40_000_000,)}  # the old file or a complete new one

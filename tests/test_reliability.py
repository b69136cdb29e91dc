"""Reliability: bad files and folders, interrupted and killed training, killed saves."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
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
from torchvision import transforms

from conftest import ROOT, isolated_env, make_image_folder
from helpers import cli
from helpers.core.device import StopFlag
from helpers.core.errors import CheckpointError, DataError, ImageError, Stopped
from helpers.core.files import atomic_save
from helpers.data import images, splits
from helpers.data.folders import BadImageWarning, image_folder
from helpers.data.names import class_names
from helpers.model import backbones, checkpoint
from helpers.serve.prediction import process_image

LITE0 = backbones.get_backbone("efficientnet_lite0").preprocess
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
    with pytest.raises(ImageError, match=message) as info:
        images.open_image(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert images.check_image(path) is not None


def test_decompression_bomb_guard_is_kept(tmp_path, monkeypatch):
    Image.new("L", (300, 300)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200 * 200)
    with pytest.raises(ImageError, match="too large"):
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
    # The reference: torchvision's own Resize, CenterCrop, ToTensor and Normalize.
    reference = transforms.Compose([
        transforms.Resize(256, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(224), transforms.ToTensor(),
        transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])(upright).numpy()
    assert array.shape == (3, 224, 224) and array.dtype == np.float32
    np.testing.assert_allclose(array, reference, rtol=0, atol=1e-6)


def test_corrupt_training_images_are_listed_and_left_out(tmp_path):
    folder = make_image_folder(tmp_path / "f", ["1", "2"], per_class=3)
    (folder / "train" / "1" / "broken.jpg").write_bytes(_jpeg_bytes()[:150])
    (folder / "train" / "2" / "text.jpg").write_text("not an image")
    with pytest.warns(BadImageWarning, match=r"left out 2 unreadable.*broken\.jpg"):
        sets = splits.load_data(folder, LITE0).sets
    assert len(sets["train"]) == 6 and len(sets["train"].targets) == 6
    assert all("broken" not in p for p, _ in sets["train"].samples)


def test_folder_problems_are_clear(tmp_path):
    folder = make_image_folder(tmp_path / "f", ["1", "2"], per_class=2)
    with pytest.warns(UserWarning, match="no name for class folder"):
        assert class_names({"1": 0, "77": 1}, {"1": "one"}) == ["one", "77"]
    (folder / "train" / "3").mkdir()
    with pytest.raises(DataError, match="3"):
        splits.load_data(folder, LITE0)
    empty = tmp_path / "empty" / "train"
    empty.mkdir(parents=True)
    with pytest.raises(DataError, match="empty"):
        image_folder(empty)


def _train(folder, out, *extra, epochs=40):
    return [sys.executable, str(ROOT / "train.py"), str(folder), "--save_dir", str(out),
            "--epochs", str(epochs), "--batch_size", "4", "--seed", "7",
            "--arch", "test_efficientnet", *extra]


def _wait_for_epoch(path, epoch, process, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if path.is_file():
            try:
                state = checkpoint.read_resume(path)
                if state["epoch"] + state["phase"] * 1000 >= epoch:
                    return
            except CheckpointError:
                pass  # being replaced this instant
        time.sleep(0.05)
    raise AssertionError("training ended before it could be interrupted")


@pytest.fixture
def train_env(tmp_path, monkeypatch):
    folder = make_image_folder(tmp_path / "flowers", ["1", "2", "3"], per_class=6)
    env = isolated_env(FLOWERS_CACHE=str(tmp_path / "cache"),
                       OMP_NUM_THREADS="1")  # one thread: the same arithmetic in every run
    return folder, env


def _weights(path):
    return torch.load(path, weights_only=True)["state_dict"]


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# train.py with a global optimizer hook that counts the steps into a file and, at step
# `pause_at`, holds the process for a few seconds (arithmetic unchanged): a signal sent then
# lands at a known batch, not wherever the scheduler happens to be.
PAUSING_TRAIN = """
import runpy, sys, time
from torch.optim.optimizer import register_optimizer_step_post_hook
progress, pause_at = sys.argv[1], int(sys.argv[2])
sys.argv = sys.argv[3:]
steps = [0]
def hook(optimizer, args, kwargs):
    steps[0] += 1
    with open(progress, "a") as f:
        f.write(f"{steps[0]}\\n")
    if steps[0] == pause_at:
        time.sleep(3)
register_optimizer_step_post_hook(hook)
runpy.run_path(sys.argv[0], run_name="__main__")
"""
PHASE_LINE = re.compile(r"^(.+?): [\d,]+ parameters train, (\d+) epoch\(s\) of (\d+) batches",
                        re.MULTILINE)


def _resume(folder, out):
    """The command the interrupted run printed: the same folders, nothing else typed."""
    return [sys.executable, str(ROOT / "train.py"), str(folder), "--save_dir", str(out),
            "--resume", str(out / "last.pth")]


def _steps(progress) -> int:
    try:
        return len(progress.read_text().splitlines())
    except OSError:
        return 0


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["cached", "course"])
def test_interrupted_then_resumed_gives_bitwise_the_same_weights(train_env, tmp_path, recipe):
    """SIGKILL at an epoch boundary, and SIGINT to the whole process group in the middle of
    an epoch (data-loader workers included; the state says batch 2 of 5): resuming gives the
    uninterrupted run's weights."""
    folder, env = train_env
    args = ["--recipe", recipe, "--hidden_units", "8"]
    reference = subprocess.run(_train(folder, tmp_path / "a", *args), env=env,
                               capture_output=True, text=True, timeout=600)
    assert reference.returncode == 0, reference.stderr
    expected = _weights(tmp_path / "a" / "checkpoint.pth")
    phases = [(int(e), int(b)) for _, e, b in PHASE_LINE.findall(reference.stdout)]
    assert phases, reference.stdout
    last = len(phases) - 1
    epochs, batches = phases[last]
    assert epochs >= 4 and batches >= 3, phases  # room for a stop in the middle of an epoch
    # SIGKILL once the last phase's third epoch is saved: the state of an epoch boundary.
    out = tmp_path / "killed"
    run = subprocess.Popen(_train(folder, out, *args), env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True, start_new_session=True)
    _wait_for_epoch(out / "last.pth", 1000 * last + 3, run)
    os.killpg(run.pid, signal.SIGKILL)
    run.communicate(timeout=120)
    assert not (out / "checkpoint.pth").exists()
    resumed = subprocess.run(_resume(folder, out), env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert _same(_weights(out / "checkpoint.pth"), expected), "killed"

    # SIGINT while the second batch of the last phase's third epoch is being trained.
    out, progress = tmp_path / "ctrl-c", tmp_path / "steps.txt"
    pause_at = sum(e * b for e, b in phases[:last]) + 2 * batches + 2
    run = subprocess.Popen([sys.executable, "-c", PAUSING_TRAIN, str(progress), str(pause_at),
                            *_train(folder, out, *args)[1:]], cwd=ROOT, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    deadline = time.time() + 300
    while _steps(progress) < pause_at and run.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert _steps(progress) == pause_at, "training ended or stalled before the pause"
    os.killpg(run.pid, signal.SIGINT)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 130 and "Traceback" not in err, err
    assert f"--resume {out / 'last.pth'}" in err.strip().splitlines()[-1]
    assert _steps(progress) == pause_at  # not one batch more
    assert not (out / "checkpoint.pth").exists()
    state = checkpoint.read_resume(out / "last.pth")
    # Mid-epoch: two batches of the third epoch done, strictly between 0 and the epoch's count.
    assert (state["phase"], state["epoch"], state["batches_done"]) == (last, 2, 2)
    assert 0 < state["batches_done"] < batches
    resumed = subprocess.run(_resume(folder, out), env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert _same(_weights(out / "checkpoint.pth"), expected), "ctrl-c"


@pytest.mark.slow
def test_sigterm_to_the_process_group_during_extraction_saves_nothing_half_done(train_env,
                                                                                tmp_path):
    """As systemd, Slurm and Kubernetes do: every process of the group gets SIGTERM."""
    folder, env = train_env
    run = subprocess.Popen(_train(folder, tmp_path / "c"), env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while not list((tmp_path / "cache").rglob("trunk-*.onnx")) and time.time() < deadline:
        time.sleep(0.02)  # the trunk is exported: extraction starts now
    os.killpg(run.pid, signal.SIGTERM)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 130, err
    assert "Traceback" not in err and "DataLoader worker" not in err
    assert err.strip().splitlines()[-1].startswith("error: stopped by SIGTERM")


@pytest.mark.slow
def test_sigterm_saves_and_says_how_to_resume(train_env, tmp_path):
    folder, env = train_env
    run = subprocess.Popen(_train(folder, tmp_path / "c"), env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, start_new_session=True)
    _wait_for_epoch(tmp_path / "c" / "last.pth", 1001, run)
    os.killpg(run.pid, signal.SIGTERM)
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


def test_resume_of_another_runs_state_is_refused(train_env, tmp_path, capsys):
    folder, _ = train_env
    other = make_image_folder(tmp_path / "other", ["a", "b", "c"], per_class=6)
    state = {"kind": "resume", "identity": {"class_to_idx": {"a": 0, "b": 1, "c": 2},
                                            "data_digest": "0" * 64, "run_id": "old"}}
    torch.save(state, tmp_path / "last.pth")
    for data_dir in (folder, other):  # other classes; the same classes but other files
        assert cli.main(["train", str(data_dir), "--save_dir", str(tmp_path / "out"),
                         "--resume", str(tmp_path / "last.pth")]) == 1
        err = capsys.readouterr().err
        assert "belongs to another run" in err and err.count("\n") == 1


KILL_DURING_SAVE = """
import sys, torch
from helpers.core.files import atomic_save
big = {"weights": torch.ones(40_000_000)}
while True:
    atomic_save(big, sys.argv[1])
"""


@pytest.mark.slow  # a process of its own
def test_killed_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    target = tmp_path / "model.pth"
    atomic_save({"weights": torch.zeros(3)}, target)
    writer = subprocess.Popen([sys.executable, "-c", KILL_DURING_SAVE, str(target)], cwd=ROOT)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".model.pth.*.tmp")) and time.time() < deadline:
        time.sleep(0.01)
    writer.send_signal(signal.SIGKILL)  # in the middle of writing the temporary file
    writer.wait()
    loaded = torch.load(target, weights_only=True)["weights"]
    assert loaded.shape in {(3,), (40_000_000,)}  # the old file or a complete new one


FILL_THE_DISK = """
import sys, torch
from helpers.core.errors import DiskFullError
from helpers.core.files import atomic_save
target = sys.argv[1] + "/state.pth"
atomic_save({"weights": torch.zeros(10)}, target)
try:
    atomic_save({"weights": torch.ones(2_000_000)}, target)  # 8 MB on a 4 MB disk
except DiskFullError as err:
    print("refused:", err)
print(torch.load(target, weights_only=True)["weights"].shape)
"""


def _in_a_small_tmpfs(tmp_path, command: str) -> subprocess.CompletedProcess:
    """Run a shell command with a 4 MB tmpfs mounted at tmp_path/disk, in a private mount
    namespace (root only), so a full disk can be tested without filling a real one."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("a private tmpfs needs root and unshare (CI runs as root)")
    disk = tmp_path / "disk"
    disk.mkdir()
    script = f"mount -t tmpfs -o size=4m tmpfs {disk} && {command}"
    done = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True,
                          text=True, cwd=ROOT, timeout=600)
    if "mount" in done.stderr and "permission denied" in done.stderr.lower():
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    return done


@pytest.mark.slow  # a process of its own
def test_a_full_disk_keeps_the_previous_file_and_leaves_no_temporary_file(tmp_path):
    done = _in_a_small_tmpfs(
        tmp_path, f"{sys.executable} -c '{FILL_THE_DISK}' {tmp_path / 'disk'} && ls -A "
                  f"{tmp_path / 'disk'}")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0].startswith(f"refused: no space left on the device holding {tmp_path}/disk")
    assert "choose another folder" in lines[0]
    assert lines[1] == "torch.Size([10])"  # the previous file, whole
    assert lines[2:] == ["state.pth"]  # no temporary file left behind


@pytest.mark.slow
def test_training_onto_a_full_disk_is_one_line(train_env, tmp_path):
    folder, _ = train_env
    done = _in_a_small_tmpfs(
        tmp_path, f"FLOWERS_CACHE={tmp_path / 'cache'} {sys.executable} train.py {folder} "
                  f"--arch efficientnet_lite0 --epochs 1 --save_dir {tmp_path / 'disk'}; "
                  f"echo status $?; ls -A {tmp_path / 'disk'}")
    lines = done.stdout.strip().splitlines()
    assert "status 1" in lines, done.stdout + done.stderr
    err = done.stderr.strip().splitlines()
    assert err[-1].startswith(f"error: no space left on the device holding {tmp_path}/disk")
    assert "Traceback" not in done.stderr
    assert not [n for n in lines[lines.index("status 1") + 1:] if n.endswith(".tmp")]


def test_a_second_stop_request_aborts_at_once():
    stop = StopFlag()
    stop.request(signal.SIGTERM)
    assert stop.requested and stop.signal_name == "SIGTERM"
    with pytest.raises(Stopped, match="stopped by SIGTERM during extraction"):
        stop.check("extraction")
    with pytest.raises(KeyboardInterrupt):
        stop.request(signal.SIGINT)


@pytest.mark.parametrize("case", ["missing", "truncated", "not an image"])
def test_the_standalone_onnx_script_fails_in_one_line(case, tmp_path):
    from helpers.model.classifier import build_model
    from helpers.serve import export

    torch.manual_seed(0)
    onnx_path = export.export_onnx(build_model("test_efficientnet", {"a": 0, "b": 1},
                                                     hidden_units=0), tmp_path / "m.onnx")
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(_jpeg_bytes())
    if case == "missing":
        onnx_path = tmp_path / "absent.onnx"
    elif case == "truncated":
        onnx_path.write_bytes(onnx_path.read_bytes()[:500])
    else:
        photo.write_text("hello")
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "onnx_predict.py"),
                           str(onnx_path), str(photo)], capture_output=True, text=True)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1


def test_a_torchvision_built_for_another_torch_is_one_line(tmp_path):
    """The error a mismatched pair gives at import ("operator torchvision::nms does not
    exist") becomes one line naming both versions and the command that installs a pair."""
    fake = tmp_path / "site" / "torchvision"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        'raise RuntimeError("operator torchvision::nms does not exist")\n')
    folder = make_image_folder(tmp_path / "d", ["a", "b"], 2)
    env = os.environ | {"PYTHONPATH": str(tmp_path / "site")}
    done = subprocess.run([sys.executable, "train.py", str(folder), "--save_dir",
                           str(tmp_path / "out")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    from importlib import metadata

    assert lines[0].startswith(f"error: torchvision {metadata.version('torchvision')} does "
                               f"not work with torch {metadata.version('torch')}")
    assert "operator torchvision::nms does not exist" in lines[0]
    assert "install a matching pair: pip install torch==" in lines[0]


@pytest.mark.parametrize("content, says", [
    ('{"exclude": [' + "9" * 5000 + "]}", "cannot be read as JSON (Exceeds the limit"),
    ("[" * 10_000 + "]" * 10_000, "cannot be read as JSON (nested too deep)"),
    ('{"exclude": ["train/a/' + "x" * 300 + '.jpg"]}', "is longer than a file name can be"),
    ("EMPTY_VALID", "the fixes leave no photo in valid/"),
])
def test_a_bad_fixes_file_is_one_line_before_any_training(tmp_path, content, says):
    folder = make_image_folder(tmp_path / "d", ["a", "b"], 2)
    fixes = tmp_path / "fixes.json"
    if content == "EMPTY_VALID":
        content = json.dumps({"exclude": sorted(p.relative_to(folder).as_posix()
                                                for p in (folder / "valid").rglob("*.jpg"))})
    fixes.write_text(content)
    commands = [["train.py", str(folder), "--save_dir", str(tmp_path / "out"), "--fixes",
                 str(fixes)]]
    if says != "the fixes leave no photo in valid/":  # the doctor examines an emptied split
        commands.append(["-m", "helpers", "doctor", str(folder), "--fixes", str(fixes)])
    for command in commands:
        done = subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True,
                              text=True, timeout=300)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 1 and len(lines) == 1, done.stderr[-1500:]
        assert lines[0].startswith(f"error: {fixes}: ") and says in lines[0], lines[0]
    assert not (tmp_path / "out" / "checkpoint.pth").exists()


@pytest.mark.parametrize("content, says", [
    ("{" + '"1": "a", ' * 2 + '"2": ' + "9" * 5000 + "}", "cannot be read as JSON"),
    ("[" * 10_000 + "]" * 10_000, "nested too deep"),
])
def test_a_names_file_that_cannot_be_read_is_one_line(tmp_path, content, says):
    folder = make_image_folder(tmp_path / "d", ["1", "2"], 2)
    names = tmp_path / "names.json"
    names.write_text(content)
    done = subprocess.run([sys.executable, "train.py", str(folder), "--save_dir",
                           str(tmp_path / "out"), "--category_names", str(names)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, done.stderr[-1500:]
    assert lines[0].startswith(f"error: {names}: ") and says in lines[0], lines[0]


@pytest.mark.slow
def test_sighup_and_sigterm_at_any_moment_leave_no_lock_and_only_whole_files(train_env,
                                                                            tmp_path):
    """A closed terminal (SIGHUP) or SIGTERM at moments from set-up to after the checkpoint:
    the run stops in one line (how to resume, where there is something to resume) or has
    finished; no .lock and no temporary file stay; every file left loads. (A signal while the
    interpreter itself starts kills it as any program; then nothing was written.)"""
    folder, env = train_env
    delays = [0.05, 0.4, 1.5, 3.0, 5.0, 8.0, 12.0, 20.0]
    rng = np.random.default_rng(11)
    for n, delay in enumerate(delays):
        sig = (signal.SIGHUP, signal.SIGTERM)[n % 2]
        out = tmp_path / f"run{n}"
        run = subprocess.Popen(_train(folder, out, epochs=3), env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
        time.sleep(delay * float(rng.uniform(0.8, 1.2)))
        if run.poll() is None:
            os.killpg(run.pid, sig)
        _, err = run.communicate(timeout=300)
        lines = err.strip().splitlines()
        if run.returncode == -sig:  # before Python ran a line of ours: nothing done at all
            assert not out.exists() and not err, (delay, err)
            continue
        assert run.returncode in (0, 130), (delay, run.returncode, err[-800:])
        assert "Traceback" not in err, err[-2000:]
        if run.returncode == 130:
            assert lines[-1].startswith(("error: stopped by", "interrupted")) or (
                "--resume" in lines[-1]), lines[-1]
            if "--resume" in lines[-1]:
                checkpoint.read_resume(out / "last.pth")
        left = sorted(p.name for p in out.rglob("*")) if out.exists() else []
        assert ".lock" not in left and not [p for p in left if p.endswith(".tmp")], left
        if (out / "checkpoint.pth").exists():
            checkpoint.load_checkpoint(out / "checkpoint.pth")
        if (out / "last.pth").exists():
            checkpoint.read_resume(out / "last.pth")


def test_names_with_escapes_and_lone_surrogates_are_shown_escaped(tmp_path, capsys):
    """A names file with an ANSI escape, a bell, a bidi override and a lone surrogate: the
    text output shows them escaped (nothing reaches the terminal raw), JSON stays JSON."""
    import json as json_

    from helpers.core.text import shown
    from helpers.model.classifier import build_model
    from helpers.serve import inference

    folder = make_image_folder(tmp_path / "f", ["1", "2"], per_class=1, splits=("test",))
    names = {"1": "\x1b[31mred\x1b[0m rose\a", "2": "\u202eevil \ud800"}
    (tmp_path / "names.json").write_text(json_.dumps(names))  # ensure_ascii: \ud800 escaped
    clf = build_model("test_efficientnet", {"1": 0, "2": 1}, hidden_units=0)
    ckpt = inference.save_model(clf, tmp_path / "c.pth")
    image = next((folder / "test").rglob("*.jpg"))
    assert cli.main(["predict", str(image), str(ckpt), "--category_names",
                     str(tmp_path / "names.json")]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\a" not in out and "\u202e" not in out
    assert "\\x1b[31mred\\x1b[0m rose\\x07" in out and "\\u202eevil \\ud800" in out
    out.encode("utf-8")  # printable: no lone surrogate left
    assert cli.main(["predict", str(image), str(ckpt), "--category_names",
                     str(tmp_path / "names.json"), "--json"]) == 0
    item = json_.loads(capsys.readouterr().out)
    assert {p["name"] for p in item["predictions"]} == set(names.values())
    assert shown("pétale 花") == "pétale 花"


def test_a_fifo_a_device_or_a_folder_is_not_a_regular_file(tmp_path, capsys):
    """Given as the photo or the checkpoint: one line that says what it is, never a hang."""
    from helpers.model.classifier import build_model
    from helpers.serve import inference

    fifo = tmp_path / "x.jpg"
    os.mkfifo(fifo)
    ckpt = inference.save_model(build_model("test_efficientnet", {"a": 0, "b": 1},
                                            hidden_units=0), tmp_path / "c.pth")
    photo = make_image_folder(tmp_path / "f", ["a"], per_class=1, splits=("test",))
    photo = next(photo.rglob("*.jpg"))
    fake_ckpt = tmp_path / "c2.pth"
    os.mkfifo(fake_ckpt)
    cases = [([str(fifo), str(ckpt)], "a named pipe (FIFO)"),
             (["/dev/zero", str(ckpt)], "a device"),
             ([str(photo), str(tmp_path)], "a folder"),
             ([str(photo), str(fake_ckpt)], "a named pipe (FIFO)"),
             ([str(photo), "/dev/null"], "a device")]
    for args, kind in cases:
        assert cli.main(["predict", *args]) == 1
        err = capsys.readouterr().err
        assert f"not a regular file ({kind})" in err and err.count("\n") == 1, err


def test_top_k_above_the_class_count_says_so_once(tmp_path, capsys):
    from helpers.model.classifier import build_model
    from helpers.serve import inference

    ckpt = inference.save_model(build_model("test_efficientnet", {"a": 0, "b": 1},
                                            hidden_units=0), tmp_path / "c.pth")
    folder = make_image_folder(tmp_path / "f", ["a"], per_class=3, splits=("test",))
    assert cli.main(["predict", str(folder), str(ckpt), "--top_k", "103"]) == 0
    done = capsys.readouterr()
    assert done.err.count("--top_k 103: the model knows 2 classes; showing all 2") == 1
    assert done.out.count("2. ") == 3  # two names for each of the three photos

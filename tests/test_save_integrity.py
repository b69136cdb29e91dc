"""What a saved run promises: an engine bound to its checkpoint, one run per save folder,
read-only places in one line, options that cannot be dropped silently."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, make_image_folder
from helpers import cli
from helpers.cli import train_commands as training
from helpers.core.errors import Stopped
from helpers.core.files import file_sha256, folder_lock
from helpers.model.classifier import Classifier, build_model
from helpers.serve import inference
from helpers.serve.engine import engine_path, open_engine, read_header
from helpers.serve.export import save_with_metadata
from helpers.train import calibration
from helpers.train import run as run_module


def _model(classes: list[str], seed: int) -> Classifier:
    torch.manual_seed(seed)
    clf = build_model("test_efficientnet", {c: i for i, c in enumerate(classes)},
                            [f"name of {c}" for c in classes], hidden_units=0)
    with torch.no_grad():
        clf.head[1].weight.normal_(0, 0.5)
    return clf


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("integrity") / "data", ["a", "b", "c"],
                             per_class=4)


def _predict(image: Path, ckpt: Path, capsys) -> dict:
    assert cli.main(["predict", str(image), str(ckpt), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_interleaved_saves_never_pair_an_engine_with_another_checkpoint(folder, tmp_path,
                                                                         monkeypatch, capsys):
    """A checkpoint, B checkpoint, B engine, A engine: A's engine must not vouch for B."""
    a, b = _model(["a", "b", "c"], 0), _model(["x", "y", "z", "w"], 1)
    path = tmp_path / "shared" / "checkpoint.pth"
    real_write = inference.atomic_write_bytes
    order = []

    def write_then_let_b_save(data, target):
        done = real_write(data, target)
        if Path(target) != path:  # the engine's cached copy, or the engine beside it
            return done
        order.append("A checkpoint")
        if len(order) == 1:  # A's checkpoint is in place: B saves whole before A's engine
            monkeypatch.setattr(inference, "atomic_write_bytes", real_write)
            inference.save_model(b, path)
            order.append("B checkpoint and engine")
        return done

    monkeypatch.setattr(inference, "atomic_write_bytes", write_then_let_b_save)
    inference.save_model(a, path)  # its engine is written last, over B's
    assert order == ["A checkpoint", "B checkpoint and engine"]
    assert open_engine(path) is None  # A's engine beside B's checkpoint: not trusted
    answer = _predict(folder / "test" / "a" / "img_0.jpg", path, capsys)
    assert {p["class"] for p in answer["predictions"]} == {"x", "y", "z", "w"}  # B's classes
    assert open_engine(path).class_ids == ["x", "y", "z", "w"]


def test_a_forged_engine_with_every_metadata_entry_copied_is_not_trusted(folder, tmp_path,
                                                                          capsys):
    """Another model's graph (the same classes, or another count of outputs) given every
    metadata entry of the real engine, saved in its place: rebuilt, never answering."""
    import onnx

    real = inference.save_model(_model(["a", "b", "c", "d"], 2), tmp_path / "real.pth")
    image = folder / "test" / "b" / "img_1.jpg"
    truth = _predict(image, real, capsys)
    real_meta = {p.key: p.value for p in onnx.load(engine_path(real)).metadata_props}
    for classes in (["a", "b", "c", "d"], ["a", "b", "c"], list("abcdefghij")):
        other = inference.save_model(_model(classes, 3), tmp_path / f"other{len(classes)}.pth")
        proto = onnx.load(engine_path(other))
        save_with_metadata(proto, engine_path(real), real_meta)  # every entry copied
        assert read_header(engine_path(real))[0] == real_meta
        assert open_engine(real) is None
        assert _predict(image, real, capsys) == truth  # the real model's answer, rebuilt
    saved = torch.load(real, weights_only=True)
    assert saved["engine_sha256"] == file_sha256(engine_path(real))


def test_one_run_per_save_folder(folder, tmp_path, capsys):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom helpers.core.files import folder_lock\n"
         f"with folder_lock({str(out)!r}):\n"
         "    print('held', flush=True); time.sleep(60)"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code = cli.main(["train", str(folder), "--save_dir", str(out), "--epochs", "1",
                         "--arch", "test_efficientnet"])
        err = capsys.readouterr().err.strip()
        assert code == 1 and len(err.splitlines()) == 1
        assert f"another run (pid {holder.pid}) is saving into this folder" in err
        assert "--save_dir" in err and not (out / "checkpoint.pth").exists()
    finally:
        holder.kill()
        holder.wait()
    # the killed holder's lock file is left behind; the kernel released its lock: taken over
    assert (out / ".lock").read_text().split()[0] == str(holder.pid)
    with folder_lock(out) as lock:
        assert lock.read_text().split()[0] == str(os.getpid())
    assert not (out / ".lock").exists()  # released on the way out


def test_resume_refuses_settings_typed_with_it_before_any_work(folder, tmp_path, capsys):
    state = tmp_path / "nowhere" / "last.pth"  # not even read: the options fail first
    code = cli.main(["train", str(folder), "--save_dir", str(tmp_path), "--resume", str(state),
                     "--epochs", "3", "--arch", "resnet50"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1
    assert "--arch, --epochs cannot change them" in err and "without --resume" in err


def _read_only(*folders: Path) -> str:
    """A shell prefix that mounts the folders read-only in a private mount namespace."""
    return " && ".join(f"mount --bind {f} {f} && mount -o remount,bind,ro {f}" for f in folders)


def _run_read_only(command: list[str], *folders: Path, env: dict) -> subprocess.CompletedProcess:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("read-only mounts need root and unshare (CI runs as root)")
    script = _read_only(*folders) + " && exec " + " ".join(map(str, command))
    return subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_read_only_places_are_one_line_and_prediction_still_answers(folder, tmp_path):
    ckpt_dir, cache = tmp_path / "ck", tmp_path / "cache"
    ckpt_dir.mkdir(), cache.mkdir()
    path = inference.save_model(_model(["a", "b", "c"], 4), ckpt_dir / "checkpoint.pth")
    expected = open_engine(path).predict(folder / "test" / "c" / "img_2.jpg").classes
    engine_path(path).unlink()  # stale: it must be made again, where nothing can be written
    env = os.environ | {"FLOWERS_CACHE": str(cache)}
    image = folder / "test" / "c" / "img_2.jpg"
    done = _run_read_only([sys.executable, "predict.py", image, path, "--json"], ckpt_dir, cache,
                          env=env)
    assert done.returncode == 0, done.stderr
    assert [p["class"] for p in json.loads(done.stdout)["predictions"]] == expected
    assert "Traceback" not in done.stderr and "held in memory" in done.stderr
    assert not engine_path(path).exists()

    trained = _run_read_only([sys.executable, "train.py", folder, "--save_dir", tmp_path / "o",
                              "--epochs", "1", "--arch", "test_efficientnet"], cache, env=env)
    err = trained.stderr.strip().splitlines()
    assert trained.returncode == 1 and "Traceback" not in trained.stderr
    assert err[-1].startswith(f"error: {cache}") and "set FLOWERS_CACHE to a writable" in err[-1]

    a_file = tmp_path / "not_a_folder"
    a_file.write_text("x")
    listed = subprocess.run([sys.executable, "-m", "helpers", "cache"], cwd=ROOT, text=True,
                            capture_output=True, env=os.environ | {"FLOWERS_CACHE": str(a_file)})
    assert listed.returncode == 1
    assert listed.stderr.strip() == (f"error: {a_file}: the cache folder is a file; set "
                                     "FLOWERS_CACHE to a folder")


@pytest.mark.slow
def test_a_stopped_final_model_says_how_to_train_it_again(folder, tmp_path, monkeypatch,
                                                          capsys):
    from helpers.train import recipes

    real = recipes.run_recipe
    runs = []

    def stop_the_final(*args, **kwargs):
        runs.append(kwargs["identity"].get("final", False))
        if runs[-1]:
            raise Stopped("stopped by SIGINT during fine-tune 1/1")
        return real(*args, **kwargs)

    monkeypatch.setattr(recipes, "run_recipe", stop_the_final)
    out = tmp_path / "out"
    args = [str(folder), "--save_dir", str(out), "--epochs", "1", "--arch", "test_efficientnet",
            "--batch_size", "6"]
    assert cli.main(["train", *args, "--final"]) == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]
    again = f"--save_dir {out} --resume {out / 'last.pth'} --final"
    assert f"the first run is saved in {out / 'last.pth'}; train the final model again with: " \
        "python train.py" in err
    assert err.endswith(again) and "nothing to resume" not in err
    monkeypatch.setattr(recipes, "run_recipe", real)
    assert cli.main(["train", str(folder), *again.split()]) == 0
    saved = torch.load(out / "checkpoint.pth", weights_only=True)
    assert saved["metrics"]["final"]["trained_on"] == "train+valid"


def test_calibration_needs_enough_held_out_images():
    clf = _model(["a", "b"], 5)
    logits = np.array([[3.0, 0.0], [0.0, 2.0], [4.0, 1.0], [0.5, 3.0], [2.0, 0.0]])
    labels = np.array([0, 1, 0, 1, 0])  # all right: the NLL falls without end as T -> 0
    with pytest.warns(calibration.CalibrationWarning, match="only 5 validation image"):
        facts = calibration.calibrate(clf, logits, labels)
    assert (clf.temperature, clf.unsure_below) == (1.0, 0.0) and facts["fitted_on"] is None
    rng = np.random.default_rng(0)
    many = rng.normal(0, 1, (60, 2)) + np.eye(2)[np.arange(60) % 2] * 3
    facts = calibration.calibrate(clf, many, np.arange(60) % 2)
    assert facts["fitted_on"] == "valid" and clf.temperature != 1.0


def test_the_lock_is_taken_before_the_data_is_read(folder, tmp_path, monkeypatch):
    """The lock is the first thing a run takes after its options: a refused run reads no data."""
    seen = []
    real_set_up = run_module.set_up

    def set_up(*args, **kwargs):
        seen.append(("set_up", (tmp_path / "out" / ".lock").exists()))
        return real_set_up(*args, **kwargs)

    monkeypatch.setattr(run_module, "set_up", set_up)
    monkeypatch.setattr(run_module, "_run", lambda *a, **k: seen.append(
        ("train", (tmp_path / "out" / ".lock").exists())))
    monkeypatch.setattr(training, "print_figures", lambda done: None)
    assert cli.main(["train", str(folder), "--save_dir", str(tmp_path / "out")]) == 0
    assert seen == [("set_up", True), ("train", True)]
    assert not (tmp_path / "out" / ".lock").exists()


def test_a_lock_that_is_a_link_is_refused_and_its_target_untouched(folder, tmp_path):
    """A neighbour plants SAVE_DIR/.lock -> a file of ours: the run refuses in one line and
    the file keeps its bytes (the lock was opened with O_NOFOLLOW)."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / ".lock").symlink_to(victim)
    done = subprocess.run([sys.executable, "train.py", str(folder), "--save_dir", str(out),
                           "--arch", "test_efficientnet", "--epochs", "1"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"error: {out / '.lock'} is a symbolic link, not a lock this project made; remove it, "
        "or choose another folder (--save_dir)"]
    assert victim.read_text() == "precious\n" and not (out / "checkpoint.pth").exists()


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_saved_files_get_the_mode_open_would_give(tmp_path, umask):
    """Atomic writes end as 0666 less the umask (not mkstemp's 0600); a replaced file keeps
    its own mode."""
    from helpers.core.files import atomic_write_bytes

    old = os.umask(umask)
    try:
        path = atomic_write_bytes(b"x", tmp_path / "new.bin")
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
        kept = tmp_path / "kept.bin"
        kept.write_bytes(b"old")
        kept.chmod(0o640)
        atomic_write_bytes(b"new", kept)
        assert stat.S_IMODE(kept.stat().st_mode) == 0o640 and kept.read_bytes() == b"new"
    finally:
        os.umask(old)


@pytest.mark.slow
def test_a_trained_run_saves_readable_files_under_umask_022(folder, tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(["sh", "-c", f"umask 022 && {sys.executable} train.py {folder} "
                           f"--save_dir {out} --arch test_efficientnet --epochs 1 "
                           "--batch_size 6"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    for name in ("checkpoint.pth", "checkpoint.engine.onnx", "last.pth"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644, name

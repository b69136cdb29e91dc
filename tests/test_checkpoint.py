"""Checkpoints: a plain dict, safe loading, identical logits after the round trip, atomic writes."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from conftest import write_checkpoint
from helpers.config import TrainConfig
from helpers.core.errors import CheckpointError
from helpers.model import checkpoint
from helpers.model.classifier import Classifier, build_model

CLASSES = {str(c): i for i, c in enumerate(sorted(str(k) for k in range(1, 13)))}


@pytest.fixture(scope="module")
def trained() -> Classifier:
    torch.manual_seed(0)
    clf = build_model("efficientnet_lite0", CLASSES, [f"f{c}" for c in CLASSES],
                            hidden_units=32)
    with torch.no_grad():
        for p in clf.head.parameters():
            p.add_(torch.randn_like(p))  # differ from any fresh initialisation
    return clf.eval()


def test_round_trip_gives_identical_logits(trained, tmp_path):
    path = write_checkpoint(trained, tmp_path / "c.pth",
                                      config=TrainConfig(hidden_units=32),
                                      metrics={"test": {"top1": 0.5}})
    loaded, ckpt = checkpoint.load_checkpoint(path)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert torch.equal(trained(x), loaded(x))
    assert loaded.class_to_idx == trained.class_to_idx
    assert loaded.class_names == trained.class_names and loaded.idx_to_class[1] == "10"
    assert ckpt["config"]["hidden_units"] == 32 and ckpt["metrics"]["test"]["top1"] == 0.5


def test_checkpoint_is_a_plain_dict_loadable_with_weights_only(trained, tmp_path):
    path = write_checkpoint(trained, tmp_path / "c.pth")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert ckpt["format_version"] == checkpoint.FORMAT_VERSION
    assert ckpt["arch"] == "efficientnet_lite0" and ckpt["input_size"] == 224
    assert ckpt["mean"] == [0.5] * 3 and ckpt["head"]["hidden_units"] == 32
    assert set(ckpt["versions"]) >= {"torch", "torchvision", "timm"}
    assert all(isinstance(v, torch.Tensor) for v in ckpt["state_dict"].values())


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_code_payload_is_refused_and_never_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"format_version": 1, "x": _Payload()}, f)
    torch.save({"format_version": 1, "x": _Payload()}, tmp_path / "evil2.pth")
    for p in (path, tmp_path / "evil2.pth"):
        with pytest.raises(CheckpointError, match="refused"):
            checkpoint.load_checkpoint(p)
    assert not (tmp_path / "PWNED").exists()


def test_bad_files_are_clear_errors(trained, tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        checkpoint.load_checkpoint(tmp_path / "absent.pth")
    (tmp_path / "text.pth").write_text("hello")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        checkpoint.load_checkpoint(tmp_path / "text.pth")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="missing format_version"):
        checkpoint.load_checkpoint(tmp_path / "other.pth")
    good = write_checkpoint(trained, tmp_path / "good.pth")
    data = good.read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        checkpoint.load_checkpoint(tmp_path / "cut.pth")
    ckpt = checkpoint.checkpoint_dict(trained)
    torch.save(ckpt | {"format_version": 99}, tmp_path / "new.pth")
    with pytest.raises(CheckpointError, match="newer"):
        checkpoint.load_checkpoint(tmp_path / "new.pth")
    torch.save(ckpt | {"arch": "alexnet"}, tmp_path / "arch.pth")
    with pytest.raises(CheckpointError, match="unknown architecture 'alexnet'"):
        checkpoint.load_checkpoint(tmp_path / "arch.pth")
    torch.save(ckpt | {"class_to_idx": {"1": 0}, "class_names": ["one"],
                       "head": ckpt["head"] | {"num_classes": 1}}, tmp_path / "n.pth")
    with pytest.raises(CheckpointError, match="do not fit"):
        checkpoint.load_checkpoint(tmp_path / "n.pth")


@pytest.mark.parametrize(("change", "field"), [
    ({"class_to_idx": {"1": 0}}, "class_names"),  # names for 12 classes, a mapping of one
    ({"class_names": ["only", "two"]}, "class_names"),
    ({"class_names": "pink primrose"}, "class_names"),
    ({"class_to_idx": {"1": 0, "2": 5}}, "class_to_idx"),
    ({"class_to_idx": ["1", "2"]}, "class_to_idx"),
    ({"temperature": 0.0}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"unsure_below": 3.0}, "unsure_below"),
    ({"arch": 5}, "arch"),
    ({"head": {"hidden_units": "many"}}, "head"),
    ({"state_dict": [1, 2]}, "state_dict"),
    ({"format_version": "one"}, "format_version"),
])
def test_edited_checkpoints_name_the_file_and_the_field(trained, tmp_path, change, field):
    path = tmp_path / "edited.pth"
    torch.save(checkpoint.checkpoint_dict(trained) | change, path)
    with pytest.raises(CheckpointError, match=f"edited.pth: field {field} "):
        checkpoint.load_checkpoint(path)


def test_resume_refuses_a_state_of_another_run(tmp_path):
    state = {"kind": "resume", "identity": {"class_to_idx": {"a": 0, "b": 1},
                                            "data_digest": "abc", "run_id": "r1"}}
    torch.save(state, tmp_path / "last.pth")
    assert checkpoint.read_resume(tmp_path / "last.pth",
                                  identity={"class_to_idx": {"a": 0, "b": 1},
                                            "data_digest": "abc"})["kind"] == "resume"
    with pytest.raises(CheckpointError, match="belongs to another run .*data digest"):
        checkpoint.read_resume(tmp_path / "last.pth", identity={"data_digest": "xyz"})
    assert checkpoint.resume_belongs(tmp_path / "last.pth", "r1")
    assert not checkpoint.resume_belongs(tmp_path / "last.pth", "r2")
    assert not checkpoint.resume_belongs(tmp_path / "absent.pth", "r1")


def test_failed_save_keeps_the_previous_file(trained, tmp_path, monkeypatch):
    path = write_checkpoint(trained, tmp_path / "c.pth")
    before = path.read_bytes()

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        write_checkpoint(trained, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.pth"]  # no temporary file left


def test_safetensors_format_round_trip(trained, tmp_path):
    path = write_checkpoint(trained, tmp_path / "c.safetensors",
                                      config=TrainConfig(hidden_units=32),
                                      metrics={"test": {"top1": 0.5}})
    assert path.read_bytes()[8:9] == b"{"  # a safetensors header, not a pickle
    loaded, ckpt = checkpoint.load_checkpoint(path)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert torch.equal(trained(x), loaded(x))
    assert loaded.class_names == trained.class_names and ckpt["metrics"]["test"]["top1"] == 0.5
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        checkpoint.load_checkpoint(tmp_path / "bad.safetensors")

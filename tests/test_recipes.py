"""The fast recipe: backbone split, seeded views, the activation cache, and all three recipes."""

from __future__ import annotations

import os

import pytest
import torch

from helpers import backbones, data, features, model, recipes, train

LITE0 = backbones.get_backbone("efficientnet_lite0")


@pytest.fixture(scope="module")
def backbone() -> torch.nn.Module:
    return LITE0.build(True).eval()


@pytest.mark.parametrize("tail_stages", [-1, 0, 1, 2, 3])
def test_trunk_then_tail_is_the_backbone(backbone, tail_stages):
    trunk, tail = features.split_backbone(backbone, tail_stages)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert torch.allclose(tail(trunk(x)), backbone(x), atol=1e-5)
    shared = {id(p) for p in backbone.parameters()}
    assert all(id(p) in shared for p in tail.parameters())


def test_torchvision_backbones_only_cache_pooled_features():
    resnet = backbones.get_backbone("resnet50").build(False)
    assert isinstance(features.split_backbone(resnet, -1)[1], torch.nn.Identity)
    with pytest.raises(ValueError, match="pooled features"):
        features.split_backbone(resnet, 1)


def test_seeded_views_repeat_and_differ_by_seed(tiny_folder):
    ds = data.image_folder(tiny_folder / "train")
    a = features.SeededView(ds, features.view_transform(LITE0, "aug1"), seed=1)
    b = features.SeededView(ds, features.view_transform(LITE0, "aug1"), seed=2)
    assert torch.equal(a[5][0], a[5][0]) and not torch.equal(a[5][0], b[5][0])
    centre = features.SeededView(ds, features.view_transform(LITE0, "flip"), seed=0)[0][0]
    plain = data.eval_transform(LITE0)(ds.loader(ds.samples[0][0]))
    assert torch.allclose(centre, plain.flip(2))


def test_onnx_runner_matches_torch_fp32(backbone):
    pytest.importorskip("onnxruntime")
    trunk, _ = features.split_backbone(backbone, 1)
    x = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        expected = trunk(x)
    got = features.onnx_runner(trunk, 224)(x)
    assert got.shape == expected.shape == (3, 192, 7, 7)
    assert (got - expected).abs().max().item() < 1e-3
    assert list((data.cache_dir() / "onnx").glob("trunk-*.onnx"))  # exported into the cache


def test_activation_cache_hits_and_rebuilds_when_a_file_changes(backbone, tiny_folder,
                                                                monkeypatch):
    calls = []
    real_extract = features.extract
    monkeypatch.setattr(features, "extract",
                        lambda *a, **k: calls.append(1) or real_extract(*a, **k))
    ds = data.image_folder(tiny_folder / "valid", data.eval_transform(LITE0))
    cache = features.ActivationCache(LITE0, backbone, 1, torch.device("cpu"), engine="torch",
                                     progress=False)
    first = cache.get(ds, "centre")
    assert first.shape == (36, 192, 7, 7) and first.dtype == torch.float16
    assert torch.equal(cache.get(ds, "centre"), first) and len(calls) == 1
    assert features.cache_size() > 0
    assert str(data.cache_dir()) in str(next((data.cache_dir() / "activations").iterdir()))
    path = ds.samples[0][0]
    os.utime(path, ns=(1, 1))  # the same bytes, another mtime: the cache must not be trusted
    cache.get(ds, "centre")
    assert len(calls) == 2
    assert features.clear_cache() > 0 and features.cache_size() == 0


def _setup(folder, **changes):
    config = train.TrainConfig(**({"batch_size": 12, "epochs": 2, "probe_epochs": 3, "views": 1}
                                  | changes))
    sets = data.load_datasets(folder, LITE0)
    train.seed_everything(config.seed)
    clf = model.build_model(config.arch, sets["train"].class_to_idx, dropout=0.0)
    return config, sets, clf


def test_cached_recipe_probes_fine_tunes_and_matches_the_whole_model(tiny_folder):
    config, sets, clf = _setup(tiny_folder, recipe="cached", tta=True)
    history = recipes.run_recipe(clf, sets, config, torch.device("cpu"), progress=False, log=None)
    assert [r["epoch"] for r in history] == [0, 1, 2]  # the probe, then two epochs
    assert all(r["seconds"] > 0 for r in history)
    # Without the probe the best epoch is a fine-tuned one: the tail moved, the trunk did not.
    config, sets, clf = _setup(tiny_folder, recipe="cached", tta=True, probe_epochs=0)
    tail_before = clf.backbone.conv_head.weight.clone()
    stem_before = clf.backbone.conv_stem.weight.clone()
    history = recipes.run_recipe(clf, sets, config, torch.device("cpu"), progress=False, log=None)
    assert [r["epoch"] for r in history] == [1, 2]
    assert not torch.equal(clf.backbone.conv_head.weight, tail_before)
    assert torch.equal(clf.backbone.conv_stem.weight, stem_before)
    counts = model.count_parameters(clf)
    tail = sum(p.numel() for p in clf.backbone.blocks[6].parameters())
    assert counts["trainable"] > tail
    cached = recipes.evaluate_split(clf, sets["valid"], config, torch.device("cpu"))
    images = recipes.evaluate_split(clf, sets["valid"], train.TrainConfig(
        recipe="course", tta=True, fast=False), torch.device("cpu"))
    assert cached["n"] == images["n"] == 36
    assert abs(cached["top1"] - images["top1"]) <= 2 / 36  # fp16 cache vs fp32 images
    assert cached["loss"] == pytest.approx(images["loss"], rel=0.1, abs=0.05)


def test_full_recipe_fine_tunes_every_layer_on_cpu(tiny_folder):
    config, sets, clf = _setup(tiny_folder, recipe="full", epochs=1, batch_size=18)
    stem_before = clf.backbone.conv_stem.weight.clone()
    history = recipes.run_recipe(clf, sets, config, torch.device("cpu"), progress=False, log=None)
    assert len(history) == 1
    assert not torch.equal(clf.backbone.conv_stem.weight, stem_before)
    assert model.count_parameters(clf)["frozen"] == 0


def test_course_recipe_and_auto_choice(tiny_folder):
    config = train.TrainConfig.course(epochs=1, batch_size=12, hidden_units=16)
    assert config.recipe == "course" and config.learning_rate == 1e-3 and not config.fast
    _, sets, _ = _setup(tiny_folder)
    clf = model.build_model(config.arch, sets["train"].class_to_idx, hidden_units=16)
    history = recipes.run_recipe(clf, sets, config, torch.device("cpu"), progress=False, log=None)
    assert len(history) == 1 and model.count_parameters(clf)["trainable"] < 30_000
    auto = train.TrainConfig()
    assert recipes.resolve_recipe(auto, torch.device("cpu")) == "cached"
    assert recipes.resolve_recipe(auto, torch.device("cuda")) == "full"
    with pytest.raises(ValueError, match="unknown recipe"):
        recipes.run_recipe(clf, sets, train.TrainConfig(recipe="magic"), torch.device("cpu"))

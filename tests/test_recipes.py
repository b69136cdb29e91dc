"""The recipes through the one loop: backbone split, seeded views, the activation cache (and
its damage checks), and each recipe's plan training a tiny model."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from helpers.config import TUNED, TrainConfig, for_data, recipe_for
from helpers.core.device import autocast_dtype, cpu_flags, cpu_has_bf16
from helpers.core.files import cache_dir
from helpers.data import splits
from helpers.data.folders import image_folder, make_loaders
from helpers.data.transforms import eval_transform
from helpers.model import backbones
from helpers.model.classifier import new_model
from helpers.train import batches as batches_mod
from helpers.train import cache, cached_recipe, evaluate, recipes, trunk

LITE0 = backbones.get_backbone("efficientnet_lite0").preprocess
TINY = backbones.get_backbone("test_efficientnet")
features = cache  # the activation cache module


@pytest.fixture(scope="module")
def backbone() -> torch.nn.Module:
    torch.manual_seed(0)
    return TINY.build(False).eval()


@pytest.mark.parametrize("tail_stages", [-1, 0, 1, 2])
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
    ds = image_folder(tiny_folder / "train")
    a = features.SeededView(ds, features.view_transform(LITE0, "aug1"), seed=1)
    b = features.SeededView(ds, features.view_transform(LITE0, "aug1"), seed=2)
    assert torch.equal(a[5][0], a[5][0]) and not torch.equal(a[5][0], b[5][0])
    centre = features.SeededView(ds, features.view_transform(LITE0, "flip"), seed=0)[0][0]
    plain = eval_transform(LITE0)(ds.loader(ds.samples[0][0]))
    assert torch.allclose(centre, plain.flip(2))


@pytest.mark.parametrize("name", ["onnxruntime", "openvino"])
def test_runtimes_match_torch_fp32_within_the_tolerance(backbone, name):
    pytest.importorskip(name)
    trunk_, _ = features.split_backbone(backbone, 1)
    x = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        expected = trunk_(x)
    run = trunk.make_runner(name, trunk_, digest="d" * 64, input_size=224,
                            device=torch.device("cpu"))
    got = run(x)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=trunk.TOLERANCE, rtol=trunk.TOLERANCE)
    assert list((cache_dir() / "onnx").glob("trunk-*-224.onnx"))  # in the cache


def test_trunk_runtime_is_measured_once_and_remembered(backbone, monkeypatch):
    trunk_, _ = features.split_backbone(backbone, 1)
    measured = []
    real = trunk.measure_runtimes
    monkeypatch.setattr(trunk, "measure_runtimes",
                        lambda *a, **k: measured.append(1) or real(*a, **k))
    lines = []
    first = trunk.trunk_runtime(trunk_, digest="d" * 64, input_size=64, log=lines.append)
    saved = json.loads((cache_dir() / "trunk_runtime.json").read_text())
    assert first == saved["runtime"] and len(measured) == 1
    assert saved["facts"]["flags"] == cpu_flags()
    # the fastest of those that agree with PyTorch fp32 was chosen, and the log says which
    agreeing = {k: m for k, m in saved["measured"].items() if m["agrees"]}
    assert first == max(agreeing, key=lambda k: agreeing[k]["images_per_s"])
    assert lines and lines[0].startswith(f"trunk runtime: {first} ")
    assert trunk.trunk_runtime(trunk_, digest="d" * 64, input_size=64, log=lines.append) == first
    assert len(measured) == 1 and len(lines) == 1  # read back, not measured again
    saved["facts"]["flags"] = "avx2 fma"  # another CPU kind: measured again
    (cache_dir() / "trunk_runtime.json").write_text(json.dumps(saved))
    trunk.trunk_runtime(trunk_, digest="d" * 64, input_size=64, log=None)
    assert len(measured) == 2


def test_a_runtime_that_disagrees_is_never_chosen(backbone, monkeypatch):
    trunk_, _ = features.split_backbone(backbone, 1)
    fake = {"openvino": {"images_per_s": 900.0, "max_diff": 0.3, "agrees": False},
            "onnxruntime": {"images_per_s": 100.0, "max_diff": 1e-6, "agrees": True},
            "torch": {"images_per_s": 50.0, "max_diff": 0.0, "agrees": True}}
    monkeypatch.setattr(trunk, "measure_runtimes", lambda *a, **k: fake)
    assert trunk.trunk_runtime(trunk_, digest="e" * 64, input_size=64, log=None) == "onnxruntime"


def test_onednn_isa_ceiling_turns_bf16_off(monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert not cpu_has_bf16()
    assert autocast_dtype(torch.device("cpu")) is None


@pytest.fixture
def extractions(monkeypatch) -> list[int]:
    """One entry for each set of activations extracted (not found in the cache)."""
    calls: list[int] = []
    real_extract = features.extract
    monkeypatch.setattr(features, "extract",
                        lambda *a, **k: calls.append(1) or real_extract(*a, **k))
    return calls


def test_activation_cache_hits_and_rebuilds_when_a_file_changes(backbone, tiny_folder,
                                                                extractions):
    calls = extractions
    ds = image_folder(tiny_folder / "valid", eval_transform(LITE0))
    acts = features.ActivationCache(TINY, backbone, tail_stages=1, device=torch.device("cpu"),
                                    engine="torch")
    first = acts.get(ds, "centre")
    assert first.shape[0] == 36 and first.dtype == torch.float16
    assert torch.equal(acts.get(ds, "centre"), first) and len(calls) == 1
    assert features.cache_size() > 0
    stored = next((cache_dir() / "activations").glob("*.pt"))
    assert stored.with_name(stored.name + ".sha256").is_file()  # its digest beside it
    path = ds.samples[0][0]
    os.utime(path, ns=(1, 1))  # the same bytes, another mtime: the cache must not be trusted
    acts.get(ds, "centre")
    assert len(calls) == 2
    # Damage that still loads: one byte changed inside the tensor data is found and rebuilt.
    stored = max((cache_dir() / "activations").glob("*.pt"), key=os.path.getmtime)
    raw = bytearray(stored.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    stored.write_bytes(bytes(raw))
    assert torch.equal(acts.get(ds, "centre"), first) and len(calls) == 3
    assert features.clear_cache() > 0 and features.cache_size() == 0


def test_joined_set_reuses_its_parts_views(backbone, tiny_folder, extractions):
    """A final model's train+valid set extracts nothing its parts already have in the cache."""
    calls = extractions
    sets = splits.load_data(tiny_folder, LITE0).sets
    acts = features.ActivationCache(TINY, backbone, tail_stages=1, device=torch.device("cpu"),
                                    engine="torch")
    train = acts.get(sets["train"], "aug1", seed=7)
    merged = recipes.all_labelled(sets)["train"]
    assert merged.samples == sets["train"].samples + sets["valid"].samples
    both = acts.get(merged, "aug1", seed=7)
    assert len(calls) == 2  # train's view came from the cache; valid's was extracted once
    assert torch.equal(both[:len(train)], train) and len(both) == len(merged)
    assert torch.equal(both[len(train):], acts.get(sets["valid"], "aug1", seed=7))
    assert len(calls) == 2 and both.is_contiguous(memory_format=torch.channels_last)
    assert merged.subset(merged.samples[:3]).parts == ()  # a subset is a plain set again


def test_a_fixed_set_is_served_from_the_cached_set_it_came_from(backbone, tiny_folder,
                                                                extractions):
    """Photos left out and relabelled (a fixes file): every view, augmented ones included,
    comes from the set extracted before, row for row; nothing is extracted again."""
    calls = extractions
    sets = splits.load_data(tiny_folder, LITE0).sets
    acts = features.ActivationCache(TINY, backbone, tail_stages=1, device=torch.device("cpu"),
                                    engine="torch")
    whole = {view: acts.get(sets["train"], view, seed=3) for view in ("centre", "aug1")}
    kept = [i for i in range(len(sets["train"])) if i % 4]  # a quarter left out
    samples = [(sets["train"].samples[i][0], (sets["train"].samples[i][1] + 1) % 12)
               for i in kept]  # and every label changed
    fixed = sets["train"].subset(samples)
    for view, rows in whole.items():
        assert torch.equal(acts.get(fixed, view, seed=3), rows[kept])
    assert len(calls) == 2  # the two views of the whole set, once each
    other_seed = acts.get(fixed, "aug1", seed=4)  # another seed is another family: extracted
    assert len(calls) == 3 and not torch.equal(other_seed, whole["aug1"][kept])


def test_truncated_onnx_trunk_is_rebuilt_and_cleared(backbone):
    pytest.importorskip("onnxruntime")
    trunk_, _ = features.split_backbone(backbone, 1)

    def runner():
        return trunk.make_runner("onnxruntime", trunk_, digest="f" * 64, input_size=64,
                                 device=torch.device("cpu"))

    runner()
    path = next((cache_dir() / "onnx").glob("trunk-*.onnx"))
    path.write_bytes(path.read_bytes()[:1000])  # a truncated file, as a full disk leaves
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = trunk_(x)
    assert (runner()(x) - expected).abs().max() < trunk.TOLERANCE
    assert features.clear_cache() > 0
    assert not list((cache_dir() / "onnx").glob("*"))


def _setup(folder, **changes):
    config = TrainConfig(**({"arch": "test_efficientnet", "batch_size": 12, "epochs": 2,
                             "probe_epochs": 3, "views": 1} | changes))
    sets = splits.load_data(folder, TINY.preprocess).sets
    return config, sets, new_model(sets, config)


def test_cached_recipe_probes_fine_tunes_and_calibrates(tiny_folder):
    config, sets, clf = _setup(tiny_folder, recipe="cached", tta=True)
    trained = recipes.run_recipe(clf, sets, config, torch.device("cpu"), log=None)
    assert [(r["phase"], r["epoch"]) for r in trained.history] == [
        ("linear probe", 1), ("fine-tune", 2), ("fine-tune", 3)]
    assert all(r["seconds"] > 0 for r in trained.history)
    assert trained.calibration["fitted_on"] == "valid"
    assert clf.temperature == trained.calibration["temperature"] > 0
    assert {"extract", "linear probe", "fine-tune", "calibrate"} <= set(trained.timings)
    # Without the probe the best epoch is a fine-tuned one: the tail moved, the trunk did not.
    config, sets, clf = _setup(tiny_folder, recipe="cached", probe_epochs=0)
    tail_before = clf.backbone.conv_head.weight.clone()
    stem_before = clf.backbone.conv_stem.weight.clone()
    trained = recipes.run_recipe(clf, sets, config, torch.device("cpu"), log=None)
    assert [r["phase"] for r in trained.history] == ["fine-tune", "fine-tune"]
    assert not torch.equal(clf.backbone.conv_head.weight, tail_before)
    assert torch.equal(clf.backbone.conv_stem.weight, stem_before)
    tail = sum(p.numel() for p in clf.backbone.blocks[-1].parameters())
    assert sum(p.numel() for p in clf.parameters() if p.requires_grad) > tail


def test_cached_validation_agrees_with_the_whole_model(tiny_folder):
    config, sets, clf = _setup(tiny_folder, recipe="cached")
    plan, acts = cached_recipe.cached_plan(clf, sets, config, torch.device("cpu"))
    cached = plan.validate()
    loader = make_loaders({"valid": sets["valid"]}, batch_size=12, num_workers=0)["valid"]
    from helpers.train import loop

    whole = evaluate.topk_accuracy(*loop.predict_probs(clf, loader, torch.device("cpu"),
                                                         mixed_precision=False))
    assert cached["n"] == whole["n"] == 36
    assert abs(cached["top1"] - whole["top1"]) <= 2 / 36  # fp16 cache vs fp32 images
    assert cached["loss"] == pytest.approx(whole["loss"], rel=0.1, abs=0.05)


def test_full_recipe_fine_tunes_every_layer_on_cpu(tiny_folder):
    config, sets, clf = _setup(tiny_folder, recipe="full", epochs=1, batch_size=18)
    stem_before = clf.backbone.conv_stem.weight.clone()
    trained = recipes.run_recipe(clf, sets, config, torch.device("cpu"), log=None)
    assert len(trained.history) == 1
    assert not torch.equal(clf.backbone.conv_stem.weight, stem_before)
    assert all(p.requires_grad for p in clf.parameters())


def test_course_recipe_and_auto_choice(tiny_folder):
    config = TrainConfig.course(arch="test_efficientnet", epochs=1, batch_size=12,
                                hidden_units=16)
    assert config.recipe == "course" and config.learning_rate == 1e-3 and not config.fast
    _, sets, _ = _setup(tiny_folder)
    clf = new_model(sets, config)
    trained = recipes.run_recipe(clf, sets, config, torch.device("cpu"), log=None)
    assert len(trained.history) == 1
    assert sum(p.numel() for p in clf.parameters() if p.requires_grad) < 30_000
    auto = TrainConfig()
    assert recipe_for(auto.recipe, "cpu") == "cached"
    assert recipe_for(auto.recipe, "cuda") == "full"
    with pytest.raises(ValueError, match="unknown recipe"):
        recipes.run_recipe(clf, sets, TrainConfig(recipe="magic"), torch.device("cpu"))


def test_final_config_takes_the_kept_epoch():
    history = [{"phase": "linear probe", "phase_epoch": 1, "kept": False},
               {"phase": "fine-tune", "phase_epoch": 1, "kept": False},
               {"phase": "fine-tune", "phase_epoch": 2, "kept": True},
               {"phase": "fine-tune", "phase_epoch": 3, "kept": False}]
    assert recipes.final_config(TrainConfig(epochs=3), history).epochs == 2
    history[0]["kept"], history[2]["kept"] = True, False
    assert recipes.final_config(TrainConfig(epochs=3), history).epochs == 0


def test_settings_follow_the_images_a_class_and_typed_options_win():
    """Few images a class: more views and epochs for the cached recipe; nothing else moves."""
    (few, few_views, few_epochs), (many, many_views, many_epochs) = TUNED
    assert (many_views, many_epochs) == (TrainConfig().views, TrainConfig().epochs)
    assert few < many and few_views > many_views and few_epochs > many_epochs

    def settings(per_class: float, config: TrainConfig | None = None, **kwargs):
        config = config or TrainConfig()
        adapted = for_data(config, images_per_class=per_class, device_type="cpu", **kwargs)
        assert dataclasses.replace(adapted, views=0, epochs=0) == \
            dataclasses.replace(config, views=0, epochs=0)  # only these two move
        return adapted.views, adapted.epochs

    assert settings(2) == settings(few) == (few_views, few_epochs)
    assert settings(many) == settings(10 * many) == (many_views, many_epochs)
    middle = [settings(n) for n in range(few, many + 1)]  # from one tuned point to the other
    assert middle == sorted(middle, reverse=True) and len(set(middle)) >= 3
    assert settings(few, TrainConfig(views=1, epochs=2), keep={"views", "epochs"}) == (1, 2)
    assert settings(few, TrainConfig(epochs=2), keep={"epochs"}) == (few_views, 2)
    for other in (TrainConfig.course(), TrainConfig.full()):
        assert for_data(other, images_per_class=5, device_type="cpu") == other
    gpu = TrainConfig()  # auto is the full recipe on a GPU: views mean nothing there
    assert for_data(gpu, images_per_class=5, device_type="cuda") == gpu


def test_view_batches_show_every_image_once_an_epoch_in_a_seeded_view():
    n, count = 10, 3
    # row v*n + i holds the number 100*v + i: view v of image i
    views = torch.tensor([100 * v + i for v in range(count) for i in range(n)], dtype=torch.float32)
    views = views[:, None, None, None].expand(-1, 2, 2, 2).contiguous()
    labels = torch.arange(n) * 7
    batches = batches_mod.ViewBatches(views, labels, batch_size=4)
    assert len(batches) == 3

    def epoch(seed):
        batches.generator.manual_seed(seed)
        return [(x.clone(), y.clone()) for x, y in batches]

    first = epoch(1)
    assert [len(y) for _, y in first] == [4, 4, 2]
    assert all(x.shape[1:] == (2, 2, 2) for x, _ in first)
    codes = torch.cat([x[:, 0, 0, 0] for x, _ in first]).long()
    image, view = codes % 100, codes // 100
    assert sorted(image.tolist()) == list(range(n))  # every image once
    assert torch.equal(torch.cat([y for _, y in first]), image * 7)  # with its own label
    again = epoch(1)  # reseeded as a resumed run's epoch is: the very same batches
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
               for a, b in zip(first, again, strict=True))
    seen = {int(v) for s in range(2, 8) for x, _ in epoch(s) for v in x[:, 0, 0, 0] // 100}
    assert seen == set(range(count)) and not torch.equal(view, torch.cat(
        [x[:, 0, 0, 0] for x, _ in epoch(2)]).long() // 100)
    with pytest.raises(ValueError, match="whole views"):
        batches_mod.ViewBatches(views[:-1], labels, batch_size=4)


@pytest.mark.parametrize("freeze_bn", [True, False])
def test_frozen_batch_norm_keeps_its_statistics_and_trains_its_scale(tiny_folder, freeze_bn):
    config, sets, clf = _setup(tiny_folder, recipe="cached", probe_epochs=0,
                               freeze_bn=freeze_bn)
    bn = clf.backbone.bn2
    mean, weight = bn.running_mean.clone(), bn.weight.clone()
    recipes.run_recipe(clf, sets, config, torch.device("cpu"), log=None)
    assert torch.equal(bn.running_mean, mean) == freeze_bn
    assert not torch.equal(bn.weight, weight)  # its scale trains either way

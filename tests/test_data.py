"""Data: locations, transforms, label mapping, names and summaries."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.core.errors import DataError
from helpers.core.files import cache_dir
from helpers.data import splits
from helpers.data.folders import (
    PROJECT_ROOT,
    data_dir,
    image_folder,
    images_per_class,
    make_loaders,
    summarize,
)
from helpers.data.names import class_names, load_category_names
from helpers.data.transforms import eval_transform
from helpers.model.backbones import get_backbone
from helpers.serve.prediction import process_image

LITE0 = get_backbone("efficientnet_lite0").preprocess


def test_data_and_cache_dirs_follow_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("FLOWERS_DIR", raising=False)
    assert data_dir() == PROJECT_ROOT / "flowers"
    monkeypatch.setenv("FLOWERS_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("FLOWERS_CACHE", str(tmp_path / "c"))
    assert data_dir() == tmp_path / "d"
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("FLOWERS_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "flower-classifier"


def test_label_mapping_sorts_folders_as_strings(tiny_folder):
    sets = splits.load_data(tiny_folder, LITE0).sets
    mapping = sets["train"].class_to_idx
    assert list(mapping) == ["1", "10", "11", "12", "2", "3", "4", "5", "6", "7", "8", "9"]
    assert mapping["10"] == 1 and mapping["2"] == 4
    names = class_names(mapping, {str(i): f"flower {i}" for i in range(1, 13)})
    assert names[1] == "flower 10" and names[4] == "flower 2"
    # Every sample's label is the index of its own folder.
    for path, label in sets["valid"].samples:
        assert sets["valid"].classes[label] == path.split("/")[-2]


def test_folder_names_are_names_without_a_names_file(tiny_folder):
    mapping = image_folder(tiny_folder / "train").class_to_idx
    assert class_names(mapping) == sorted(mapping)
    assert class_names(mapping, {"1": "one"})[0] == "one"


def test_summary_counts_images_and_classes(tiny_folder):
    summary = summarize(splits.load_data(tiny_folder, LITE0).sets)
    assert summary["train"] == {"images": 36, "classes": 12, "min_per_class": 3,
                                "max_per_class": 3}
    assert images_per_class({"train": image_folder(tiny_folder / "test")}) == 3.0


def test_transforms_give_backbone_sized_normalised_tensors(tiny_folder):
    sets = splits.load_data(tiny_folder, LITE0).sets
    for split in ("train", "valid"):
        x, y = sets[split][0]
        assert x.shape == (3, 224, 224) and x.dtype == torch.float32
        assert -1.0 <= x.min() and x.max() <= 1.0  # mean = std = 0.5 maps 0..1 to -1..1
    loaders = make_loaders(sets, batch_size=8, num_workers=0)
    images, labels = next(iter(loaders["train"]))
    assert images.shape == (8, 3, 224, 224) and labels.shape == (8,)


@pytest.mark.parametrize("size", [(300, 200), (200, 300), (257, 256), (224, 224), (640, 481)])
@pytest.mark.parametrize("arch", ["efficientnet_lite0", "resnet50", "efficientnet_lite2"])
def test_numpy_process_image_matches_torchvision_eval_transform(size, arch):
    spec = get_backbone(arch)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    ours = process_image(image, spec=spec.preprocess)
    reference = eval_transform(spec.preprocess)(image).numpy()
    size = spec.preprocess.input_size
    assert ours.shape == reference.shape == (3, size, size)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, reference, atol=1e-5)


def test_missing_folder_and_mismatched_classes_are_clear_errors(tiny_folder, tmp_path):
    with pytest.raises(DataError, match="no such folder"):
        image_folder(tmp_path / "nowhere")
    with pytest.raises(DataError, match="no such folder"):
        splits.load_data(tmp_path / "nowhere", LITE0)
    (tiny_folder / "valid" / "1").rename(tiny_folder / "valid" / "13")
    with pytest.raises(DataError, match="classes differ"):
        splits.load_data(tiny_folder, LITE0)


def test_category_names_file(tmp_path):
    names = load_category_names()
    assert len(names) == 102 and names["1"] == "pink primrose"
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_category_names(bad)
    bad.write_text(json.dumps(["a", "b"]))
    with pytest.raises(DataError, match="expected a JSON object"):
        load_category_names(bad)
    with pytest.raises(DataError, match="no such names file"):
        load_category_names(tmp_path / "absent.json")

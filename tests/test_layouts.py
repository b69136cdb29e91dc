"""Any folder of photos: layouts, stable carved splits, names, links, formats and warnings."""

from __future__ import annotations

import json
import os
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import make_image_folder, synthetic_image
from helpers.core.errors import DataError, ImageError
from helpers.data import download, images, splits
from helpers.data.folders import (
    DataWarning,
    LinkLoopWarning,
    choose_names,
    image_folder,
    make_loaders,
)
from helpers.data.names import load_category_names
from helpers.model.backbones import get_backbone

LITE0 = get_backbone("efficientnet_lite0").preprocess
CLASSES = ["daisy", "rose", "tulip"]


def _photos(folder: Path, n: int, *, cls: int = 0, start: int = 0, ext: str = ".jpg") -> None:
    """n distinct synthetic photos folder/img_<start..>.<ext>."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([cls, start])
    for i in range(start, start + n):
        synthetic_image(cls, rng).save(folder / f"img_{i}{ext}", "JPEG")


def _plain(root: Path, per_class: int = 10, classes: list[str] = CLASSES) -> Path:
    for i, name in enumerate(classes):
        _photos(root / name, per_class, cls=i)
    return root


def _load(root: Path, **kwargs) -> splits.DataSplits:
    """load_data that fails on any data warning not asked for."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        return splits.load_data(root, LITE0, **kwargs)


def _rel(ds, root: Path) -> set[str]:
    return {Path(p).relative_to(root).as_posix() for p, _ in ds.samples}


@pytest.mark.parametrize("given", [("train", "valid", "test"), ("train", "valid"),
                                   ("train", "test"), ("train",), ()])
def test_every_layout_gives_train_valid_and_test(tmp_path, given):
    root = tmp_path / "photos"
    if given:
        make_image_folder(root, CLASSES, per_class=10, splits=given)
    else:
        _plain(root)
    result = _load(root)
    assert list(result.sets) == ["train", "valid", "test"]
    assert result.class_to_idx == {"daisy": 0, "rose": 1, "tulip": 2}
    assert result.names == CLASSES and result.root == root
    carved = [s for s in ("valid", "test") if s not in given]
    assert sorted(result.held_out) == sorted(carved)
    pool = _rel(image_folder(root / "train" if given else root), root)
    for split in carved:
        assert set(result.held_out[split]) == _rel(result.sets[split], root) <= pool
        n = len(result.held_out[split])
        assert f"no {split}/ folder: {n} of 30 images held out for" in " | ".join(result.messages)
    assert _rel(result.sets["train"], root) | {p for s in carved for p in result.held_out[s]} \
        == pool
    assert not _rel(result.sets["train"], root) & {p for v in result.held_out.values() for p in v}
    # Training images are augmented, the others centre-cropped like the backbone expects.
    assert "RandomResizedCrop" in repr(result.sets["train"].transform)
    assert "CenterCrop" in repr(result.sets["test"].transform)
    x, y = result.sets["valid"][0]
    assert x.shape == (3, 224, 224) and result.sets["valid"].classes[y] in CLASSES


def test_split_is_stable_and_new_photos_never_move_held_out_photos_into_training(tmp_path):
    root = _plain(tmp_path / "photos", per_class=20)
    first, again = _load(root), _load(root)
    assert first.held_out == again.held_out and first.digest() == again.digest()
    for i, name in enumerate(CLASSES):
        _photos(root / name, 15, cls=i, start=20)
    _photos(root / "iris", 20, cls=3)
    grown = _load(root)
    for split in ("valid", "test"):
        assert set(first.held_out[split]) <= set(grown.held_out[split])
    # Stratified: each class is split on its own, each photo held out with chance 0.4, so the
    # count held out is binomial: within three standard deviations of 0.4 n.
    for result in (first, grown):
        n = sum(len(ds) for ds in result.sets.values())
        held = n - len(result.sets["train"])
        assert abs(held - 0.4 * n) <= 3 * (0.24 * n) ** 0.5, (held, n)
        for name, idx in result.class_to_idx.items():
            n = {s: sum(t == idx for t in ds.targets) for s, ds in result.sets.items()}
            assert n["train"] >= 5 and n["valid"] and n["test"], (name, n)


def _paths_with_hash(low: float, high: float, count: int, prefix: str) -> list[str]:
    """The first `count` names prefix/x<i>.jpg whose uniform hash lies in [low, high)."""
    found = (f"{prefix}/x{i}.jpg" for i in range(10_000))
    return [p for p in found if low <= splits.uniform_hash(p) < high][:count]


def test_carving_thresholds_fix_ups_and_duplicate_groups():
    fractions = {"valid": 0.2, "test": 0.2}
    held = _paths_with_hash(0.0, 0.4, 3, "c")  # all three would be held out
    sides, small = splits.carve_splits(held, [0, 0, 0], fractions=fractions)
    keep = max(held, key=splits.uniform_hash)  # the least held-out one goes back to training
    assert [p for p, s in zip(held, sides, strict=True) if s == "train"] == [keep] and small == []
    one_each = splits.carve_splits(held[:2], [0, 1], fractions=fractions)
    assert one_each == (["train", "train"], [0, 1])  # too small to split: both warned about
    test, train = _paths_with_hash(0.0, 0.2, 1, "d")[0], _paths_with_hash(0.5, 1.0, 1, "d")[0]
    others = _paths_with_hash(0.5, 1.0, 3, "e")
    sides, _ = splits.carve_splits([test, train, *others], [0, 0, 0, 0, 0],
                                   fractions=fractions, groups=[[1, 0]])
    assert sides[:2] == ["test", "test"]  # the group follows its lowest hash
    only_valid, _ = splits.carve_splits([test, train], [0, 0], fractions={"valid": 0.2})
    assert only_valid == ["valid", "train"]


def test_identical_photos_stay_on_one_side_and_leaks_are_reported(tmp_path):
    root = _plain(tmp_path / "photos", per_class=12)
    for name in CLASSES:  # a copy of every photo under another name
        for photo in sorted((root / name).glob("*.jpg")):
            shutil.copy(photo, photo.with_name("copy_" + photo.name))
    result = _load(root)
    side = {p: s for s, ds in result.sets.items() for p in _rel(ds, root)}
    for path in [p for p in side if "/img_" in p]:
        assert side[path] == side[path.replace("/img_", "/copy_img_")], path

    given = make_image_folder(tmp_path / "given", CLASSES, per_class=4)
    shutil.copy(given / "train" / "rose" / "img_1.jpg", given / "test" / "rose" / "same.jpg")
    with pytest.warns(splits.DuplicateImageWarning,
                      match=r"same photo is in train.*train/rose/img_1\.jpg and test/rose/same"):
        splits.load_data(given, LITE0)
    for i in range(3):
        daisy = given / "train" / "daisy" / f"img_{i}.jpg"
        shutil.copy(daisy, given / "valid" / "daisy" / f"{i}.jpg")
    with pytest.warns(splits.DuplicateImageWarning, match="4 photos are in train and held out"):
        splits.load_data(given, LITE0)


def test_names_file_then_root_file_then_flower_names_only_for_the_102_flowers(tmp_path):
    numbered = _plain(tmp_path / "mine", per_class=5, classes=["1", "2", "3"])
    assert _load(numbered).names == ["1", "2", "3"]  # not "pink primrose" and friends
    flowers = {str(i): i - 1 for i in range(1, 103)}
    names, source = choose_names(flowers, root=tmp_path)
    assert names[0] == "pink primrose" and "cat_to_name.json" in source
    (numbered / "cat_to_name.json").write_text(json.dumps({"1": "one", "2": "two", "3": "three"}),
                                               encoding="utf-8-sig")  # with a BOM
    assert _load(numbered).names == ["one", "two", "three"]
    mine = tmp_path / "names.json"
    mine.write_text(json.dumps({"1": "uno", "2": "dos", "3": "tres"}), encoding="utf-8-sig")
    result = _load(numbered, names_file=mine)
    assert result.names == ["uno", "dos", "tres"] and f"from {mine}" in result.messages[-1]
    assert load_category_names(mine)["1"] == "uno"


def test_links_are_followed_once_and_loops_skipped_with_one_warning(tmp_path):
    root = _plain(tmp_path / "photos", per_class=4)
    outside = tmp_path / "elsewhere"
    _photos(outside, 3, cls=0, start=100)
    daisy = root / "daisy"
    (daisy / "more").symlink_to(outside)
    (daisy / "more_again").symlink_to(outside)  # the same folder twice: listed once
    (daisy / "twin_a.jpg").symlink_to(outside / "img_100.jpg")  # already reached through more/
    (daisy / "twin_b.jpg").symlink_to(daisy / "img_0.jpg")
    assert len(image_folder(root).samples) == 12 + 3
    (daisy / "loop").symlink_to(daisy)
    (root / "rose" / "up").symlink_to(tmp_path)
    with pytest.warns(LinkLoopWarning, match=r"skipped 2 symbolic link.*daisy/loop"):
        ds = image_folder(root)
    assert len(ds.samples) == 15 and ds.classes == CLASSES
    with pytest.warns(LinkLoopWarning) as record:
        assert len(splits.load_data(root, LITE0).sets) == 3
    assert len([w for w in record if w.category is LinkLoopWarning]) == 1


def test_hidden_and_editor_folders_are_never_classes_or_images(tmp_path):
    root = _plain(tmp_path / "photos", per_class=4)
    for hidden in (root / ".ipynb_checkpoints", root / "__MACOSX", root / "rose" / ".thumbs",
                   root / "rose" / "__pycache__"):
        _photos(hidden, 2)
    shutil.copy(root / "rose" / "img_0.jpg", root / "rose" / ".hidden.jpg")
    ds = image_folder(root)
    assert ds.classes == CLASSES and len(ds) == 12


def test_jfif_jpe_and_heic_are_images(tmp_path, monkeypatch):
    root = _plain(tmp_path / "photos", per_class=4)
    _photos(root / "rose", 1, start=10, ext=".jfif")
    _photos(root / "rose", 1, start=11, ext=".JPE")
    assert len(image_folder(root)) == 14
    assert images.open_image(root / "rose" / "img_10.jfif").mode == "RGB"
    pillow_heif = pytest.importorskip("pillow_heif", reason="pillow-heif is not installed")
    if not pillow_heif.libheif_info().get("HEIF"):
        pytest.skip("this libheif cannot encode HEIC")
    heic = root / "rose" / "phone.heic"
    pillow_heif.from_pillow(Image.new("RGB", (40, 30), (200, 30, 30))).save(heic)
    assert images.open_image(heic).size == (40, 30) and images.check_image(heic) is None
    assert len(image_folder(root)) == 15
    monkeypatch.setitem(sys.modules, "pillow_heif", None)  # as if it were not installed
    images._heif_opener.cache_clear()
    try:
        with pytest.raises(ImageError, match="pip install pillow-heif"):
            images.open_image(heic)
    finally:
        images._heif_opener.cache_clear()


def test_tiny_imbalanced_and_empty_classes(tmp_path):
    root = tmp_path / "photos"
    _photos(root / "many", 21)
    _photos(root / "two", 2, cls=1)
    with pytest.warns(splits.SmallClassWarning, match="two"), \
            pytest.warns(splits.ImbalanceWarning, match="many has 21 images, two only 2"):
        result = splits.load_data(root, LITE0)
    two = result.class_to_idx["two"]
    assert sum(t == two for t in result.sets["train"].targets) == 2
    assert not any("/two/" in p for v in result.held_out.values() for p in v)
    (root / "none").mkdir()
    with pytest.raises(DataError, match="none"):
        splits.load_data(root, LITE0)
    single = _plain(tmp_path / "outer" / "flowers", per_class=2, classes=["train"])
    with pytest.raises(DataError, match=r"only one class folder \(flowers\).*did you mean"):
        splits.load_data(single.parent, LITE0)
    with pytest.raises(DataError, match="no train/ folder"):
        splits.load_data(make_image_folder(tmp_path / "t", CLASSES, 1, splits=("test",)), LITE0)


def test_digest_follows_files_and_classes_only(tmp_path):
    root = _plain(tmp_path / "photos", per_class=6)
    digest = _load(root).digest()
    assert _load(root).digest() == digest
    _photos(root / "rose", 1, cls=1, start=50)
    grown = _load(root).digest()
    assert grown != digest
    photo = root / "rose" / "img_50.jpg"
    Image.open(photo).resize((64, 64)).save(photo)
    assert _load(root).digest() not in (digest, grown)
    photo.unlink()
    assert _load(root).digest() == digest


def test_ensure_data_uses_any_folder_of_photos_as_it_is(tmp_path):
    plain = _plain(tmp_path / "photos", per_class=1)
    assert download.ensure_data(plain) == plain
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="cannot download"):  # empty: it tries
        download.ensure_data(empty, source="course",
                             base_url="http://127.0.0.1:9/flower_data.tar.gz")
    assert os.listdir(empty) == []


def test_a_class_folder_linking_back_to_the_root_is_a_loop_not_a_class(tmp_path):
    root = _plain(tmp_path / "photos", per_class=3)
    (root / "everything").symlink_to(root)
    with pytest.warns(LinkLoopWarning, match="everything"):
        ds = image_folder(root)
    assert ds.classes == CLASSES and len(ds) == 9
    with pytest.warns(LinkLoopWarning):
        result = splits.load_data(root, LITE0)
    loaders = make_loaders(result.sets, batch_size=4, num_workers=2)
    batch, labels = next(iter(loaders["train"]))  # carved sets travel to worker processes
    assert batch.shape[1:] == (3, 224, 224) and set(labels.tolist()) <= {0, 1, 2}


def test_a_class_folder_linked_to_another_class_is_refused(tmp_path):
    root = _plain(tmp_path / "photos", per_class=6)
    (root / "zinnia").symlink_to(root / "rose")  # a fourth "class" of the rose photos
    with pytest.raises(DataError, match=r"zinnia: the same folder as class rose \(a link\)"):
        splits.load_data(root, LITE0)
    elsewhere = tmp_path / "lilies"  # a link to a folder of other photos is a class as any
    _photos(elsewhere, 6, cls=3)
    (root / "zinnia").unlink()
    (root / "zinnia").symlink_to(elsewhere)
    assert _load(root).sets["train"].classes == [*CLASSES, "zinnia"]


def test_the_same_photo_under_two_classes_is_reported(tmp_path):
    root = _plain(tmp_path / "photos", per_class=8)
    shutil.copy(root / "daisy" / "img_2.jpg", root / "tulip" / "stray.jpg")
    with pytest.warns(splits.LabelConflictWarning,
                      match=r"same photo is filed under two or more classes.*daisy/img_2\.jpg "
                            r"and tulip/stray\.jpg"):
        splits.load_data(root, LITE0)
    given = make_image_folder(tmp_path / "given", CLASSES, per_class=4)
    shutil.copy(given / "valid" / "rose" / "img_1.jpg", given / "valid" / "tulip" / "x.jpg")
    with pytest.warns(splits.LabelConflictWarning, match="valid/rose/img_1.jpg and valid/tulip"):
        splits.load_data(given, LITE0)


@pytest.mark.parametrize("name", ["train", "valid", "test"])
def test_a_class_named_like_a_split_in_a_flat_folder_is_a_class(tmp_path, name):
    root = _plain(tmp_path / "photos", per_class=10, classes=["daisy", name, "tulip"])
    result = _load(root)
    assert result.sets["train"].classes == sorted(["daisy", name, "tulip"])
    assert set(result.sets) == {"train", "valid", "test"}
    assert sum(len(ds) for ds in result.sets.values()) == 30

"""The notebook's review grid: the doctor's suspects in a planted folder drawn as the real
widget, decisions set and saved by its button, the fixes file written and loaded again, the
data folder untouched."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_doctor import make_folder, picture, tree_digest

from helpers.data import splits
from helpers.insight import review
from helpers.model.backbones import get_backbone

widgets = pytest.importorskip("ipywidgets")
NAMES = {"a": "roses", "b": "tulips", "c": "irises"}


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A course-layout folder with a rose filed under tulips, a tulip under irises, a test
    photo that is a copy of a training one, and an unreadable file; examined by the doctor."""
    root = make_folder(tmp_path_factory.mktemp("review") / "photos",
                       {"train": 10, "valid": 3, "test": 3}, seed=2)
    (root / "cat_to_name.json").write_text(json.dumps(NAMES))
    rng = np.random.default_rng(3)
    picture("a", rng).save(root / "train" / "b" / "wrong.jpg", quality=92)
    picture("b", rng).save(root / "train" / "c" / "odd.jpg", quality=92)
    shutil.copy(root / "train" / "c" / "img_2.jpg", root / "test" / "c" / "leak.jpg")
    (root / "train" / "a" / "broken.jpg").write_bytes(
        (root / "train" / "a" / "img_0.jpg").read_bytes()[:300])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLOWERS_CACHE", str(tmp_path_factory.mktemp("review-cache")))
        from helpers.insight.doctor import examine

        with pytest.warns(UserWarning):  # the unreadable file and the leak, as training warns
            report = examine(root, log=None)
    return {"root": root, "report": report, "digest": tree_digest(root)}


def test_the_grid_shows_the_suspects_with_names_thumbnails_and_choices(planted, tmp_path):
    report, root = planted["report"], planted["root"]
    items = review.suspects(report, top=12)
    first = {item["path"]: item for item in items[:2]}  # the planted label errors rank first
    assert set(first) == {"train/b/wrong.jpg", "train/c/odd.jpg"}
    assert (first["train/b/wrong.jpg"]["given_name"],
            first["train/b/wrong.jpg"]["suggested_name"]) == ("tulips", "roses")
    assert (first["train/c/odd.jpg"]["given"], first["train/c/odd.jpg"]["suggested"]) == ("c", "b")
    kinds = {item["path"]: item["kind"] for item in items}
    assert kinds["test/c/leak.jpg"] == "across-splits copy"  # the held-out copy, not train's
    assert "train/c/img_2.jpg" not in kinds
    assert kinds["train/a/broken.jpg"] == "stranger"
    box = review.review(report, root=root, fixes_path=tmp_path / "fixes.json", top=12)
    header, grid, save, output = box.children
    assert isinstance(save, widgets.Button) and save.description == "Save decisions"
    cells = dict(zip([i["path"] for i in items], (c.children for c in grid.children),
                     strict=True))
    picture_, caption, choice = cells["train/b/wrong.jpg"]
    assert isinstance(picture_, widgets.Image)
    with Image.open(io.BytesIO(picture_.value)) as thumb:  # drawn from the photo, in memory
        assert thumb.format == "JPEG" and max(thumb.size) <= review.THUMBNAIL
        photo = Image.open(root / "train" / "b" / "wrong.jpg").convert("RGB").resize(thumb.size)
        drawn = np.asarray(thumb.convert("RGB"), float)
        assert np.abs(drawn - np.asarray(photo, float)).mean() < 8
    assert "given: <b>tulips</b> (b)" in caption.value
    assert "suggested: <b>roses</b> (a)" in caption.value
    assert choice.value == "keep"
    assert [v for _, v in choice.options] == ["keep", "relabel:a", "exclude"]
    broken = cells["train/a/broken.jpg"]
    assert isinstance(broken[0], widgets.HTML) and "cannot be drawn" in broken[0].value
    assert [v for _, v in broken[2].options] == ["keep", "exclude"]  # a stranger: no class


def test_saved_decisions_make_a_fixes_file_that_loading_applies(planted, tmp_path, capsys):
    report, root = planted["report"], planted["root"]
    fixes_path = tmp_path / "build" / "fixes.json"
    items = review.suspects(report, top=12)
    box = review.review(report, root=root, fixes_path=fixes_path, top=12)
    choices = {i["path"]: c.children[2] for i, c in zip(items, box.children[1].children,
                                                        strict=True)}
    choices["train/b/wrong.jpg"].value = "relabel:a"
    choices["test/c/leak.jpg"].value = "exclude"
    box.children[2].click()
    said = capsys.readouterr().out
    assert f"saved to {fixes_path}: 1 photo(s) excluded, 1 relabelled" in said
    assert "relabel train/b/wrong.jpg -> a (roses)" in said
    assert json.loads(fixes_path.read_text()) == {"exclude": ["test/c/leak.jpg"],
                                                  "relabel": {"train/b/wrong.jpg": "a"}}
    assert tree_digest(root) == planted["digest"]  # the data folder is untouched

    spec = get_backbone("efficientnet_lite0")
    with pytest.warns(UserWarning):  # the unreadable file, left out by loading
        found = splits.load_data(root, spec.preprocess)
        fixed = review.apply_saved(found, spec=spec.preprocess, path=fixes_path)
    assert capsys.readouterr().out.strip() == (
        f"fixes from {fixes_path}: 1 photo(s) left out, 1 relabelled")
    samples = {Path(p).relative_to(root).as_posix(): y
               for ds in fixed.sets.values() for p, y in ds.samples}
    assert "test/c/leak.jpg" not in samples
    assert samples["train/b/wrong.jpg"] == fixed.class_to_idx["a"]
    assert sum(len(ds) for ds in fixed.sets.values()) == sum(
        len(ds) for ds in found.sets.values()) - 1

    again = review.review(report, root=root, fixes_path=fixes_path, top=12)  # starts from them
    choices = {i["path"]: c.children[2] for i, c in zip(items, again.children[1].children,
                                                        strict=True)}
    assert choices["train/b/wrong.jpg"].value == "relabel:a"
    assert choices["test/c/leak.jpg"].value == "exclude"
    choices["train/b/wrong.jpg"].value = "keep"  # changed your mind: the relabel is dropped
    again.children[2].click()
    assert json.loads(fixes_path.read_text()) == {"exclude": ["test/c/leak.jpg"], "relabel": {}}
    assert tree_digest(root) == planted["digest"]


def test_nothing_to_review_and_no_fixes_file(planted, tmp_path, capsys):
    report = dict(planted["report"], duplicates=[], near_duplicates=[], label_issues=[],
                  strangers=[])
    assert review.suspects(report) == []
    box = review.review(report, root=planted["root"], fixes_path=tmp_path / "f.json")
    (only,) = box.children
    assert only.value.startswith("Nothing to review")
    assert not (tmp_path / "f.json").exists()
    summary = review.summary(report)
    assert "suspected label errors: 0" in summary and "strangers and unusable files: 0" in summary
    found = splits.DataSplits(root=planted["root"], sets={}, class_to_idx={}, names=[])
    assert review.apply_saved(found, spec=get_backbone("efficientnet_lite0").preprocess,
                              path=tmp_path / "f.json") is found
    assert capsys.readouterr().out.strip() == f"no fixes file at {tmp_path / 'f.json'} yet: " \
                                              "the data as loaded"


def test_the_summary_counts_each_list(planted):
    text = review.summary(planted["report"]).splitlines()
    counts = planted["report"]["counts"]
    assert text[0].startswith(f"{counts['total']} photos in 3 classes (train ")
    assert any(line.startswith("exact duplicates: 1 group(s) (1 across-splits)")
               for line in text)
    issues = len(planted["report"]["label_issues"])
    assert any(line.startswith(f"suspected label errors: {issues} (") for line in text)
    assert text[-1] == f"strangers and unusable files: {len(planted['report']['strangers'])}"

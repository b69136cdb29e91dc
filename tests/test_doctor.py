"""The data doctor on small planted folders (the pretrained backbone, a few dozen photos), its
command line, and the fixes file it leads to."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from helpers.cli import main
from helpers.core.errors import FixesError
from helpers.data.fixes import (
    Fixes,
    apply_fixes,
    apply_fixes_to_sets,
    fixes_from_decisions,
    read_fixes,
    write_fixes,
)

# Three clearly different kinds of picture, each photo its own arrangement of shapes.
KINDS = {"a": ((210, 40, 40), "ellipse"), "b": ((40, 170, 60), "lines"),
         "c": ((40, 60, 210), "squares")}


def picture(kind: str, rng: np.random.Generator, size: int = 128) -> Image.Image:
    """A photo of one kind: its colour and shapes, placed at random."""
    colour, shape = KINDS[kind]
    shade = tuple(int(v) for v in np.clip(np.array(colour) + rng.normal(0, 20, 3), 0, 255))
    image = Image.new("RGB", (size, size), shade)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 7))):
        x, y = (int(v) for v in rng.integers(0, size - 30, 2))
        w, h = (int(v) for v in rng.integers(12, 40, 2))
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        if shape == "ellipse":
            draw.ellipse((x, y, x + w, y + h), fill=fill)
        elif shape == "lines":
            draw.line((x, 0, y, size), fill=fill, width=w // 4)
        else:
            draw.rectangle((x, y, x + w, y + w), fill=fill, outline=(0, 0, 0))
    return image


def make_folder(root: Path, counts: dict[str, int], *, seed: int) -> Path:
    """root/<split>/<kind>/img_N.jpg, counts[split] photos of each kind."""
    rng = np.random.default_rng(seed)
    for split, n in counts.items():
        for kind in KINDS:
            folder = root / split / kind if split else root / kind
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                picture(kind, rng).save(folder / f"img_{i}.jpg", quality=92)
    return root


def tree_digest(root: Path) -> str:
    """sha256 of every file's path, bytes and mtime under root."""
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            h.update(f"{path}{path.stat().st_mtime_ns}".encode() + path.read_bytes())
    return h.hexdigest()


def run_cli(*argv: str) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of `python -m helpers ARGV`, run in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache folder for this module's doctor runs: the trunk runtime is measured once."""
    return tmp_path_factory.mktemp("doctor-cache")


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory, cache: Path) -> dict:
    """A course-layout folder with one of each problem planted, examined by the command line."""
    root = make_folder(tmp_path_factory.mktemp("planted"), {"train": 10, "valid": 3, "test": 3},
                       seed=1)
    train = root / "train"
    shutil.copy(train / "a" / "img_0.jpg", train / "a" / "copy.jpg")  # within-class
    shutil.copy(train / "b" / "img_1.jpg", train / "c" / "conflict.jpg")  # across-classes
    shutil.copy(train / "c" / "img_2.jpg", root / "test" / "c" / "leak.jpg")  # across-splits
    original = Image.open(train / "a" / "img_3.jpg")  # resized, cropped a little, re-encoded
    edited = original.resize((100, 100)).crop((3, 2, 97, 98))
    edited.save(root / "valid" / "a" / "edited.jpg", quality=70)
    Image.new("RGB", (128, 128), (128, 128, 128)).save(train / "a" / "blank.jpg")
    noise = np.random.default_rng(7).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    Image.fromarray(noise).save(train / "b" / "noise.png")
    Image.new("RGB", (16, 16), (200, 40, 40)).save(train / "a" / "tiny.png")
    (train / "b" / "broken.jpg").write_bytes((train / "b" / "img_0.jpg").read_bytes()[:300])
    before = tree_digest(root)
    out = root.parent / "doctor.json"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLOWERS_CACHE", str(cache))
        code, text, err = run_cli("doctor", str(root), "--json", str(out))
    assert code == 0, err
    return {"root": root, "report": json.loads(out.read_text()), "text": text,
            "stderr": err, "untouched": tree_digest(root) == before}


@pytest.fixture(scope="module")
def mislabelled(tmp_path_factory: pytest.TempPathFactory, cache: Path) -> dict:
    """A flat folder of user-named classes with one photo of `a` filed under `b`."""
    root = make_folder(tmp_path_factory.mktemp("flat") / "photos", {"": 14}, seed=2)
    for kind, name in (("a", "roses"), ("b", "tulips"), ("c", "irises")):
        (root / kind).rename(root / name)
    picture("a", np.random.default_rng(3)).save(root / "tulips" / "wrong.jpg", quality=92)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLOWERS_CACHE", str(cache))
        from helpers.insight.doctor import examine

        report = examine(root, log=None)
    return {"root": root, "report": report}


def groups_of(report: dict, key: str) -> dict[str, list[list[str]]]:
    found: dict[str, list[list[str]]] = {}
    for group in report[key]:
        found.setdefault(group["kind"], []).append(group["paths"])
    return found


def test_exact_duplicates_of_each_kind(planted):
    assert groups_of(planted["report"], "duplicates") == {
        "within-class": [["train/a/copy.jpg", "train/a/img_0.jpg"]],
        "across-classes": [["train/b/img_1.jpg", "train/c/conflict.jpg"]],
        "across-splits": [["test/c/leak.jpg", "train/c/img_2.jpg"]]}


def test_an_edited_copy_is_a_near_duplicate_and_distinct_photos_are_not(planted):
    assert groups_of(planted["report"], "near_duplicates") == {
        "across-splits": [["train/a/img_3.jpg", "valid/a/edited.jpg"]]}


def test_strangers_blank_noise_tiny_and_unreadable(planted):
    why = {s["path"]: s["why"] for s in planted["report"]["strangers"]}
    assert why.pop("train/a/blank.jpg") == "blank frame"
    assert why.pop("train/a/tiny.png").startswith("tiny (16 x 16")
    assert why.pop("train/b/broken.jpg").startswith("damaged")
    assert why.pop("train/b/noise.png") == "far from every other photo"
    assert not why, why  # no ordinary photo is a stranger


def test_the_planted_label_error_ranks_first_with_the_right_suggestion(mislabelled):
    issues = mislabelled["report"]["label_issues"]
    assert issues[0]["path"] == "tulips/wrong.jpg"
    assert (issues[0]["given"], issues[0]["suggested"]) == ("tulips", "roses")
    assert issues[0]["score"] > 0.5
    assert [i["score"] for i in issues] == sorted((i["score"] for i in issues), reverse=True)


def test_counts_keep_a_users_folder_names_and_carved_splits(mislabelled):
    counts = mislabelled["report"]["counts"]
    assert set(counts["classes"]) == {"irises", "roses", "tulips"}
    assert counts["classes"]["tulips"]["name"] == "tulips"
    assert counts["classes"]["tulips"]["total"] == 15 and counts["total"] == 43
    assert set(counts["splits"]) == {"train", "valid", "test"}
    assert counts["imbalance"] == pytest.approx(15 / 14, abs=0.01)


def test_json_schema(planted):
    report, root = planted["report"], planted["root"]
    assert {"duplicates", "near_duplicates", "label_issues", "strangers", "counts"} <= set(report)
    for group in report["duplicates"] + report["near_duplicates"]:
        assert group["kind"] in ("within-class", "across-classes", "across-splits")
        assert len(group["paths"]) >= 2 and all((root / p).is_file() for p in group["paths"])
    for issue in report["label_issues"]:
        assert {"path", "given", "suggested", "score"} <= set(issue)
        assert issue["given"] in "abc" and issue["suggested"] in "abc"
    for stranger in report["strangers"]:
        assert {"path", "score"} <= set(stranger) and (root / stranger["path"]).is_file()
    assert set(report["counts"]["classes"]) == {"a", "b", "c"}


def test_text_shows_each_list_with_hints_and_the_data_is_untouched(planted):
    text = planted["text"]
    for words in ("exact duplicates: 3 group(s)", "near-duplicates: 1 group(s)",
                  "hint (across-splits)", "strangers and unusable files", "to fix:"):
        assert words in text
    assert planted["untouched"]


def test_fixes_applied_by_the_doctor_extract_nothing_again(planted, cache, tmp_path,
                                                          monkeypatch):
    root = planted["root"]
    fixes = tmp_path / "fixes.json"
    fixes.write_text(json.dumps({"exclude": ["train/a/copy.jpg", "test/c/leak.jpg",
                                             "train/b/broken.jpg"],
                                 "relabel": {"train/c/conflict.jpg": "b"}}))
    monkeypatch.setenv("FLOWERS_CACHE", str(cache))
    extracted = sorted((cache / "activations").iterdir())
    code, _, err = run_cli("doctor", str(root), "--fixes", str(fixes), "--json",
                           str(tmp_path / "after.json"))
    assert code == 0, err
    after = json.loads((tmp_path / "after.json").read_text())
    assert groups_of(after, "duplicates") == {
        "within-class": [["train/b/img_1.jpg", "train/c/conflict.jpg"]]}
    assert "train/b/broken.jpg" not in {s["path"] for s in after["strangers"]}
    assert sorted((cache / "activations").iterdir()) == extracted


def test_training_finds_the_doctors_activations_in_the_cache(planted, cache, monkeypatch):
    from helpers.config import TrainConfig
    from helpers.data.splits import load_data
    from helpers.model.backbones import get_backbone
    from helpers.model.classifier import build_model
    from helpers.train.cache import ActivationCache

    monkeypatch.setenv("FLOWERS_CACHE", str(cache))
    config = TrainConfig()
    with pytest.warns(UserWarning):
        sets = load_data(planted["root"], get_backbone(config.arch).preprocess).sets
    model = build_model(config.arch, sets["train"].class_to_idx)
    found = ActivationCache(model.spec, model.backbone, tail_stages=config.tail_stages,
                            device=__import__("torch").device("cpu"), log=None)
    for ds in sets.values():
        found.get(ds, "centre")
    assert found.images == 0  # nothing extracted: the doctor's activations were reused


def test_a_missing_folder_is_one_line_and_exit_1(tmp_path):
    code, out, err = run_cli("doctor", str(tmp_path / "nowhere"), "--json",
                             str(tmp_path / "d.json"))
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and "nowhere: no such folder" in err
    assert not (tmp_path / "d.json").exists()


@pytest.mark.parametrize("content, words", [
    ("{", "not valid JSON"),
    ('{"exclude": ["train/a/none.jpg"]}', "train/a/none.jpg is not a photo of"),
    ('{"relabel": {"train/a/img_0.jpg": "zebra"}}', "'zebra', which is no class folder"),
    ('{"remove": []}', "expected a JSON object"),
])
def test_a_bad_fixes_file_is_one_line_naming_it(tmp_path, content, words):
    root = make_folder(tmp_path / "data", {"train": 2, "valid": 1, "test": 1}, seed=0)
    fixes = tmp_path / "fixes.json"
    fixes.write_text(content)
    code, _, err = run_cli("doctor", str(root), "--fixes", str(fixes), "--json",
                           str(tmp_path / "d.json"))
    assert code == 1 and err.count("\n") == 1, err
    assert err.startswith(f"error: {fixes}") and words in err
    assert not (tmp_path / "d.json").exists()


def test_json_into_a_folder_is_refused(tmp_path):
    root = make_folder(tmp_path / "data", {"train": 2}, seed=0)
    code, _, err = run_cli("doctor", str(root), "--json", str(tmp_path))
    assert code == 1 and "a folder; give a file name" in err


@pytest.fixture
def samples(tmp_path: Path) -> tuple[Path, list[tuple[str, int]], dict[str, int]]:
    root = make_folder(tmp_path / "data", {"train": 2, "valid": 1}, seed=0)
    classes = {"a": 0, "b": 1, "c": 2}
    listed = [(str(root / "train" / k / f"img_{i}.jpg"), c) for k, c in classes.items()
              for i in range(2)]
    return root, listed, classes


def test_apply_fixes_excludes_and_relabels_without_touching_the_folder(samples):
    root, listed, classes = samples
    before = tree_digest(root)
    fixes = Fixes(exclude=frozenset({"train/a/img_0.jpg"}), relabel={"train/b/img_1.jpg": "c"})
    fixed = apply_fixes(listed, fixes=fixes, root=root, class_to_idx=classes)
    assert str(root / "train/a/img_0.jpg") not in {p for p, _ in fixed}
    assert dict(fixed)[str(root / "train/b/img_1.jpg")] == 2
    assert len(fixed) == len(listed) - 1 and listed[0][1] == 0  # the input list is unchanged
    assert tree_digest(root) == before


def test_apply_fixes_refuses_an_unknown_path_or_class_in_one_line(samples):
    root, listed, classes = samples
    with pytest.raises(FixesError, match="train/a/img_9.jpg is not a photo of"):
        apply_fixes(listed, fixes=Fixes(exclude=frozenset({"train/a/img_9.jpg"})), root=root,
                    class_to_idx=classes)
    with pytest.raises(FixesError, match="'d', which is no class folder"):
        apply_fixes(listed, fixes=Fixes(relabel={"train/a/img_0.jpg": "d"}), root=root,
                    class_to_idx=classes)
    with pytest.raises(FixesError, match="not inside the data folder"):
        read_fixes_text = '{"exclude": ["../outside.jpg"]}'
        path = root.parent / "f.json"
        path.write_text(read_fixes_text)
        read_fixes(path)


def test_apply_fixes_to_sets_checks_paths_across_all_splits(samples):
    from helpers.data.folders import PhotoFolder

    root, _, _ = samples
    sets = {s: PhotoFolder(root / s) for s in ("train", "valid")}
    fixes = Fixes(exclude=frozenset({"valid/a/img_0.jpg"}), relabel={"train/a/img_1.jpg": "b"})
    line = apply_fixes_to_sets(sets, fixes=fixes, root=root)
    assert line.endswith("1 photo(s) left out, 1 relabelled")
    assert len(sets["valid"]) == 2 and len(sets["train"]) == 6
    assert sets["train"].targets[1] == 1 and sets["train"].samples[1][1] == 1


def test_notebook_decisions_become_a_fixes_file(samples, tmp_path):
    root, _, _ = samples
    path = tmp_path / "notes" / "fixes.json"
    write_fixes({"train/a/img_0.jpg": "exclude", "train/b/img_0.jpg": "relabel:c",
                 "train/c/img_0.jpg": "keep"}, path=path, root=root,
                classes=["a", "b", "c"])
    assert json.loads(path.read_text()) == {"exclude": ["train/a/img_0.jpg"],
                                            "relabel": {"train/b/img_0.jpg": "c"}}
    fixes = write_fixes({"train/a/img_0.jpg": "keep", "train/c/img_1.jpg": "exclude"},
                        path=path, root=root, classes=["a", "b", "c"])  # merged over the file
    assert fixes == read_fixes(path)
    assert json.loads(path.read_text())["exclude"] == ["train/c/img_1.jpg"]
    with pytest.raises(FixesError, match="choose keep, exclude or relabel:CLASS_FOLDER"):
        fixes_from_decisions({"train/a/img_0.jpg": "delete"})
    with pytest.raises(FixesError, match="'zebra', which is no class folder"):
        write_fixes({"train/a/img_1.jpg": "relabel:zebra"}, path=path, root=root,
                    classes=["a", "b", "c"])
    assert json.loads(path.read_text())["exclude"] == ["train/c/img_1.jpg"]  # kept whole
    assert os.listdir(path.parent) == ["fixes.json"]


def test_train_applies_a_fixes_file_and_its_resume_hint_keeps_it(tmp_path, capsys,
                                                                 monkeypatch):
    """`train.py --fixes FILE`: photos left out and relabelled in memory, the folder untouched,
    and the command that resumes the run carries the same fixes (they decide the data)."""
    from conftest import make_image_folder
    from helpers.core.errors import Stopped
    from helpers.train import recipes

    data = make_image_folder(tmp_path / "data", ["a", "b", "c"], per_class=4)
    before = sorted((p.relative_to(data).as_posix(), p.stat().st_mtime_ns)
                    for p in data.rglob("*") if p.is_file())
    fixes = tmp_path / "fixes.json"
    fixes.write_text(json.dumps({"exclude": ["train/a/img_0.jpg"],
                                 "relabel": {"train/b/img_1.jpg": "c"}}))
    seen = {}
    real = recipes.run_recipe

    def stop_after_looking(model, sets, config, device, **kwargs):
        seen["train"] = [(Path(p).relative_to(data).as_posix(), y)
                         for p, y in sets["train"].samples]
        real(model, sets, config, device, **kwargs)
        raise Stopped("stopped by SIGINT during fine-tune 1/1")

    monkeypatch.setattr(recipes, "run_recipe", stop_after_looking)
    out = tmp_path / "out"
    code = main(["train", str(data), "--save_dir", str(out), "--epochs", "1",
                 "--arch", "test_efficientnet", "--batch_size", "6", "--fixes", str(fixes)])
    done = capsys.readouterr()
    assert code == 130
    assert f"fixes from {fixes}: 1 photo(s) left out, 1 relabelled" in done.out
    assert "train/a/img_0.jpg" not in dict(seen["train"])
    assert dict(seen["train"])["train/b/img_1.jpg"] == 2  # class c
    assert done.err.strip().splitlines()[-1].endswith(
        f"--save_dir {out} --fixes {fixes} --resume {out / 'last.pth'}")
    assert before == sorted((p.relative_to(data).as_posix(), p.stat().st_mtime_ns)
                            for p in data.rglob("*") if p.is_file())
    fixes.write_text(json.dumps({"exclude": ["train/a/img_9.jpg"]}))  # no such photo
    assert main(["train", str(data), "--save_dir", str(tmp_path / "o2"),
                 "--fixes", str(fixes)]) == 1
    assert "train/a/img_9.jpg" in capsys.readouterr().err


@pytest.mark.slow  # real photos through the backbone
def test_a_photo_that_is_no_flower_is_among_the_five_strangest(real_data, tmp_path, monkeypatch):
    """A 12-class folder of real flowers with scikit-image's astronaut and a screenshot-like
    picture filed into classes: both flagged, both among the 5 strangest."""
    from skimage import data as samples

    from helpers.insight.doctor import examine
    from helpers.insight.strangers import synthetic

    monkeypatch.setenv("FLOWERS_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "photos"
    classes = sorted(os.listdir(real_data / "train"), key=int)[:12]
    for c in classes:
        (root / c).mkdir(parents=True)
        for photo in sorted((real_data / "train" / c).iterdir())[:30]:
            (root / c / photo.name).symlink_to(photo)
    Image.fromarray(samples.astronaut()).save(root / classes[3] / "image_99998.jpg")
    synthetic(np.random.default_rng(0), each=1)["screen"][0].save(
        root / classes[7] / "image_99999.jpg")
    report = examine(root, log=None)
    strangest = [s["path"] for s in report["strangers"][:5]]
    assert f"{classes[3]}/image_99998.jpg" in strangest, report["strangers"][:8]
    assert f"{classes[7]}/image_99999.jpg" in strangest, report["strangers"][:8]
    assert len(report["strangers"]) <= 5  # and few ordinary flowers flagged beside them

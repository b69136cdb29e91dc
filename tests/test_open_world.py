"""The open world: the known verdict (fitted on training flowers alone, the same in every
path) and teaching a model a kind it does not know."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_image_folder, synthetic_image
from helpers import cli
from helpers.config import TrainConfig
from helpers.data import splits
from helpers.model import checkpoint
from helpers.model.backbones import get_backbone
from helpers.model.classifier import new_model
from helpers.model.novelty import Novelty
from helpers.serve import inference
from helpers.serve.answers import answer
from helpers.serve.engine import engine_path, open_engine
from helpers.train import calibration, known, recipes
from helpers.train.teach import forget, teach

ROOT = Path(__file__).resolve().parent.parent
CLASSES = [str(i) for i in range(1, 7)]


def test_novelty_is_the_mahalanobis_distance_to_the_nearest_class_mean():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (3, 16))
    labels = np.repeat(np.arange(3), 40)
    x = centres[labels] + rng.normal(0, 0.1, (120, 16))
    score = Novelty().fit(torch.from_numpy(x), torch.from_numpy(labels), num_classes=3)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    means = np.stack([unit[labels == c].mean(0) for c in range(3)])
    centred = unit - means[labels]
    cov = centred.T @ centred / len(x)
    cov += 1e-3 * cov.diagonal().mean() * np.eye(16)
    precision = np.linalg.inv(cov)
    probe = np.concatenate([x[:5], rng.normal(0, 1, (5, 16))])
    u = probe / np.linalg.norm(probe, axis=1, keepdims=True)
    expected = np.min([np.einsum("nd,de,ne->n", u - m, precision, u - m) for m in means], axis=0)
    got = score(torch.from_numpy(probe).float()).numpy()
    np.testing.assert_allclose(got, expected, rtol=2e-3, atol=1e-2)
    assert got[5:].min() > got[:5].max()  # strangers lie farther than members
    # A taught class: its members become known at a threshold set on the learned ones.
    fresh = centres[labels] + rng.normal(0, 0.1, (120, 16))  # learned kinds, unseen photos
    threshold = float(np.quantile(score(torch.from_numpy(fresh).float()).numpy(), 0.95))
    newcomer = rng.normal(0, 1, 16)
    members = torch.from_numpy(newcomer + rng.normal(0, 0.1, (60, 16))).float()
    assert (score(members) > threshold).all()
    score.add_class(members[:40])
    assert (score(members[40:]) <= threshold).float().mean() >= 0.8
    assert score.memory_labels.tolist()[-8:] == [3] * 8  # 8 remembered a class
    score.drop_class(3)
    assert len(score.means) == 3 and (score.memory_labels < 3).all()
    with pytest.raises(ValueError, match="no training features for class"):
        Novelty().fit(torch.from_numpy(x), torch.zeros(120, dtype=torch.long), num_classes=2)


def test_the_answer_path_gives_the_known_verdict_beside_unsure():
    logits = np.array([[4.0, 0.0], [0.1, 0.0]])
    a = answer(logits, unsure_below=0.9, novelty=np.array([1.0, 9.0]), novel_above=5.0)
    assert a.known.tolist() == [True, False] and a.unsure.tolist() == [False, True]
    p = a.prediction(1, class_ids=["a", "b"], names=["A", "B"])
    assert p.known is False and p.novelty == 9.0
    probs, classes, names = p  # three fields, as the course's predict returns
    assert answer(logits).known is None  # no novelty: no verdict


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained by the cached recipe (its known verdict fitted as train.py fits
    it), saved with its engine; and the photos every step saw."""
    folder = make_image_folder(tmp_path_factory.mktemp("ow") / "flowers", CLASSES, per_class=6)
    config = TrainConfig(arch="test_efficientnet", batch_size=12, epochs=2, probe_epochs=3,
                         views=1, recipe="cached")
    sets = splits.load_data(folder, get_backbone("test_efficientnet").preprocess).sets
    clf = new_model(sets, config)
    seen = {"features": []}
    real_features, real_scores = known.training_features, calibration.scores_of
    real_fit = Novelty.fit

    def spy_features(model, dataset, device, **kw):
        features = real_features(model, dataset, device, **kw)
        seen["features"].append(([p for p, _ in dataset.samples], features))
        return features

    def spy_fit(self, features, labels, **kw):
        seen["fit"] = next(paths for paths, f in seen["features"] if f is features)
        return real_fit(self, features, labels, **kw)

    def spy_scores(model, samples):
        seen.setdefault("threshold", []).append([p for p, _ in samples])
        return real_scores(model, samples)

    mp = pytest.MonkeyPatch()
    mp.setattr(known, "training_features", spy_features)
    mp.setattr(Novelty, "fit", spy_fit)
    mp.setattr(calibration, "scores_of", spy_scores)
    try:
        recipes.run_recipe(clf, sets, config, torch.device("cpu"), log=None)
    finally:
        mp.undo()
    path = inference.save_model(clf, tmp_path_factory.mktemp("ck") / "checkpoint.pth")
    return {"folder": folder, "sets": sets, "model": clf, "checkpoint": path, "seen": seen}


def test_the_verdict_is_fitted_on_training_flowers_and_its_threshold_on_valid(trained):
    sets, seen, clf = trained["sets"], trained["seen"], trained["model"]
    # Fitted on exactly the training photos; no valid, test or stranger photo took part.
    assert seen["fit"] == [p for p, _ in sets["train"].samples]
    assert seen["threshold"] == [[p for p, _ in sets["valid"].samples]]
    assert clf.novelty.fitted and clf.novelty.means.shape[0] == len(CLASSES)
    # teach's remembered negatives are valid photos' features, outside the score
    valid_paths, valid_features = seen["features"][-1]
    assert valid_paths == [p for p, _ in sets["valid"].samples]
    assert len(clf.novelty.memory) == len(CLASSES) * 6  # 6 valid photos a class, all kept
    scores, _, _ = inference.scores_of(clf, sets["valid"].samples)
    assert clf.novel_above == calibration.choose_novel_above(scores.novelty)
    assert (scores.novelty <= clf.novel_above).mean() >= calibration.KEEP_KNOWN


def _strangers(folder: Path) -> list[Path]:
    from helpers.insight.strangers import write_strangers

    groups = write_strangers(folder, crops=0, each=2)
    return [p for group in groups.values() for p in group]


def test_every_path_gives_the_same_verdict(trained, tmp_path, capsys):
    """The engine, predict --json, evaluate, a reloaded checkpoint, the exported ONNX graph
    and the app's metadata agree on each photo's novelty and verdict."""
    import onnxruntime as ort

    from helpers.data.preprocess import process_image
    from helpers.serve import export, webapp

    ckpt, clf = trained["checkpoint"], trained["model"]
    photos = [*_strangers(tmp_path / "strangers")[:12],
              *sorted((trained["folder"] / "test").rglob("*.jpg"))[:8]]
    engine = open_engine(ckpt)
    assert engine is not None and engine.novel_above == clf.novel_above
    loaded, _ = checkpoint.load_checkpoint(ckpt)
    onnx_path = export.export_onnx(loaded, tmp_path / "model.onnx")
    session = ort.InferenceSession(str(onnx_path))
    meta = session.get_modelmeta().custom_metadata_map
    assert [o.name for o in session.get_outputs()] == ["probabilities", "novelty"]
    app_meta = webapp.app_metadata(loaded, precision="fp32")
    assert app_meta["novel_above"] == clf.novel_above
    verdicts = []
    for photo in photos:
        assert cli.main(["predict", str(photo), str(ckpt), "--json"]) == 0
        item = json.loads(capsys.readouterr().out)
        direct = engine.predict(photo)
        x = process_image(photo, spec=loaded.preprocess)[None]
        with torch.no_grad():
            _, torch_novelty = loaded.scored(torch.from_numpy(x))
        onnx_novelty = session.run(None, {"images": x})[1][0]
        assert item["novelty"] == pytest.approx(direct.novelty, abs=1e-3)
        assert direct.novelty == pytest.approx(float(torch_novelty[0]), rel=1e-3, abs=1e-2)
        assert onnx_novelty == pytest.approx(direct.novelty, rel=1e-3, abs=1e-2)
        assert item["known"] == direct.known == bool(direct.novelty <= float(meta["novel_above"]))
        verdicts.append(item["known"])
    assert False in verdicts and True in verdicts  # both answers occur on these photos


def test_predict_says_not_a_flower_i_know(trained, tmp_path, capsys):
    ckpt = trained["checkpoint"]
    engine = open_engine(ckpt)
    strangers = _strangers(tmp_path / "s")
    flagged = [p for p in strangers if engine.predict(p).known is False]
    assert flagged, "no stranger photo was flagged"
    assert cli.main(["predict", str(flagged[0]), str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("not a flower I know (closest: ")


def test_teach_adds_a_kind_and_forget_removes_it(trained, tmp_path, capsys):
    """A new kind from 5 photos: the checkpoint and its engine round trip, old answers keep
    their scores, the new kind is answered and known; --forget gives the old model back."""
    ckpt = trained["checkpoint"]
    rng = np.random.default_rng(5)
    new = tmp_path / "new kind"
    new.mkdir()
    for n in range(8):  # class 9's colour: none of the model's six classes
        synthetic_image(9, rng).save(new / f"n{n}.jpg")
    photos = sorted(new.glob("*.jpg"))
    out = tmp_path / "taught" / "checkpoint.pth"
    assert cli.main(["teach", str(ckpt), str(new.parent / "new kind"), "--name", "night bloom",
                     "--out", str(out)]) == 0
    assert "taught 'night bloom' from 8 photos" in capsys.readouterr().out
    taught, saved = checkpoint.load_checkpoint(out)
    assert saved["taught"] == ["night bloom"] and taught.taught == ["night bloom"]
    assert taught.class_names[-1] == "night bloom" and taught.class_to_idx["night bloom"] == 6
    assert taught.novelty.means.shape[0] == 7
    metrics = json.loads(out.with_name("checkpoint.metrics.json").read_text())
    assert metrics["taught"] == [{"class": "night bloom", "name": "night bloom"}]
    engine = open_engine(out)
    assert engine is not None and engine.class_names[-1] == "night bloom"
    old = open_engine(ckpt)
    test_photos = sorted((trained["folder"] / "test").rglob("*.jpg"))
    for photo in test_photos:  # the learned classes' scores are unchanged
        from helpers.data.preprocess import process_image

        x = process_image(photo, spec=old.preprocess)[None]
        np.testing.assert_allclose(engine.logits(x)[0, :6], old.logits(x)[0], atol=1e-4)
    answers = [engine.predict(p) for p in photos]
    assert sum(a.names[0] == "night bloom" for a in answers) >= 6
    # The verdict learned the new kind: every photo of it much nearer than before (a model
    # fitted on 36 tiny photos cannot call it known; the benchmark measures that on flowers).
    assert all(a.novelty < old.predict(p).novelty / 2 for a, p in zip(answers, photos, strict=True))
    # predict names it
    assert cli.main(["predict", str(photos[0]), str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["predictions"][0]["name"] == "night bloom"
    # forget
    back = tmp_path / "back.pth"
    assert cli.main(["teach", str(out), "--forget", "night bloom",
                     "--out", str(back)]) == 0
    capsys.readouterr()
    restored, saved = checkpoint.load_checkpoint(back)
    original, _ = checkpoint.load_checkpoint(ckpt)
    assert restored.class_to_idx == original.class_to_idx and saved["taught"] == []
    for key, value in original.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key


def test_teach_refuses_what_it_cannot_do(trained, tmp_path, capsys):
    ckpt = trained["checkpoint"]
    few = tmp_path / "few"
    few.mkdir()
    synthetic_image(9, np.random.default_rng(0)).save(few / "a.jpg")
    cases = [
        ([str(ckpt), str(few), "--name", "x", "--out", str(tmp_path / "o.pth")], "teach needs 3"),
        ([str(ckpt), str(tmp_path / "none"), "--name", "x", "--out", str(tmp_path / "o.pth")],
         "not a folder"),
        ([str(ckpt), str(few), "--out", str(tmp_path / "o.pth")], "--name must be"),
        ([str(ckpt), "--forget", "pink primrose", "--out", str(tmp_path / "o.pth")],
         "is not a taught class"),
        ([str(ckpt), str(few), "--name", "x", "--out", str(ckpt)], "must be a new checkpoint"),
        ([str(ckpt), "--out", str(tmp_path / "o.pth")], "--forget NAME"),
    ]
    for args, message in cases:
        assert cli.main(["teach", *args]) == 1
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "o.pth").exists()
    model, _ = checkpoint.load_checkpoint(ckpt)
    with pytest.raises(Exception, match="already knows"):
        teach(model, [few / "a.jpg"] * 3, name=model.class_names[0])
    with pytest.raises(Exception, match="not a taught class"):
        forget(model, name=model.class_names[0])


def test_a_checkpoint_without_a_verdict_answers_as_before(tmp_path, capsys):
    """Saved before the known verdict existed: no novelty output, known is null."""
    from conftest import write_checkpoint
    from helpers.model.classifier import build_model

    clf = build_model("test_efficientnet", {"a": 0, "b": 1}, hidden_units=0)
    path = write_checkpoint(clf, tmp_path / "old.pth")
    folder = make_image_folder(tmp_path / "f", ["a", "b"], per_class=1, splits=("test",))
    image = next((folder / "test").rglob("*.jpg"))
    assert cli.main(["predict", str(image), str(path), "--json"]) == 0
    item = json.loads(capsys.readouterr().out)
    assert item["known"] is None and item["novelty"] is None
    assert engine_path(path).is_file()


@pytest.mark.slow  # a process of its own, and the benchmark's code on a tiny folder
def test_the_open_world_benchmark_runs(tmp_path):
    folder = make_image_folder(tmp_path / "flowers", CLASSES, per_class=6)
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "open_world.py"),
                           "--data", str(folder), "--draws", "1", "--held_out", "2",
                           "--teach_photos", "3", "--json", str(tmp_path / "ow.json"),
                           "--settings", json.dumps({"arch": "test_efficientnet",
                                                     "epochs": 1, "views": 1})],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    row = json.loads((tmp_path / "ow.json").read_text())[0]
    assert len(row["held_out"]) == 2 and 0 <= row["held_out_kinds"]["auroc"] <= 1
    assert row["not_flowers"]["n"] >= 100
    assert "| kinds held out of training |" in done.stdout

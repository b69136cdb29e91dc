"""Insight: evaluation metrics, calibration, the unsure signal, Grad-CAM and their pictures."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import json  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from PIL import Image  # noqa: E402
from scipy.special import softmax  # noqa: E402
from torch import nn  # noqa: E402

from conftest import make_image_folder, write_checkpoint  # noqa: E402
from helpers import cli
from helpers.data import splits
from helpers.data.preprocess import process_image
from helpers.insight import gradcam, report
from helpers.insight import report_plots as insight_plots  # noqa: E402
from helpers.insight.metrics import (
    cluster_order,
    confused_pairs,
    confusion_matrix,
    highest_loss,
    worst_classes,
)
from helpers.model import checkpoint
from helpers.model.classifier import Classifier, build_model  # noqa: E402
from helpers.serve import export, inference
from helpers.serve.answers import answer
from helpers.serve.prediction import Prediction, predict  # noqa: E402
from helpers.train import calibration, evaluate

CLASSES = ["1", "10", "2", "3"]


@pytest.fixture(scope="module")
def clf() -> Classifier:
    torch.manual_seed(0)
    mapping = {c: i for i, c in enumerate(CLASSES)}
    model = build_model("test_efficientnet", mapping, [f"flower {c}" for c in CLASSES],
                        hidden_units=0)
    with torch.no_grad():
        model.head[1].weight.normal_(0, 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("insight") / "flowers", CLASSES, 2)


def _calibrated_toy(n: int, classes: int, rng: np.random.Generator):
    """Probabilities whose top-1 confidence is exactly the chance of being right."""
    confidence = rng.uniform(1 / classes + 0.05, 1.0, n)
    predicted = rng.integers(0, classes, n)
    probs = np.tile(((1 - confidence) / (classes - 1))[:, None], (1, classes))
    probs[np.arange(n), predicted] = confidence
    right = rng.random(n) < confidence
    wrong = (predicted + rng.integers(1, classes, n)) % classes
    return probs, np.where(right, predicted, wrong)


def test_ece_is_near_zero_when_calibrated_and_large_when_overconfident():
    rng = np.random.default_rng(0)
    probs, labels = _calibrated_toy(20000, 5, rng)
    assert evaluate.expected_calibration_error(probs, labels) < 0.015
    assert evaluate.expected_calibration_error(torch.as_tensor(probs),
                                               torch.as_tensor(labels)) < 0.015
    sharp = answer(np.log(probs), temperature=0.25).probs
    assert evaluate.expected_calibration_error(sharp, labels) > 0.1
    bins = evaluate.reliability(probs, labels)
    assert len(bins["edges"]) == 16 and bins["count"].sum() == 20000
    seen = bins["count"] > 100
    np.testing.assert_allclose(bins["accuracy"][seen], bins["confidence"][seen], atol=0.05)


def test_fit_temperature_recovers_a_known_temperature():
    rng = np.random.default_rng(1)
    true_logits = rng.normal(0, 2.0, (4000, 10))
    labels = np.array([rng.choice(10, p=p) for p in softmax(true_logits, axis=1)])
    assert calibration.fit_temperature(true_logits * 3, labels) == pytest.approx(3.0, rel=0.1)
    assert calibration.fit_temperature(true_logits / 2, labels) == pytest.approx(0.5, rel=0.1)
    # log-probabilities work as logits: equal up to a per-row constant
    from_probs = np.log(softmax(true_logits * 3, axis=1))
    assert calibration.fit_temperature(torch.as_tensor(from_probs), torch.as_tensor(labels)) == \
        pytest.approx(3.0, rel=0.1)


def _confusion() -> np.ndarray:
    matrix = np.diag([20, 20, 20, 20, 20, 20, 20, 20])
    matrix[0, 5], matrix[5, 0], matrix[1, 3], matrix[3, 1], matrix[2, 7] = 6, 6, 5, 3, 4
    return matrix


def test_cluster_order_puts_confused_classes_side_by_side():
    order = list(cluster_order(_confusion()))
    assert sorted(order) == list(range(8))
    for a, b in [(0, 5), (1, 3), (2, 7)]:
        assert abs(order.index(a) - order.index(b)) == 1, order
    assert list(cluster_order(np.diag([3, 3, 3]))) == [0, 1, 2]


def test_confused_pairs_and_per_class_scores():
    names = [f"c{i}" for i in range(8)]
    pairs = confused_pairs(_confusion(), names, n=4)
    assert [(p["true"], p["predicted"], p["count"]) for p in pairs] == [
        (0, 5, 6), (5, 0, 6), (1, 3, 5), (2, 7, 4)]
    assert pairs[2]["true_name"] == "c1" and pairs[2]["predicted_name"] == "c3"
    both = confused_pairs(_confusion(), names, n=10, symmetric=True)
    assert [(p["true"], p["predicted"], p["count"]) for p in both] == [
        (0, 5, 12), (1, 3, 8), (2, 7, 4)]
    probs = np.eye(3)[[0, 0, 1, 2, 2, 2]] * 0.7 + 0.1
    labels = np.array([0, 1, 1, 2, 2, 0])
    matrix = confusion_matrix(probs, labels)
    assert matrix.tolist() == [[1, 0, 1], [1, 1, 0], [0, 0, 2]]
    worst = worst_classes(probs, labels, ["a", "b", "c"], n=2)
    assert [(w["name"], w["accuracy"], w["n"]) for w in worst] == [("a", 0.5, 2), ("b", 0.5, 2)]
    loss = highest_loss(probs, labels, n=2)
    assert {r["index"] for r in loss} == {1, 5}
    assert loss[0]["probability"] == pytest.approx(0.8) and loss[0]["loss"] > 2


def test_unsure_threshold_rule():
    # confidence, right?  sorted high to low: the first four are right, then a miss
    confidence = np.array([0.99, 0.95, 0.9, 0.8, 0.6, 0.5, 0.4])
    right = np.array([1, 1, 1, 1, 0, 1, 0], bool)
    probs = np.stack([confidence, (1 - confidence) / 2, (1 - confidence) / 2], 1)
    labels = np.where(right, 0, 1)
    def rule(p, y, target):
        return calibration.choose_unsure_threshold(p, y, target_accuracy=target)

    assert rule(probs, labels, 1.0) == 0.8
    assert rule(probs, labels, 0.8) == 0.5  # 5 of 6 right
    assert rule(probs[right], labels[right], 0.99) == 0.0
    assert rule(probs[~right], labels[~right], 0.5) == 1.0
    summary = evaluate.unsure_summary(answer(np.log(probs), unsure_below=0.8), labels)
    assert summary["unsure_rate"] == pytest.approx(3 / 7) and summary["top1_sure"] == 1.0
    assert summary["top1_unsure"] == pytest.approx(1 / 3)
    prediction = Prediction([0.6, 0.3], ["1", "2"], ["a", "b"])
    assert prediction.is_unsure(0.7) and not prediction.is_unsure(0.5)
    probs_, classes, names = prediction  # three fields, as before
    assert names == ["a", "b"]


def test_predict_and_checkpoint_carry_temperature_and_threshold(clf, folder, tmp_path):
    image = folder / "test" / "2" / "img_0.jpg"
    x = torch.from_numpy(process_image(image, spec=clf.preprocess))[None]
    with torch.no_grad():
        logits = clf(x)[0]
    clf.temperature, clf.unsure_below = 2.5, 0.4
    try:
        result = predict(image, clf, topk=4)
        np.testing.assert_allclose(result.probs, (logits / 2.5).softmax(0).sort(
            descending=True).values.numpy(), atol=1e-6)
        path = write_checkpoint(clf, tmp_path / "c.pth")
    finally:
        clf.temperature, clf.unsure_below = 1.0, 0.0
    loaded, ckpt = checkpoint.load_checkpoint(path)
    assert ckpt["temperature"] == 2.5 and ckpt["unsure_below"] == 0.4
    assert loaded.temperature == 2.5 and loaded.unsure_below == 0.4
    old = {k: v for k, v in ckpt.items() if k not in ("temperature", "unsure_below")}
    torch.save(old, tmp_path / "old.pth")
    before = checkpoint.load_checkpoint(tmp_path / "old.pth")[0]
    assert before.temperature == 1.0 and before.unsure_below == 0.0


def test_onnx_probabilities_match_predict_with_a_temperature(clf, folder, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    clf.temperature, clf.unsure_below = 1.7, 0.9
    try:
        path = export.export_onnx(clf, tmp_path / "m.onnx")
        images = sorted((folder / "test").rglob("*.jpg"))[:3]
        expected = [predict(p, clf, topk=4) for p in images]
    finally:
        clf.temperature, clf.unsure_below = 1.0, 0.0
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    assert float(meta["temperature"]) == 1.7 and float(meta["unsure_below"]) == 0.9
    x = np.stack([process_image(p, spec=clf.preprocess) for p in images])
    got = session.run(None, {"images": x})[0]
    for row, pred in zip(got, expected, strict=True):
        order = np.argsort(row)[::-1]
        assert [clf.idx_to_class[i] for i in order] == pred.classes
        np.testing.assert_allclose(row[order], pred.probs, atol=1e-4)


def test_cli_predict_says_when_unsure(clf, folder, tmp_path, capsys):
    image = str(folder / "test" / "1" / "img_0.jpg")
    clf.unsure_below = 1.0  # every prediction is unsure
    try:
        sure_not = inference.save_model(clf, tmp_path / "unsure.pth")
    finally:
        clf.unsure_below = 0.0
    assert cli.main(["predict", image, str(sure_not), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["unsure"] is True
    assert cli.main(["predict", image, str(sure_not), "--top_k", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and lines[2].startswith("unsure: top probability ")
    assert lines[2].endswith("below the threshold 100.00%")
    sure = inference.save_model(clf, tmp_path / "sure.pth")
    assert cli.main(["predict", image, str(sure), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["unsure"] is False


class _RedSpot(nn.Module):
    """A toy backbone: one conv that sees only the red channel, pooled."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[0, 0] = 1.0  # feature 0: red
            self.conv.weight[1, 2] = 1.0  # feature 1: blue
            self.conv.bias.zero_()
        self.pool = nn.Sequential(nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.conv(x))


def test_grad_cam_peaks_where_the_evidence_is():
    head = nn.Linear(2, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))  # class 0: red, class 1: blue
        head.bias.zero_()
    toy = Classifier(None, _RedSpot(), head, {"red": 0, "blue": 1}, ["red", "blue"])
    peaks = []
    for top, left in [(4, 4), (40, 30)]:
        x = torch.zeros(3, 64, 64)
        x[0, top:top + 10, left:left + 10] = 1.0  # a red patch
        x[2, 50:60, 0:10] = 0.3  # a dimmer blue one elsewhere
        cam = gradcam.grad_cam(toy, x, class_index=0)
        assert cam.shape == (64, 64) and cam.min() >= 0 and cam.max() == pytest.approx(1.0)
        peaks.append(np.unravel_index(cam.argmax(), cam.shape))
        assert top <= peaks[-1][0] < top + 10 and left <= peaks[-1][1] < left + 10
        blue = gradcam.grad_cam(toy, x, class_index=1)
        assert 50 <= np.unravel_index(blue.argmax(), blue.shape)[0] < 60
    assert peaks[0] != peaks[1]


def test_grad_cam_on_an_efficientnet(clf, folder):
    assert gradcam.target_layer(clf.backbone) is clf.backbone.bn2
    shown, cam = gradcam.explain(clf, folder / "test" / "3" / "img_1.jpg")
    assert shown.shape == (64, 64, 3) and cam.shape == (64, 64) and cam.dtype == np.float32
    assert 0.0 <= cam.min() and cam.max() <= 1.0 and cam.std() > 0.01
    assert not any(p.grad is not None for p in clf.parameters())  # nothing left behind
    mixed = gradcam.overlay(Image.fromarray((shown * 255).astype(np.uint8)), cam[::2, ::2])
    assert mixed.shape == (64, 64, 3) and 0 <= mixed.min() and mixed.max() <= 1


def test_calibration_fits_on_valid_and_the_report_judges_test(clf, tmp_path):
    folder = make_image_folder(tmp_path / "flowers", CLASSES, 8)  # 32: enough to calibrate
    sets = splits.load_data(folder, clf.preprocess).sets
    logits, labels, bad = inference.logits_of(clf, sets["valid"].samples)
    assert logits.shape == (32, 4) and not bad
    try:
        fitted = calibration.calibrate(clf, logits, labels)
        assert fitted["temperature"] == clf.temperature and fitted["fitted_on"] == "valid"
        assert fitted["nll_after"] <= fitted["nll_before"] + 1e-9
        rep = report.report(clf, sets["test"].samples, worst=3, pairs=2, high_loss=3)
        assert rep["temperature"] == clf.temperature and rep["unsure_below"] == clf.unsure_below
        pairs = insight_plots.pair_items(rep, clf)
        losses = insight_plots.high_loss_items(rep, clf)
    finally:
        clf.temperature, clf.unsure_below = 1.0, 0.0
    test = rep["test"]
    assert test["n"] == 32 and 0 <= test["unsure_rate"] <= 1
    assert test["nll_after"] <= test["nll_before"] + 0.5  # fitted on another split
    assert rep["confusion"].sum() == 32 and sorted(rep["order"]) == [0, 1, 2, 3]
    assert len(rep["worst"]) == 3 and len(rep["high_loss"]) == 3
    np.testing.assert_allclose(rep["probs"].sum(1), 1, atol=1e-6)
    assert len(pairs) == len(rep["pairs"]) and len(losses) == 3
    assert all(item[0].shape == (64, 64, 3) for item in pairs + losses)


def test_plots_return_figures():
    fig = insight_plots.plot_confusion(_confusion(), cluster_order(_confusion()),
                                       [f"c{i}" for i in range(8)], annotate=3)
    assert isinstance(fig, Figure) and sorted(t.get_text() for t in fig.axes[0].texts) == \
        ["1", "2", "3"]  # numbered rings; the names are listed beside the matrix
    listed = fig.axes[1].texts[0].get_text().splitlines()
    assert listed[0] in ("1. c0 taken for c5, 6 images", "1. c5 taken for c0, 6 images")
    assert listed[2] == "3. c1 taken for c3, 5 images"
    rng = np.random.default_rng(0)
    probs, labels = _calibrated_toy(500, 4, rng)
    sharp = answer(np.log(probs), temperature=0.5).probs
    fig = insight_plots.plot_reliability(evaluate.reliability(sharp, labels),
                                         evaluate.reliability(probs, labels))
    assert len(fig.axes) == 2 and all(len(ax.patches) == 15 for ax in fig.axes)
    assert "ECE" in fig.axes[1].get_title()
    scores = [{"name": "a", "accuracy": 0.2, "n": 5}, {"name": "b", "accuracy": 0.5, "n": 4}]
    fig = insight_plots.plot_worst_classes(scores)
    assert [round(p.get_width(), 2) for p in fig.axes[0].patches] == [0.2, 0.5]
    picture = np.full((20, 20, 3), 0.5)
    fig = insight_plots.plot_confused_pairs([(picture, picture, "a", "b", 3)] * 3)
    assert len(fig.axes) == 8 and sum(len(ax.images) for ax in fig.axes) == 6
    assert fig.axes[0].get_title() == "this a\nwas taken for a b (3 times)"
    fig = insight_plots.plot_high_loss([(picture, "a", "b", 0.9), (picture, "a", "a", 0.4)])
    assert sum(len(ax.images) for ax in fig.axes) == 2 and "90%" in fig.axes[0].get_title()
    prediction = Prediction([0.4, 0.35, 0.25], ["1", "2", "3"], ["a", "b", "c"])
    fig = insight_plots.plot_gradcam(picture, np.linspace(0, 1, 400).reshape(20, 20),
                                     prediction, true_name="b", unsure_below=0.5)
    assert len(fig.axes) == 3 and len(fig.axes[2].patches) == 3
    assert fig.axes[2].get_title().startswith("unsure")
    matplotlib.pyplot.close("all")

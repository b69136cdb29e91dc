"""Prediction and pictures: process_image on any input, top-K through the label mapping, charts."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from helpers.core.errors import ImageError
from helpers.data import images
from helpers.insight import plots  # noqa: E402
from helpers.model.classifier import Classifier, build_model
from helpers.serve.prediction import Prediction, imshow, predict, process_image  # noqa: E402

FOLDERS = sorted(str(i) for i in range(1, 13))


@pytest.fixture(scope="module")
def clf() -> Classifier:
    torch.manual_seed(0)
    mapping = {c: i for i, c in enumerate(FOLDERS)}
    return build_model("test_efficientnet", mapping, [f"flower {c}" for c in FOLDERS],
                             hidden_units=32).eval()


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "I;16", "I",
                                  "F", "YCbCr"])
def test_process_image_accepts_every_mode(mode, tmp_path):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), np.uint8))
    image = rgb.convert(mode) if mode not in ("I;16", "I", "F") else rgb.convert("L").convert(mode)
    array = process_image(image)
    assert array.shape == (3, 224, 224) and array.dtype == np.float32
    assert np.isfinite(array).all() and -1.0 <= array.min() and array.max() <= 1.0


def test_sixteen_bit_and_float_images_are_scaled():
    ramp16 = Image.fromarray(np.full((10, 10), 65535, np.uint16))
    assert images.to_rgb(ramp16).getpixel((0, 0)) == (255, 255, 255)
    unit = Image.fromarray(np.full((10, 10), 0.5, np.float32))
    assert images.to_rgb(unit).getpixel((0, 0)) == (128, 128, 128)


def test_exif_rotation_is_applied(tmp_path):
    image = Image.new("RGB", (60, 30), "red")
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    image.save(tmp_path / "r.jpg", exif=exif)
    assert images.open_image(tmp_path / "r.jpg").size == (30, 60)


def test_bad_files_name_the_file(tmp_path):
    (tmp_path / "text.jpg").write_text("not an image")
    with pytest.raises(ImageError, match=r"text\.jpg: not an image"):
        images.open_image(tmp_path / "text.jpg")
    with pytest.raises(ImageError, match="no such image file"):
        images.open_image(tmp_path / "absent.jpg")


def test_predict_returns_sorted_topk_through_the_mapping(clf, tmp_path):
    Image.new("RGB", (80, 60), "orange").save(tmp_path / "x.png")
    result = predict(tmp_path / "x.png", clf, topk=5)
    assert isinstance(result, Prediction) and len(result.probs) == 5
    assert result.probs == sorted(result.probs, reverse=True)
    assert sum(result.probs) <= 1.0 + 1e-6
    with torch.no_grad():
        logits = clf(torch.from_numpy(process_image(tmp_path / "x.png"))[None])[0]
    best = logits.argmax().item()
    assert result.classes[0] == FOLDERS[best] and result.names[0] == f"flower {FOLDERS[best]}"
    probs, classes, names = predict(Image.open(tmp_path / "x.png"), clf, topk=20)
    assert len(probs) == 12 and sum(probs) == pytest.approx(1.0, abs=1e-5)


def test_charts_draw_and_save(tmp_path):
    prediction = Prediction([0.7, 0.2, 0.1], ["3", "1", "2"], ["rose", "tulip", "daisy"])
    image = Image.new("RGB", (64, 48), "purple")
    fig = plots.plot_prediction(image, prediction, true_name="tulip")
    bars = fig.axes[1].patches
    assert [round(b.get_width(), 2) for b in bars] == [0.7, 0.2, 0.1]
    assert [t.get_text() for t in fig.axes[1].get_yticklabels()] == ["rose", "tulip", "daisy"]
    path = plots.save_figure(fig, tmp_path / "out" / "top5.png")
    assert Image.open(path).size[0] > 300
    history = [{"epoch": e, "train_loss": 1 / e, "valid_loss": 1.2 / e, "train_top1": 0.5,
                "valid_top1": 0.4 + e / 10} for e in (1, 2, 3)]
    fig = plots.plot_history(history)
    assert len(fig.axes) == 2 and len(fig.axes[1].lines) == 2
    plots.save_figure(fig, tmp_path / "h.png")
    ax = imshow(process_image(image))
    shown = ax.images[0].get_array()
    np.testing.assert_allclose(shown[24, 32], np.array([128, 0, 128]) / 255, atol=0.02)

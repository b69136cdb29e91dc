"""The notebook's photo widget: an upload or a chosen test image goes through the real predict
and the real chart; what it shows is checked against the model run by hand."""

from __future__ import annotations

import datetime
import io

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import synthetic_image
from helpers.data import images
from helpers.data.folders import image_folder
from helpers.insight import try_photo
from helpers.model.classifier import Classifier, build_model
from helpers.serve.prediction import process_image

pytest.importorskip("ipywidgets")


@pytest.fixture
def widget(tiny_folder):
    torch.manual_seed(0)
    clf = build_model("test_efficientnet", {str(i): i - 1 for i in range(1, 13)},
                            [f"flower {i}" for i in range(1, 13)], hidden_units=0).eval()
    with torch.no_grad():
        clf.head[1].weight.normal_(0, 0.3)  # spread, so that the top-5 has a clear order
    box = try_photo.try_your_photo(clf, image_folder(tiny_folder / "test"), choices=5)
    (upload, menu), output = box.children[0].children, box.children[1]
    return clf, upload, menu, output


def _file(name: str, content: bytes) -> dict:
    return {"name": name, "type": "image/png", "size": len(content),
            "content": memoryview(content), "last_modified": datetime.datetime.now()}


def _by_hand(clf: Classifier, image: Image.Image) -> tuple[list[str], np.ndarray]:
    """The top-5 names and probabilities from the PyTorch model itself (not the engine that
    predict uses): softmax(logits / temperature) of process_image."""
    x = torch.from_numpy(process_image(image, spec=clf.preprocess))[None]
    with torch.no_grad():
        probs = (clf(x) / clf.temperature).softmax(1)[0].numpy()
    order = np.argsort(-probs)[:5]
    return [clf.class_names[i] for i in order], probs[order]


def _check_shown(output, clf, image: Image.Image, title: str) -> None:
    """The chart shows the photo, the model's top-5 names and their probabilities as bars."""
    shown = output.last_shown
    names, probs = _by_hand(clf, image)
    assert shown["title"] == title and shown["prediction"].names == names
    np.testing.assert_allclose(shown["prediction"].probs, probs, atol=1e-5)
    ax_image, ax_bars = shown["figure"].axes
    assert ax_image.get_title() == title
    np.testing.assert_array_equal(ax_image.images[0].get_array(), np.asarray(image))
    assert [t.get_text() for t in ax_bars.get_yticklabels()] == names
    np.testing.assert_allclose([bar.get_width() for bar in ax_bars.patches], probs, atol=1e-5)


def test_choosing_a_test_image_or_uploading_a_photo_shows_its_top5(widget, capsys):
    clf, upload, menu, output = widget
    assert len(menu.options) == 5 and menu.value is None  # nothing shown until chosen
    assert not hasattr(output, "last_shown")
    path = menu.options[2][1]
    menu.value = path
    _check_shown(output, clf, images.open_image(path), path.rsplit("/", 1)[-1])
    buf = io.BytesIO()
    photo = synthetic_image(1, np.random.default_rng(0), size=(80, 60))
    photo.convert("RGBA").save(buf, "PNG")
    upload.value = (_file("mine.png", buf.getvalue()),)
    _check_shown(output, clf, photo, "mine.png")
    names, probs = _by_hand(clf, photo)
    said = capsys.readouterr().out.strip().splitlines()[-1]
    if probs[0] < clf.unsure_below:
        assert said.startswith(f"Not sure: the top probability {probs[0]:.0%}")
    else:
        assert said == f"Most likely: {names[0]} ({probs[0]:.0%})."


def test_an_upload_that_is_no_image_says_so_in_one_line(widget, capsys):
    _, upload, _, output = widget
    upload.value = (_file("notes.png", b"not an image"),)
    assert not hasattr(output, "last_shown")  # nothing predicted, nothing drawn
    printed = capsys.readouterr().out.splitlines()[-1]
    assert printed.endswith("notes.png: not an image PIL can read; try a JPEG or PNG")

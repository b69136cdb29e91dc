"""The notebook's photo widget: an upload or a chosen test image reaches predict and the chart."""

from __future__ import annotations

import datetime
import io

import numpy as np
import pytest

from conftest import synthetic_image
from helpers import data, model, try_photo

pytest.importorskip("ipywidgets")


@pytest.fixture
def widget(tiny_folder, monkeypatch):
    clf = model.build_model("test_efficientnet", {str(i): i - 1 for i in range(1, 13)},
                            [f"flower {i}" for i in range(1, 13)], hidden_units=0).eval()
    shown = []
    monkeypatch.setattr(try_photo, "_show",
                        lambda m, image, title, output: shown.append((image.size, title)))
    box = try_photo.try_your_photo(clf, data.image_folder(tiny_folder / "test"), choices=5)
    (upload, menu), output = box.children[0].children, box.children[1]
    return upload, menu, output, shown


def _file(name: str, content: bytes) -> dict:
    return {"name": name, "type": "image/png", "size": len(content),
            "content": memoryview(content), "last_modified": datetime.datetime.now()}


def test_choosing_a_test_image_or_uploading_a_photo_shows_it(widget):
    upload, menu, _, shown = widget
    assert len(menu.options) == 5 and menu.value is None  # nothing shown until chosen
    menu.value = menu.options[2][1]
    buf = io.BytesIO()
    synthetic_image(1, np.random.default_rng(0), size=(80, 60)).convert("RGBA").save(buf, "PNG")
    upload.value = (_file("mine.png", buf.getvalue()),)
    assert shown == [((48, 40), menu.options[2][1].rsplit("/", 1)[-1]), ((80, 60), "mine.png")]


def test_an_upload_that_is_no_image_says_so_in_one_line(widget, capsys):
    upload, _, _, shown = widget
    upload.value = (_file("notes.png", b"not an image"),)
    assert shown == []
    printed = capsys.readouterr().out.splitlines()[-1]
    assert printed.endswith("notes.png: not an image PIL can read; try a JPEG or PNG")

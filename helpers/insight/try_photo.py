"""The notebook's "try it on your own photo": upload a photo or pick a test image, see the top-5."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from helpers.data.images import open_image, to_rgb
from helpers.insight.plots import plot_prediction
from helpers.model.classifier import Classifier
from helpers.serve.prediction import predict

if TYPE_CHECKING:  # a notebook dependency, imported where the widget is made
    import ipywidgets
    from torchvision.datasets import ImageFolder

def _show(model: Classifier, image: Image.Image, title: str, output) -> None:
    """Draw the photo beside its top-5 chart in `output`, and say when the model is unsure."""
    import matplotlib.pyplot as plt
    from IPython.display import display

    result = predict(image, model, topk=5)
    with output:
        output.clear_output(wait=True)
        fig = plot_prediction(image, result, title=title)
        display(fig)
        plt.close(fig)
        # What was shown last, for a test to check without a notebook's front end.
        output.last_shown = {"title": title, "prediction": result, "figure": fig}
        if result.is_unsure(model.unsure_below):
            print(f"Not sure: the top probability {result.probs[0]:.0%} is below "
                  f"{model.unsure_below:.0%}; a closer, sharper photo may help.")
        else:
            print(f"Most likely: {result.names[0]} ({result.probs[0]:.0%}).")


def try_your_photo(model: Classifier, dataset: ImageFolder, *,
                   choices: int = 30) -> ipywidgets.VBox:
    """A FileUpload and a Dropdown of test images; either shows the photo and its top-5 chart."""
    import ipywidgets as widgets

    output = widgets.Output()
    upload = widgets.FileUpload(accept="image/*", multiple=False, description="Your photo")
    step = max(1, len(dataset.samples) // choices)
    picks = dataset.samples[::step][:choices]
    names = model.class_names
    menu = widgets.Dropdown(options=[(f"{names[y]}: {Path(p).name}", p) for p, y in picks],
                            value=None, description="Test image")

    def on_upload(change) -> None:
        if not change["new"]:
            return
        item = change["new"][0]
        try:
            with Image.open(io.BytesIO(bytes(item["content"]))) as raw:
                image = to_rgb(raw)
        except (OSError, ValueError):
            with output:
                output.clear_output()
                print(f"{item['name']}: not an image PIL can read; try a JPEG or PNG")
            return
        _show(model, image, item["name"], output)

    def on_pick(change) -> None:
        if change["new"]:
            path = os.fspath(change["new"])
            _show(model, open_image(path), Path(path).name, output)

    upload.observe(on_upload, names="value")
    menu.observe(on_pick, names="value")
    return widgets.VBox([widgets.HBox([upload, menu]), output])

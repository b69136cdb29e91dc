"""From one image to the top-K flower names: process_image, imshow and predict.

`predict` runs the model's prediction engine (engine.py), the one inference path of a
trained model, so its answer is the answer of `predict.py`, `evaluate` and the main job.
"""

from __future__ import annotations

import os

import numpy as np
from matplotlib.axes import Axes
from PIL import Image

from helpers.data.preprocess import DEFAULT, Preprocess, process_image
from helpers.model.classifier import Classifier
from helpers.serve.answers import Prediction
from helpers.serve.engine import Engine
from helpers.serve.inference import engine_for


def view_for(model: Classifier | Engine, image: str | os.PathLike | Image.Image) -> np.ndarray:
    """The centre crop the model sees, as an H x W x 3 RGB array in 0..1, for display."""
    return process_image(image, spec=model.preprocess.unnormalised()).transpose(1, 2, 0)


def imshow(array: np.ndarray, ax: Axes | None = None, title: str | None = None, *,
           spec: Preprocess = DEFAULT) -> Axes:
    """Show a processed 3 x H x W image: undo the spec's normalisation and draw it on ax."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots()
    array = np.asarray(array, dtype=np.float32).transpose(1, 2, 0)
    array = np.clip(array * np.asarray(spec.std) + np.asarray(spec.mean), 0, 1)
    ax.imshow(array)
    ax.axis("off")
    if title:
        ax.set_title(title)
    return ax


def predict(image: str | os.PathLike | Image.Image, model: Classifier | Engine,
            topk: int = 5) -> Prediction:
    """The top-K calibrated probabilities, class folders and flower names, highest first.

    The probabilities are softmax(logits / model.temperature); `result.is_unsure(
    model.unsure_below)` says whether the top one is too low to trust.
    """
    engine = model if isinstance(model, Engine) else engine_for(model)
    return engine.predict(image, topk=topk)

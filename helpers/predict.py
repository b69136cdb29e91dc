"""From one image to the top-K flower names: process_image, imshow and predict."""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from .images import open_image, to_rgb
from .model import Classifier

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


class Prediction(NamedTuple):
    """Top-K probabilities, class folders and names, highest first."""

    probs: list[float]
    classes: list[str]
    names: list[str]

    def is_unsure(self, threshold: float) -> bool:
        """True when the top probability is below `threshold` (a model's unsure_below)."""
        # A method, not a fourth field: `probs, classes, names = predict(...)` keeps working.
        return bool(self.probs) and self.probs[0] < threshold


def process_image(image: str | os.PathLike | Image.Image, size: int = 224, resize: int = 256,
                  mean: tuple[float, ...] = (0.5, 0.5, 0.5),
                  std: tuple[float, ...] = (0.5, 0.5, 0.5),
                  interpolation: str = "bicubic") -> np.ndarray:
    """Resize the shorter side, centre-crop, scale to 0..1 and normalise: a 3 x H x W float32."""
    image = to_rgb(image) if isinstance(image, Image.Image) else open_image(image)
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(resize * long / short)  # the same rounding as torchvision's Resize
    new_size = (resize, new_long) if width <= height else (new_long, resize)
    image = image.resize(new_size, _RESAMPLE[interpolation])
    left = int(round((new_size[0] - size) / 2.0))
    top = int(round((new_size[1] - size) / 2.0))
    image = image.crop((left, top, left + size, top + size))
    array = np.asarray(image, dtype=np.float32) / 255.0
    array = (array - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return array.transpose(2, 0, 1).copy()


def process_for(model: Classifier, image: str | os.PathLike | Image.Image) -> np.ndarray:
    """process_image with the model's own input size, resize and normalisation."""
    spec = model.spec
    return process_image(image, spec.input_size, spec.resize_size, spec.mean, spec.std,
                         spec.interpolation)


def view_for(model: Classifier, image: str | os.PathLike | Image.Image) -> np.ndarray:
    """The centre crop the model sees, as an H x W x 3 RGB array in 0..1, for display."""
    spec = model.spec
    return process_image(image, spec.input_size, spec.resize_size, (0.0,) * 3, (1.0,) * 3,
                         spec.interpolation).transpose(1, 2, 0)


def imshow(array: np.ndarray | torch.Tensor, ax=None, title: str | None = None,
           mean: tuple[float, ...] = (0.5, 0.5, 0.5), std: tuple[float, ...] = (0.5, 0.5, 0.5)):
    """Show a processed 3 x H x W image: undo the normalisation and draw it on ax."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots()
    array = np.asarray(array, dtype=np.float32).transpose(1, 2, 0)
    array = np.clip(array * np.asarray(std) + np.asarray(mean), 0, 1)
    ax.imshow(array)
    ax.axis("off")
    if title:
        ax.set_title(title)
    return ax


@torch.inference_mode()
def predict(image: str | os.PathLike | Image.Image, model: Classifier, topk: int = 5,
            device: str | torch.device | None = None) -> Prediction:
    """The top-K calibrated probabilities, class folders and flower names, highest first.

    The probabilities are softmax(logits / model.temperature); `result.is_unsure(
    model.unsure_below)` says whether the top one is too low to trust.
    """
    device = torch.device(device) if device else next(model.parameters()).device
    x = torch.from_numpy(process_for(model, image))[None].to(device)
    model.to(device).eval()
    temperature = float(getattr(model, "temperature", 1.0))
    probs = (model(x).float() / temperature).softmax(dim=1)[0]
    top = probs.topk(min(topk, probs.numel()))
    indices = top.indices.tolist()
    return Prediction(top.values.tolist(), [model.idx_to_class[i] for i in indices],
                      [model.class_names[i] for i in indices])

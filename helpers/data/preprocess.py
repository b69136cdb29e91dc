"""The one preprocessing spec of a model, and `process_image`, its NumPy form.

A backbone names its `Preprocess` (input size, resize, normalisation, interpolation); the
training and evaluation transforms (transforms.py), `process_image`, the prediction engine,
the exports' metadata and the phone app's JavaScript are all built from it, so mean and std
are never typed twice. PIL and NumPy, no torch: the engine and `predict.py` use it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from PIL import Image

from helpers.data.images import open_image, to_rgb

CROP_RATIO = 0.875  # the centre crop's share of the resized shorter side (timm's crop_pct)


@dataclass(frozen=True)
class Preprocess:
    """How images are prepared for one model: shorter side to `resize_size`, a centre crop
    of `input_size`, scaled to 0..1 and normalised by `mean` and `std`."""

    input_size: int = 224
    resize_size: int = 256
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    interpolation: str = "bicubic"  # "bicubic" or "bilinear", as PIL names them

    @classmethod
    def crop_of(cls, input_size: int, *, mean: tuple[float, float, float],
                std: tuple[float, float, float], interpolation: str) -> Preprocess:
        """The spec of a backbone trained on `input_size` crops at the usual crop ratio."""
        return cls(input_size=input_size, resize_size=int(input_size / CROP_RATIO), mean=mean,
                   std=std, interpolation=interpolation)

    def metadata(self) -> dict[str, str]:
        """The spec as strings, for an ONNX file's metadata (see `from_metadata`)."""
        return {"mean": json.dumps(list(self.mean)), "std": json.dumps(list(self.std)),
                "input_size": str(self.input_size), "resize_size": str(self.resize_size),
                "interpolation": self.interpolation}

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str]) -> Preprocess:
        """The spec an ONNX file's metadata (or a checkpoint's fields) describes."""
        return cls(input_size=int(meta["input_size"]), resize_size=int(meta["resize_size"]),
                   mean=tuple(json.loads(meta["mean"])) if isinstance(meta["mean"], str)
                   else tuple(meta["mean"]),
                   std=tuple(json.loads(meta["std"])) if isinstance(meta["std"], str)
                   else tuple(meta["std"]),
                   interpolation=str(meta["interpolation"]))

    def unnormalised(self) -> Preprocess:
        """The same crop with no normalisation: the pixels the model sees, in 0..1, to show."""
        return dataclasses.replace(self, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


DEFAULT = Preprocess()  # EfficientNet-Lite0's, the default backbone's


def process_image(image: str | os.PathLike | Image.Image, *,
                  spec: Preprocess = DEFAULT) -> np.ndarray:
    """Resize the shorter side, centre-crop, scale to 0..1 and normalise as `spec` says (the
    default: EfficientNet-Lite0's): a 3 x H x W float32 array."""
    size, resize, interpolation = spec.input_size, spec.resize_size, spec.interpolation
    image = (to_rgb(image) if isinstance(image, Image.Image)
             else open_image(image, at_least=resize))
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(resize * long / short)  # the same rounding as torchvision's Resize
    new_size = (resize, new_long) if width <= height else (new_long, resize)
    image = image.resize(new_size, _RESAMPLE[interpolation])
    left = int(round((new_size[0] - size) / 2.0))
    top = int(round((new_size[1] - size) / 2.0))
    image = image.crop((left, top, left + size, top + size))
    array = np.asarray(image, dtype=np.float32) / 255.0
    array = (array - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return array.transpose(2, 0, 1).copy()

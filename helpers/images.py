"""Opening any image file as an upright 8-bit RGB picture, or failing with a clear message."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def is_image_file(path: str | os.PathLike) -> bool:
    """True for a visible file with an image extension."""
    name = os.path.basename(path)
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


class ImageError(ValueError):
    """An image file cannot be read; the message names the file and what to do."""


def _to_8bit(image: Image.Image) -> Image.Image:
    """Scale 16-bit and float single-channel images into 0..255 grey levels."""
    a = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16") or (image.mode == "I" and a.max(initial=0) > 255):
        a = a / 257.0  # 16-bit range onto 8-bit
    elif image.mode == "F" and a.size and np.nanmax(a) <= 1.0:
        a = a * 255.0  # float images in 0..1
    return Image.fromarray(np.clip(np.nan_to_num(a), 0, 255).round().astype(np.uint8), "L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as RGB: alpha over white, 16-bit and float scaled, EXIF rotation applied."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = _to_8bit(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def open_image(path: str | os.PathLike) -> Image.Image:
    """Read an image file (first frame if animated) as upright RGB; ImageError names a bad file."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: no such image file; check the path")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.seek(0)
                image.load()
                return to_rgb(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(
            f"{path}: image is too large ({Image.MAX_IMAGE_PIXELS:,} pixels at most); "
            f"shrink it before classifying"
        ) from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image PIL can read; use a JPEG, PNG or WebP") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"{path}: damaged or truncated image ({err}); replace it") from None


def check_image(path: str | os.PathLike) -> str | None:
    """Why an image file cannot be used, or None if it decodes (a fast, reduced-size decode)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.draft("RGB", (64, 64))  # JPEG: decode at 1/8 scale, still reads every byte
                image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return "too large"
    except UnidentifiedImageError:
        return "not an image"
    except (OSError, SyntaxError, ValueError) as err:
        return f"damaged ({err})"
    return None

"""Finding image files in a folder, and opening any of them as an upright 8-bit RGB picture
(or failing with a clear message naming the file). PIL and NumPy, no torch."""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from helpers.core.errors import ImageError
from helpers.core.files import not_a_file

HEIF_EXTENSIONS = (".heic", ".heif")  # phone photos; read through pillow-heif
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".gif", ".tif",
                    ".tiff", *HEIF_EXTENSIONS)


def is_hidden(name: str) -> bool:
    """True for names that are never data: dot files and folders, __MACOSX, __pycache__ and such."""
    return name.startswith((".", "__"))


def is_image_file(path: str | os.PathLike) -> bool:
    """True for a visible file with an image extension."""
    name = os.path.basename(path)
    return not is_hidden(name) and name.lower().endswith(IMAGE_EXTENSIONS)


def _identity(stat: os.stat_result) -> tuple[int, int]:
    return stat.st_dev, stat.st_ino


def list_image_files(folder: str | os.PathLike) -> tuple[list[str], list[str]]:
    """Image files under folder, sorted, and the links skipped because they loop back.

    Links are followed, but every real folder and file is listed once however many links
    reach it; a link to a folder being listed (or one above it) would repeat it forever.
    """
    folder = os.fspath(folder)
    real = Path(os.path.realpath(folder))
    above = frozenset(_identity(os.stat(p)) for p in (real, *real.parents))
    files, loops, seen = [], [], set(above)

    def walk(path: str, ancestors: frozenset) -> None:
        try:
            entries = sorted(os.scandir(path), key=lambda e: e.name)
        except OSError:  # unreadable folder
            return
        for entry in entries:
            if is_hidden(entry.name):
                continue
            try:
                is_dir = entry.is_dir()
                if not is_dir and not (entry.is_file() and is_image_file(entry.name)):
                    continue
                key = _identity(entry.stat())
            except OSError:  # a broken link, or a file removed meanwhile
                continue
            if is_dir and key in ancestors:
                loops.append(entry.path)
            elif key not in seen:
                seen.add(key)
                if is_dir:
                    walk(entry.path, ancestors | {key})
                else:
                    files.append(entry.path)

    walk(folder, above)
    return sorted(files), loops


@functools.cache
def _heif_opener() -> bool:
    """Teach PIL to read HEIC/HEIF once, on first need; False when pillow-heif is missing."""
    try:
        import pillow_heif
        pillow_heif.register_heif_opener()
    except (ImportError, OSError):
        return False
    return True


def _require_opener(path: Path) -> None:
    """Raise ImageError for a HEIC/HEIF photo when pillow-heif is not installed."""
    if path.suffix.lower() in HEIF_EXTENSIONS and not _heif_opener():
        raise ImageError(f"{path}: HEIC/HEIF photos need pillow-heif; pip install pillow-heif")


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


def open_image(path: str | os.PathLike, *, at_least: int | None = None) -> Image.Image:
    """Read an image file (first frame if animated) as upright RGB; ImageError names a bad file.

    With `at_least`, a large JPEG is decoded at the largest 1/2, 1/4 or 1/8 scale that keeps
    both sides at least that many pixels (a 12-megapixel photo 8x faster, before the resize).
    """
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: {not_a_file(path, 'image')}")
    _require_opener(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.seek(0)
                if at_least and image.format == "JPEG":
                    image.draft("RGB", (at_least, at_least))
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
    """Why an image file cannot be used, or None if it decodes (a fast, reduced-size decode).

    A HEIC/HEIF photo without pillow-heif raises ImageError: the setup, not the file, is at fault.
    """
    _require_opener(Path(path))
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

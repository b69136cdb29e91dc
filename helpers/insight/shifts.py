"""Photos as a phone takes them: the camera shifts of the robustness benchmark.

Fourteen shifts, three severities each, made with albumentations (a maintained library of
image corruptions) where it has them: out of focus, camera shake, low resolution, strong
JPEG, sensor noise, dark, overexposed, low contrast, faded colour; made here: a warm white
balance, tilted, and three of framing: the flower small in a larger frame of real
surroundings (scikit-image's photos of grass, gravel, brick and a street), a close-up, and
the flower off-centre. Each shifted photo is drawn from a seed of its own (the shift, the
severity, the photo's path), so the shifted copies are the same on every machine.

None of it trains a model: training augments with its own code (data/augment.py), so the
shifts measure what the training did not copy.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # offline: no version check

SEVERITIES = (1, 2, 3)


@dataclass(frozen=True)
class Shift:
    """One way a phone photo differs from the data set's: its name, what it imitates, and
    how to make it at a severity (1, 2 or 3) from an RGB array with a random generator."""

    name: str
    what: str
    make: Callable[[np.ndarray, int, np.random.Generator], np.ndarray]


def _albu(build: Callable[[int], object]) -> Callable[[np.ndarray, int, np.random.Generator],
                                                       np.ndarray]:
    """An albumentations transform at a severity, seeded by the generator."""
    def make(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
        import albumentations as A

        transform = A.Compose([build(severity)], seed=int(rng.integers(2**31)))
        return transform(image=image)["image"]

    return make


def _pick(values: tuple, severity: int):
    return values[severity - 1]


def _defocus(s: int) -> object:
    import albumentations as A

    r = _pick((3, 5, 8), s)
    return A.Defocus(radius=(r, r), alias_blur=(0.1, 0.1), p=1.0)


def _motion(s: int) -> object:
    import albumentations as A

    k = _pick((9, 15, 25), s)
    return A.MotionBlur(blur_limit=(k, k), allow_shifted=False, p=1.0)


def _low_res(s: int) -> object:
    import albumentations as A
    import cv2

    f = _pick((0.4, 0.25, 0.15), s)
    return A.Downscale(scale_range=(f, f), p=1.0, interpolation_pair={
        "downscale": cv2.INTER_AREA, "upscale": cv2.INTER_LINEAR})


def _jpeg(s: int) -> object:
    import albumentations as A

    q = _pick((20, 12, 7), s)
    return A.ImageCompression(quality_range=(q, q), p=1.0)


def _noise(s: int) -> object:
    import albumentations as A

    sd = _pick((0.06, 0.1, 0.16), s)
    return A.GaussNoise(std_range=(sd, sd), p=1.0)


def _brightness(sign: int) -> Callable[[int], object]:
    def build(s: int) -> object:
        import albumentations as A

        b = sign * _pick((0.2, 0.3, 0.4), s)
        return A.RandomBrightnessContrast(brightness_limit=(b, b), contrast_limit=(0, 0),
                                          p=1.0)

    return build


def _contrast(s: int) -> object:
    import albumentations as A

    c = -_pick((0.4, 0.55, 0.7), s)
    return A.RandomBrightnessContrast(brightness_limit=(0, 0), contrast_limit=(c, c), p=1.0)


def _warm(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Indoor light or a wrong white balance: red up, blue down by 15, 25 or 35 %."""
    a = _pick((0.15, 0.25, 0.35), severity)
    gains = np.asarray([1 + a, 1.0, 1 - a], np.float32)
    return np.clip(image.astype(np.float32) * gains, 0, 255).astype(np.uint8)


def _faded(s: int) -> object:
    import albumentations as A

    d = -_pick((30, 45, 60), s)
    return A.HueSaturationValue(hue_shift_limit=(0, 0), sat_shift_limit=(d, d),
                                val_shift_limit=(0, 0), p=1.0)


def _tilted(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """A camera held at an angle: rotated, and cropped to what a rotated frame would see."""
    angle = _pick((15, 30, 45), severity) * (1 if rng.random() < 0.5 else -1)
    h, w = image.shape[:2]
    turned = Image.fromarray(image).rotate(angle, resample=Image.Resampling.BICUBIC)
    # the largest centred rectangle of the same shape with no corner outside the photo
    a = np.deg2rad(abs(angle))
    scale = min(w, h) / (min(w, h) * np.cos(a) + max(w, h) * np.sin(a))
    cw, ch = int(w * scale), int(h * scale)
    left, top = (w - cw) // 2, (h - ch) // 2
    return np.asarray(turned.crop((left, top, left + cw, top + ch)).resize((w, h)))


def _surroundings(size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A real background of `size` (w, h): scikit-image's photo of grass, gravel, brick or a
    street scene, a random crop of it, tinted as such a place looks."""
    from skimage import data

    choice = int(rng.integers(4))
    picture, tint = [(data.grass, (0.55, 0.8, 0.4)), (data.gravel, (0.8, 0.75, 0.65)),
                     (data.brick, (0.85, 0.55, 0.45)), (data.rocket, None)][choice]
    array = picture()
    if array.ndim == 2:
        array = (array[..., None] * np.asarray(tint)[None, None]).astype(np.uint8)
    w, h = size
    side = int(min(array.shape[:2]) * rng.uniform(0.6, 1.0))
    top = int(rng.integers(array.shape[0] - side + 1))
    left = int(rng.integers(array.shape[1] - side + 1))
    crop = Image.fromarray(np.ascontiguousarray(array[top:top + side, left:left + side, :3]))
    return np.asarray(crop.resize((w, h), Image.Resampling.BILINEAR))


def _zoomed_out(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """The flower small in a larger frame: the photo shrunk to 1/1.5, 1/2 or 1/3 of the
    frame's side, somewhere in it, on real surroundings."""
    factor = _pick((1.5, 2.0, 3.0), severity)
    h, w = image.shape[:2]
    frame = _surroundings((w, h), rng).copy()
    sw, sh = int(w / factor), int(h / factor)
    small = np.asarray(Image.fromarray(image).resize((sw, sh), Image.Resampling.BICUBIC))
    left = int(rng.integers(w - sw + 1))
    top = int(rng.integers(h - sh + 1))
    frame[top:top + sh, left:left + sw] = small
    return frame


def _close_up(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """A close-up: the middle 70, 55 or 40 % of the photo's sides, enlarged to its size."""
    keep = _pick((0.7, 0.55, 0.4), severity)
    h, w = image.shape[:2]
    cw, ch = int(w * keep), int(h * keep)
    left, top = (w - cw) // 2, (h - ch) // 2
    crop = Image.fromarray(image).crop((left, top, left + cw, top + ch))
    return np.asarray(crop.resize((w, h), Image.Resampling.BICUBIC))


def _off_centre(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """The flower off-centre: a frame of 80, 70 or 60 % of the photo's sides pushed to a
    random corner, so the flower sits at the frame's edge."""
    keep = _pick((0.8, 0.7, 0.6), severity)
    h, w = image.shape[:2]
    cw, ch = int(w * keep), int(h * keep)
    left = 0 if rng.random() < 0.5 else w - cw
    top = 0 if rng.random() < 0.5 else h - ch
    crop = Image.fromarray(image).crop((left, top, left + cw, top + ch))
    return np.asarray(crop.resize((w, h), Image.Resampling.BICUBIC))


SHIFTS: dict[str, Shift] = {s.name: s for s in [
    Shift("defocus", "out of focus", _albu(_defocus)),
    Shift("motion", "camera shake (motion blur)", _albu(_motion)),
    Shift("low_res", "low resolution", _albu(_low_res)),
    Shift("jpeg", "strong JPEG compression", _albu(_jpeg)),
    Shift("noise", "sensor noise", _albu(_noise)),
    Shift("dark", "dark", _albu(_brightness(-1))),
    Shift("bright", "overexposed", _albu(_brightness(+1))),
    Shift("contrast", "low contrast", _albu(_contrast)),
    Shift("warm", "warm white balance", _warm),
    Shift("faded", "faded colour", _albu(_faded)),
    Shift("tilted", "tilted", _tilted),
    Shift("zoomed_out", "the flower small in a larger frame", _zoomed_out),
    Shift("close_up", "close-up", _close_up),
    Shift("off_centre", "framed off-centre", _off_centre),
]}


def seed_of(path: str | os.PathLike, *, shift: str, severity: int, seed: int = 0) -> int:
    """The seed of one shifted photo: the same for the same photo name, shift and severity."""
    key = f"{seed}\0{shift}\0{severity}\0{Path(path).parent.name}/{Path(path).name}"
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")


def shift_image(image: Image.Image, *, shift: str, severity: int, seed: int) -> Image.Image:
    """The photo as the shift makes it at a severity (1 mild, 3 strong), from a seed."""
    if shift not in SHIFTS:
        raise ValueError(f"unknown shift {shift!r}; choose one of {', '.join(SHIFTS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity {severity} is not one of {SEVERITIES}")
    rng = np.random.default_rng(seed)
    array = np.ascontiguousarray(np.asarray(image.convert("RGB")))
    return Image.fromarray(SHIFTS[shift].make(array, severity, rng))


def shifted_copies(samples: Iterable[tuple[str, int]], *, folder: str | os.PathLike,
                   shift: str, severity: int, seed: int = 0) -> list[tuple[str, int]]:
    """(path, label) of every sample's shifted copy under `folder`, made once and kept (as
    JPEG at quality 95 with full colour resolution, a loss far below any shift's; a copy made
    before is reused)."""
    from helpers.core.files import atomic_write
    from helpers.data.images import open_image

    out = []
    for path, label in samples:
        target = Path(folder) / Path(path).parent.name / (Path(path).stem + ".jpg")
        if not target.is_file():
            shifted = shift_image(open_image(path), shift=shift, severity=severity,
                                  seed=seed_of(path, shift=shift, severity=severity, seed=seed))
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(target, lambda f, image=shifted: image.save(f, format="JPEG", quality=95,
                                                                     subsampling=0))
        out.append((str(target), label))
    return out

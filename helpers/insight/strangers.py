"""Photos that are no flowers, to measure "not a flower I know" (never to fit it).

The sample photos that ship with scikit-image, scikit-learn and matplotlib (a cat, a coffee
cup, coins, a clock, a rocket, an astronaut, a motorcycle, a page of text, ...; not the two
flower photos they hold), a few crops of each, and synthetic ones: flat colours, gradients,
noise, textures and screenshot-like pictures of text and boxes. Written as JPEGs, seeded, in
groups; benchmarks/open_world.py and the tests read them. Nothing here reaches the fitting
of the known verdict (train/known.py fits on training flowers alone).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SKIMAGE_PHOTOS = ("astronaut", "binary_blobs", "brick", "camera", "chelsea", "checkerboard",
                  "clock", "coffee", "coins", "colorwheel", "grass", "gravel", "horse",
                  "hubble_deep_field", "immunohistochemistry", "logo", "microaneurysms",
                  "moon", "page", "retina", "rocket", "shepp_logan_phantom", "text",
                  "stereo_motorcycle", "cell")


def _to_rgb(array: np.ndarray) -> Image.Image:
    """Any sample array (bool, float, grey, RGBA) as an 8-bit RGB image."""
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    elif array.dtype != np.uint8:
        lo, hi = float(array.min()), float(array.max())
        array = ((array - lo) / (hi - lo or 1.0) * 255).astype(np.uint8)
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    return Image.fromarray(np.ascontiguousarray(array[..., :3]))


def package_photos() -> dict[str, Image.Image]:
    """The packages' own sample photos that are no flowers, by name."""
    from skimage import data

    photos = {}
    for name in SKIMAGE_PHOTOS:
        try:
            value = getattr(data, name)()
        except Exception:  # a sample this scikit-image does not ship offline
            continue
        photos[f"skimage-{name}"] = _to_rgb(value[0] if isinstance(value, tuple) else value)
    try:
        import sklearn.datasets

        china = Path(sklearn.datasets.__file__).parent / "images" / "china.jpg"
        photos["sklearn-china"] = Image.open(china).convert("RGB")
    except (ImportError, OSError):
        pass
    try:
        import matplotlib

        sample = Path(matplotlib.get_data_path()) / "sample_data"
        for name in ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png", "logo2.png"):
            if (sample / name).is_file():
                photos[f"matplotlib-{Path(name).stem}"] = Image.open(sample / name).convert("RGB")
    except ImportError:
        pass
    return photos


def sklearn_flower() -> Image.Image:
    """The one flower photo that ships with scikit-learn (a kind to teach in the notebook)."""
    import sklearn.datasets

    return Image.open(Path(sklearn.datasets.__file__).parent / "images" / "flower.jpg").convert(
        "RGB")


def crops_of(photo: Image.Image, *, count: int, seed: int = 0) -> list[Image.Image]:
    """`count` random crops of 45-80 % of a photo's sides, seeded."""
    return _crops(photo, np.random.default_rng(seed), count)


def _crops(photo: Image.Image, rng: np.random.Generator, count: int) -> list[Image.Image]:
    """`count` random square-ish crops of 45-80 % of a photo's sides."""
    w, h = photo.size
    out = []
    for _ in range(count):
        f = rng.uniform(0.45, 0.8)
        cw, ch = max(8, int(w * f)), max(8, int(h * f))
        left, top = int(rng.integers(w - cw + 1)), int(rng.integers(h - ch + 1))
        out.append(photo.crop((left, top, left + cw, top + ch)))
    return out


def synthetic(rng: np.random.Generator, *, each: int = 12,
              size: tuple[int, int] = (320, 288)) -> dict[str, list[Image.Image]]:
    """Flat colours, gradients, noise, textures and screenshot-like pictures, `each` a kind."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    kinds: dict[str, list[Image.Image]] = {k: [] for k in
                                           ("flat", "gradient", "noise", "texture", "screen")}
    for _ in range(each):
        colour = rng.integers(0, 256, 3)
        kinds["flat"].append(Image.new("RGB", size, tuple(int(c) for c in colour)))
        a, b = rng.integers(0, 256, (2, 3))
        t = (np.cos(rng.uniform(0, np.pi)) * xx + np.sin(rng.uniform(0, np.pi)) * yy)[..., None]
        t = (t - t.min()) / (np.ptp(t) or 1)
        kinds["gradient"].append(Image.fromarray((a * (1 - t) + b * t).astype(np.uint8)))
        noise = rng.normal(rng.uniform(60, 190), rng.uniform(20, 80), (h, w, 3))
        kinds["noise"].append(Image.fromarray(noise.clip(0, 255).astype(np.uint8)))
        period = rng.uniform(6, 40)
        angle = rng.uniform(0, np.pi)
        wave = np.sin((np.cos(angle) * xx + np.sin(angle) * yy) * max(w, h) / period * 2 * np.pi)
        if rng.random() < 0.5:
            wave = np.sign(wave) * np.sign(np.sin(xx * max(w, h) / period * 2 * np.pi))
        c1, c2 = rng.integers(0, 256, (2, 3))
        t = ((wave + 1) / 2)[..., None]
        kinds["texture"].append(Image.fromarray((c1 * (1 - t) + c2 * t).astype(np.uint8)))
        screen = Image.new("RGB", size, (245, 245, 245) if rng.random() < 0.7 else (30, 30, 36))
        draw = ImageDraw.Draw(screen)
        for _ in range(int(rng.integers(3, 9))):
            x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 20))
            x1, y1 = x0 + int(rng.integers(30, w // 2)), y0 + int(rng.integers(12, h // 3))
            draw.rectangle((x0, y0, x1, y1), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        for line in range(int(rng.integers(4, 14))):
            draw.text((8, 6 + 18 * line), "".join(chr(int(c)) for c in rng.integers(97, 123, 30)),
                      fill=(20, 20, 20) if screen.getpixel((0, 0))[0] > 128 else (220, 220, 220))
        kinds["screen"].append(screen)
    return kinds


def write_strangers(folder: str | os.PathLike, *, seed: int = 0,
                    crops: int = 2, each: int = 12) -> dict[str, list[Path]]:
    """Write every stranger photo under `folder` as JPEG, by group ("package", "crops",
    "flat", "gradient", "noise", "texture", "screen"); returns the paths by group."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    groups: dict[str, list[Image.Image]] = {"package": [], "crops": []}
    names: dict[str, list[str]] = {"package": [], "crops": []}
    for name, photo in package_photos().items():
        groups["package"].append(photo)
        names["package"].append(name)
        for i, crop in enumerate(_crops(photo, rng, crops)):
            groups["crops"].append(crop)
            names["crops"].append(f"{name}-crop{i}")
    for kind, pictures in synthetic(rng, each=each).items():
        groups[kind] = pictures
        names[kind] = [f"{kind}{i}" for i in range(len(pictures))]
    written: dict[str, list[Path]] = {}
    for group, pictures in groups.items():
        written[group] = []
        for name, picture in zip(names[group], pictures, strict=True):
            path = folder / group / f"{name}.jpg"
            path.parent.mkdir(exist_ok=True)
            picture.save(path, quality=90)
            written[group].append(path)
    return written

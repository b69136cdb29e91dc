"""Training augmentation that looks like a phone camera: the flower small or off-centre in
the frame, out of focus, shaken, low resolution, compressed, noisy, badly lit, off colour.

Written here with torch and torchvision alone (the robustness benchmark makes its shifts
with albumentations, insight/shifts.py), and drawn from torch's generator only, so a seeded
view (train/cache.py seeds torch per photo) is the same on every run.
"""

from __future__ import annotations

import io
import math

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import functional as TF


def _chance(p: float) -> bool:
    return bool(torch.rand(()) < p)


def _uniform(low: float, high: float) -> float:
    return float(low + (high - low) * torch.rand(()))


class ZoomOut:
    """With probability `p`, the photo shrunk to 1/1.3 to 1/`most` of its side and put
    somewhere in a frame of its own surroundings: an enlarged, blurred copy of itself, the
    colours and light of the same place (a phone photo taken from farther away)."""

    def __init__(self, *, p: float = 0.25, most: float = 2.5) -> None:
        self.p, self.most = p, most

    def __call__(self, image: Image.Image) -> Image.Image:
        """The photo, zoomed out or as it was."""
        if not _chance(self.p):
            return image
        w, h = image.size
        factor = _uniform(1.3, self.most)
        frame = image.resize((max(w // 8, 1), max(h // 8, 1)), Image.Resampling.BILINEAR)
        frame = frame.resize((w, h), Image.Resampling.BILINEAR)
        sw, sh = max(int(w / factor), 1), max(int(h / factor), 1)
        left = int(torch.randint(0, w - sw + 1, ()))
        top = int(torch.randint(0, h - sh + 1, ()))
        frame.paste(image.resize((sw, sh), Image.Resampling.BICUBIC), (left, top))
        return frame

    def __repr__(self) -> str:
        return f"ZoomOut(p={self.p}, most={self.most})"


class CameraShake:
    """On a 3 x H x W tensor in 0..1, each with its probability: out of focus (Gaussian
    blur), shaken (motion blur along a random line), low resolution, JPEG compression, sensor
    noise, light (brightness, contrast, gamma) and colour (saturation, white balance)."""

    def __init__(self, *, blur: float = 0.2, motion: float = 0.2, low_res: float = 0.15,
                 jpeg: float = 0.25, noise: float = 0.15, light: float = 0.5,
                 colour: float = 0.4) -> None:
        self.p = {"blur": blur, "motion": motion, "low_res": low_res, "jpeg": jpeg,
                  "noise": noise, "light": light, "colour": colour}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The tensor with the shifts drawn for it."""
        p = self.p
        if _chance(p["blur"]):
            sigma = _uniform(0.6, 3.0)
            k = 2 * math.ceil(3 * sigma) + 1
            x = TF.gaussian_blur(x, [k, k], [sigma, sigma])
        if _chance(p["motion"]):
            x = _motion_blur(x, length=int(torch.randint(5, 20, ())), angle=_uniform(0, math.pi))
        if _chance(p["low_res"]):
            h, w = x.shape[-2:]
            f = _uniform(0.15, 0.5)
            small = F.interpolate(x[None], size=(max(int(h * f), 8), max(int(w * f), 8)),
                                  mode="area")
            x = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)[0]
        if _chance(p["light"]):
            x = TF.adjust_brightness(x, _uniform(0.35, 1.6))
            x = TF.adjust_contrast(x, _uniform(0.4, 1.3))
            x = TF.adjust_gamma(x.clamp(0, 1), _uniform(0.7, 1.5))
        if _chance(p["colour"]):
            x = TF.adjust_saturation(x, _uniform(0.3, 1.3))
            warm = _uniform(-0.3, 0.3)  # red up and blue down, or the other way
            x = x * torch.tensor([1 + warm, 1.0, 1 - warm])[:, None, None]
        if _chance(p["noise"]):
            x = x + torch.randn_like(x) * _uniform(0.02, 0.15)
        x = x.clamp(0, 1)
        if _chance(p["jpeg"]):
            x = _jpeg(x, quality=int(torch.randint(5, 50, ())))
        return x

    def __repr__(self) -> str:
        return "CameraShake(" + ", ".join(f"{k}={v}" for k, v in self.p.items()) + ")"


def _motion_blur(x: torch.Tensor, *, length: int, angle: float) -> torch.Tensor:
    """A blur along a line of `length` pixels at `angle` (radians): a shaken camera."""
    size = length | 1
    kernel = torch.zeros(size, size)
    c = size // 2
    for t in torch.linspace(-c, c, 2 * size):
        kernel[round(c + float(t) * math.sin(angle)), round(c + float(t) * math.cos(angle))] = 1
    kernel = (kernel / kernel.sum()).expand(3, 1, size, size)
    padded = F.pad(x[None], [c, c, c, c], mode="reflect")
    return F.conv2d(padded, kernel, groups=3)[0]


def _jpeg(x: torch.Tensor, *, quality: int) -> torch.Tensor:
    """The tensor after a round trip through JPEG at `quality`."""
    image = TF.to_pil_image(x)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return TF.to_tensor(Image.open(buffer).convert("RGB"))

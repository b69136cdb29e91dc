"""Grad-CAM: which parts of the image the prediction of a class rests on.

The last convolutional feature map of the backbone is weighted, channel by channel, by the
mean gradient of the class score with respect to it; the positive part of the sum, scaled
up to the image and to 0..1, is the class activation map.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from helpers.data.preprocess import process_image
from helpers.model.classifier import Classifier
from helpers.serve.prediction import view_for


def target_layer(backbone: nn.Module) -> nn.Module:
    """The module whose output is the backbone's last convolutional feature map."""
    if hasattr(backbone, "conv_head") and hasattr(backbone, "bn2"):
        return backbone.bn2  # timm EfficientNet: conv_head -> bn2 (+ activation), then pooling
    if hasattr(backbone, "layer4"):
        return backbone.layer4  # torchvision ResNet
    if isinstance(getattr(backbone, "features", None), nn.Module):
        return backbone.features  # torchvision VGG, DenseNet, MobileNet, EfficientNet
    convs = [m for m in backbone.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"{type(backbone).__name__} has no convolution for Grad-CAM")
    return convs[-1]


def grad_cam(model: Classifier, image: torch.Tensor | np.ndarray, class_index: int | None = None,
             layer: nn.Module | None = None) -> np.ndarray:
    """The Grad-CAM of a processed image (3 x H x W) for a class (default: the predicted one),
    as an H x W float32 array in 0..1."""
    x = torch.as_tensor(np.asarray(image) if not isinstance(image, torch.Tensor) else image)
    x = x.float().reshape(1, *x.shape[-3:])
    device = next(model.parameters()).device
    x = x.to(device).requires_grad_(True)  # a graph even when every weight is frozen
    layer = layer or target_layer(model.backbone)
    seen: list[torch.Tensor] = []

    def keep(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        seen.append(output)
        # Downstream gets a copy: an in-place activation after the layer leaves ours intact.
        return output.clone()

    handle = layer.register_forward_hook(keep)
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            logits = model(x)
            index = int(logits.argmax(1)) if class_index is None else int(class_index)
            (grads,) = torch.autograd.grad(logits[0, index], seen[-1])
    finally:
        handle.remove()
        model.train(was_training)
    features = seen[-1].detach()[0].float()
    weights = grads[0].float().mean(dim=(1, 2))
    cam = F.relu((weights[:, None, None] * features).sum(0))
    cam = F.interpolate(cam[None, None], size=tuple(x.shape[-2:]), mode="bilinear",
                        align_corners=False)[0, 0].clamp_min(0)
    peak = cam.max()
    cam = cam / peak if peak > 0 else torch.zeros_like(cam)
    return cam.cpu().numpy().astype(np.float32)


def overlay(image: Image.Image | np.ndarray, cam: np.ndarray, alpha: float = 0.45,
            colormap: str = "jet") -> np.ndarray:
    """The image (H x W x 3, 0..1 or 0..255) with the CAM blended over it in colour."""
    from matplotlib import colormaps

    base = np.asarray(image, dtype=np.float32)
    if base.max() > 1.0:
        base = base / 255.0
    base = base[..., :3] if base.ndim == 3 else np.repeat(base[..., None], 3, axis=2)
    if cam.shape != base.shape[:2]:  # stretch the map to the picture
        stretched = Image.fromarray(np.asarray(cam, np.float32)).resize(
            (base.shape[1], base.shape[0]), Image.Resampling.BILINEAR)
        cam = np.asarray(stretched)
    heat = colormaps[colormap](np.clip(cam, 0, 1))[..., :3]
    return np.clip((1 - alpha) * base + alpha * heat, 0, 1).astype(np.float32)


def explain(model: Classifier, image: str | os.PathLike | Image.Image,
            class_index: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(the centre crop the model sees, its Grad-CAM): ready for overlay or plot_gradcam."""
    x = process_image(image, spec=model.preprocess)
    return view_for(model, image), grad_cam(model, x, class_index)

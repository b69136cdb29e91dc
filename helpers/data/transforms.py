"""The torchvision transforms of training and evaluation, built from a model's `Preprocess`:
the evaluation preset is `process_image` in torchvision's terms (tests check they agree)."""

from __future__ import annotations

from torchvision import transforms
from torchvision.transforms import InterpolationMode

from helpers.data.augment import CameraShake, ZoomOut
from helpers.data.preprocess import Preprocess

AUGMENTATIONS = ("crop", "camera", "mixed")  # TrainConfig.augmentation


def train_transform(spec: Preprocess, *, augmentation: str = "crop") -> transforms.Compose:
    """Augmentation for training: small rotation, random resized crop, horizontal flip; with
    "camera", also the flower zoomed out in its surroundings, larger tilts, and the blur,
    shake, low resolution, compression, noise, light and colour of phone photos; "mixed",
    one or the other at random (the cached recipe alternates them by view instead)."""
    if augmentation == "mixed":
        return transforms.RandomChoice([train_transform(spec, augmentation="crop"),
                                        train_transform(spec, augmentation="camera")])
    if augmentation == "camera":
        return transforms.Compose([
            ZoomOut(),
            transforms.RandomRotation(30, interpolation=InterpolationMode.BILINEAR),
            transforms.RandomResizedCrop(spec.input_size, scale=(0.25, 1.0),
                                         interpolation=InterpolationMode(spec.interpolation)),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            CameraShake(),
            transforms.Normalize(spec.mean, spec.std),
        ])
    if augmentation != "crop":
        raise ValueError(f"unknown augmentation {augmentation!r}; choose {AUGMENTATIONS}")
    return transforms.Compose([
        transforms.RandomRotation(15, interpolation=InterpolationMode.BILINEAR),
        transforms.RandomResizedCrop(spec.input_size, scale=(0.25, 1.0),
                                     interpolation=InterpolationMode(spec.interpolation)),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(spec.mean, spec.std),
    ])


def eval_transform(spec: Preprocess) -> transforms.Compose:
    """Evaluation: shorter side to the spec's resize, centre crop, normalise."""
    return transforms.Compose([
        transforms.Resize(spec.resize_size, interpolation=InterpolationMode(spec.interpolation)),
        transforms.CenterCrop(spec.input_size),
        transforms.ToTensor(),
        transforms.Normalize(spec.mean, spec.std),
    ])

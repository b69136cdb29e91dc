"""The torchvision transforms of training and evaluation, built from a model's `Preprocess`:
the evaluation preset is `process_image` in torchvision's terms (tests check they agree)."""

from __future__ import annotations

from torchvision import transforms
from torchvision.transforms import InterpolationMode

from helpers.data.preprocess import Preprocess


def train_transform(spec: Preprocess) -> transforms.Compose:
    """Augmentation for training: small rotation, random resized crop, horizontal flip."""
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

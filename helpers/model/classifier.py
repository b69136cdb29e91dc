"""The classifier: a pretrained backbone and a new head for our classes."""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor, nn
from torchvision import datasets

from helpers.config import TrainConfig
from helpers.core.device import seed_everything
from helpers.data.preprocess import Preprocess
from helpers.model.backbones import Backbone, get_backbone
from helpers.model.novelty import Novelty


def build_head(in_features: int, num_classes: int, *, hidden_units: int = 512,
               dropout: float = 0.2) -> nn.Sequential:
    """Hidden layer, ReLU and dropout, then the class scores; hidden_units=0 gives a linear head."""
    if hidden_units <= 0:
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, num_classes))
    return nn.Sequential(
        nn.Linear(in_features, hidden_units),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(hidden_units, num_classes),
    )


class Classifier(nn.Module):
    """backbone -> feature vector -> head -> class scores, with the labels it was trained on."""

    def __init__(self, spec: Backbone, backbone: nn.Module, head: nn.Module,
                 class_to_idx: dict[str, int], class_names: list[str]) -> None:
        super().__init__()
        self.spec = spec
        self.backbone = backbone
        self.head = head
        self.class_to_idx = dict(class_to_idx)
        self.idx_to_class = {i: c for c, i in class_to_idx.items()}
        self.class_names = list(class_names)
        # Set on the valid split after training (calibration.calibrate), saved in the checkpoint:
        # predict divides the logits by the temperature; a top probability below
        # unsure_below marks the prediction unsure (0.0: never).
        self.temperature = 1.0
        self.unsure_below = 0.0
        # The known verdict (novelty.py), fitted after training: a photo whose novelty is
        # above novel_above is "not a flower I know" (inf: never, as before it was fitted).
        self.novelty = Novelty()
        self.novel_above = float("inf")
        self.taught: list[str] = []  # class folders added by `teach`, not by training

    def features(self, x: Tensor) -> Tensor:
        """The backbone's pooled feature vectors of a batch of images."""
        return self.backbone(x)

    def scored(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Class scores (logits) and novelty (higher = stranger) of a batch of images."""
        features = self.backbone(x)
        if not self.novelty.whiten.numel():  # not fitted: no known verdict
            return self.head(features), features[:, 0] * 0.0
        return self.head(features), self.novelty(features)

    def forward(self, x: Tensor) -> Tensor:
        """Class scores (logits) of a batch of images."""
        return self.head(self.backbone(x))

    @property
    def preprocess(self) -> Preprocess:
        """How this model's images are prepared (its backbone's spec)."""
        return self.spec.preprocess

    def parameter_counts(self) -> dict[str, int]:
        """How many parameters the backbone and the head hold, and how many of all train."""
        def count(module: nn.Module, *, trainable: bool = False) -> int:
            return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)

        return {"backbone": count(self.backbone), "head": count(self.head),
                "trainable": count(self, trainable=True),
                "frozen": count(self) - count(self, trainable=True)}

    @property
    def backbone_frozen(self) -> bool:
        """True when no backbone parameter is trained."""
        return not any(p.requires_grad for p in self.backbone.parameters())

    def train(self, mode: bool = True) -> Classifier:
        """Training mode for what trains; a frozen backbone stays in eval mode."""
        # A frozen backbone stays in eval mode so its batch-norm statistics never drift.
        super().train(mode)
        if self.backbone_frozen:
            self.backbone.eval()
        return self


def build_model(arch: str, class_to_idx: dict[str, int], class_names: list[str] | None = None, *,
                hidden_units: int = 512, dropout: float = 0.2, pretrained: bool = True,
                freeze: bool = True) -> Classifier:
    """A pretrained backbone (frozen by default) with a new head for the classes of class_to_idx."""
    spec = get_backbone(arch)
    backbone = spec.build(pretrained)
    backbone.requires_grad_(not freeze)
    head = build_head(spec.num_features, len(class_to_idx), hidden_units=hidden_units,
                      dropout=dropout)
    names = class_names or sorted(class_to_idx, key=class_to_idx.__getitem__)
    return Classifier(spec, backbone, head, class_to_idx, names)


def weights_digest(module: nn.Module) -> hashlib._Hash:
    """A running sha256 over a module's parameter names and bytes."""
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h


def new_model(sets: dict[str, datasets.ImageFolder], config: TrainConfig, *,
              names: list[str] | None = None) -> Classifier:
    """A seeded new classifier for the classes of the training set, as the settings say."""
    seed_everything(config.seed)
    return build_model(config.arch, sets["train"].class_to_idx, names,
                       hidden_units=config.hidden_units, dropout=config.dropout)

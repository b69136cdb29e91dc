"""The training settings: a frozen dataclass, torch-free so that command lines start fast."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run except the device; defaults are the fast recipe."""

    arch: str = "efficientnet_lite0"
    recipe: str = "auto"  # auto: "full" on a GPU, "cached" on a CPU; or "course"
    hidden_units: int = 0  # 0: a linear head; the course recipe uses 512
    dropout: float = 0.2
    learning_rate: float = 3e-3  # of the head (Adam in the course recipe, AdamW otherwise)
    backbone_lr: float = 1e-3  # of the fine-tuned backbone layers
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    epochs: int = 4
    batch_size: int = 128
    tail_stages: int = 1  # cached recipe: backbone stages fine-tuned on cached activations
    views: int = 2  # cached recipe: augmented views per training image, besides the centre
    probe_epochs: int = 20  # cached recipe: passes of the linear probe before fine-tuning
    tta: bool = False  # validate on the image and its mirror image, averaged
    seed: int = 0
    fast: bool = True  # bf16/fp16 autocast and channels_last where the hardware gains

    @classmethod
    def course(cls, **changes: Any) -> TrainConfig:
        """The course project's recipe: frozen backbone, 512-unit head, Adam 1e-3, fp32."""
        values = {"recipe": "course", "hidden_units": 512, "dropout": 0.2,
                  "learning_rate": 1e-3, "weight_decay": 0.0, "label_smoothing": 0.0,
                  "epochs": 5, "batch_size": 64, "fast": False}
        return cls(**(values | changes))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """A config from a saved dict, ignoring keys this version does not know."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

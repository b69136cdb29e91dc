"""The training settings: a frozen dataclass, torch-free so that command lines start fast."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, fields, replace
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
    augment: bool = True  # False: training images get the evaluation transform (exact tests)
    compile: bool = False  # torch.compile the trained module (pays on long CUDA runs only)

    @classmethod
    def course(cls, **changes: Any) -> TrainConfig:
        """The course project's recipe: frozen backbone, 512-unit head, Adam 1e-3, fp32."""
        values = {"recipe": "course", "hidden_units": 512, "dropout": 0.2,
                  "learning_rate": 1e-3, "weight_decay": 0.0, "label_smoothing": 0.0,
                  "epochs": 5, "batch_size": 64, "fast": False}
        return cls(**(values | changes))

    @classmethod
    def full(cls, **changes: Any) -> TrainConfig:
        """The GPU recipe: the whole network fine-tuned, with settings chosen by reasoning
        (no GPU was at hand to tune them; benchmarks/gpu_check.sh measures them)."""
        # 224 pixels: the resolution the backbone was trained at, and the one the engine,
        # the exports and the eval transform use; more costs (s/224)^2 compute for a point
        # or less on flowers. 12 epochs of 64: ~1,200 steps over 6,552 images, where
        # published EfficientNet-B0 fine-tunes on Flowers-102 level off; small batches give
        # more steps to a small data set, and 64 keeps batch norm's statistics sound. The
        # backbone at 3e-4, a tenth of the new head's 3e-3: 1e-3 won on the CPU recipe, which
        # tunes the last stage alone; the early stages' general features, trained here too,
        # are undone by AdamW steps that large before the head has settled.
        values = {"recipe": "full", "epochs": 12, "batch_size": 64, "learning_rate": 3e-3,
                  "backbone_lr": 3e-4}
        return cls(**(values | changes))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """A config from a saved dict, ignoring keys this version does not know."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def recipe_for(recipe: str, device_type: str) -> str:
    """The recipe to run: 'auto' is full fine-tuning on a GPU, cached activations on a CPU."""
    if recipe != "auto":
        return recipe
    return "cached" if device_type == "cpu" else "full"


# The cached recipe's settings by training images a class, chosen on valid splits of two
# regimes (benchmarks/tune.py; figures in README.md): the course split (64 a class) and 10 a
# class drawn from it. Few images: more augmented views and epochs pay, and cost little.
FEW_IMAGES = 20  # images a class at or below which the few-image settings apply
FEW_VIEWS, FEW_EPOCHS = 4, 4


def for_data(config: TrainConfig, *, images_per_class: float, device_type: str,
             keep: Collection[str] = ()) -> TrainConfig:
    """The settings that follow the data (views, epochs of the cached recipe); fields in
    `keep` (the options a user typed) stay as given."""
    if recipe_for(config.recipe, device_type) != "cached" or images_per_class > FEW_IMAGES:
        return config
    changes = {"views": max(config.views, FEW_VIEWS), "epochs": max(config.epochs, FEW_EPOCHS)}
    return replace(config, **{k: v for k, v in changes.items() if k not in keep})

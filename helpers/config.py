"""The training settings: a frozen dataclass, torch-free so that command lines start fast."""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from helpers.core.errors import UserError


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
    epochs: int = 12  # passes over the training images (each once, in one of its views)
    batch_size: int = 128
    tail_stages: int = 1  # cached recipe: backbone stages fine-tuned on cached activations
    views: int = 2  # cached recipe: augmented views per training image, besides the centre
    probe_epochs: int = 20  # cached recipe: passes of the linear probe before fine-tuning
    freeze_bn: bool = True  # cached recipe: the tail's batch norm keeps ImageNet statistics
    tta: bool = False  # validate on the image and its mirror image, averaged
    seed: int = 0
    fast: bool = True  # bf16/fp16 autocast and channels_last where the hardware gains
    augment: bool = True  # False: training images get the evaluation transform (exact tests)
    augmentation: str = "crop"  # "crop"; "camera": also the shifts of phone photos; "mixed"
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


# The cached recipe's views and epochs, chosen on valid splits at two sizes of data
# (benchmarks/tune.py; README.md has the figures): 10 images a class (drawn from the course
# split) and the course split's 64. Few images: more augmented views and epochs pay, and
# cost little. Between the two, interpolated on a log scale; beyond, the nearer one.
TUNED = ((10, 6, 48), (64, 2, 12))  # (training images a class, augmented views, epochs)


def for_data(config: TrainConfig, *, images_per_class: float, device_type: str,
             keep: Collection[str] = ()) -> TrainConfig:
    """The settings that follow the data (the cached recipe's views and epochs); fields in
    `keep` (the options a user typed) stay as given."""
    if recipe_for(config.recipe, device_type) != "cached":
        return config
    (few, few_views, few_epochs), (many, many_views, many_epochs) = TUNED
    t = (math.log(max(images_per_class, 1)) - math.log(few)) / (math.log(many) - math.log(few))
    t = min(max(t, 0.0), 1.0)
    changes = {"views": round(few_views + t * (many_views - few_views)),
               "epochs": round(few_epochs + t * (many_epochs - few_epochs))}
    return replace(config, **{k: v for k, v in changes.items() if k not in keep})


def settle(typed: Mapping[str, Any], *, device_type: str,
           images_per_class: float | None = None) -> TrainConfig:
    """A run's settings, settled in this one place for the command line, the notebook and the
    benchmarks: the recipe ('auto' resolved for the device) with its own defaults, then the
    views and epochs that follow the data (once its images a class are known), and every
    option the user typed, which always wins. Impossible values are refused in one line."""
    config = _recipe_config(typed, device_type=device_type)
    if images_per_class is None:
        return config
    return for_data(config, images_per_class=images_per_class, device_type=device_type,
                    keep=typed)


def _recipe_config(typed: Mapping[str, Any], *, device_type: str) -> TrainConfig:
    """The recipe's defaults with the typed settings over them, checked."""
    unknown = sorted(set(typed) - {f.name for f in fields(TrainConfig)})
    if unknown:
        raise UserError(f"unknown setting(s) {', '.join(unknown)}; the settings are the fields "
                        "of TrainConfig")
    recipe = recipe_for(typed.get("recipe", "auto"), device_type)
    base = {"course": TrainConfig.course, "full": TrainConfig.full}.get(recipe, TrainConfig)
    config = base(**(dict(typed) | {"recipe": recipe}))
    check(config)
    return config


def check_typed(typed: Mapping[str, Any], *, device_type: str) -> None:
    """Refuse unknown or impossible typed settings before any work starts."""
    _recipe_config(typed, device_type=device_type)


def followed_data(config: TrainConfig, *, typed: Collection[str]) -> dict[str, Any]:
    """The settings of a settled config that the data chose (the cached recipe's views and
    epochs), those typed left out."""
    if config.recipe != "cached":
        return {}
    return {k: getattr(config, k) for k in ("views", "epochs") if k not in typed}


def check(config: TrainConfig) -> None:
    """Refuse impossible settings before any work starts, one line each (named as options)."""
    def positive(name: str, value: float) -> None:
        if not (math.isfinite(value) and value > 0):
            raise UserError(f"--{name} must be a finite number above 0, not {value}")

    positive("learning_rate", config.learning_rate)
    positive("backbone_lr", config.backbone_lr)
    if config.batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, not {config.batch_size}")
    if config.epochs < 1:
        raise UserError(f"--epochs must be at least 1, not {config.epochs}")
    if not 0 <= config.views <= 32:
        raise UserError(f"--views must be between 0 and 32, not {config.views}")
    if not 0.0 <= config.dropout < 1.0:
        raise UserError(f"--dropout must be in [0, 1), not {config.dropout}")
    if config.augmentation not in ("crop", "camera", "mixed"):
        raise UserError("--augmentation must be crop, camera or mixed, not "
                        f"{config.augmentation!r}")
    if config.hidden_units < 0:
        raise UserError(f"--hidden_units must be 0 (a linear head) or more, "
                        f"not {config.hidden_units}")

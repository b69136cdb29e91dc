"""Training recipes: each builds a `plan.Plan` (what trains on what); `loop.fit` runs it.

- cached (the CPU default): the frozen trunk's activations are computed once (in the
  fastest runtime on this CPU, trunk.py) and cached; a linear probe trains the head on
  pooled features in seconds, then the last backbone stage, the final 1x1 conv and the head
  are fine-tuned on the cached views, each image once an epoch in one view drawn at random
  (its centre crop or an augmented view).
- full (the GPU default): the whole network is fine-tuned on augmented images.
- course: the course project's recipe, a frozen backbone and every augmented image
  through it every epoch.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torchvision import datasets

from helpers.config import TrainConfig, recipe_for
from helpers.core.device import StopFlag
from helpers.core.distributed import Distributed
from helpers.data.folders import make_loaders, with_transform
from helpers.data.transforms import eval_transform, train_transform
from helpers.model.classifier import Classifier
from helpers.train.cache import ActivationCache
from helpers.train.cached_recipe import cached_plan
from helpers.train.calibration import calibrate_on
from helpers.train.evaluate import topk_accuracy
from helpers.train.known import fit_known
from helpers.train.loop import fit, predict_probs
from helpers.train.plan import Phase, Plan, adamw, one_cycle


def final_config(config: TrainConfig, history: list[dict[str, Any]]) -> TrainConfig:
    """The settings of a final model on all labelled images: the first run's, with as many
    epochs of the last phase as that run's kept epoch had (0: the probe alone)."""
    kept = next(row for row in history if row.get("kept"))
    last_phase = history[-1]["phase"]
    epochs = kept["phase_epoch"] if kept["phase"] == last_phase else 0
    return dataclasses.replace(config, epochs=epochs)


def all_labelled(sets: dict[str, datasets.ImageFolder]) -> dict[str, datasets.ImageFolder]:
    """The training set of a final model: train and valid images, with train's transform."""
    return {"train": sets["train"].joined(sets["valid"])}


def trainable_by_phase(model: Classifier, config: TrainConfig,
                       device: torch.device) -> dict[str, int]:
    """How many parameters each phase of config's recipe will train (before training)."""
    head = sum(p.numel() for p in model.head.parameters())
    recipe = recipe_for(config.recipe, device.type)
    if recipe == "course":
        return {"train (head only, backbone frozen)": head}
    if recipe == "full":
        return {"train (the whole network)": sum(p.numel() for p in model.parameters())}
    from helpers.train.cache import split_backbone

    _, tail = split_backbone(model.backbone, config.tail_stages)
    phases = {"linear probe (head only)": head} if config.probe_epochs > 0 else {}
    return phases | {"fine-tune (last backbone stage and head)":
                     head + sum(p.numel() for p in tail.parameters())}


def _image_plan(model: Classifier, sets: dict[str, datasets.ImageFolder], config: TrainConfig,
                device: torch.device, *, optimizer: torch.optim.Optimizer,
                scheduled: bool, dist: Distributed | None = None) -> Plan:
    """A plan that trains `model` on augmented images with `optimizer` for config.epochs
    (under torchrun each process takes a shard of config.batch_size images per step)."""
    chosen = {s: sets[s] for s in ("train", "valid") if s in sets}
    if not config.augment:  # the same input every epoch: runs that can be compared exactly
        chosen["train"] = with_transform(chosen["train"], eval_transform(model.preprocess))
    elif config.augmentation != "crop":
        chosen["train"] = with_transform(chosen["train"], train_transform(
            model.preprocess, augmentation=config.augmentation))
    loaders = make_loaders(chosen, batch_size=config.batch_size, dist=dist, device=device)
    scheduler = (one_cycle(optimizer, config.epochs * len(loaders["train"])) if scheduled
                 else None)
    loss = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    phase = Phase(name="train", module=model, batches=loaders["train"], optimizer=optimizer,
                  epochs=config.epochs, scheduler=scheduler, loss=loss,
                  mixed_precision=config.fast, compiled=config.compile)

    def validate() -> dict[str, float]:
        return topk_accuracy(*predict_probs(model, loaders["valid"], device,
                                       mixed_precision=config.fast, mirror=config.tta))

    return Plan(model=model, phases=[phase], validate=validate if "valid" in loaders else None,
                seed=config.seed)


def full_plan(model: Classifier, sets: dict[str, datasets.ImageFolder], config: TrainConfig,
              device: torch.device, *, dist: Distributed | None = None) -> Plan:
    """The whole network fine-tuned on augmented images: AdamW, one-cycle, label smoothing."""
    model.requires_grad_(True)
    optimizer = adamw([(list(model.backbone.parameters()), config.backbone_lr),
                        (list(model.head.parameters()), config.learning_rate)],
                       config.weight_decay)
    return _image_plan(model, sets, config, device, optimizer=optimizer, scheduled=True,
                       dist=dist)


def course_plan(model: Classifier, sets: dict[str, datasets.ImageFolder], config: TrainConfig,
                device: torch.device, *, dist: Distributed | None = None) -> Plan:
    """The course's recipe: Adam on the head of a frozen backbone, no schedule."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=config.learning_rate)
    return _image_plan(model, sets, config, device, optimizer=optimizer, scheduled=False,
                       dist=dist)


@dataclass
class Trained:
    """What training gives besides the trained model: history, calibration, timings."""

    history: list[dict[str, Any]]
    calibration: dict[str, Any]  # temperature and unsure threshold fitted on valid, and facts
    timings: dict[str, float]  # seconds extracting activations, in each phase


def build_plan(model: Classifier, sets: dict[str, datasets.ImageFolder], config: TrainConfig,
               device: torch.device, *, stop: StopFlag | None = None,
               log: Callable[[str], None] | None = print,
               dist: Distributed | None = None) -> tuple[Plan, ActivationCache | None]:
    """The plan of config's recipe ('auto' resolved for the device), and the activation
    cache of the cached recipe (None for the others), whose extraction happens here."""
    recipe = recipe_for(config.recipe, device.type)
    if recipe == "cached":
        return cached_plan(model, sets, config, device, stop=stop, log=log)
    if recipe == "full":
        return full_plan(model, sets, config, device, dist=dist), None
    if recipe == "course":
        return course_plan(model, sets, config, device, dist=dist), None
    raise ValueError(f"unknown recipe {recipe!r}; choose auto, cached, full or course")


def run_recipe(model: Classifier, sets: dict[str, datasets.ImageFolder], config: TrainConfig,
               device: torch.device, *, log: Callable[[str], None] | None = print,
               state_path: str | os.PathLike | None = None,
               resume: dict | None = None, stop: StopFlag | None = None,
               dist: Distributed | None = None, identity: dict | None = None) -> Trained:
    """Train `model` by config's recipe (loop.fit runs its plan), then calibrate it on valid.

    The model leaves with its best epoch's weights, its temperature and its unsure
    threshold. See loop.fit for the resumable state (`state_path`, `resume`) and `stop`.
    """
    plan, cache = build_plan(model, sets, config, device, stop=stop, log=log, dist=dist)
    plan.identity = {"config": asdict(config), **(identity or {})}
    history = fit(plan, device, log=log, state_path=state_path, resume=resume, stop=stop,
                  dist=dist)
    finish_training(model, plan)
    timings = _phase_seconds(history, cache)
    if dist is None or dist.is_main:
        timings["fit_known"] = fit_known(model, sets["train"], device, cache=cache,
                                         valid=sets.get("valid"))["seconds"]
    tic = time.perf_counter()
    calibration = {}
    if "valid" in sets and (dist is None or dist.is_main):
        calibration = calibrate_on(model, sets["valid"].samples)
    timings["calibrate"] = time.perf_counter() - tic
    return Trained(history=history, calibration=calibration, timings=timings)


def finish_training(model: Classifier, plan: Plan) -> None:
    """The classifier after its plan ran: in eval mode, and with what was trained (the plan's
    module) still marked trainable, as counted."""
    if plan.model is not model:  # the cached recipe trained tail and head on activations
        model.requires_grad_(False)
        plan.model.requires_grad_(True)
    model.eval()


def _phase_seconds(history: list[dict], cache: ActivationCache | None) -> dict[str, float]:
    """Seconds extracting activations (before the plan ran) and in each phase's epochs."""
    timings: dict[str, float] = {"extract": cache.seconds if cache else 0.0,
                                 "extract_images": cache.images if cache else 0}
    previous = 0.0
    for row in history:
        timings[row["phase"]] = timings.get(row["phase"], 0.0) + row["seconds"] - previous
        previous = row["seconds"]
    return timings

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
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torchvision import datasets

from helpers.config import TrainConfig, recipe_for
from helpers.config import for_data as config_for_data
from helpers.core.device import StopFlag, autocast
from helpers.core.distributed import Distributed
from helpers.data.folders import images_per_class, make_loaders, with_transform
from helpers.data.transforms import eval_transform
from helpers.model.classifier import Classifier
from helpers.serve.inference import logits_of
from helpers.train.batches import Passes, ViewBatches, tensor_loader
from helpers.train.cache import ActivationCache
from helpers.train.calibration import calibrate
from helpers.train.evaluate import topk_accuracy
from helpers.train.loop import fit, predict_probs
from helpers.train.plan import Phase, Plan


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


def for_data(config: TrainConfig, sets: dict[str, datasets.ImageFolder], device: torch.device,
             *, keep: Collection[str] = ()) -> TrainConfig:
    """The settings that follow the training images a class (config.for_data): the fields in
    `keep`, the ones a user chose, stay."""
    return config_for_data(config, images_per_class=images_per_class(sets),
                           device_type=device.type, keep=keep)


def trainable_by_phase(model: Classifier, config: TrainConfig,
                       device: torch.device) -> dict[str, int]:
    """How many parameters each phase of config's recipe will train (before training)."""
    head = sum(p.numel() for p in model.head.parameters())
    recipe = resolve_recipe(config, device)
    if recipe == "course":
        return {"train (head only, backbone frozen)": head}
    if recipe == "full":
        return {"train (the whole network)": sum(p.numel() for p in model.parameters())}
    from helpers.train.cache import split_backbone

    _, tail = split_backbone(model.backbone, config.tail_stages)
    phases = {"linear probe (head only)": head} if config.probe_epochs > 0 else {}
    return phases | {"fine-tune (last backbone stage and head)":
                     head + sum(p.numel() for p in tail.parameters())}


def resolve_recipe(config: TrainConfig, device: torch.device) -> str:
    """The recipe to run: 'auto' means full fine-tuning on a GPU, cached activations on a CPU."""
    return recipe_for(config.recipe, device.type)


def _one_cycle(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.OneCycleLR:
    """One-cycle schedule to each group's learning rate over `steps` batches."""
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=max(steps, 1),
        pct_start=0.15)


def _adamw(groups: list[tuple[list[nn.Parameter], float]], weight_decay: float):
    """AdamW with one parameter group per (parameters, learning rate)."""
    return torch.optim.AdamW([{"params": p, "lr": lr} for p, lr in groups if p],
                             weight_decay=weight_decay)


def _labels(dataset: datasets.ImageFolder) -> torch.Tensor:
    return torch.tensor(dataset.targets)


class CachedModel(nn.Module):
    """tail -> head: the trainable part of the classifier, fed cached trunk activations."""

    def __init__(self, tail: nn.Module, head: nn.Module, *, freeze_bn: bool = False) -> None:
        super().__init__()
        self.tail, self.head, self.freeze_bn = tail, head, freeze_bn

    def train(self, mode: bool = True) -> CachedModel:
        """Train mode; with freeze_bn the tail's batch norm keeps normalising by its ImageNet
        statistics (its scale and shift still train): a quarter less time a step."""
        super().train(mode)
        if self.freeze_bn:
            for module in self.tail.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores of a batch of cached trunk activations."""
        # The cache holds fp16; without autocast (no bf16 on this CPU) the tail needs fp32.
        return self.head(self.tail(x.float()))


def cached_probs(net: nn.Module, cache: ActivationCache, dataset: datasets.ImageFolder,
                 device: torch.device, *, config: TrainConfig) -> torch.Tensor:
    """Class probabilities of a dataset from its cached centre (and mirrored) activations."""
    labels = _labels(dataset)
    views = ["centre", "flip"] if config.tta else ["centre"]
    probs = [predict_probs(net, tensor_loader(cache.get(dataset, v), labels, batch_size=256),
                           device, mixed_precision=config.fast)[0] for v in views]
    return torch.stack(probs).mean(0)


@torch.inference_mode()
def _pooled(tail: nn.Module, x: torch.Tensor, device: torch.device, *,
            mixed_precision: bool) -> torch.Tensor:
    """The frozen tail's pooled features of cached activations, in float32 on the CPU."""
    tail.eval().to(device)
    outputs = []
    for batch in x.split(256):
        with autocast(device, enabled=mixed_precision):
            outputs.append(tail(batch.to(device).float()).float().cpu())
    return torch.cat(outputs)


def cached_plan(model: Classifier, sets: dict[str, datasets.ImageFolder], config: TrainConfig,
                device: torch.device, *, stop: StopFlag | None = None,
                log: Callable[[str], None] | None = None) -> tuple[Plan, ActivationCache]:
    """Linear probe on pooled centre features, then the tail and head on cached views."""
    model.requires_grad_(False).eval()
    cache = ActivationCache(model.spec, model.backbone, tail_stages=config.tail_stages,
                            device=device, stop=stop, log=log)
    net = CachedModel(cache.tail, model.head, freeze_bn=config.freeze_bn).to(device)
    y_train = _labels(sets["train"])
    x_train = cache.get(sets["train"], "centre")
    for view in (["centre", "flip"] if config.tta else ["centre"]) if "valid" in sets else []:
        cache.get(sets["valid"], view)  # extracted now, so that phases time training alone
    loss = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    phases = []
    if config.probe_epochs > 0:  # the head alone, on features computed once by the frozen tail
        features = _pooled(cache.tail, x_train, device, mixed_precision=config.fast)
        probe = _adamw([(list(model.head.parameters()), config.learning_rate)],
                       config.weight_decay)
        loader = Passes(tensor_loader(features, y_train, batch_size=256, shuffle=True),
                        config.probe_epochs)
        phases.append(Phase(name="linear probe", module=model.head, batches=loader,
                            optimizer=probe, scheduler=_one_cycle(probe, len(loader)),
                            loss=loss, mixed_precision=False))
    augmented = config.views if config.augment else 0
    # One tensor of every view, filled a view at a time: never two copies of the views.
    n = len(x_train)
    x_all = torch.empty((n * (1 + augmented), *x_train.shape[1:]), dtype=x_train.dtype,
                        memory_format=torch.channels_last)
    x_all[:n] = x_train
    for v in range(1, augmented + 1):
        x_all[v * n:(v + 1) * n] = cache.get(sets["train"], f"aug{v}",
                                             seed=config.seed * 1000 + v)
    cache.release()  # the trunk's ONNX Runtime session and its memory: extraction is done
    optimizer = _adamw([(list(cache.tail.parameters()), config.backbone_lr),
                        (list(model.head.parameters()), config.learning_rate)],
                       config.weight_decay)
    loader = ViewBatches(x_all, y_train, batch_size=config.batch_size)
    phases.append(Phase(name="fine-tune", module=net, batches=loader, optimizer=optimizer,
                        epochs=config.epochs,
                        scheduler=_one_cycle(optimizer, config.epochs * len(loader)),
                        loss=loss, mixed_precision=config.fast))
    model.head.requires_grad_(True)
    cache.tail.requires_grad_(True)

    def validate() -> dict[str, float]:
        return topk_accuracy(cached_probs(net, cache, sets["valid"], device, config=config),
                        _labels(sets["valid"]))

    return Plan(model=net, phases=phases, validate=validate if "valid" in sets else None,
                seed=config.seed), cache


def _image_plan(model: Classifier, sets: dict[str, datasets.ImageFolder], config: TrainConfig,
                device: torch.device, *, optimizer: torch.optim.Optimizer,
                scheduled: bool, dist: Distributed | None = None) -> Plan:
    """A plan that trains `model` on augmented images with `optimizer` for config.epochs
    (under torchrun each process takes a shard of config.batch_size images per step)."""
    chosen = {s: sets[s] for s in ("train", "valid") if s in sets}
    if not config.augment:  # the same input every epoch: runs that can be compared exactly
        chosen["train"] = with_transform(chosen["train"], eval_transform(model.preprocess))
    loaders = make_loaders(chosen, batch_size=config.batch_size, dist=dist, device=device)
    scheduler = (_one_cycle(optimizer, config.epochs * len(loaders["train"])) if scheduled
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
    optimizer = _adamw([(list(model.backbone.parameters()), config.backbone_lr),
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


def run_recipe(model: Classifier, sets: dict[str, datasets.ImageFolder], config: TrainConfig,
               device: torch.device, *, log: Callable[[str], None] | None = print,
               state_path: str | os.PathLike | None = None,
               resume: dict | None = None, stop: StopFlag | None = None,
               dist: Distributed | None = None, identity: dict | None = None) -> Trained:
    """Train `model` by config's recipe (loop.fit runs its plan), then calibrate it on valid.

    The model leaves with its best epoch's weights, its temperature and its unsure
    threshold. See loop.fit for the resumable state (`state_path`, `resume`) and `stop`.
    """
    recipe = resolve_recipe(config, device)
    cache = None
    if recipe == "cached":
        plan, cache = cached_plan(model, sets, config, device, stop=stop, log=log)
    elif recipe == "full":
        plan = full_plan(model, sets, config, device, dist=dist)
    elif recipe == "course":
        plan = course_plan(model, sets, config, device, dist=dist)
    else:
        raise ValueError(f"unknown recipe {recipe!r}; choose auto, cached, full or course")
    plan.identity = {"config": asdict(config), **(identity or {})}
    history = fit(plan, device, log=log, state_path=state_path, resume=resume, stop=stop,
                  dist=dist)
    if cache is not None:
        model.requires_grad_(False)
        plan.model.requires_grad_(True)  # what was trained stays trainable, as counted
    model.eval()
    timings = _phase_seconds(history, cache)
    tic = time.perf_counter()
    calibration = {}
    if "valid" in sets and (dist is None or dist.is_main):
        logits, labels, _ = logits_of(model, sets["valid"].samples)
        calibration = calibrate(model, logits, labels)
    timings["calibrate"] = time.perf_counter() - tic
    return Trained(history=history, calibration=calibration, timings=timings)


def _phase_seconds(history: list[dict], cache: ActivationCache | None) -> dict[str, float]:
    """Seconds extracting activations (before the plan ran) and in each phase's epochs."""
    timings: dict[str, float] = {"extract": cache.seconds if cache else 0.0,
                                 "extract_images": cache.images if cache else 0}
    previous = 0.0
    for row in history:
        timings[row["phase"]] = timings.get(row["phase"], 0.0) + row["seconds"] - previous
        previous = row["seconds"]
    return timings

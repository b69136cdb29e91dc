"""Training recipes, one entry point: `run_recipe(model, datasets, config, device)`.

- cached (the CPU default): the frozen trunk's activations are computed once (ONNX Runtime)
  and cached; a linear probe trains the head on pooled features in seconds, then the last
  backbone stage, the final 1x1 conv and the head are fine-tuned on centre and augmented
  views of every training image.
- full (the GPU default): the whole network is fine-tuned on augmented images.
- course: the course project's recipe, a frozen backbone and every augmented image
  through it every epoch.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision import datasets

from .backbones import get_backbone
from .data import class_names, load_category_names, load_datasets, make_loaders
from .features import ActivationCache
from .model import Classifier, build_model
from .train import (
    BestEpoch,
    TrainConfig,
    accuracy,
    autocast,
    fit,
    predict_probs,
    seed_everything,
    train_one_epoch,
)

Log = Callable[[str], None] | None


def prepare(data_root: str | os.PathLike, config: TrainConfig,
            names_file: str | os.PathLike | None = None,
            ) -> tuple[dict[str, datasets.ImageFolder], Classifier]:
    """The datasets under data_root and a seeded new model for their classes, named."""
    spec = get_backbone(config.arch)
    sets = load_datasets(data_root, spec)
    names = class_names(sets["train"].class_to_idx, load_category_names(names_file))
    seed_everything(config.seed)
    model = build_model(config.arch, sets["train"].class_to_idx, names, config.hidden_units,
                        config.dropout)
    return sets, model


def resolve_recipe(config: TrainConfig, device: torch.device) -> str:
    """The recipe to run: 'auto' means full fine-tuning on a GPU, cached activations on a CPU."""
    if config.recipe != "auto":
        return config.recipe
    return "cached" if device.type == "cpu" else "full"


def _one_cycle(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.OneCycleLR:
    """One-cycle schedule to each group's learning rate over `steps` batches."""
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=max(steps, 1),
        pct_start=0.15)


def _adamw(groups: list[tuple[list[nn.Parameter], float]], weight_decay: float):
    """AdamW with one parameter group per (parameters, learning rate)."""
    return torch.optim.AdamW([{"params": p, "lr": lr} for p, lr in groups if p],
                             weight_decay=weight_decay)


def _tensor_loader(x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool = False,
                   seed: int = 0) -> DataLoader:
    """Batches of cached tensors."""
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle,
                      generator=torch.Generator().manual_seed(seed))


def _labels(dataset: datasets.ImageFolder) -> torch.Tensor:
    return torch.tensor(dataset.targets)


class CachedModel(nn.Module):
    """tail -> head: the trainable part of the classifier, fed cached trunk activations."""

    def __init__(self, tail: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.tail, self.head = tail, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.tail(x))


def cached_probs(net: nn.Module, cache: ActivationCache, dataset: datasets.ImageFolder,
                 device: torch.device, config: TrainConfig) -> torch.Tensor:
    """Class probabilities of a dataset from its cached centre (and mirrored) activations."""
    labels = _labels(dataset)
    views = ["centre", "flip"] if config.tta else ["centre"]
    probs = [predict_probs(net, _tensor_loader(cache.get(dataset, v), labels, 256), device,
                           config.fast, progress=False)[0] for v in views]
    return torch.stack(probs).mean(0)


def fit_cached(model: Classifier, sets: dict[str, datasets.ImageFolder], config: TrainConfig,
               device: torch.device, progress: bool = True, log: Log = print,
               start: float | None = None, phases: dict[str, float] | None = None,
               tracker: BestEpoch | None = None, resume: dict | None = None,
               ) -> list[dict[str, float]]:
    """Linear probe, then fine-tune the backbone's tail and the head on cached activations.

    `phases`, when given, receives the seconds spent extracting (and the number of images),
    probing and fine-tuning. `resume` is a resumable state saved by an earlier run.
    """
    start = time.perf_counter() if start is None else start
    phases = {} if phases is None else phases
    model.requires_grad_(False).eval()
    cache = ActivationCache(model.spec, model.backbone, config.tail_stages, device,
                            progress=progress)
    net = CachedModel(cache.tail, model.head).to(device)
    y_train, y_valid = _labels(sets["train"]), _labels(sets["valid"])
    x_train = cache.get(sets["train"], "centre")
    tracker = tracker or BestEpoch(net, config.epochs, log, start)
    tracker.model = net

    def validate() -> dict[str, float]:
        return accuracy(cached_probs(net, cache, sets["valid"], device, config), y_valid)

    # Linear probe: the head alone on pooled features, computed once through the frozen tail.
    tic, extracted = time.perf_counter(), cache.seconds
    if config.probe_epochs > 0 and resume is None:
        features = _pooled(cache.tail, x_train, device, config.fast)
        model.head.requires_grad_(True)
        optimizer = _adamw([(list(model.head.parameters()), config.learning_rate)],
                           config.weight_decay)
        loader = _tensor_loader(features, y_train, 256, shuffle=True, seed=config.seed)
        scheduler = _one_cycle(optimizer, config.probe_epochs * len(loader))
        loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
        for _ in range(config.probe_epochs):
            trained = train_one_epoch(model.head, loader, optimizer, device, False, False,
                                      scheduler, loss_fn)
        tracker.update(trained, validate(), epoch=0)
    phases["probe"] = time.perf_counter() - tic - (cache.seconds - extracted)

    # Fine-tune the tail and the head on the centre and augmented views of every image.
    views = [x_train] + [cache.get(sets["train"], f"aug{v}", seed=config.seed * 1000 + v)
                         for v in range(1, config.views + 1)]
    x_all, y_all = torch.cat(views), y_train.repeat(len(views))
    del views
    tic, extracted = time.perf_counter(), cache.seconds
    net.requires_grad_(True)
    optimizer = _adamw([(list(cache.tail.parameters()), config.backbone_lr),
                        (list(model.head.parameters()), config.learning_rate)],
                       config.weight_decay)
    loader = _tensor_loader(x_all, y_all, config.batch_size, shuffle=True, seed=config.seed)
    scheduler = _one_cycle(optimizer, config.epochs * len(loader))
    history = fit(net, {"train": loader}, config, device, progress, log, optimizer, scheduler,
                  start, validate, tracker, resume)
    phases["finetune"] = time.perf_counter() - tic - (cache.seconds - extracted)
    phases["extract"], phases["extract_images"] = cache.seconds, cache.images
    model.requires_grad_(False)
    net.requires_grad_(True)  # what was trained stays trainable, as counted
    model.eval()
    return history


@torch.inference_mode()
def _pooled(tail: nn.Module, x: torch.Tensor, device: torch.device, fast: bool) -> torch.Tensor:
    """The frozen tail's pooled features of cached activations, in float32 on the CPU."""
    tail.eval().to(device)
    outputs = []
    for batch in x.split(256):
        with autocast(device, fast):
            outputs.append(tail(batch.to(device)).float().cpu())
    return torch.cat(outputs)


def fit_full(model: Classifier, sets: dict[str, datasets.ImageFolder], config: TrainConfig,
             device: torch.device, progress: bool = True, log: Log = print,
             start: float | None = None, tracker: BestEpoch | None = None,
             resume: dict | None = None) -> list[dict[str, float]]:
    """Fine-tune the whole network on augmented images: AdamW, one-cycle, label smoothing."""
    model.requires_grad_(True)
    loaders = make_loaders(sets, config.batch_size, seed=config.seed)
    optimizer = _adamw([(list(model.backbone.parameters()), config.backbone_lr),
                        (list(model.head.parameters()), config.learning_rate)],
                       config.weight_decay)
    scheduler = _one_cycle(optimizer, config.epochs * len(loaders["train"]))
    return fit(model, loaders, config, device, progress, log, optimizer, scheduler, start,
               tracker=tracker, resume=resume)


def run_recipe(model: Classifier, sets: dict[str, datasets.ImageFolder], config: TrainConfig,
               device: torch.device, progress: bool = True, log: Log = print,
               start: float | None = None, phases: dict[str, float] | None = None,
               state_path: str | os.PathLike | None = None,
               resume: dict | None = None) -> list[dict[str, float]]:
    """Train `model` by the recipe of config (see the module docstring); returns the history.

    `phases`, when given, receives the wall time of each phase in seconds. With
    `state_path`, a resumable state is written there after every epoch; `resume` is such a
    state (checkpoint.read_resume), to continue an interrupted run.
    """
    recipe = resolve_recipe(config, device)
    phases = {} if phases is None else phases
    extra = {"resume_config": asdict(config), "class_to_idx": model.class_to_idx,
             "class_names": model.class_names}
    tracker = BestEpoch(model, config.epochs, log, start, state_path, extra)
    if recipe == "cached":
        return fit_cached(model, sets, config, device, progress, log, start, phases, tracker,
                          resume)
    tic = time.perf_counter()
    if recipe == "full":
        history = fit_full(model, sets, config, device, progress, log, start, tracker, resume)
    elif recipe == "course":
        loaders = make_loaders(sets, config.batch_size, seed=config.seed)
        history = fit(model, loaders, config, device, progress, log, start=start,
                      tracker=tracker, resume=resume)
    else:
        raise ValueError(f"unknown recipe {recipe!r}; choose auto, cached, full or course")
    phases["train"] = time.perf_counter() - tic
    return history


def split_probs(model: Classifier, dataset: datasets.ImageFolder, config: TrainConfig,
                device: torch.device, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Class probabilities (plain softmax, no temperature) and labels of an eval dataset.

    After the cached recipe the frozen trunk's activations come from (or go to) the cache:
    the trunk is unchanged by training, so they are what the whole model would compute.
    """
    if resolve_recipe(config, device) == "cached":
        cache = ActivationCache(model.spec, model.backbone, config.tail_stages, device,
                                progress=progress)
        net = CachedModel(cache.tail, model.head)
        return cached_probs(net, cache, dataset, device, config), _labels(dataset)
    loader = DataLoader(dataset, batch_size=config.batch_size, num_workers=1)
    return predict_probs(model, loader, device, config.fast, progress, config.tta)


def evaluate_split(model: Classifier, dataset: datasets.ImageFolder, config: TrainConfig,
                   device: torch.device, progress: bool = False) -> dict[str, float]:
    """Top-1/top-5 of a trained model on an eval-transformed dataset (see split_probs)."""
    return accuracy(*split_probs(model, dataset, config, device, progress))

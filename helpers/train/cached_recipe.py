"""The cached recipe (the CPU default): the frozen trunk's activations are computed once (in
the fastest runtime on this CPU, trunk.py) and cached on disk; a linear probe trains the head
on pooled centre features in seconds, then the last backbone stage, the final 1x1 conv and
the head are fine-tuned on the cached views, each image once an epoch in one view drawn at
random (its centre crop or an augmented view)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torchvision import datasets

from helpers.config import TrainConfig
from helpers.core.device import StopFlag, autocast
from helpers.model.classifier import Classifier
from helpers.train.batches import Passes, ViewBatches, tensor_loader
from helpers.train.cache import ActivationCache
from helpers.train.evaluate import topk_accuracy
from helpers.train.loop import predict_probs
from helpers.train.plan import Phase, Plan, adamw, one_cycle


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
                            device=device, stop=stop, log=log,
                            augmentation=config.augmentation)
    net = CachedModel(cache.tail, model.head, freeze_bn=config.freeze_bn).to(device)
    y_train = _labels(sets["train"])
    x_train = cache.get(sets["train"], "centre")
    for view in (["centre", "flip"] if config.tta else ["centre"]) if "valid" in sets else []:
        cache.get(sets["valid"], view)  # extracted now, so that phases time training alone
    loss = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    phases = []
    if config.probe_epochs > 0:  # the head alone, on features computed once by the frozen tail
        features = _pooled(cache.tail, x_train, device, mixed_precision=config.fast)
        probe = adamw([(list(model.head.parameters()), config.learning_rate)],
                       config.weight_decay)
        loader = Passes(tensor_loader(features, y_train, batch_size=256, shuffle=True),
                        config.probe_epochs)
        phases.append(Phase(name="linear probe", module=model.head, batches=loader,
                            optimizer=probe, scheduler=one_cycle(probe, len(loader)),
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
    optimizer = adamw([(list(cache.tail.parameters()), config.backbone_lr),
                        (list(model.head.parameters()), config.learning_rate)],
                       config.weight_decay)
    loader = ViewBatches(x_all, y_train, batch_size=config.batch_size)
    phases.append(Phase(name="fine-tune", module=net, batches=loader, optimizer=optimizer,
                        epochs=config.epochs,
                        scheduler=one_cycle(optimizer, config.epochs * len(loader)),
                        loss=loss, mixed_precision=config.fast))
    model.head.requires_grad_(True)
    cache.tail.requires_grad_(True)

    def validate() -> dict[str, float]:
        return topk_accuracy(cached_probs(net, cache, sets["valid"], device, config=config),
                        _labels(sets["valid"]))

    return Plan(model=net, phases=phases, validate=validate if "valid" in sets else None,
                seed=config.seed), cache

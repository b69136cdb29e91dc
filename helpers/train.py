"""Training and evaluation loops: train_one_epoch, evaluate, and fit that owns the epochs."""

from __future__ import annotations

import contextlib
import copy
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run except the device."""

    arch: str = "efficientnet_lite0"
    hidden_units: int = 512
    dropout: float = 0.2
    learning_rate: float = 1e-3
    epochs: int = 5
    batch_size: int = 64
    seed: int = 0
    fast: bool = True  # bf16 autocast and channels_last where the hardware gains from them


def get_device(gpu: bool = True) -> torch.device:
    """cuda, then mps, then cpu (cpu only when gpu is False)."""
    if gpu and torch.cuda.is_available():
        return torch.device("cuda")
    if gpu and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch so a run can be repeated."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """Mixed precision where it pays: fp16 on CUDA, bf16 on CPUs with native bf16, else nothing."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    if enabled and device.type == "cpu" and torch.cpu._is_avx512_bf16_supported():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _batches(loader: DataLoader, device: torch.device, fast: bool, desc: str, progress: bool):
    """Yield (images, labels) on the device, channels_last when fast, under a progress bar."""
    bar = tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True)
    memory_format = torch.channels_last if fast else torch.contiguous_format
    for images, labels in bar:
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        yield bar, images, labels.to(device, non_blocking=True)


def train_one_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    device: torch.device, fast: bool = True, progress: bool = True,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
                    loss_fn: nn.Module | None = None) -> dict[str, float]:
    """One pass over the training data; returns the mean loss and accuracy over samples."""
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    for bar, images, labels in _batches(loader, device, fast, "train", progress):
        with autocast(device, fast):
            logits = model(images)
            loss = loss_fn(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total_loss += loss.item() * len(labels)
        correct += (logits.argmax(1) == labels).sum().item()
        seen += len(labels)
        bar.set_postfix(loss=f"{total_loss / seen:.3f}")
    return {"loss": total_loss / max(seen, 1), "top1": correct / max(seen, 1)}


@torch.inference_mode()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, fast: bool = True,
             progress: bool = True) -> dict[str, float]:
    """Mean loss, top-1 and top-5 accuracy over every sample of the loader."""
    model.eval()
    total_loss, top1, top5, seen = 0.0, 0, 0, 0
    for _, images, labels in _batches(loader, device, fast, "eval", progress):
        with autocast(device, fast):
            logits = model(images).float()
        total_loss += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        best = logits.topk(min(5, logits.shape[1]), dim=1).indices
        top1 += (best[:, 0] == labels).sum().item()
        top5 += (best == labels[:, None]).any(1).sum().item()
        seen += len(labels)
    n = max(seen, 1)
    return {"loss": total_loss / n, "top1": top1 / n, "top5": top5 / n, "n": seen}


def fit(model: nn.Module, loaders: dict[str, DataLoader], config: TrainConfig,
        device: torch.device, progress: bool = True,
        log: callable | None = print) -> list[dict[str, float]]:
    """Train for config.epochs, validate after each, keep the best epoch; returns the history."""
    model.to(device)
    if config.fast:
        model.to(memory_format=torch.channels_last)
    params: Iterable[nn.Parameter] = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=config.learning_rate)
    history: list[dict[str, float]] = []
    best_top1, best_state = -1.0, None
    start = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        trained = train_one_epoch(model, loaders["train"], optimizer, device, config.fast, progress)
        valid = evaluate(model, loaders["valid"], device, config.fast, progress)
        row = {"epoch": epoch, "train_loss": trained["loss"], "train_top1": trained["top1"],
               "valid_loss": valid["loss"], "valid_top1": valid["top1"],
               "valid_top5": valid["top5"], "seconds": time.perf_counter() - start}
        history.append(row)
        if log:
            log(f"epoch {epoch}/{config.epochs}  train loss {row['train_loss']:.3f}  "
                f"valid loss {row['valid_loss']:.3f}  valid accuracy {row['valid_top1']:.1%}  "
                f"({row['seconds']:.0f} s)")
        if valid["top1"] > best_top1:
            best_top1, best_state = valid["top1"], copy.deepcopy(model.state_dict())
    if best_state is not None:
        model.load_state_dict(best_state)
    return history

"""Training and evaluation loops: train_one_epoch, evaluate, and fit that owns the epochs."""

from __future__ import annotations

import contextlib
import copy
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm


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
    probe_epochs: int = 20  # cached recipe: epochs of the linear probe before fine-tuning
    tta: bool = False  # average the predictions of the image and its mirror image
    seed: int = 0
    fast: bool = True  # bf16/fp16 autocast and channels_last where the hardware gains

    @classmethod
    def course(cls, **changes) -> TrainConfig:
        """The course project's recipe: frozen backbone, 512-unit head, Adam 1e-3, fp32."""
        values = {"recipe": "course", "hidden_units": 512, "dropout": 0.2,
                  "learning_rate": 1e-3, "weight_decay": 0.0, "label_smoothing": 0.0,
                  "epochs": 5, "batch_size": 64, "fast": False}
        return cls(**(values | changes))


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
    """Mixed precision where it pays: bf16 (or fp16) on CUDA, bf16 on CPUs with native bf16."""
    if enabled and device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    if enabled and device.type == "cpu" and torch.cpu._is_avx512_bf16_supported():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _batches(loader: DataLoader, device: torch.device, fast: bool, desc: str, progress: bool):
    """Yield (inputs, labels) on the device, images channels_last when fast, under a bar."""
    bar = tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True)
    for inputs, labels in bar:
        memory_format = torch.channels_last if fast and inputs.ndim == 4 else torch.preserve_format
        inputs = inputs.to(device, non_blocking=True, memory_format=memory_format)
        yield bar, inputs, labels.to(device, non_blocking=True)


def train_one_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    device: torch.device, fast: bool = True, progress: bool = True,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
                    loss_fn: nn.Module | None = None, skip: int = 0,
                    on_step: Callable[[int], None] | None = None) -> dict[str, float]:
    """One pass over the training data; returns the mean loss and accuracy over samples.

    The first `skip` batches are passed over (a resumed epoch); on_step(n) is told after
    each optimizer step how many batches of the epoch are done.
    """
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    for step, (bar, inputs, labels) in enumerate(_batches(loader, device, fast, "train",
                                                          progress), 1):
        if step <= skip:
            continue
        with autocast(device, fast):
            logits = model(inputs).float()
        loss = loss_fn(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if on_step is not None:
            on_step(step)
        total_loss += loss.item() * len(labels)
        correct += (logits.argmax(1) == labels).sum().item()
        seen += len(labels)
        bar.set_postfix(loss=f"{total_loss / seen:.3f}")
    return {"loss": total_loss / max(seen, 1), "top1": correct / max(seen, 1)}


@torch.inference_mode()
def predict_probs(model: nn.Module, loader: DataLoader, device: torch.device, fast: bool = True,
                  progress: bool = True, tta: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Class probabilities and labels of every sample (tta: averaged with the mirror image)."""
    model.eval()
    probs, targets = [], []
    for _, inputs, labels in _batches(loader, device, fast, "eval", progress):
        with autocast(device, fast):
            p = model(inputs).float().softmax(1)
            if tta:
                p = (p + model(inputs.flip(3)).float().softmax(1)) / 2
        probs.append(p.cpu())
        targets.append(labels.cpu())
    return torch.cat(probs), torch.cat(targets)


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Mean negative log-likelihood, top-1 and top-5 accuracy, counted over samples."""
    n = len(labels)
    best = probs.topk(min(5, probs.shape[1]), dim=1).indices
    nll = -probs[torch.arange(n), labels].clamp_min(1e-12).log().sum().item()
    return {"loss": nll / max(n, 1), "top1": (best[:, 0] == labels).sum().item() / max(n, 1),
            "top5": (best == labels[:, None]).any(1).sum().item() / max(n, 1), "n": n}


def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, fast: bool = True,
             progress: bool = True, tta: bool = False) -> dict[str, float]:
    """Mean loss, top-1 and top-5 accuracy over every sample of the loader."""
    return accuracy(*predict_probs(model, loader, device, fast, progress, tta))


def fit(model: nn.Module, loaders: dict[str, DataLoader], config: TrainConfig,
        device: torch.device, progress: bool = True, log: Callable[[str], None] | None = print,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        start: float | None = None,
        validate: Callable[[], dict[str, float]] | None = None,
        tracker: BestEpoch | None = None, resume: dict | None = None) -> list[dict[str, float]]:
    """Train for config.epochs, validate after each, keep the best epoch; returns the history.

    Without an optimizer this is the course recipe: Adam on the trainable parameters.
    A scheduler, if given, steps after every batch. `validate` replaces the evaluation of
    loaders["valid"]. A `tracker` may save a resumable state after every epoch; `resume`
    is such a state, to continue from.
    """
    model.to(device)
    if config.fast:
        model.to(memory_format=torch.channels_last)
    if optimizer is None:
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=config.learning_rate)
    validate = validate or (lambda: evaluate(model, loaders["valid"], device, config.fast,
                                             progress, config.tta))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    tracker = tracker or BestEpoch(model, config.epochs, log, start)
    tracker.attach(model, optimizer, scheduler)
    if resume is not None:
        tracker.restore(resume)
    for epoch in range(tracker.epoch + 1, config.epochs + 1):
        # The order of each epoch depends only on (seed, epoch): a resumed run sees the same.
        loaders["train"].generator.manual_seed(config.seed * 1000 + epoch)
        try:
            trained = train_one_epoch(model, loaders["train"], optimizer, device, config.fast,
                                      progress, scheduler, loss_fn, tracker.batches_done,
                                      tracker.step_done)
        except KeyboardInterrupt:
            tracker.save()  # this epoch's finished batches, resumable
            raise
        tracker.batches_done = 0
        tracker.update(trained, validate())
    return tracker.finish()


class BestEpoch:
    """Epoch bookkeeping: history rows, the log line, the best epoch's weights, and the
    resumable state written after every epoch (to `state_path`, when given)."""

    def __init__(self, model: nn.Module, epochs: int, log: Callable[[str], None] | None,
                 start: float | None = None, state_path: str | os.PathLike | None = None,
                 extra: dict | None = None) -> None:
        self.model, self.epochs, self.log = model, epochs, log
        self.start = start if start is not None else time.perf_counter()
        self.state_path, self.extra = state_path, extra or {}
        self.history: list[dict[str, float]] = []
        self.epoch = 0
        self.best_top1, self.best_state = -1.0, None
        self.optimizer = self.scheduler = None
        self.batches_done = 0  # of the epoch under way

    def step_done(self, batches: int) -> None:
        """Note how many batches of the current epoch are done."""
        self.batches_done = batches

    def save(self) -> None:
        """Write the resumable state now, when there is a state path."""
        if self.state_path:
            from .checkpoint import atomic_save

            atomic_save(self.state(), self.state_path)

    def attach(self, model: nn.Module, optimizer, scheduler) -> None:
        """The model, optimizer and scheduler whose state a resumable checkpoint holds."""
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler

    def update(self, trained: dict[str, float], valid: dict[str, float],
               epoch: int | None = None) -> None:
        """Record an epoch (numbered 1, 2, ... unless given); keep the best epoch's weights."""
        if epoch is None:
            self.epoch = epoch = self.epoch + 1
        row = {"epoch": epoch, "train_loss": trained["loss"], "train_top1": trained["top1"],
               "valid_loss": valid["loss"], "valid_top1": valid["top1"],
               "valid_top5": valid["top5"], "seconds": time.perf_counter() - self.start}
        self.history.append(row)
        if self.log:
            self.log(f"epoch {epoch}/{self.epochs}  train loss {row['train_loss']:.3f}  "
                     f"valid loss {row['valid_loss']:.3f}  valid accuracy "
                     f"{row['valid_top1']:.1%}  ({row['seconds']:.0f} s)")
        if valid["top1"] > self.best_top1:
            self.best_top1 = valid["top1"]
            self.best_state = copy.deepcopy(self.model.state_dict())
        self.save()

    def state(self) -> dict:
        """A resumable checkpoint: tensors and plain values only (loads with weights_only)."""
        np_state = np.random.get_state()
        return {"kind": "resume", "epoch": self.epoch, "batches_done": self.batches_done,
                "history": self.history,
                "best_top1": self.best_top1, "best_state": self.best_state,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict() if self.optimizer else None,
                "scheduler": self.scheduler.state_dict() if self.scheduler else None,
                "rng": {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
                        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
                        "numpy_pos": int(np_state[2])},
                **self.extra}

    def restore(self, state: dict) -> None:
        """Continue from a resumable checkpoint: weights, optimizer, schedule, RNG, history."""
        self.epoch, self.history = state["epoch"], list(state["history"])
        self.batches_done = state["batches_done"]
        self.best_top1, self.best_state = state["best_top1"], state["best_state"]
        self.model.load_state_dict(state["model"])
        if self.optimizer and state["optimizer"]:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler and state["scheduler"]:
            self.scheduler.load_state_dict(state["scheduler"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate((3, tuple(rng["python"]), None))
        np.random.set_state(("MT19937", rng["numpy"].numpy().astype(np.uint32),
                             rng["numpy_pos"], 0, 0.0))

    def finish(self) -> list[dict[str, float]]:
        """Restore the best epoch's weights; returns the history."""
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        return self.history

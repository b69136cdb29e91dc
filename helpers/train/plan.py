"""What a recipe hands the training loop, and the state of one run of it.

A `Plan` says what trains on what (its `Phase`s) and how to validate; `RunState` is where a
run of it stands (phase, epoch, batch), its history, its best epoch so far (valid top-1,
ties broken by the lower valid loss), and the resumable state saved after every epoch.
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from helpers.core.device import autocast_dtype
from helpers.core.distributed import Distributed
from helpers.core.files import atomic_save


@dataclass
class Phase:
    """One phase of a plan: `module` trains on `batches` for `epochs` epochs."""

    name: str  # shown in the log and the history: "linear probe", "fine-tune", "train"
    module: nn.Module  # called on each batch's inputs; shares its weights with Plan.model
    batches: Iterable  # (inputs, labels) batches; a DataLoader's generator is reseeded per epoch
    optimizer: torch.optim.Optimizer
    epochs: int = 1
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None  # stepped after every batch
    loss: nn.Module = field(default_factory=nn.CrossEntropyLoss)
    mixed_precision: bool = True  # autocast and channels_last where the hardware gains
    compiled: bool = False  # torch.compile the module (CUDA: minutes of compiling, then faster)

    def describe(self) -> dict[str, Any]:
        """What this phase trains and how, in plain values: to print or to log."""
        scheduler = self.scheduler
        return {"phase": self.name, "epochs": self.epochs, "batches": len(self.batches),
                "trains": f"{sum(p.numel() for p in self.module.parameters() if p.requires_grad):,}"
                          " parameters",
                "optimizer": type(self.optimizer).__name__,
                "learning rates": [g.get("max_lr", g["lr"]) for g in self.optimizer.param_groups],
                "schedule": (f"{type(scheduler).__name__} over "
                             f"{getattr(scheduler, 'total_steps', '?')} steps")
                            if scheduler is not None else "constant",
                "loss": repr(self.loss), "mixed precision": self.mixed_precision}


@dataclass
class Plan:
    """What a recipe trains: the kept module, its phases in order, and the validation."""

    model: nn.Module  # its state is what the best epoch and the resumable state keep
    phases: list[Phase]
    validate: Callable[[], dict[str, float]] | None  # loss, top1, top5 on the valid split;
    # None: no valid split (a final model on all labelled images keeps its last epoch)
    seed: int = 0
    identity: dict[str, Any] = field(default_factory=dict)  # what a resumable state belongs to


@dataclass
class Position:
    """Where a run is: phase index, epochs done in it, batches done of the epoch under way."""

    phase: int = 0
    epoch: int = 0
    batches: int = 0


def _rank(top1: float, loss: float) -> tuple[float, float]:
    """How good an epoch is: valid top-1, ties broken by the lower valid loss."""
    return top1, (-loss if math.isfinite(loss) else -math.inf)


class RunState:
    """The state of one fit(): position, history, best epoch, and what to save to resume."""

    def __init__(self, plan: Plan, *, state_path: Path | None = None,
                 dist: Distributed | None = None) -> None:
        self.plan, self.state_path, self.dist = plan, state_path, dist or Distributed()
        self.at = Position()
        self._runnable: dict[int, tuple[nn.Module, Any]] = {}  # per phase: module, scaler
        self.history: list[dict[str, Any]] = []
        self.best_top1, self.best_loss, self.best_state = -1.0, math.inf, None
        self.start = time.perf_counter()

    def state(self) -> dict[str, Any]:
        """A resumable state: tensors and plain values only (loads with weights_only=True)."""
        phase = self.plan.phases[min(self.at.phase, len(self.plan.phases) - 1)]
        np_state = np.random.get_state()
        return {"kind": "resume", "identity": self.plan.identity,
                "phase": self.at.phase, "epoch": self.at.epoch, "batches_done": self.at.batches,
                "history": self.history, "best_top1": self.best_top1,
                "best_loss": self.best_loss,
                "best_state": self.best_state, "model": self.plan.model.state_dict(),
                "optimizer": phase.optimizer.state_dict(),
                "scheduler": phase.scheduler.state_dict() if phase.scheduler else None,
                "rng": {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
                        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
                        "numpy_pos": int(np_state[2])}}

    def save(self) -> None:
        """Write the resumable state (rank 0 only), when the run has a state path; the other
        ranks wait until it is written."""
        if self.state_path is not None and self.dist.is_main:
            atomic_save(self.state(), self.state_path)
        self.dist.barrier()

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a resumable state: position, weights, optimizer, schedule, RNG."""
        self.at = Position(state["phase"], state["epoch"], state["batches_done"])
        self.history = list(state["history"])
        self.best_top1, self.best_state = state["best_top1"], state["best_state"]
        self.best_loss = state.get("best_loss", math.inf)
        self.plan.model.load_state_dict(state["model"])
        if self.at.phase < len(self.plan.phases):
            phase = self.plan.phases[self.at.phase]
            phase.optimizer.load_state_dict(state["optimizer"])
            if phase.scheduler is not None and state["scheduler"] is not None:
                phase.scheduler.load_state_dict(state["scheduler"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate((3, tuple(rng["python"]), None))
        np.random.set_state(("MT19937", rng["numpy"].numpy().astype(np.uint32),
                             rng["numpy_pos"], 0, 0.0))

    def runnable(self, phase: Phase, device: torch.device) -> tuple[nn.Module, Any]:
        """What the phase's batches go through (its module; under torchrun its
        DistributedDataParallel, compiled when asked) and its gradient scaler (fp16 only),
        made when the phase starts and kept for its epochs."""
        index = self.plan.phases.index(phase)
        if index not in self._runnable:
            if phase.mixed_precision:
                phase.module.to(memory_format=torch.channels_last)
            # fp16 (GPUs without bf16) needs its loss scaled, lest small gradients round to 0
            fp16 = autocast_dtype(device, enabled=phase.mixed_precision) == torch.float16
            self._runnable[index] = (_runnable(phase, device, self.dist),
                                     torch.amp.GradScaler(device.type) if fp16 else None)
        return self._runnable[index]

    def record(self, phase: Phase, *, trained: dict[str, float], valid: dict[str, float],
               log: Callable[[str], None] | None = print) -> dict[str, Any]:
        """Add an epoch's history row (its training and validation figures), log it, and keep
        the weights when it is the best epoch so far; returns the row."""
        number = sum(1 for r in self.history if r["phase"] == phase.name) + 1
        epoch = len(self.history) + 1
        row = {"phase": phase.name, "epoch": epoch, "phase_epoch": number,
               "train_loss": trained["loss"], "train_top1": trained["top1"],
               "valid_loss": valid["loss"], "valid_top1": valid["top1"],
               "valid_top5": valid["top5"], "seconds": time.perf_counter() - self.start}
        self.history.append(row)
        if log and self.dist.is_main:
            count = f" {number}/{phase.epochs}" if phase.epochs > 1 else ""
            judged = (f"  valid loss {row['valid_loss']:.3f}  valid accuracy "
                      f"{row['valid_top1']:.1%}" if self.plan.validate is not None else "")
            log(f"{phase.name}{count}: train loss {row['train_loss']:.3f}{judged}  "
                f"({row['seconds']:.0f} s)")
        if self.plan.validate is not None and (_rank(valid["top1"], valid["loss"])
                                               > _rank(self.best_top1, self.best_loss)):
            self.best_top1, self.best_loss = valid["top1"], valid["loss"]
            self.best_state = copy.deepcopy(self.plan.model.state_dict())
        return row

    def finish(self) -> list[dict[str, Any]]:
        """Restore the best epoch's weights and mark its row kept; returns the history."""
        if self.best_state is not None:
            self.plan.model.load_state_dict(self.best_state)
        if self.plan.validate is None:  # nothing to choose by: the last epoch is kept
            best = len(self.history) - 1
        else:
            best = max(range(len(self.history)), default=None, key=lambda i: _rank(
                self.history[i]["valid_top1"], self.history[i]["valid_loss"]))
        for i, row in enumerate(self.history):  # the first of equal bests is the one kept
            row["kept"] = i == best
        return self.history


def _runnable(phase: Phase, device: torch.device, dist: Distributed) -> nn.Module:
    """What the phase calls on its batches: the module, in DistributedDataParallel under
    torchrun, compiled when asked. The wrappers share the module's weights and are never
    saved, so the plan's state dict keeps its plain keys."""
    module = phase.module
    if dist.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        # Built when the phase starts, after a resume loaded the weights; it copies rank 0's
        # weights to the others, then averages gradients (of trainable parameters) in backward.
        module = DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None)
    if phase.compiled:
        module = torch.compile(module)
    return module


def one_cycle(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.OneCycleLR:
    """One-cycle schedule to each group's learning rate over `steps` batches."""
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=max(steps, 1),
        pct_start=0.15)


def adamw(groups: list[tuple[list[nn.Parameter], float]],
          weight_decay: float) -> torch.optim.AdamW:
    """AdamW with one parameter group per (parameters, learning rate)."""
    return torch.optim.AdamW([{"params": p, "lr": lr} for p, lr in groups if p],
                             weight_decay=weight_decay)

"""Training: one loop, `fit(plan, device)`, runs every recipe, an epoch at a time:
`train_one_epoch` then `validate` (the notebook shows the same loop unrolled).

A recipe (recipes.py) only builds a `Plan` (plan.py): the module whose weights are kept,
the phases (what trains on which batches, with which optimizer, schedule and loss) and how
to validate. The loop owns the rest: epochs, the history with named phases, the best epoch,
progress, the resumable state after every epoch, and a stop flag checked between batches
(Ctrl-C, SIGTERM) so an interrupted run saves finished batches only.

Under torchrun (`Distributed` with world_size > 1) the loop calls each phase's module through
DistributedDataParallel, which averages the gradients of the processes' shards in backward:
N processes of batch b train as one process of batch N x b with the same learning rates, up
to the order of float sums. Every rank validates the whole valid split (the same figures,
so every rank keeps the same best epoch without a broadcast); rank 0 alone logs and saves.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from helpers.core.device import StopFlag, autocast, progress
from helpers.core.distributed import Distributed
from helpers.core.errors import Stopped
from helpers.train.plan import Phase, Plan, Position, RunState


def _to_device(inputs: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """Inputs on the device, images in channels_last when asked."""
    memory_format = (torch.channels_last if channels_last and inputs.ndim == 4
                     else torch.preserve_format)
    return inputs.to(device, non_blocking=True, memory_format=memory_format)


def fit(plan: Plan, device: torch.device, *, log: Callable[[str], None] | None = print,
        state_path: str | os.PathLike | None = None, resume: dict[str, Any] | None = None,
        stop: StopFlag | None = None, dist: Distributed | None = None,
        ) -> list[dict[str, Any]]:
    """Run every phase of the plan; keep the epoch with the best validation top-1.

    After every epoch a resumable state goes to `state_path` (when given); `resume` is such
    a state, to continue from. A set `stop` flag ends the run at the next batch boundary:
    the finished batches are saved and `Stopped` is raised. Returns the history, one row per
    epoch (`phase`, `epoch` counted over the plan, losses and accuracies, `kept`).
    """
    run = RunState(plan, state_path=Path(state_path) if state_path else None,
                   dist=dist or Distributed())
    with run.dist.guard(run.state_path):  # a lost process: PeerLost, a Stopped, not a traceback
        plan.model.to(device)
        if resume is not None:
            run.restore(resume)
        for index, phase in enumerate(plan.phases):
            if index < run.at.phase:
                continue
            if log and run.dist.is_main:
                trainable = sum(p.numel() for p in phase.module.parameters() if p.requires_grad)
                per = " per process" if run.dist.world_size > 1 else ""
                log(f"{phase.name}: {trainable:,} parameters train, {phase.epochs} epoch(s) of "
                    f"{len(phase.batches)} batches{per}")
            start = run.at.epoch + 1 if index == run.at.phase else 1
            for epoch in range(start, phase.epochs + 1):
                trained = train_one_epoch(phase, device, run=run, epoch=epoch, stop=stop)
                run.record(phase, trained=trained, valid=validate(plan), log=log)
                run.save()
            run.at = Position(index + 1, 0, 0)
        return run.finish()


def validate(plan: Plan) -> dict[str, float]:
    """The plan's validation figures now (loss, top1, top5 on the valid split); NaN without
    a valid split."""
    nan = float("nan")
    return plan.validate() if plan.validate is not None else {"loss": nan, "top1": nan,
                                                              "top5": nan}


def _reseed(batches: Iterable, *, seed: int, rank: int = 0) -> None:
    """The order of each epoch depends only on (seed, phase, epoch): a resumed run sees the same."""
    generator = getattr(batches, "generator", None)
    if generator is not None:  # its draws also seed the loader's workers: other augmentations
        generator.manual_seed(seed + (rank << 32))  # per rank, the same for one process
    sampler = getattr(batches, "sampler", None)
    if hasattr(sampler, "set_epoch"):  # a DistributedSampler shuffles by its own seed + epoch
        sampler.set_epoch(seed)


def train_one_epoch(phase: Phase, device: torch.device, *, run: RunState, epoch: int = 1,
                    stop: StopFlag | None = None) -> dict[str, float]:
    """One pass of the phase's module over its batches, optimizer and schedule stepped after
    every batch; returns the epoch's mean training loss and top-1. Where `run` stands in this
    epoch already (a resumed run), the batches done are skipped; a set `stop` flag saves the
    finished batches and raises Stopped."""
    index = run.plan.phases.index(phase)
    skip = run.at.batches if (run.at.phase, run.at.epoch) == (index, epoch - 1) else 0
    run.at = Position(index, epoch - 1, skip)
    module, scaler = run.runnable(phase, device)
    _reseed(phase.batches, seed=run.plan.seed * 1000 + 100 * index + epoch, rank=run.dist.rank)
    module.train()
    total_loss, correct, seen = 0.0, 0, 0
    of = f" {epoch}/{phase.epochs}" if phase.epochs > 1 else ""
    batches = (progress(phase.batches, desc=f"{phase.name}{of}") if run.dist.is_main
               else phase.batches)
    for step, (inputs, labels) in enumerate(batches, 1):
        if step <= skip:
            continue
        inputs = _to_device(inputs, device, phase.mixed_precision)
        labels = labels.to(device, non_blocking=True)
        with autocast(device, enabled=phase.mixed_precision):
            logits = module(inputs).float()
        loss = phase.loss(logits, labels)
        phase.optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            phase.optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(phase.optimizer)
            scaler.update()
        if phase.scheduler is not None:
            phase.scheduler.step()
        run.at.batches = step
        total_loss += loss.item() * len(labels)
        correct += (logits.argmax(1) == labels).sum().item()
        seen += len(labels)
        if run.dist.agree(stop is not None and stop.requested):  # nothing half-done is saved
            run.save()
            raise Stopped(f"stopped by {(stop and stop.signal_name) or 'another process'} "
                          f"after {step} batches of {phase.name}{of}")
    run.at = Position(index, epoch, 0)
    total_loss, correct, seen = run.dist.total([total_loss, correct, seen])  # every shard's
    return {"loss": total_loss / max(seen, 1), "top1": correct / max(seen, 1)}


@torch.inference_mode()
def predict_probs(model: nn.Module, batches: Iterable, device: torch.device, *,
                  mixed_precision: bool = True, mirror: bool = False,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Class probabilities and labels of every sample (mirror: averaged with the mirror image)."""
    model.eval()
    probs, targets = [], []
    for inputs, labels in batches:
        inputs = _to_device(inputs, device, mixed_precision)
        with autocast(device, enabled=mixed_precision):
            p = model(inputs).float().softmax(1)
            if mirror:
                p = (p + model(inputs.flip(3)).float().softmax(1)) / 2
        probs.append(p.cpu())
        targets.append(labels.cpu())
    return torch.cat(probs), torch.cat(targets)

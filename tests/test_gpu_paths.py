"""The GPU's code paths that a CPU can check: fp16 loss scaling, CUDA loader settings, each
process's device under torchrun, and the GPU recipe's own defaults."""

from __future__ import annotations

import contextlib
import os

import torch

from helpers.cli import build_parser
from helpers.cli.train_commands import typed_options
from helpers.config import TrainConfig, recipe_for, settle
from helpers.core import distributed
from helpers.data import splits
from helpers.data.folders import make_loaders
from helpers.model.backbones import get_backbone
from helpers.model.classifier import new_model
from helpers.train import loop, recipes
from helpers.train import plan as plan_module


def test_fp16_autocast_scales_the_loss(tiny_folder, monkeypatch):
    """Where a GPU has fp16 but no bf16 (T4, V100) the loop steps through a GradScaler."""
    def fp16(device, *, enabled=True):
        return torch.float16 if enabled else None

    def cpu_fp16(device, *, enabled=True):
        return torch.autocast("cpu", dtype=torch.float16) if enabled else contextlib.nullcontext()

    monkeypatch.setattr(plan_module, "autocast_dtype", fp16)
    monkeypatch.setattr(loop, "autocast", cpu_fp16)
    updates = []
    original = torch.amp.GradScaler.update
    monkeypatch.setattr(torch.amp.GradScaler, "update",
                        lambda self, *a: updates.append(1) or original(self, *a))
    config = TrainConfig.course(arch="test_efficientnet", epochs=2, batch_size=12,
                                hidden_units=8, fast=True)
    sets = splits.load_data(tiny_folder, get_backbone(config.arch).preprocess).sets
    plan = recipes.course_plan(new_model(sets, config), sets, config,
                               torch.device("cpu"))
    history = loop.fit(plan, torch.device("cpu"), log=None)
    assert len(updates) == 2 * 3 and all(torch.isfinite(torch.tensor(r["train_loss"]))
                                         for r in history)


def test_loaders_keep_a_cuda_gpu_fed_and_leave_the_cpu_path_alone(tiny_folder):
    sets = splits.load_data(tiny_folder, get_backbone("test_efficientnet").preprocess).sets
    gpu = make_loaders(sets, batch_size=4, device=torch.device("cuda"))["train"]
    assert gpu.num_workers >= 1 and gpu.persistent_workers and gpu.pin_memory
    assert gpu.prefetch_factor == 4
    cpu = make_loaders(sets, batch_size=4, device=torch.device("cpu"))["train"]
    before = make_loaders(sets, batch_size=4)["train"]
    for loader in (cpu, before):
        assert not loader.persistent_workers and loader.pin_memory == torch.cuda.is_available()
        assert loader.num_workers == min(4, max(1, (os.cpu_count() or 1) - 1))


def test_each_process_takes_the_gpu_of_its_local_rank(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    dist = distributed.Distributed.from_environment()
    assert (dist.rank, dist.world_size, dist.local_rank, dist.is_main) == (3, 4, 1, False)
    assert dist.place(torch.device("cuda")) == torch.device("cuda", 1)
    assert dist.place(torch.device("mps")) == torch.device("mps")
    assert dist.place(torch.device("cpu")) == torch.device("cpu")
    alone = distributed.Distributed()
    assert alone.place(torch.device("cuda")) == torch.device("cuda")
    assert alone.agree(True) and alone.total([1.0, 2.0]) == [1.0, 2.0]
    assert alone.share("run") == "run"


def test_auto_on_a_gpu_is_the_full_recipe_with_its_own_defaults():
    assert recipe_for("auto", "cuda") == recipe_for("auto", "mps") == "full"
    assert recipe_for("auto", "cpu") == "cached" and recipe_for("course", "cuda") == "course"
    args = build_parser().parse_args(["train", "d", "--gpu", "--epochs", "3"])
    assert settle(typed_options(args), device_type="cuda") == TrainConfig.full(epochs=3)
    assert settle(typed_options(args), device_type="cpu") == TrainConfig(recipe="cached",
                                                                         epochs=3)
    no_aug = build_parser().parse_args(["train", "d", "--no_augment"])
    assert settle(typed_options(no_aug), device_type="cpu").augment is False
    assert TrainConfig().augment is True

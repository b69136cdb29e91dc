"""The activation cache: run the frozen part of the backbone once, keep its output on disk.

The backbone is split in two: a frozen *trunk* whose output is computed once per image
and view and cached, and a trainable *tail* (the last stages, the final 1x1 conv and the
pooling) that is fine-tuned together with the head on those cached activations.

Every cached file has its sha256 in a file beside it and is checked before use: a damaged
file, even one that still loads, is deleted and rebuilt. A photo's activations depend on the
photo alone (its augmented views are seeded by its path, not its place in the set), so a
set with photos left out or relabelled (a fixes file) is served from the cached set it came
from, extracting nothing again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets, transforms

from helpers.core.device import StopFlag, ignore_stop_signals, progress
from helpers.core.files import atomic_save, cache_dir, is_intact, runtime_choice, seal
from helpers.data.preprocess import Preprocess
from helpers.data.transforms import eval_transform, train_transform
from helpers.model.backbones import Backbone
from helpers.model.classifier import weights_digest
from helpers.train.trunk import make_runner, trunk_runtime

CACHE_VERSION = 2  # 2: views seeded per photo; the files listed in each cached file
CACHED_KINDS = ("activations", "onnx", "engines")  # the folders cache_dir() holds



def split_backbone(backbone: nn.Module, tail_stages: int) -> tuple[nn.Module, nn.Module]:
    """(trunk, tail) sharing the backbone's modules; tail_stages=-1 leaves the tail empty.

    For timm EfficientNets the tail is the last `tail_stages` block stages, conv_head,
    bn2 and the pooling; other backbones only split at -1 (cached pooled features).
    """
    if tail_stages < 0:
        return backbone, nn.Identity()
    if not hasattr(backbone, "blocks") or not hasattr(backbone, "conv_head"):
        raise ValueError(f"{type(backbone).__name__} can only cache pooled features (tail -1)")
    cut = len(backbone.blocks) - tail_stages
    trunk = nn.Sequential(backbone.conv_stem, backbone.bn1, *backbone.blocks[:cut])
    tail = nn.Sequential(*backbone.blocks[cut:], backbone.conv_head, backbone.bn2,
                         backbone.global_pool)
    return trunk, tail


def photo_seed(path: str) -> int:
    """A number fixed by a photo's path: its augmented views, whatever set it is in."""
    return int.from_bytes(hashlib.sha256(os.fsencode(path)).digest()[:6], "big")


class SeededView(Dataset):
    """A dataset whose random transform is seeded per photo: view v is the same every run,
    and the same in any set the photo is part of."""

    def __init__(self, dataset: datasets.ImageFolder, transform, seed: int) -> None:
        self.dataset, self.transform, self.seed = dataset, transform, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        path, label = self.dataset.samples[index]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1_000_003 + photo_seed(path))
            return self.transform(self.dataset.loader(path)), label


def view_transform(spec: Preprocess, view: str, *,
                   augmentation: str = "crop") -> transforms.Compose:
    """'centre' (the eval transform), 'flip' (mirrored centre) or 'aug<N>' (train transform)."""
    if view == "centre":
        return eval_transform(spec)
    if view == "flip":
        # mirrored after the crop: exactly the mirror image of the centre view
        return transforms.Compose([*eval_transform(spec).transforms,
                                   transforms.RandomHorizontalFlip(p=1.0)])
    if augmentation == "mixed":  # odd views cropped, even views camera-shifted
        augmentation = "camera" if int(view.removeprefix("aug")) % 2 == 0 else "crop"
    return train_transform(spec, augmentation=augmentation)


@torch.inference_mode()
def extract(run: Callable[[torch.Tensor], torch.Tensor], data: Dataset, *, batch_size: int = 32,
            desc: str = "extract", stop: StopFlag | None = None) -> torch.Tensor:
    """The trunk's output for every item of `data`, in order, stored as fp16 on the CPU."""
    workers = 1 if (os.cpu_count() or 1) <= 2 else min(4, (os.cpu_count() or 2) - 1)
    loader = DataLoader(data, batch_size=batch_size, num_workers=workers,
                        pin_memory=torch.cuda.is_available(), worker_init_fn=ignore_stop_signals)
    parts = []
    for images, _ in progress(loader, desc=desc):
        parts.append(run(images).to("cpu", torch.float16))
        if stop is not None:
            stop.check(desc)
    return torch.cat(parts).contiguous(memory_format=torch.channels_last)


class ActivationCache:
    """The frozen trunk of a backbone and its activations per (dataset, view), cached on disk."""

    def __init__(self, spec: Backbone, backbone: nn.Module, *, tail_stages: int,
                 device: torch.device, engine: str = "auto", stop: StopFlag | None = None,
                 log: Callable[[str], None] | None = None, augmentation: str = "crop") -> None:
        self.spec, self.tail_stages, self.device = spec, tail_stages, device
        self.augmentation = augmentation  # of the augmented views (transforms.train_transform)
        self.stop, self.log = stop, log
        self.trunk, self.tail = split_backbone(backbone, tail_stages)
        self._digest = weights_digest(self.trunk).hexdigest()
        if engine == "auto":  # on a CPU the fastest runtime here (trunk.py), else PyTorch
            engine = (trunk_runtime(self.trunk, digest=self._digest,
                                    input_size=spec.preprocess.input_size, log=log)
                      if device.type == "cpu" else "torch")
        self.engine = engine
        self._run: Callable[[torch.Tensor], torch.Tensor] | None = None  # made when first needed
        self.seconds, self.images = 0.0, 0  # time spent computing activations, and for how many

    def _transform(self, view: str) -> transforms.Compose:
        """The transform of a view of this cache's backbone and augmentation."""
        return view_transform(self.spec.preprocess, view, augmentation=self.augmentation)

    def release(self) -> None:
        """Free the trunk's runner (a runtime's session and its memory arena)."""
        self._run = None

    def family(self, view: str, seed: int) -> str:
        """A digest of what every photo's activations depend on besides the photo: weights,
        engine, transform, view and its seed."""
        facts = {"version": CACHE_VERSION, "arch": self.spec.name, "tail": self.tail_stages,
                 "engine": self.engine, "weights": self._digest, "view": view,
                 "seed": seed if view.startswith("aug") else None,
                 "transform": repr(self._transform(view)),
                 "torch": torch.__version__}
        return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:12]

    def key(self, dataset: datasets.ImageFolder, view: str, seed: int) -> str:
        """The family and a digest of the files, in order (labels do not matter)."""
        h = hashlib.sha256()
        for file in _files(dataset):
            h.update(f"{file}\n".encode())
        return f"{self.family(view, seed)}-{h.hexdigest()[:12]}"

    def get(self, dataset: datasets.ImageFolder, view: str = "centre", *,
            seed: int = 0) -> torch.Tensor:
        """Activations of one view of every image: from the cache, or computed and stored.

        A joined set (train+valid of a final model) is the concatenation of its parts' views:
        the training images' views extracted by the first run are found in the cache.
        """
        if getattr(dataset, "parts", ()):
            parts = [self.get(part, view, seed=seed) for part in dataset.parts]
            return torch.cat(parts).contiguous(memory_format=torch.channels_last)
        name = f"{self.spec.name}-{view}-{self.key(dataset, view, seed)}.pt"
        path = cache_dir() / "activations" / name
        acts = (torch.load(path, map_location="cpu", weights_only=True)["activations"]
                if is_intact(path) else self._from_a_larger_set(dataset, view, seed))
        if acts is not None:  # the layout of a fresh extraction: the same arithmetic
            return acts.contiguous(memory_format=torch.channels_last)
        tic = time.perf_counter()
        # Exporting and extracting must not move the caller's random numbers: a run that
        # finds its activations cached has to train exactly like the run that made them.
        with torch.random.fork_rng(devices=[]):
            if self._run is None:
                if self.log:
                    self.log(f"extracting the frozen trunk's activations with {self.engine}")
                self._run = make_runner(self.engine, self.trunk, digest=self._digest,
                                        input_size=self.spec.preprocess.input_size,
                                        device=self.device)
            data = SeededView(dataset, self._transform(view), seed)
            acts = extract(self._run, data, desc=f"{view} views of {Path(dataset.root).name}",
                           stop=self.stop)
        seal(atomic_save({"activations": acts, "created": time.time(),
                          "files": _files(dataset)}, path))
        self.seconds += time.perf_counter() - tic
        self.images += len(acts)
        return acts

    def _from_a_larger_set(self, dataset: datasets.ImageFolder, view: str,
                           seed: int) -> torch.Tensor | None:
        """This set's rows of a cached set holding all its photos (the set before a fixes
        file left some out), or None."""
        wanted = _files(dataset)
        prefix = f"{self.spec.name}-{view}-{self.family(view, seed)}-"
        for path in sorted((cache_dir() / "activations").glob(prefix + "*.pt")):
            if not is_intact(path):
                continue
            cached = torch.load(path, map_location="cpu", weights_only=True)
            row = {file: i for i, file in enumerate(cached.get("files", []))}
            if all(file in row for file in wanted):
                return cached["activations"][[row[file] for file in wanted]]
        return None


def _files(dataset: datasets.ImageFolder) -> list[str]:
    """Each photo of a set as path, size and modification time: what its activations are of."""
    files = []
    for path, _ in dataset.samples:
        stat = os.stat(path)
        files.append(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}")
    return files


def _cached(folder: Path) -> list[Path]:
    """Every cached file: activations, ONNX trunks, prediction engines, the runtime choice."""
    files = [p for kind in CACHED_KINDS for p in (folder / kind).rglob("*") if p.is_file()]
    choice = folder / runtime_choice().name
    return files + ([choice] if choice.is_file() else [])


def cache_size(folder: Path | None = None) -> int:
    """Bytes held by every cached artefact: activations, ONNX trunks, prediction engines."""
    return sum(p.stat().st_size for p in _cached(folder or cache_dir()))


def clear_cache(folder: Path | None = None) -> int:
    """Delete every cached artefact; returns the bytes freed."""
    folder = folder or cache_dir()
    size = cache_size(folder)
    for kind in CACHED_KINDS:
        shutil.rmtree(folder / kind, ignore_errors=True)
    (folder / runtime_choice().name).unlink(missing_ok=True)
    return size

"""Where the data lives, how images are transformed, and the train/valid/test loaders."""

from __future__ import annotations

import hashlib
import os
import warnings
from collections import Counter
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision import datasets, transforms
from torchvision.transforms import InterpolationMode

from .backbones import Backbone
from .images import check_image, is_image_file, open_image
from .runtime import Distributed, UserError, ignore_stop_signals

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SPLITS = ("train", "valid", "test")


class DataError(UserError):
    """The data folder or a names file is missing or malformed; the message says what to do."""


class BadImageWarning(UserWarning):
    """Unreadable images were found in a data set and left out."""


def data_dir() -> Path:
    """The data folder: $FLOWERS_DIR when set, else flowers/ in the project root."""
    return Path(os.environ.get("FLOWERS_DIR") or PROJECT_ROOT / "flowers")


def cache_dir() -> Path:
    """The cache folder: $FLOWERS_CACHE when set, else the user's cache directory."""
    if os.environ.get("FLOWERS_CACHE"):
        return Path(os.environ["FLOWERS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "flower-classifier"


def train_transform(spec: Backbone) -> transforms.Compose:
    """Augmentation for training: small rotation, random resized crop, horizontal flip."""
    return transforms.Compose([
        transforms.RandomRotation(15, interpolation=InterpolationMode.BILINEAR),
        transforms.RandomResizedCrop(spec.input_size, scale=(0.25, 1.0),
                                     interpolation=InterpolationMode(spec.interpolation)),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(spec.mean, spec.std),
    ])


def eval_transform(spec: Backbone) -> transforms.Compose:
    """Evaluation: shorter side to input/0.875, centre crop, normalise as the backbone expects."""
    return transforms.Compose([
        transforms.Resize(spec.resize_size, interpolation=InterpolationMode(spec.interpolation)),
        transforms.CenterCrop(spec.input_size),
        transforms.ToTensor(),
        transforms.Normalize(spec.mean, spec.std),
    ])


def image_folder(root: str | os.PathLike, transform=None) -> datasets.ImageFolder:
    """An ImageFolder read through open_image, or a DataError saying what is missing."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder; it should hold one folder of images per class")
    try:
        return datasets.ImageFolder(root, transform=transform, loader=open_image,
                                    is_valid_file=is_image_file)
    except FileNotFoundError as err:  # no class folders, or a class folder with no images
        raise DataError(f"{root}: {err}") from None


def drop_bad_images(dataset: datasets.ImageFolder) -> list[tuple[str, str]]:
    """Find unreadable images before training, leave them out with a warning; returns them."""
    bad = [(path, why) for path, _ in dataset.samples if (why := check_image(path))]
    if bad:
        skip = {path for path, _ in bad}
        dataset.samples = [s for s in dataset.samples if s[0] not in skip]
        dataset.imgs, dataset.targets = dataset.samples, [label for _, label in dataset.samples]
        listed = "; ".join(f"{path}: {why}" for path, why in bad[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        warnings.warn(f"left out {len(bad)} unreadable image(s) of {dataset.root}: "
                      f"{listed}{more}", BadImageWarning, stacklevel=2)
        if not dataset.samples:
            raise DataError(f"{dataset.root}: no readable images left; replace the files")
    return bad


def load_datasets(root: str | os.PathLike, spec: Backbone, splits: tuple[str, ...] = SPLITS,
                  check: bool = True) -> dict[str, datasets.ImageFolder]:
    """ImageFolders for the splits under root: train augmented, the others centre-cropped.

    With `check`, unreadable images are found first and left out with a BadImageWarning,
    so training never stops half-way on a damaged file.
    """
    root = Path(root)
    found = {s: image_folder(root / s, train_transform(spec) if s == "train" else
                             eval_transform(spec)) for s in splits if (root / s).is_dir()}
    for ds in found.values() if check else ():
        drop_bad_images(ds)
    if "train" in splits and "train" not in found:
        raise DataError(f"{root}: no train/ folder; expected {'/, '.join(splits)}/ inside it")
    reference = next(iter(found.values())).class_to_idx
    for s, ds in found.items():
        if ds.class_to_idx != reference:
            extra = sorted(set(ds.class_to_idx) ^ set(reference))
            raise DataError(f"{root / s}: its classes differ from {next(iter(found))}/ "
                            f"({', '.join(extra[:5])}); every split needs the same class folders")
    return found


def make_loaders(datasets_: dict[str, datasets.ImageFolder], *, batch_size: int = 64,
                 num_workers: int | None = None, dist: Distributed | None = None,
                 ) -> dict[str, DataLoader]:
    """DataLoaders: train shuffled (by a generator the training loop reseeds every epoch, or
    sharded by a DistributedSampler across processes), the others in order."""
    if num_workers is None:
        num_workers = min(4, max(1, (os.cpu_count() or 1) - 1))
    loaders = {}
    for split, ds in datasets_.items():
        shuffle, sampler = split == "train", None
        if shuffle and dist is not None and dist.world_size > 1:
            from torch.utils.data.distributed import DistributedSampler

            sampler = DistributedSampler(ds, num_replicas=dist.world_size, rank=dist.rank,
                                         shuffle=True, drop_last=True)
            shuffle = False
        loaders[split] = DataLoader(
            ds, batch_size=batch_size, shuffle=shuffle, sampler=sampler,
            num_workers=num_workers, generator=torch.Generator(),
            worker_init_fn=ignore_stop_signals, persistent_workers=False,
            pin_memory=torch.cuda.is_available(),
        )
    return loaders


def files_digest(datasets_: dict[str, datasets.ImageFolder], root: str | os.PathLike) -> str:
    """A sha256 of what a run trained on: every split's files (path relative to root, size,
    class), so a resumable state is never continued on other data."""
    h = hashlib.sha256()
    for split in sorted(datasets_):
        ds = datasets_[split]
        h.update(f"{split}\0{sorted(ds.class_to_idx.items())}\n".encode())
        for path, label in ds.samples:
            rel = os.path.relpath(path, root)
            h.update(f"{rel}\0{os.path.getsize(path)}\0{label}\n".encode())
    return h.hexdigest()


def summarize(datasets_: dict[str, datasets.ImageFolder]) -> dict[str, dict[str, int]]:
    """Images per split: total, number of classes, and the smallest and largest class."""
    summary = {}
    for split, ds in datasets_.items():
        counts = Counter(ds.targets)
        summary[split] = {"images": len(ds), "classes": len(ds.classes),
                          "min_per_class": min(counts.values(), default=0),
                          "max_per_class": max(counts.values(), default=0)}
    return summary


def images_per_class(ds: datasets.ImageFolder) -> dict[str, int]:
    """Number of images of each class folder."""
    counts = Counter(ds.targets)
    return {folder: counts[idx] for folder, idx in ds.class_to_idx.items()}

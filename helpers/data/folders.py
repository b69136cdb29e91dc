"""Where the data lives, its class folders listed, how images are transformed, loaders, names."""

from __future__ import annotations

import copy
import os
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision.datasets.vision import StandardTransform

from helpers.core.device import ignore_stop_signals
from helpers.core.distributed import Distributed
from helpers.core.errors import DataError
from helpers.data.images import check_image, is_hidden, list_image_files, open_image
from helpers.data.names import PROJECT_ROOT, class_names, load_category_names

SPLITS = ("train", "valid", "test")
FLOWER_IDS = frozenset(str(i) for i in range(1, 103))  # the class folders of the flowers data


class DataWarning(UserWarning):
    """Something about the data a user should know; training goes on."""


class BadImageWarning(DataWarning):
    """Unreadable images were found in a data set and left out."""


class LinkLoopWarning(DataWarning):
    """Symbolic links that lead back into a folder being listed were skipped."""


def data_dir() -> Path:
    """The data folder: $FLOWERS_DIR when set, else flowers/ in the project root."""
    return Path(os.environ.get("FLOWERS_DIR") or PROJECT_ROOT / "flowers")


def _class_folders(root: str | os.PathLike) -> tuple[list[str], list[str]]:
    """Class folder names, and links among them that lead back to root or above (loops)."""
    real = Path(os.path.realpath(root))
    names, loops = [], []
    with os.scandir(root) as entries:
        for entry in entries:
            if not is_hidden(entry.name) and entry.is_dir():
                if Path(os.path.realpath(entry.path)) in (real, *real.parents):
                    loops.append(entry.name)
                else:
                    names.append(entry.name)
    return sorted(names), [os.path.join(root, name) for name in sorted(loops)]


def find_class_folders(root: str | os.PathLike) -> list[str]:
    """The class folders of root, sorted as strings; hidden and editor folders are never classes."""
    return _class_folders(root)[0]


class PhotoFolder(datasets.ImageFolder):
    """An ImageFolder listed by list_image_files: links followed once, loops and hidden skipped.

    `link_loops` holds the links skipped because they lead back into a folder being listed;
    `parts` the folders a joined set was made of (the activation cache reuses theirs).
    """

    parts: tuple[PhotoFolder, ...] = ()

    def __init__(self, root: str | os.PathLike, transform=None) -> None:
        super().__init__(root, transform=transform, loader=open_image)

    def find_classes(self, directory: str | os.PathLike) -> tuple[list[str], dict[str, int]]:
        """Class folders and their indices; FileNotFoundError when there are none."""
        classes, self.link_loops = _class_folders(directory)
        if not classes:
            raise FileNotFoundError("no class folders inside; put one folder of images per class "
                                    "there")
        return classes, {name: i for i, name in enumerate(classes)}

    def make_dataset(self, directory: str | os.PathLike, class_to_idx: dict[str, int], *,
                     extensions=None, is_valid_file=None,
                     allow_empty: bool = False) -> list[tuple[str, int]]:
        """(path, class index) of every image; FileNotFoundError names the empty class folders."""
        samples, empty = [], []
        for name, index in class_to_idx.items():
            files, loops = list_image_files(os.path.join(directory, name))
            samples += [(path, index) for path in files]
            self.link_loops += loops
            if not files:
                empty.append(name)
        if empty and not allow_empty:
            raise FileNotFoundError(f"class folder(s) with no images: {', '.join(empty[:5])}; "
                                    "add images or remove them")
        return samples

    def subset(self, samples: list[tuple[str, int]],
               transform: Callable | None = None) -> PhotoFolder:
        """The same classes with only these samples and another transform."""
        part = copy.copy(self)
        part.samples = part.imgs = list(samples)
        part.targets = [label for _, label in samples]
        part.transform, part.transforms = transform, StandardTransform(transform, None)
        part.parts = ()
        return part

    def joined(self, other: PhotoFolder) -> PhotoFolder:
        """This folder's samples then other's, with this folder's transform."""
        whole = self.subset(self.samples + other.samples, self.transform)
        whole.parts = (self, other)
        return whole


def warn_link_loops(loops: list[str]) -> None:
    """One LinkLoopWarning naming the skipped links, if any."""
    if loops:
        more = f" and {len(loops) - 3} more" if len(loops) > 3 else ""
        warnings.warn(f"skipped {len(loops)} symbolic link(s) leading back into a folder being "
                      f"listed: {', '.join(loops[:3])}{more}; remove them", LinkLoopWarning,
                      stacklevel=3)


def image_folder(root: str | os.PathLike, transform: Callable | None = None) -> PhotoFolder:
    """A PhotoFolder of root, or a DataError saying what is missing."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder; it should hold one folder of images per class")
    try:
        dataset = PhotoFolder(root, transform=transform)
    except FileNotFoundError as err:  # no class folders, or a class folder with no images
        raise DataError(f"{root}: {err}") from None
    warn_link_loops(dataset.link_loops)
    return dataset


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


def with_transform(dataset: datasets.ImageFolder,
                   transform: Callable | None) -> datasets.ImageFolder:
    """The same samples under another transform (a copy; the dataset itself is unchanged)."""
    part = copy.copy(dataset)
    part.transform, part.transforms = transform, StandardTransform(transform, None)
    return part


def _cuda_loading() -> dict:
    """DataLoader settings that keep a GPU fed: decoding and augmenting JPEGs (a few ms of
    CPU per image) is the bottleneck of a small network on a fast GPU, so each process takes
    its share of the cores, keeps its workers between epochs, copies batches from pinned
    memory and keeps 4 batches per worker ready."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    per_process = (cores or 2) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # torchrun's
    return {"num_workers": max(1, per_process - 1), "persistent_workers": True,
            "pin_memory": True, "prefetch_factor": 4}


def make_loaders(datasets_: dict[str, datasets.ImageFolder], *, batch_size: int = 64,
                 num_workers: int | None = None, dist: Distributed | None = None,
                 device: torch.device | None = None) -> dict[str, DataLoader]:
    """DataLoaders: train shuffled (by a generator the training loop reseeds every epoch, or
    sharded by a DistributedSampler across processes), the others in order. For a CUDA
    `device` they use every core this process has, persistent workers and pinned memory."""
    if device is not None and device.type == "cuda":
        settings = _cuda_loading()
    else:  # the CPU (and MPS) path: training shares the cores with loading
        settings = {"num_workers": min(4, max(1, (os.cpu_count() or 1) - 1)),
                    "persistent_workers": False, "pin_memory": torch.cuda.is_available()}
    if num_workers is not None:
        settings |= {"num_workers": num_workers}
        if num_workers == 0:
            settings |= {"persistent_workers": False, "prefetch_factor": None}
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
            generator=torch.Generator(), worker_init_fn=ignore_stop_signals, **settings)
    return loaders




def choose_names(class_to_idx: dict[str, int], *, root: str | os.PathLike,
                 names_file: str | os.PathLike | None = None) -> tuple[list[str], str]:
    """Names per output index, and where they came from.

    The user's names file wins, then root/cat_to_name.json, then the project's flower names
    but only for the 102 flower folders "1".."102"; otherwise the folder names are the names.
    """
    found = Path(root) / "cat_to_name.json"
    if names_file:
        source = Path(names_file)
    elif found.is_file():
        source = found
    elif set(class_to_idx) == FLOWER_IDS:
        source = PROJECT_ROOT / "cat_to_name.json"
    else:
        return class_names(class_to_idx), "class names: the folder names"
    return class_names(class_to_idx, load_category_names(source)), f"class names: from {source}"


def summarize(datasets_: dict[str, datasets.ImageFolder]) -> dict[str, dict[str, int]]:
    """Images per split: total, number of classes, and the smallest and largest class."""
    summary = {}
    for split, ds in datasets_.items():
        counts = Counter(ds.targets)
        summary[split] = {"images": len(ds), "classes": len(ds.classes),
                          "min_per_class": min(counts.values(), default=0),
                          "max_per_class": max(counts.values(), default=0)}
    return summary


def images_per_class(sets: dict[str, datasets.ImageFolder]) -> float:
    """Training images a class, on average: what the data-following settings follow."""
    return len(sets["train"]) / max(len(sets["train"].classes), 1)

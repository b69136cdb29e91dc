"""One entry point for any folder of photos: its layout, the missing splits carved out, names."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from torchvision import datasets

from helpers.data.fixes import Fixes, apply_fixes_to_sets
from helpers.data.folders import (
    SPLITS,
    DataError,
    DataWarning,
    PhotoFolder,
    choose_names,
    drop_bad_images,
    warn_link_loops,
)
from helpers.data.images import is_image_file
from helpers.data.preprocess import Preprocess
from helpers.data.transforms import eval_transform, train_transform

# A fifth of the photos for validation and a fifth for testing, as in the usual 60/20/20 split:
# transfer learning needs few training photos, while an accuracy measured on fewer held-out
# photos of a user's folder (often tens per class) is too noisy to choose or trust a model by.
VALID_FRACTION = 0.2
TEST_FRACTION = 0.2
IMBALANCE_RATIO = 10  # largest class over smallest beyond which the model will favour the large
PURPOSE = {"valid": "validation", "test": "testing"}


class SmallClassWarning(DataWarning):
    """Classes with too few images to hold any out; they stay in training only."""


class ImbalanceWarning(DataWarning):
    """The largest class has many times the images of the smallest."""


class DuplicateImageWarning(DataWarning):
    """The same photo (the same bytes) is in training and in a held-out split."""


class LabelConflictWarning(DataWarning):
    """The same photo (the same bytes) is filed under two or more classes."""


@dataclass
class DataSplits:
    """The data sets of one folder, their class names, and what was done to make them."""

    root: Path  # the folder given; relative paths below are relative to it
    sets: dict[str, datasets.ImageFolder]  # "train", and "valid" and "test" when available
    class_to_idx: dict[str, int]  # class folder -> output index, the same in every set
    names: list[str]  # the display name of each output index
    held_out: dict[str, list[str]] = field(default_factory=dict)  # carved split -> POSIX paths
    messages: list[str] = field(default_factory=list)  # one line per thing done, for the caller

    def digest(self) -> str:
        """sha256 of every split's files (relative path, size as on disk now, label: a fixes file
    changes it) and class_to_idx."""
        files = {split: sorted((_relative(path, self.root), os.path.getsize(path), label)
                               for path, label in ds.samples) for split, ds in self.sets.items()}
        text = json.dumps({"class_to_idx": self.class_to_idx, "files": files}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()


def _relative(path: str, root: Path) -> str:
    return Path(path).relative_to(root).as_posix()


def uniform_hash(relative_path: str) -> float:
    """A number in [0, 1) fixed by the path alone: the same on every machine and in every run."""
    return int.from_bytes(hashlib.sha256(relative_path.encode()).digest()[:8], "big") / 2**64


def carve_splits(paths: Sequence[str], labels: Sequence[int], *, fractions: dict[str, float],
                 groups: Sequence[Sequence[int]] = ()) -> tuple[list[str], list[int]]:
    """The split of each file ("train", "valid" or "test") and the classes too small to split.

    Each file's own hash against fixed thresholds decides (test below test's fraction, valid in
    the next band), so adding photos never moves an old held-out photo into training. Each group
    of identical files follows its lowest hash; a class that would have no training file keeps
    the held-out group with the highest hash, and one with fewer files than splits keeps all.
    """
    u = [uniform_hash(p) for p in paths]
    group_of = list(range(len(paths)))
    for group in groups:
        low = min(u[i] for i in group)
        for i in group:
            u[i], group_of[i] = low, group[0]
    edges, edge = [], 0.0
    for split in ("test", "valid"):
        if fractions.get(split, 0) > 0:
            edge += fractions[split]
            edges.append((edge, split))
    sides = [next((split for top, split in edges if x < top), "train") for x in u]
    by_class, by_group = defaultdict(list), defaultdict(list)
    for i, (label, group) in enumerate(zip(labels, group_of, strict=True)):
        by_class[label].append(i)
        by_group[group].append(i)
    small = sorted(c for c, members in by_class.items() if edges and len(members) <= len(edges))
    for c, members in by_class.items():
        if c in small:
            for i in members:
                sides[i] = "train"
        elif all(sides[i] != "train" for i in members):
            for i in by_group[group_of[max(members, key=u.__getitem__)]]:
                sides[i] = "train"
    return sides, small


def duplicate_groups(paths: Sequence[str]) -> list[list[int]]:
    """Indices of byte-identical files, grouped (only files of equal size are read)."""
    by_size, by_content = defaultdict(list), defaultdict(list)
    for i, path in enumerate(paths):
        by_size[os.path.getsize(path)].append(i)
    for same_size in by_size.values():
        for i in same_size if len(same_size) > 1 else ():
            with open(paths[i], "rb") as f:
                by_content[hashlib.file_digest(f, "sha256").digest()].append(i)
    return [group for group in by_content.values() if len(group) > 1]


def _open_folder(folder: Path, transform=None) -> PhotoFolder:
    """A PhotoFolder, or a DataError naming the folder."""
    try:
        return PhotoFolder(folder, transform=transform)
    except FileNotFoundError as err:  # no class folders, or a class folder with no images
        raise DataError(f"{folder}: {err}") from None


def _check_classes(folders: dict[str, PhotoFolder]) -> None:
    """At least two classes, the same in every split, each with a readable training image."""
    train = folders["train"]
    if len(train.classes) < 2:
        inner = Path(train.root) / train.classes[0]
        hint = f"; did you mean {inner}?" if (inner / "train").is_dir() else ""
        raise DataError(f"{train.root}: only one class folder ({train.classes[0]}); "
                        f"a classifier needs two or more{hint}")
    for ds in folders.values():
        if ds.class_to_idx != train.class_to_idx:
            extra = sorted(set(ds.class_to_idx) ^ set(train.class_to_idx))
            raise DataError(f"{ds.root}: its classes differ from train/ ({', '.join(extra[:5])});"
                            " every split needs the same class folders")
    present = set(train.targets)
    empty = [c for c, i in train.class_to_idx.items() if i not in present]
    if empty:
        raise DataError(f"{train.root}: no readable images in class folder(s) "
                        f"{', '.join(empty[:5])}; add photos or remove the folders")


def _warn_about(folders: dict[str, PhotoFolder], small: list[int],
                leaks: list[tuple[str, str]], conflicts: list[tuple[str, ...]]) -> None:
    """Warnings for tiny classes, strong imbalance, photos both in train and held out, and
    photos filed under two classes."""
    classes = folders["train"].classes
    if conflicts:
        head = "the same photo is" if len(conflicts) == 1 else f"{len(conflicts)} photos are"
        warnings.warn(f"{head} filed under two or more classes (same bytes), e.g. "
                      f"{' and '.join(conflicts[0])}; keep each photo in its one right class "
                      f"(python -m helpers doctor DATA lists them all)", LabelConflictWarning,
                      stacklevel=3)
    if small:
        listed = ", ".join(classes[c] for c in small[:5]) + (" ..." if len(small) > 5 else "")
        warnings.warn(f"too few images to hold any out of class(es) {listed}: kept for training "
                      "only; add photos to test them", SmallClassWarning, stacklevel=3)
    counts = Counter(label for ds in folders.values() for label in ds.targets)
    big, few = max(counts, key=counts.get), min(counts, key=counts.get)
    if counts[big] > IMBALANCE_RATIO * counts[few]:
        warnings.warn(f"imbalanced classes: {classes[big]} has {counts[big]} images, "
                      f"{classes[few]} only {counts[few]}; the model will favour the large "
                      "classes, add photos to the small ones", ImbalanceWarning, stacklevel=3)
    if leaks:
        first = f"{leaks[0][0]} and {leaks[0][1]}"
        head = "the same photo is" if len(leaks) == 1 else f"{len(leaks)} photos are"
        warnings.warn(f"{head} in train and held out (same bytes), e.g. {first}; remove the "
                      "copies so the held-out accuracy is honest", DuplicateImageWarning,
                      stacklevel=3)


def _split_folders(root: Path, spec: Preprocess) -> tuple[dict[str, PhotoFolder], str]:
    """The split folders under root (root itself as train/ when it has none), and what was found."""
    # A split folder holds class folders; a folder named train/ that holds photos itself is
    # a class of a flat folder (a flower called "test" is a class, not a split).
    given = [split for split in SPLITS if (root / split).is_dir()
             and not _holds_photos(root / split)]
    if given and "train" not in given:
        raise DataError(f"{root}: {'/, '.join(given)}/ but no train/ folder; add train/ with "
                        "one folder of images per class")
    if not given:
        folders = {"train": _open_folder(root)}
        return folders, f"no split folders: {len(folders['train'])} images in the class folders"
    folders = {split: _open_folder(root / split, None if split == "train" else
                                   eval_transform(spec)) for split in given}
    return folders, "found " + ", ".join(f"{s}/ ({len(ds)} images)" for s, ds in folders.items())


def _holds_photos(folder: Path) -> bool:
    """True when image files lie directly in the folder (a class folder, not a split)."""
    return any(is_image_file(p) for p in folder.iterdir() if p.is_file())


def _check_links(folders: dict[str, PhotoFolder]) -> None:
    """Refuse a class folder that is a link to another class folder of the same split: the
    same photos would be learned as two classes."""
    for ds in folders.values():
        seen: dict[str, str] = {}
        for name in ds.classes:
            real = os.path.realpath(os.path.join(ds.root, name))
            if real in seen:
                raise DataError(f"{os.path.join(ds.root, name)}: the same folder as class "
                                f"{seen[real]} (a link); its photos would be two classes: "
                                "remove the link or make it a real folder of other photos")
            seen[real] = name


def _conflicts(groups: list[list[int]], paths: list[str],
               labels: list[int]) -> list[tuple[str, ...]]:
    """The copies of each group of identical files filed under more than one class."""
    return [tuple(sorted(paths[i] for i in group)) for group in groups
            if len({labels[i] for i in group}) > 1]


def _leaks(groups: list[list[int]], paths: list[str], where: list[str]) -> list[tuple[str, str]]:
    """(training copy, held-out copy) of each group of identical files on both sides."""
    leaks = []
    for group in groups:
        train = [paths[i] for i in group if where[i] == "train"]
        held = [paths[i] for i in group if where[i] != "train"]
        if train and held:
            leaks.append((min(train), min(held)))
    return leaks


def load_data(root: str | os.PathLike, spec: Preprocess, *, valid_fraction: float = VALID_FRACTION,
              test_fraction: float = TEST_FRACTION, names_file: str | os.PathLike | None = None,
              check: bool = True, fixes: Fixes | None = None) -> DataSplits:
    """The sets of a folder in any accepted layout, the splits it lacks carved out of train.

    Layouts: train/ + valid/ (+ test/), train/ + test/, train/ alone, or class folders alone.
    With `check`, unreadable images are left out first with a BadImageWarning. `fixes` (the
    doctor's fixes file) leaves photos out and relabels others, in memory only.
    """
    root = Path(root).expanduser()
    if min(valid_fraction, test_fraction) < 0 or valid_fraction + test_fraction >= 1:
        raise DataError(f"--valid_fraction {valid_fraction} and --test_fraction {test_fraction} "
                        "must be >= 0 and sum to less than 1")
    if not root.is_dir():
        raise DataError(f"{root}: no such folder; give a folder of class folders of photos")
    folders, found = _split_folders(root, spec)
    messages = [found]
    warn_link_loops([loop for ds in folders.values() for loop in ds.link_loops])
    for ds in folders.values() if check else ():
        if bad := drop_bad_images(ds):
            messages.append(f"left out {len(bad)} unreadable image(s) of {ds.root}")
    if fixes is not None:  # before the checks and the carving: they see the fixed photos
        messages.append(apply_fixes_to_sets(folders, fixes=fixes, root=root))
    _check_classes(folders)
    _check_links(folders)

    pool = folders["train"]  # train/, or root itself: the photos the missing splits come from
    fractions = {split: fraction for split, fraction in (("valid", valid_fraction),
                 ("test", test_fraction)) if split not in folders and fraction > 0}
    paths = [_relative(path, root) for ds in folders.values() for path, _ in ds.samples]
    groups = duplicate_groups([os.path.join(root, p) for p in paths])
    in_pool = [[i for i in group if i < len(pool)] for group in groups]
    sides, small = carve_splits(paths[:len(pool)], pool.targets, fractions=fractions,
                                groups=[group for group in in_pool if len(group) > 1])
    sets = {"train": pool.subset([s for s, side in zip(pool.samples, sides, strict=True)
                                  if side == "train"], train_transform(spec))}
    held_out = {}
    for split in SPLITS[1:]:
        if split in folders:
            sets[split] = folders[split]
        elif split in fractions:
            samples = [s for s, side in zip(pool.samples, sides, strict=True) if side == split]
            sets[split] = pool.subset(samples, eval_transform(spec))
            held_out[split] = [_relative(path, root) for path, _ in samples]
            messages.append(f"no {split}/ folder: {len(samples)} of {len(pool)} images held out "
                            f"for {PURPOSE[split]}")
    where = sides + [split for split, ds in folders.items() if split != "train" for _ in ds.samples]
    labels = [label for ds in folders.values() for label in ds.targets]
    _warn_about(folders, small, _leaks(groups, paths, where), _conflicts(groups, paths, labels))
    names, source = choose_names(pool.class_to_idx, root=root, names_file=names_file)
    return DataSplits(root=root, sets=sets, class_to_idx=dict(pool.class_to_idx), names=names,
                      held_out=held_out, messages=[*messages, source])

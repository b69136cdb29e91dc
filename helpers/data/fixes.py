"""The fixes file: photos to leave out and photos to relabel, applied to the loaded samples,
never to the data folder (which may be read-only, shared, or the course's own split).

    {"exclude": ["train/31/image_08077.jpg"], "relabel": {"train/5/image_04.jpg": "17"}}

Paths are relative to the data folder, with forward slashes; a relabel names a class folder.
`python -m helpers doctor` finds candidates; `fixes_from_decisions` and `write_fixes` turn a
notebook's keep / exclude / relabel decisions into the file. Torch-free.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from helpers.core.errors import FixesError
from helpers.core.files import atomic_write_bytes, read_json


@dataclass(frozen=True)
class Fixes:
    """Relative paths to leave out, and relative path -> class folder to relabel to."""

    exclude: frozenset[str] = frozenset()
    relabel: dict[str, str] = field(default_factory=dict)
    source: str = "fixes"  # the file they came from, named in every error

    def __bool__(self) -> bool:
        return bool(self.exclude or self.relabel)


def _clean_path(path: Any, source: str) -> str:
    """A relative POSIX path inside the data folder, or a FixesError naming it."""
    if not isinstance(path, str) or not path.strip():
        raise FixesError(f"{source}: {path!r} is not a path; give paths relative to the data "
                         "folder, like train/1/image_06734.jpg")
    pure = PurePosixPath(path.replace("\\", "/"))
    long = next((part for part in pure.parts if len(part.encode()) > 255), None)
    if long is not None:
        raise FixesError(f"{source}: {long[:40]}... ({len(long.encode())} bytes) is longer "
                         "than a file name can be (255); correct the path or remove it")
    if pure.is_absolute() or ".." in pure.parts or os.path.isabs(path):
        raise FixesError(f"{source}: {path} is not inside the data folder; give paths relative "
                         "to it, like train/1/image_06734.jpg")
    return pure.as_posix()


def parse_fixes(values: Any, *, source: str = "fixes") -> Fixes:
    """Fixes from a decoded JSON object, checked for shape (not yet against any data)."""
    if not isinstance(values, dict) or set(values) - {"exclude", "relabel"}:
        raise FixesError(f'{source}: expected a JSON object like {{"exclude": [paths], '
                         f'"relabel": {{path: class_folder}}}}, nothing else')
    exclude, relabel = values.get("exclude", []), values.get("relabel", {})
    if not isinstance(exclude, list):
        raise FixesError(f'{source}: "exclude" must be a list of paths')
    if not isinstance(relabel, dict) or not all(isinstance(c, str) for c in relabel.values()):
        raise FixesError(f'{source}: "relabel" must map paths to class folder names')
    excluded = frozenset(_clean_path(p, source) for p in exclude)
    relabelled = {_clean_path(p, source): c for p, c in relabel.items()}
    both = sorted(excluded & set(relabelled))
    if both:
        raise FixesError(f"{source}: {both[0]} is both excluded and relabelled; keep one")
    return Fixes(exclude=excluded, relabel=relabelled, source=source)


def read_fixes(path: str | os.PathLike) -> Fixes:
    """The fixes file at `path`, checked for shape; a one-line FixesError names what is wrong."""
    path = Path(path)
    if not path.exists():
        raise FixesError(f"{path}: no such fixes file; write one with `python -m helpers doctor` "
                         "hints or helpers.data.fixes.write_fixes")
    values = read_json(path, what="fixes file", error=FixesError)
    return parse_fixes(values, source=str(path))


def check_fixes(fixes: Fixes, *, root: str | os.PathLike, paths: Collection[str],
                classes: Collection[str]) -> None:
    """Every fixed photo is a file of the data folder and every relabel names a class folder.

    `paths`: the relative paths of the loaded photos; a relabelled photo must be one of them
    (an unreadable file may only be excluded).
    """
    root = Path(root)
    for path in sorted(fixes.exclude | set(fixes.relabel)):
        if path not in paths and not (root / path).is_file():
            raise FixesError(f"{fixes.source}: {path} is not a photo of {root}; correct the "
                             "path (relative to the data folder) or remove it")
    for path, folder in sorted(fixes.relabel.items()):
        if folder not in classes:
            listed = ", ".join(sorted(classes)[:8])
            raise FixesError(f"{fixes.source}: {path} is relabelled to {folder!r}, which is no "
                             f"class folder of {root}; choose one of {listed} ...")
        if path not in paths:
            raise FixesError(f"{fixes.source}: {path} was not loaded (unreadable?); exclude it "
                             "instead of relabelling it")


def _relative(path: str, root: Path) -> str:
    return Path(path).relative_to(root).as_posix()


def apply_fixes(samples: Sequence[tuple[str, int]], *, fixes: Fixes, root: str | os.PathLike,
                class_to_idx: Mapping[str, int], check: bool = True) -> list[tuple[str, int]]:
    """The (path, class index) samples less the excluded, relabelled ones moved; a new list.

    Sample paths are as loaded (root joined with the relative path); with `check` the fixes
    are first checked against these samples (check_fixes). The files are never touched.
    """
    root = Path(root)
    if check:
        check_fixes(fixes, root=root, paths={_relative(p, root) for p, _ in samples},
                    classes=class_to_idx)
    fixed = []
    for path, label in samples:
        rel = _relative(path, root)
        if rel not in fixes.exclude:
            fixed.append((path, class_to_idx[fixes.relabel[rel]] if rel in fixes.relabel
                          else label))
    return fixed


def apply_fixes_to_sets(sets: Mapping[str, Any], *, fixes: Fixes,
                        root: str | os.PathLike) -> str:
    """Apply fixes in place to ImageFolder-like sets (samples, imgs, targets) loaded from root,
    checked against all their photos together; returns one line saying what was done."""
    root = Path(root)
    classes = next(iter(sets.values())).class_to_idx
    paths = {_relative(p, root) for ds in sets.values() for p, _ in ds.samples}
    check_fixes(fixes, root=root, paths=paths, classes=classes)
    before = sum(len(ds.samples) for ds in sets.values())
    for ds in sets.values():
        ds.samples = ds.imgs = apply_fixes(ds.samples, fixes=fixes, root=root,
                                           class_to_idx=classes, check=False)
        ds.targets = [label for _, label in ds.samples]
    emptied = next((split for split, ds in sets.items() if not ds.samples), None)
    if emptied is not None:
        raise FixesError(f"{fixes.source}: the fixes leave no photo in {emptied}/; exclude "
                         f"fewer of its photos, or remove the {emptied}/ folder")
    left_out = before - sum(len(ds.samples) for ds in sets.values())
    return (f"fixes from {fixes.source}: {left_out} photo(s) left out, "
            f"{len(fixes.relabel)} relabelled")


def fixes_from_decisions(decisions: Mapping[str, str], *,
                         previous: Fixes | None = None) -> Fixes:
    """Fixes from per-photo decisions: "keep", "exclude" or "relabel:FOLDER", over `previous`.

    A later decision replaces an earlier fix of the same photo; "keep" removes it.
    """
    exclude = set(previous.exclude) if previous else set()
    relabel = dict(previous.relabel) if previous else {}
    source = previous.source if previous else "decisions"
    for raw, decision in decisions.items():
        path = _clean_path(raw, source)
        exclude.discard(path)
        relabel.pop(path, None)
        if decision == "exclude":
            exclude.add(path)
        elif isinstance(decision, str) and decision.startswith("relabel:") and decision[8:]:
            relabel[path] = decision[8:]
        elif decision != "keep":
            raise FixesError(f"{path}: decision {decision!r}; choose keep, exclude or "
                             "relabel:CLASS_FOLDER")
    return Fixes(exclude=frozenset(exclude), relabel=relabel, source=source)


def write_fixes(decisions: Mapping[str, str], *, path: str | os.PathLike,
                root: str | os.PathLike, classes: Collection[str]) -> Fixes:
    """Merge decisions into the fixes file at `path` (made if missing), checked against the
    data folder `root` and its class folders as loaded, written whole or not at all; returns
    what the file now holds."""
    path = Path(path)
    previous = read_fixes(path) if path.is_file() else Fixes(source=str(path))
    fixes = fixes_from_decisions(decisions, previous=previous)
    root = Path(root)
    if not root.is_dir():
        raise FixesError(f"{root}: no such data folder; give the folder the paths are in")
    relabelled = {p for p in fixes.relabel if (root / p).is_file()}
    check_fixes(fixes, root=root, paths=relabelled, classes=classes)
    text = json.dumps({"exclude": sorted(fixes.exclude), "relabel": dict(sorted(
        fixes.relabel.items()))}, indent=1)
    atomic_write_bytes((text + "\n").encode(), path)
    return fixes

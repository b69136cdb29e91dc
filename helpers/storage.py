"""Where cached files live and how they are trusted: the cache folder, and the sha256 sealed
beside each cached file (checked before use; a damaged file is deleted and rebuilt).

Torch-free, at the bottom of `helpers/` beside runtime.py, so that the prediction engine
and the command lines use it without importing torch.
"""

from __future__ import annotations

import os
from pathlib import Path

from .runtime import atomic_write_bytes, file_sha256


def cache_dir() -> Path:
    """The cache folder: $FLOWERS_CACHE when set, else the user's cache directory."""
    if os.environ.get("FLOWERS_CACHE"):
        return Path(os.environ["FLOWERS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "flower-classifier"


def runtime_choice() -> Path:
    """The file where the cached recipe keeps the trunk runtime it measured fastest here."""
    return cache_dir() / "trunk_runtime.json"


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def seal(path: str | os.PathLike) -> Path:
    """Store the sha256 of a cached file beside it (written after the file itself)."""
    path = Path(path)
    atomic_write_bytes(file_sha256(path).encode(), _sidecar(path))
    return path


def is_intact(path: str | os.PathLike) -> bool:
    """True when a cached file and its stored sha256 exist and agree; else both are deleted."""
    path = Path(path)
    try:
        if path.is_file() and file_sha256(path) == _sidecar(path).read_text().strip():
            return True
    except OSError:
        pass
    path.unlink(missing_ok=True)
    _sidecar(path).unlink(missing_ok=True)
    return False

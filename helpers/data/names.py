"""Class names: index -> class folder -> name, from a names file or the folder names.

Torch-free, so that `predict.py --category_names` answers without importing torch.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from helpers.core.errors import DataError
from helpers.core.files import read_json

PROJECT_ROOT = Path(__file__).resolve().parents[2]
FLOWER_NAMES = PROJECT_ROOT / "cat_to_name.json"


def load_category_names(path: str | os.PathLike | None = None) -> dict[str, str]:
    """Class folder -> flower name from a JSON file (default: the project's cat_to_name.json)."""
    path = Path(path) if path else FLOWER_NAMES
    if not path.exists():
        raise DataError(f"{path}: no such names file; give a JSON file of class -> name")
    names = read_json(path, what="names file", error=DataError)  # a BOM is fine
    if not isinstance(names, dict) or not all(isinstance(v, str) for v in names.values()):
        raise DataError(f'{path}: expected a JSON object like {{"1": "pink primrose"}}')
    return {str(k): v for k, v in names.items()}


def class_names(class_to_idx: dict[str, int], names: dict[str, str] | None = None) -> list[str]:
    """The name of each output index: index -> class folder -> name (folder name if unnamed)."""
    by_index = sorted(class_to_idx.items(), key=lambda item: item[1])
    missing = [folder for folder, _ in by_index if names and folder not in names]
    if missing:
        warnings.warn(f"no name for class folder(s) {', '.join(missing[:5])} in the names file; "
                      "using the folder names", stacklevel=2)
    return [(names or {}).get(folder, folder) for folder, _ in by_index]

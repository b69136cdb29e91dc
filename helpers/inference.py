"""Making and using the prediction engine of a trained model (see engine.py).

`engine_for(model)` exports a model in memory once (cached by its weights) and returns its
engine, carrying the model's current temperature and threshold; `save_model` writes the
checkpoint and its engine beside it; `logits_of` runs the engine over a dataset. Every
reported figure of a trained model comes through here, so all agree on every image.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .cache import weights_digest
from .checkpoint import save_checkpoint
from .engine import Engine, engine_path
from .export import export_onnx, save_with_metadata
from .images import ImageError
from .model import Classifier
from .runtime import file_sha256
from .storage import cache_dir, is_intact, seal

_LOADED: dict[str, Engine] = {}  # engines by weights digest, so a session is made once


def engine_key(model: Classifier) -> str:
    """A sha256 of what the engine depends on: architecture, labels and every weight."""
    h = weights_digest(model)
    h.update(f"{model.spec.name}\0{model.class_names}\0{model.class_to_idx}".encode())
    return h.hexdigest()


def engine_for(model: Classifier) -> Engine:
    """The engine of a model in memory, exported once per weights (cached on disk)."""
    digest = engine_key(model)
    engine = _LOADED.get(digest)
    if engine is None:
        path = cache_dir() / "engines" / f"{model.spec.name}-{digest[:24]}.onnx"
        if not is_intact(path):
            seal(export_onnx(model, path, output="logits", extra={"weights_sha256": digest}))
        engine = _LOADED[digest] = Engine(path, threads=torch.get_num_threads())
    engine.temperature = float(model.temperature)
    engine.unsure_below = float(model.unsure_below)
    return engine


def write_engine(model: Classifier, checkpoint: str | os.PathLike) -> Path:
    """The engine beside a saved checkpoint, stamped with the checkpoint's sha256."""
    import onnx

    proto = onnx.load(engine_for(model).path)
    values = {p.key: p.value for p in proto.metadata_props}
    values |= {"temperature": repr(float(model.temperature)),
               "unsure_below": repr(float(model.unsure_below)),
               "checkpoint_sha256": file_sha256(checkpoint)}
    return save_with_metadata(proto, engine_path(checkpoint), values)


def save_model(model: Classifier, path: str | os.PathLike, *, config: Any = None,
               metrics: dict[str, Any] | None = None) -> Path:
    """Save the checkpoint and, for .pth files, its prediction engine beside it."""
    path = save_checkpoint(model, path, config=config, metrics=metrics)
    write_engine(model, path)
    return path


def logits_of(model: Classifier | Engine, samples: list[tuple[str, int]],
              ) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
    """Logits and labels of (path, label) samples through the engine, and the bad files.

    A file that cannot be read is left out and listed as (path, why); the others are kept.
    """
    engine = model if isinstance(model, Engine) else engine_for(model)
    labels = dict(samples)
    logits, kept, bad = [], [], []
    for path, result in engine.run_paths([p for p, _ in samples]):
        if isinstance(result, ImageError):
            bad.append((str(path), str(result)))
        else:
            logits.append(result)
            kept.append(labels[str(path)])
    if not logits:
        return np.zeros((0, len(engine.class_names)), np.float32), np.zeros(0, np.int64), bad
    return np.stack(logits), np.asarray(kept, dtype=np.int64), bad

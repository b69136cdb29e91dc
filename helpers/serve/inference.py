"""Making and using the prediction engine of a trained model (see engine.py).

`engine_for(model)` exports a model in memory once (cached by its weights) and returns its
engine, carrying the model's current temperature and threshold; `save_model` writes the
checkpoint and its engine beside it; `logits_of` runs the engine over a dataset. Every
reported figure of a trained model comes through here, so all agree on every image.
"""

from __future__ import annotations

import errno
import hashlib
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from helpers.core.errors import DiskFullError, ImageError
from helpers.core.files import atomic_write_bytes, cache_dir, is_intact, seal
from helpers.model.checkpoint import checkpoint_dict, encode_checkpoint
from helpers.model.classifier import Classifier, weights_digest
from helpers.serve.engine import Engine, engine_path
from helpers.serve.export import onnx_proto, save_with_metadata

_LOADED: dict[str, Engine] = {}  # engines by weights digest, so a session is made once


def engine_key(model: Classifier) -> str:
    """A sha256 of what the engine depends on: architecture, labels and every weight."""
    h = weights_digest(model)
    h.update(f"{model.spec.name}\0{model.class_names}\0{model.class_to_idx}".encode())
    return h.hexdigest()


def engine_for(model: Classifier) -> Engine:
    """The engine of a model in memory, exported once per weights (cached on disk; held in
    memory alone when the cache cannot be written)."""
    digest = engine_key(model)
    engine = _LOADED.get(digest)
    if engine is None:
        path = cache_dir() / "engines" / f"{model.spec.name}-{digest[:24]}.onnx"
        if is_intact(path):
            engine = Engine(path, threads=torch.get_num_threads())
        else:
            proto = onnx_proto(model, output="logits", extra={"weights_sha256": digest})
            data = proto.SerializeToString()
            try:
                seal(atomic_write_bytes(data, path))
                engine = Engine(path, threads=torch.get_num_threads())
            except OSError as err:  # read-only or full: the engine answers from memory
                warnings.warn(f"cannot cache the prediction engine in {path.parent} "
                              f"({why(err)}); it is held in memory for this process (set "
                              "FLOWERS_CACHE to a writable folder to keep it)", stacklevel=2)
                engine = Engine(data, threads=torch.get_num_threads())
        _LOADED[digest] = engine
    engine.temperature = float(model.temperature)
    engine.unsure_below = float(model.unsure_below)
    return engine


def why(err: OSError) -> str:
    """An OS error's reason in a few words (read-only file system, permission denied, ...)."""
    return (err.strerror or str(err)).lower()


def write_engine(model: Classifier, checkpoint: str | os.PathLike, *,
                 checkpoint_sha256: str) -> Engine:
    """The engine beside a saved checkpoint, stamped with the sha256 of the checkpoint's bytes
    (as this process wrote or read them), and loaded.

    Where it cannot be written (a read-only or full folder) one warning says so and the
    engine answers from memory.
    """
    import onnx

    engine = engine_for(model)
    proto = onnx.load(engine.path) if engine.path else onnx.load_from_string(engine.source)
    values = {p.key: p.value for p in proto.metadata_props}
    values |= {"temperature": repr(float(model.temperature)),
               "unsure_below": repr(float(model.unsure_below)),
               "checkpoint_sha256": checkpoint_sha256}
    try:
        return Engine(save_with_metadata(proto, engine_path(checkpoint), values))
    except OSError as err:
        if isinstance(err, DiskFullError) or not is_unwritable(err):
            raise
        warnings.warn(f"cannot save the prediction engine beside {checkpoint} ({why(err)}); "
                      "answering from an engine held in memory", stacklevel=2)
        del proto.metadata_props[:]
        for key, value in values.items():
            proto.metadata_props.add(key=key, value=value)
        return Engine(proto.SerializeToString())


def is_unwritable(err: OSError) -> bool:
    """True for an OS error that says a place cannot be written (read-only, no permission)."""
    return err.errno in (errno.EROFS, errno.EACCES, errno.EPERM) or isinstance(
        err, NotADirectoryError)


def save_model(model: Classifier, path: str | os.PathLike, *, config: Any = None,
               metrics: dict[str, Any] | None = None) -> Path:
    """Save the checkpoint, naming its engine, and the engine beside it, bound to the bytes
    written here (another run saving into the same folder can never pair them wrongly)."""
    path = Path(path)
    ckpt = checkpoint_dict(model, config=config, metrics=metrics)
    ckpt["engine_key"] = engine_key(model)
    data = encode_checkpoint(ckpt, suffix=path.suffix)
    atomic_write_bytes(data, path)
    write_engine(model, path, checkpoint_sha256=hashlib.sha256(data).hexdigest())
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

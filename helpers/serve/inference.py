"""Making and using the prediction engine of a trained model (see engine.py).

`engine_for(model)` exports a model in memory once (cached by its weights) and returns its
engine, carrying the model's current temperature and threshold; `save_model` writes the
checkpoint and its engine beside it; `scores_of` runs the engine over a dataset. Every
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
from helpers.serve.answers import Scores
from helpers.serve.engine import Engine, bind, engine_path
from helpers.serve.export import onnx_proto

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
    engine.novel_above = float(model.novel_above)
    return engine


def why(err: OSError) -> str:
    """An OS error's reason in a few words (read-only file system, permission denied, ...)."""
    return (err.strerror or str(err)).lower()


def engine_bytes(model: Classifier) -> bytes:
    """The bytes of a model's engine file: its graph with the model's current labels,
    preprocessing, temperature and thresholds in the metadata."""
    import onnx

    engine = engine_for(model)
    proto = onnx.load(engine.path) if engine.path else onnx.load_from_string(engine.source)
    values = {p.key: p.value for p in proto.metadata_props}
    values |= {"temperature": repr(float(model.temperature)),
               "unsure_below": repr(float(model.unsure_below)),
               "novel_above": repr(float(model.novel_above))}
    del proto.metadata_props[:]
    for key, value in values.items():
        proto.metadata_props.add(key=key, value=value)
    return proto.SerializeToString()


def write_engine(model: Classifier, checkpoint: str | os.PathLike, *,
                 data: bytes | None = None, checkpoint_sha256: str | None = None) -> Engine:
    """The engine (its bytes: `data`, else made now) beside a saved checkpoint, and loaded;
    rebuilt for the checkpoint with bytes `checkpoint_sha256`, it is bound to them (bind).

    Where it cannot be written (a read-only or full folder) one warning says so and the
    engine answers from memory.
    """
    data = engine_bytes(model) if data is None else data
    if checkpoint_sha256:
        bind(checkpoint_sha256, hashlib.sha256(data).hexdigest())
    try:
        return Engine(atomic_write_bytes(data, engine_path(checkpoint)))
    except OSError as err:
        if isinstance(err, DiskFullError) or not is_unwritable(err):
            raise
        warnings.warn(f"cannot save the prediction engine beside {checkpoint} ({why(err)}); "
                      "answering from an engine held in memory", stacklevel=2)
        return Engine(data)


def is_unwritable(err: OSError) -> bool:
    """True for an OS error that says a place cannot be written (read-only, no permission)."""
    return err.errno in (errno.EROFS, errno.EACCES, errno.EPERM) or isinstance(
        err, NotADirectoryError)


def save_model(model: Classifier, path: str | os.PathLike, *, config: Any = None,
               metrics: dict[str, Any] | None = None) -> Path:
    """Save the checkpoint and its engine beside it; the checkpoint holds the sha256 of the
    engine's bytes, so only this engine (never another model's graph given its metadata, nor
    one another run saved) answers for it."""
    path = Path(path)
    engine = engine_bytes(model)
    ckpt = checkpoint_dict(model, config=config, metrics=metrics)
    ckpt["engine_key"] = engine_key(model)
    ckpt["engine_sha256"] = hashlib.sha256(engine).hexdigest()
    atomic_write_bytes(encode_checkpoint(ckpt, suffix=path.suffix), path)
    write_engine(model, path, data=engine)
    return path


def logits_of(model: Classifier | Engine, samples: list[tuple[str, int]],
              ) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
    """Logits and labels of (path, label) samples through the engine, and the bad files."""
    scores, labels, bad = scores_of(model, samples)
    return scores.logits, labels, bad


def scores_of(model: Classifier | Engine, samples: list[tuple[str, int]],
              ) -> tuple[Scores, np.ndarray, list[tuple[str, str]]]:
    """Scores (logits, novelty) and labels of (path, label) samples through the engine, and
    the bad files.

    A file that cannot be read is left out and listed as (path, why); the others are kept.
    """
    engine = model if isinstance(model, Engine) else engine_for(model)
    labels = dict(samples)
    logits, novelty, kept, bad = [], [], [], []
    for path, result in engine.run_paths([p for p, _ in samples]):
        if isinstance(result, ImageError):
            bad.append((str(path), str(result)))
        else:
            logits.append(result.logits[0])
            novelty.append(None if result.novelty is None else result.novelty[0])
            kept.append(labels[str(path)])
    if not logits:
        empty = Scores(np.zeros((0, len(engine.class_names)), np.float32), None)
        return empty, np.zeros(0, np.int64), bad
    scores = Scores(np.stack(logits), None if novelty[0] is None else np.asarray(novelty))
    return scores, np.asarray(kept, dtype=np.int64), bad

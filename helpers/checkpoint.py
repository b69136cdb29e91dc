"""Saving and loading a trained classifier as one plain dict that loads with weights_only=True."""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torchvision

from . import __version__
from .backbones import BackboneError
from .model import Classifier, build_model

FORMAT_VERSION = 1
REQUIRED_KEYS = ("format_version", "arch", "head", "state_dict", "class_to_idx", "class_names")


class CheckpointError(RuntimeError):
    """A file is not a checkpoint this version can load; the message says why."""


def checkpoint_dict(model: Classifier, config: Any = None,
                    metrics: dict[str, Any] | None = None) -> dict[str, Any]:
    """The plain dict saved for `model`: tensors and primitive values only."""
    import timm

    head = model.head
    hidden = head[0].out_features if isinstance(head[0], torch.nn.Linear) else 0
    dropout = next(m.p for m in head if isinstance(m, torch.nn.Dropout))
    spec = model.spec
    return {
        "format_version": FORMAT_VERSION,
        "arch": spec.name,
        "head": {"hidden_units": hidden, "dropout": dropout, "num_classes": len(model.class_names)},
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "class_to_idx": dict(model.class_to_idx),
        "class_names": list(model.class_names),
        "mean": list(spec.mean),
        "std": list(spec.std),
        "input_size": spec.input_size,
        "resize_size": spec.resize_size,
        "interpolation": spec.interpolation,
        "temperature": float(getattr(model, "temperature", 1.0)),
        "unsure_below": float(getattr(model, "unsure_below", 0.0)),
        "config": asdict(config) if config is not None else {},
        "metrics": dict(metrics or {}),
        "versions": {"helpers": __version__, "torch": str(torch.__version__),
                     "torchvision": str(torchvision.__version__), "timm": str(timm.__version__)},
    }


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save to a temporary file beside `path`, then rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_checkpoint(model: Classifier, path: str | os.PathLike, config: Any = None,
                    metrics: dict[str, Any] | None = None) -> Path:
    """Write the model, its labels, preprocessing, config and metrics to `path` atomically.

    A `.safetensors` path stores the weights in the safetensors format (no pickle at all)
    and everything else as JSON in its metadata.
    """
    ckpt = checkpoint_dict(model, config, metrics)
    if Path(path).suffix != ".safetensors":
        return atomic_save(ckpt, path)
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    weights = {k: v.contiguous() for k, v in ckpt.pop("state_dict").items()}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(weights, tmp, metadata={"checkpoint": json.dumps(ckpt, default=str)})
    os.replace(tmp, path)
    return path


def _read_safetensors(path: Path, device: str | torch.device) -> dict[str, Any]:
    """A .safetensors checkpoint: the weights, and the rest from its JSON metadata."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device=str(device)) as f:
        ckpt = json.loads((f.metadata() or {}).get("checkpoint", "{}"))
        ckpt["state_dict"] = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    return ckpt


def read_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, Any]:
    """The checkpoint dict, loaded safely (weights_only=True) and checked for the needed keys."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file; check the path")
    try:
        ckpt = (_read_safetensors(path, device) if path.suffix == ".safetensors" else
                torch.load(path, map_location=device, weights_only=True))
    except pickle.UnpicklingError as err:
        lines = [ln for ln in str(err).splitlines() if "Unsupported global" in ln]
        if not lines:  # not a pickle at all
            raise CheckpointError(f"{path}: not a readable checkpoint ({str(err).strip()[:80]});"
                                  " it may be truncated or not a PyTorch file") from None
        why = lines[0].split(":", 1)[-1].strip()
        raise CheckpointError(f"{path}: refused to load, it holds more than weights and plain "
                              f"values ({why}); only load checkpoints from people you trust"
                              ) from None
    except Exception as err:  # a damaged file fails in many ways, none of them the user's code
        raise CheckpointError(f"{path}: not a readable checkpoint ({err}); it may be truncated "
                              "or not a PyTorch file") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED_KEYS):
        missing = [k for k in REQUIRED_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
        raise CheckpointError(f"{path}: not a flower-classifier checkpoint (missing "
                              f"{', '.join(missing)})")
    if ckpt["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {ckpt['format_version']} is newer than "
                              f"this code reads ({FORMAT_VERSION}); update the project")
    return ckpt


def load_checkpoint(path: str | os.PathLike,
                    device: str | torch.device = "cpu") -> tuple[Classifier, dict[str, Any]]:
    """Rebuild the model from a checkpoint with no network; returns (model, checkpoint dict)."""
    ckpt = read_checkpoint(path, device)
    head = ckpt["head"]
    try:
        model = build_model(ckpt["arch"], ckpt["class_to_idx"], ckpt["class_names"],
                            hidden_units=head["hidden_units"], dropout=head["dropout"],
                            pretrained=False)
    except BackboneError as err:
        raise CheckpointError(f"{path}: {err}") from None
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise CheckpointError(f"{path}: weights do not fit the {ckpt['arch']} model ({first})"
                              ) from None
    # Checkpoints written before calibration existed: plain softmax, never unsure.
    model.temperature = float(ckpt.get("temperature", 1.0))
    model.unsure_below = float(ckpt.get("unsure_below", 0.0))
    return model.to(device).eval(), ckpt


def read_resume(path: str | os.PathLike) -> dict[str, Any]:
    """A resumable training state (written after every epoch), loaded safely."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such resumable state; it is last.pth in --save_dir")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # damaged, or carrying code: refused either way
        raise CheckpointError(f"{path}: not a readable resumable state "
                              f"({str(err).strip().splitlines()[0][:80]})") from None
    if not isinstance(state, dict) or state.get("kind") != "resume":
        raise CheckpointError(f"{path}: not a resumable state; resume from last.pth, "
                              "not from checkpoint.pth")
    return state

"""Saving and loading a trained classifier as one plain dict that loads with weights_only=True."""

from __future__ import annotations

import io
import json
import math
import os
import pickle
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torchvision

from helpers import __version__
from helpers.core.errors import BackboneError, CheckpointError
from helpers.core.files import not_a_file
from helpers.model.classifier import Classifier, build_model

FORMAT_VERSION = 1
REQUIRED_KEYS = ("format_version", "arch", "head", "state_dict", "class_to_idx", "class_names")


def checkpoint_dict(model: Classifier, *, config: Any = None,
                    metrics: dict[str, Any] | None = None) -> dict[str, Any]:
    """The plain dict saved for `model`: tensors and primitive values only."""
    import timm

    head = model.head
    hidden = head[0].out_features if isinstance(head[0], torch.nn.Linear) else 0
    dropout = next(m.p for m in head if isinstance(m, torch.nn.Dropout))
    spec = model.preprocess
    return {
        "format_version": FORMAT_VERSION,
        "arch": model.spec.name,
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
        **({"novel_above": float(model.novel_above)} if math.isfinite(model.novel_above)
           else {}),
        "taught": list(model.taught),
        "config": asdict(config) if config is not None else {},
        "metrics": dict(metrics or {}),
        "versions": {"helpers": __version__, "torch": str(torch.__version__),
                     "torchvision": str(torchvision.__version__), "timm": str(timm.__version__)},
    }


def encode_checkpoint(ckpt: dict[str, Any], *, suffix: str = ".pth") -> bytes:
    """The bytes of a checkpoint file: torch.save's, or safetensors' for a .safetensors suffix.

    Saving goes through bytes so the writer knows the digest of exactly what it wrote (the
    engine beside a checkpoint is stamped with it, never with a file another run replaced).
    """
    if suffix != ".safetensors":
        buffer = io.BytesIO()
        torch.save(ckpt, buffer)
        return buffer.getvalue()
    from safetensors.torch import save

    ckpt = dict(ckpt)
    weights = {k: v.contiguous() for k, v in ckpt.pop("state_dict").items()}
    return save(weights, metadata={"checkpoint": json.dumps(ckpt, default=str)})


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
        raise CheckpointError(f"{path}: {not_a_file(path, 'checkpoint')}")
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
    if not isinstance(ckpt["format_version"], int):
        raise CheckpointError(f"{path}: field format_version is not a number; the file was "
                              "edited or is not a checkpoint of this project")
    if ckpt["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {ckpt['format_version']} is newer than "
                              f"this code reads ({FORMAT_VERSION}); update the project")
    _check_fields(ckpt, path)
    return ckpt


def _check_fields(ckpt: dict[str, Any], path: Path) -> None:
    """One line naming the file and the field for an edited or foreign checkpoint."""
    def bad(field: str, why: str) -> CheckpointError:
        return CheckpointError(f"{path}: field {field} {why}; the file was edited or comes from "
                               "another program: retrain or restore the original")

    mapping, names, head = ckpt["class_to_idx"], ckpt["class_names"], ckpt["head"]
    if not isinstance(ckpt["arch"], str):
        raise bad("arch", "is not a name")
    if not isinstance(ckpt["state_dict"], dict):
        raise bad("state_dict", "is not a dictionary of tensors")
    if not isinstance(head, dict) or not all(isinstance(head.get(k), int | float) for k in
                                             ("hidden_units", "dropout")):
        raise bad("head", "lacks hidden_units or dropout numbers")
    if (not isinstance(mapping, dict) or not all(isinstance(k, str) for k in mapping)
            or sorted(mapping.values()) != list(range(len(mapping)))):
        raise bad("class_to_idx", "is not a mapping of class folders onto 0..N-1")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise bad("class_names", "is not a list of names")
    if len(names) != len(mapping):
        raise bad("class_names", f"has {len(names)} names for {len(mapping)} classes")
    if head.get("num_classes", len(mapping)) != len(mapping):
        raise bad("head", f"has {head['num_classes']} outputs for {len(mapping)} classes")
    temperature = ckpt.get("temperature", 1.0)
    if (not isinstance(temperature, int | float) or not math.isfinite(temperature)
            or temperature <= 0):
        raise bad("temperature", f"is {temperature!r}, not a positive number")
    unsure = ckpt.get("unsure_below", 0.0)
    if not isinstance(unsure, int | float) or not 0.0 <= unsure <= 1.0:
        raise bad("unsure_below", f"is {unsure!r}, not a probability")
    novel = ckpt.get("novel_above", math.inf)
    if not isinstance(novel, int | float) or math.isnan(novel) or novel < 0:
        raise bad("novel_above", f"is {novel!r}, not a distance")
    taught = ckpt.get("taught", [])
    if not isinstance(taught, list) or not all(t in mapping for t in taught):
        raise bad("taught", "is not a list of the model's class folders")
    novelty = {k: v for k, v in ckpt["state_dict"].items() if k.startswith("novelty.")}
    if novelty:
        whiten, means = novelty.get("novelty.whiten"), novelty.get("novelty.means")
        if (not isinstance(whiten, torch.Tensor) or not isinstance(means, torch.Tensor)
                or whiten.dim() != 2 or means.dim() != 2 or whiten.shape[0] != whiten.shape[1]
                or (whiten.numel() and means.shape != (len(mapping), whiten.shape[0]))):
            raise bad("state_dict", "holds a novelty score whose shapes do not fit the classes")
        memory, labels = novelty.get("novelty.memory"), novelty.get("novelty.memory_labels")
        if memory is not None and (
                not isinstance(memory, torch.Tensor) or not isinstance(labels, torch.Tensor)
                or memory.dim() != 2 or labels.shape != memory.shape[:1]
                or (len(labels) and not 0 <= int(labels.min()) <= int(labels.max())
                    < len(mapping))):
            raise bad("state_dict", "holds remembered features that do not fit the classes")


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
    weights = dict(ckpt["state_dict"])
    # The novelty score's buffers take their fitted shapes; a checkpoint saved before the
    # known verdict existed has none (never "not a flower I know").
    model.novelty.whiten = weights.pop("novelty.whiten", model.novelty.whiten).float()
    model.novelty.means = weights.pop("novelty.means", model.novelty.means).float()
    model.novelty.memory = weights.pop("novelty.memory", model.novelty.memory)
    model.novelty.memory_labels = weights.pop("novelty.memory_labels",
                                              model.novelty.memory_labels).long()
    try:
        _load(model, weights)
    except (RuntimeError, TypeError, AttributeError) as err:
        first = str(err).strip().splitlines()[0]
        raise CheckpointError(f"{path}: weights do not fit the {ckpt['arch']} model ({first})"
                              ) from None
    # Checkpoints written before calibration existed: plain softmax, never unsure.
    model.temperature = float(ckpt.get("temperature", 1.0))
    model.unsure_below = float(ckpt.get("unsure_below", 0.0))
    model.novel_above = float(ckpt.get("novel_above", math.inf))
    model.taught = list(ckpt.get("taught", []))
    return model.to(device).eval(), ckpt


def _load(model: Classifier, weights: dict[str, torch.Tensor]) -> None:
    """Every weight but the novelty score's (set before), strictly."""
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.startswith("novelty.")]
    if missing or unexpected:
        raise RuntimeError(f"missing keys {missing[:3]}, unexpected keys {unexpected[:3]}")


def read_resume(path: str | os.PathLike, *, identity: dict[str, Any] | None = None,
                ) -> dict[str, Any]:
    """A resumable training state, loaded safely and checked to belong to this run's data.

    `identity` holds what the state must match (class mapping, data digest, held-out
    split); a state written for other data is refused in one line.
    """
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
    check_belongs(state, identity=identity or {}, path=path)
    return state


def check_belongs(state: dict[str, Any], *, identity: dict[str, Any],
                  path: str | os.PathLike) -> None:
    """Refuse, in one line, a resumable state written for other data (`identity`: class
    mapping, data digest, held-out split)."""
    saved = state.get("identity") or {}
    for key, expected in identity.items():
        if saved.get(key) != expected:
            raise CheckpointError(f"{path}: belongs to another run (its {key.replace('_', ' ')} "
                                  "differs from this data's); start without --resume or point "
                                  "to the data it was trained on")


def resume_belongs(path: str | os.PathLike, run_id: str) -> bool:
    """True when the resumable state at `path` was written by the run `run_id`."""
    try:
        return read_resume(path).get("identity", {}).get("run_id") == run_id
    except CheckpointError:
        return False

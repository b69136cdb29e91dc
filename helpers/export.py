"""Export a trained classifier for applications: ONNX (fp32 or static int8) and TorchScript.

The exported graph takes a batch of preprocessed images (N x 3 x H x W, as process_image
makes them) and returns class probabilities. The ONNX file carries what an application
needs to prepare images and name classes in its metadata, so it stands alone.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .images import is_image_file
from .model import Classifier
from .predict import process_for


class Probabilities(nn.Module):
    """The classifier, its temperature and a softmax: calibrated probabilities, as predict."""

    def __init__(self, model: Classifier) -> None:
        super().__init__()
        self.model = model
        self.temperature = float(getattr(model, "temperature", 1.0))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.model(images)
        if self.temperature != 1.0:  # no extra node in the graph of an uncalibrated model
            logits = logits / self.temperature
        return logits.softmax(dim=1)


def metadata(model: Classifier) -> dict[str, str]:
    """Preprocessing and label facts, as strings, for the ONNX file's metadata."""
    spec = model.spec
    return {"class_names": json.dumps(model.class_names),
            "class_ids": json.dumps([model.idx_to_class[i] for i in range(len(model.class_names))]),
            "mean": json.dumps(list(spec.mean)), "std": json.dumps(list(spec.std)),
            "input_size": str(spec.input_size), "resize_size": str(spec.resize_size),
            "interpolation": spec.interpolation, "output": "probabilities",
            "temperature": repr(float(getattr(model, "temperature", 1.0))),
            "unsure_below": repr(float(getattr(model, "unsure_below", 0.0)))}


def _quiet():
    """Silence the exporter's progress lines and warnings."""
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    return stack


def _save_with_metadata(proto, model: Classifier, path: Path) -> Path:
    """Write an ONNX model carrying the model's metadata, atomically (temporary file, rename)."""
    import onnx

    del proto.metadata_props[:]
    for key, value in metadata(model).items():
        proto.metadata_props.add(key=key, value=value)
    tmp_path = path.with_name(f".{path.name}.tmp")
    onnx.save(proto, tmp_path)
    os.replace(tmp_path, path)
    return path


def export_onnx(model: Classifier, path: str | os.PathLike) -> Path:
    """One self-contained ONNX file (weights inside) with a dynamic batch and metadata."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    size = model.spec.input_size
    wrapper = Probabilities(copy.deepcopy(model).float().cpu().eval())
    with tempfile.TemporaryDirectory() as tmp, _quiet():
        raw = Path(tmp) / "model.onnx"
        torch.onnx.export(wrapper, (torch.zeros(2, 3, size, size),), raw, dynamo=True,
                          verbose=False, input_names=["images"], output_names=["probabilities"],
                          dynamic_shapes=({0: torch.export.Dim("batch")},), external_data=False)
        proto = onnx.load(raw)
    return _save_with_metadata(proto, model, path)


def _calibration_images(folder: str | os.PathLike, count: int) -> list[Path]:
    """Up to `count` images spread evenly over a folder tree (every class represented)."""
    images = sorted(p for p in Path(folder).rglob("*") if p.is_file() and is_image_file(p))
    if not images:
        raise ValueError(f"{folder}: no images to calibrate the int8 model with")
    step = max(1, len(images) // count)
    return images[::step][:count]


def quantize_onnx(model: Classifier, fp32_path: str | os.PathLike, path: str | os.PathLike,
                  calibration_folder: str | os.PathLike, count: int = 200) -> Path:
    """Static int8 (QDQ) quantization, calibrated on training images, per-channel weights."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    batches = [process_for(model, p)[None] for p in _calibration_images(calibration_folder, count)]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter({"images": b.astype(np.float32)} for b in batches)

        def get_next(self):
            return next(self.items, None)

    path = Path(path)
    with tempfile.TemporaryDirectory() as tmp, _quiet():
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        out = Path(tmp) / "int8.onnx"
        # The softmax (and the temperature's division before it) stays in float: quantized
        # probabilities would move in steps of 1/255.
        softmax = [n.name for n in onnx.load(prepared).graph.node
                   if n.op_type in ("Softmax", "Div")]
        quantize_static(str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, nodes_to_exclude=softmax)
        proto = onnx.load(out)
    return _save_with_metadata(proto, model, path)


def export_ort(onnx_path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """An ONNX file in ONNX Runtime Mobile's .ort format (for native Android and iOS apps)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        # The converter works on a folder and names its output after the input file.
        source = Path(tmp) / "model.onnx"
        shutil.copyfile(onnx_path, source)
        done = subprocess.run([sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort",
                               str(source), "--output_dir", str(Path(tmp) / "ort"),
                               "--optimization_style", "Fixed"], capture_output=True, text=True)
        converted = Path(tmp) / "ort" / "model.ort"
        if done.returncode != 0 or not converted.is_file():
            last = (done.stderr or done.stdout).strip().splitlines() or ["no output"]
            raise ValueError(f"{onnx_path}: conversion to .ort failed ({last[-1]})")
        shutil.move(converted, out)
    return out


def export_torch(model: Classifier, path: str | os.PathLike) -> Path:
    """TorchScript (.pt) where torch.jit.trace is not deprecated, else torch.export (.pt2)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    size = model.spec.input_size
    wrapper = Probabilities(copy.deepcopy(model).float().cpu().eval())
    example = torch.zeros(2, 3, size, size)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traced = torch.jit.trace(wrapper, example) if hasattr(torch.jit, "trace") else None
    deprecated = any("deprecated" in str(w.message).lower() for w in caught)
    tmp_path = path.with_name(f".{path.name}.tmp")
    if traced is not None and not deprecated:
        path = path.with_suffix(".pt")
        traced.save(str(tmp_path))
    else:
        path = path.with_suffix(".pt2")
        with _quiet():
            program = torch.export.export(wrapper, (example,),
                                          dynamic_shapes=({0: torch.export.Dim("batch")},))
            torch.export.save(program, tmp_path)
    os.replace(tmp_path, path)
    return path


def load_torch_export(path: str | os.PathLike) -> nn.Module:
    """A model saved by export_torch, ready to call on a batch of processed images."""
    path = Path(path)
    if path.suffix == ".pt":
        return torch.jit.load(str(path))
    return torch.export.load(path).module()

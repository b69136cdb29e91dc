"""Export a trained classifier for applications: ONNX (fp32 or static int8) and TorchScript.

The exported graph takes a batch of preprocessed images (N x 3 x H x W, as process_image
makes them) and returns class probabilities. The ONNX file carries what an application
needs to prepare images and name classes in its metadata, so it stands alone.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from helpers.core.errors import ImageError, UserError
from helpers.core.files import atomic_copy, atomic_write, atomic_write_bytes
from helpers.data.images import is_image_file
from helpers.data.preprocess import process_image
from helpers.model.classifier import Classifier
from helpers.model.onnx_io import onnx_bytes, quiet

if TYPE_CHECKING:
    import onnx

class Probabilities(nn.Module):
    """The classifier, its temperature and a softmax: calibrated probabilities, as predict;
    and the novelty of each image beside them where the model's known verdict is fitted."""

    def __init__(self, model: Classifier, *, softmax: bool = True) -> None:
        super().__init__()
        self.model = model
        self.softmax = softmax
        self.temperature = float(getattr(model, "temperature", 1.0))
        self.with_novelty = model.novelty.fitted

    def forward(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Calibrated class probabilities (or logits) of a batch of preprocessed images, and
        their novelty where the model has a known verdict."""
        if self.with_novelty:
            logits, novelty = self.model.scored(images)
        else:
            logits, novelty = self.model(images), None
        if self.softmax:
            if self.temperature != 1.0:  # no extra node in the graph of an uncalibrated model
                logits = logits / self.temperature
            logits = logits.softmax(dim=1)
        return (logits, novelty) if self.with_novelty else logits


def output_names(model: Classifier, output: str) -> list[str]:
    """The exported graph's outputs: the class scores, then "novelty" where fitted."""
    return [output, "novelty"] if model.novelty.fitted else [output]


def metadata(model: Classifier) -> dict[str, str]:
    """Preprocessing and label facts, as strings, for the ONNX file's metadata."""
    return {"class_names": json.dumps(model.class_names),
            "class_ids": json.dumps([model.idx_to_class[i] for i in range(len(model.class_names))]),
            **model.preprocess.metadata(), "output": "probabilities",
            "temperature": repr(float(getattr(model, "temperature", 1.0))),
            "unsure_below": repr(float(getattr(model, "unsure_below", 0.0))),
            "novel_above": repr(float(model.novel_above)),
            "taught": json.dumps(list(model.taught))}


def save_with_metadata(proto: onnx.ModelProto, path: str | os.PathLike,
                       values: dict[str, str]) -> Path:
    """Write an ONNX model whose metadata is `values`, atomically (temporary file, rename)."""
    del proto.metadata_props[:]
    for key, value in values.items():
        proto.metadata_props.add(key=key, value=value)
    return atomic_write_bytes(proto.SerializeToString(), path)


def export_onnx(model: Classifier, path: str | os.PathLike, *, output: str = "probabilities",
                extra: dict[str, str] | None = None) -> Path:
    """One self-contained ONNX file (weights inside) with a dynamic batch and metadata.

    The graph returns calibrated probabilities, or raw logits with output="logits" (the
    prediction engine applies the temperature itself).
    """
    return atomic_write_bytes(onnx_proto(model, output=output, extra=extra)
                              .SerializeToString(), path)


def onnx_proto(model: Classifier, *, output: str = "probabilities",
               extra: dict[str, str] | None = None) -> onnx.ModelProto:
    """The model as an ONNX ModelProto with its metadata (see export_onnx), in memory."""
    import onnx

    size = model.preprocess.input_size
    module = copy.deepcopy(model).float().cpu().eval()
    wrapper = Probabilities(module, softmax=output == "probabilities")
    proto = onnx.load_from_string(onnx_bytes(wrapper, torch.zeros(2, 3, size, size),
                                             outputs=output_names(model, output)))
    for key, value in (metadata(model) | {"output": output} | (extra or {})).items():
        proto.metadata_props.add(key=key, value=value)
    return proto


def one_image_onnx(model: Classifier, onnx_path: str | os.PathLike, *,
                   out: str | os.PathLike) -> Path:
    """The ONNX model specialised for one image at a time, as the app runs it.

    The batch is fixed at 1, which makes every shape static: ONNX Runtime's basic graph
    optimizations then fold the exported shape arithmetic (TF "same" padding: Shape, Gather,
    Ceil, Pad, ...) into the convolutions' pads, leaving standard ONNX operators only
    (Conv, Clip, Add, ...). onnxruntime-web then makes its session in tens of ms instead of
    the seconds its own optimizer spends on the exported graph; the answers are the same.
    """
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp, quiet():
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.add_free_dimension_override_by_name("batch", 1)
        options.optimized_model_filepath = str(Path(tmp) / "one.onnx")
        ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        proto = onnx.load(options.optimized_model_filepath)
    return save_with_metadata(proto, out, metadata(model))


def _calibration_images(folder: str | os.PathLike, count: int) -> list[Path]:
    """Up to `count` images spread evenly over a folder tree (every class represented)."""
    images = sorted(p for p in Path(folder).rglob("*") if p.is_file() and is_image_file(p))
    if not images:
        raise ImageError(f"{folder}: no images to calibrate the int8 model with; give a folder "
                         "of training images")
    step = max(1, len(images) // count)
    return images[::step][:count]


def quantize_onnx(model: Classifier, fp32_path: str | os.PathLike, *, out: str | os.PathLike,
                  calibration: str | os.PathLike, count: int = 200) -> Path:
    """Static int8 (QDQ) quantization, calibrated on training images, per-channel weights."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    batches = [process_image(p, spec=model.preprocess)[None]
               for p in _calibration_images(calibration, count)]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter({"images": b.astype(np.float32)} for b in batches)

        def get_next(self):
            return next(self.items, None)

    path = Path(out)
    with tempfile.TemporaryDirectory() as tmp, quiet():
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        out = Path(tmp) / "int8.onnx"
        # The softmax (and the temperature's division before it) stays in float: quantized
        # probabilities would move in steps of 1/255.
        graph = onnx.load(prepared).graph
        softmax = [n.name for n in graph.node if n.op_type in ("Softmax", "Div")]
        # The novelty score stays in float too: a distance of whitened features in int8
        # steps would move the known verdict of photos near its threshold.
        keep = softmax + novelty_nodes(graph)
        quantize_static(str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, nodes_to_exclude=keep)
        proto = onnx.load(out)
    return save_with_metadata(proto, path, metadata(model))


def novelty_nodes(graph: onnx.GraphProto) -> list[str]:
    """The names of the nodes that only the "novelty" output needs (none without it)."""
    makers = {out: node for node in graph.node for out in node.output}

    def needed(output: str) -> set[str]:
        seen: set[str] = set()
        todo = [output]
        while todo:
            node = makers.get(todo.pop())
            if node is not None and node.name not in seen:
                seen.add(node.name)
                todo += list(node.input)
        return seen

    outputs = [o.name for o in graph.output]
    if "novelty" not in outputs:
        return []
    others = set().union(*(needed(o) for o in outputs if o != "novelty"))
    return sorted(needed("novelty") - others)


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
            raise UserError(f"{onnx_path}: conversion to .ort failed ({last[-1]})")
        return atomic_copy(converted, out)


def export_torch(model: Classifier, path: str | os.PathLike) -> Path:
    """TorchScript (.pt) where torch.jit.trace is not deprecated, else torch.export (.pt2)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    size = model.preprocess.input_size
    wrapper = Probabilities(copy.deepcopy(model).float().cpu().eval())
    wrapper.with_novelty = False  # TorchScript and torch.export: the probabilities alone
    example = torch.zeros(2, 3, size, size)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traced = torch.jit.trace(wrapper, example) if hasattr(torch.jit, "trace") else None
    deprecated = any("deprecated" in str(w.message).lower() for w in caught)
    if traced is not None and not deprecated:
        return atomic_write(path.with_suffix(".pt"), lambda f: torch.jit.save(traced, f))
    with quiet():
        program = torch.export.export(wrapper, (example,),
                                      dynamic_shapes=({0: torch.export.Dim("batch")},))
    return atomic_write(path.with_suffix(".pt2"), lambda f: torch.export.save(program, f))


def load_torch_export(path: str | os.PathLike) -> nn.Module:
    """A model saved by export_torch, ready to call on a batch of processed images."""
    path = Path(path)
    if path.suffix == ".pt":
        return torch.jit.load(str(path))
    return torch.export.load(path).module()

"""Reading what a file says about itself without the packages that wrote it: an ONNX file's
metadata and inputs without `onnx` (whose import alone costs most of a one-photo answer), a
checkpoint's plain values without torch. Torch-free, at the bottom of `helpers/`.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import zipfile
from collections.abc import Iterator
from pathlib import Path


def _fields(data: bytes | memoryview) -> Iterator[tuple[int, bytes | memoryview | int]]:
    """(field number, value) of a protobuf message: bytes for length-delimited fields."""
    i = 0

    def varint() -> int:
        nonlocal i
        value = shift = 0
        while True:
            byte = data[i]
            i += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value

    while i < len(data):
        key = varint()
        kind = key & 7
        if kind == 0:
            yield key >> 3, varint()
        elif kind == 2:
            size = varint()
            yield key >> 3, data[i:i + size]
            i += size
        elif kind in (1, 5):
            i += 8 if kind == 1 else 4
        else:
            raise ValueError(f"not an ONNX file (protobuf wire type {kind})")


def read_header(source: Path | bytes) -> tuple[dict[str, str], list[str]]:
    """An ONNX file's (or bytes') metadata and input names, read without the onnx package
    (whose import alone costs most of a one-photo answer): ModelProto field 14 holds the
    metadata, field 7 the graph, whose field 11 lists the inputs."""
    data = memoryview(source if isinstance(source, bytes) else source.read_bytes())
    meta, inputs = {}, []
    for number, value in _fields(data):
        if number == 14:
            entry = dict(_fields(value))
            meta[bytes(entry.get(1, b"")).decode()] = bytes(entry.get(2, b"")).decode()
        elif number == 7:
            inputs += [bytes(dict(_fields(v)).get(1, b"")).decode()
                       for n, v in _fields(value) if n == 11]
    if not inputs:
        raise ValueError("the ONNX model has no graph inputs")
    return meta, inputs


def checkpoint_facts(path: str | os.PathLike) -> dict:
    """A checkpoint's plain values (labels, engine key, ...) read without torch: the pickle
    inside torch.save's zip with every tensor left out, or a .safetensors file's JSON header.
    Raises ValueError for anything else."""
    path = Path(path)
    if path.suffix == ".safetensors":
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size)) if 0 < size < 1 << 26 else {}
        return json.loads(header.get("__metadata__", {}).get("checkpoint", "{}"))

    class Skip:  # stands for every torch object: a tensor, its storage, its type
        def __init__(self, *args: object, **kwargs: object) -> None:
            pass

    class Facts(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> object:
            if module == "collections" and name == "OrderedDict":
                return dict
            if module.split(".")[0] == "torch":
                return Skip
            raise pickle.UnpicklingError(f"{module}.{name} is not a checkpoint's")

        def persistent_load(self, pid: object) -> None:
            return None

    try:
        with zipfile.ZipFile(path) as archive:
            name = next(n for n in archive.namelist() if n.endswith("/data.pkl"))
            facts = Facts(io.BytesIO(archive.read(name))).load()
    except (OSError, zipfile.BadZipFile, StopIteration, pickle.UnpicklingError, EOFError) as err:
        raise ValueError(f"{path}: not a checkpoint ({err})") from None
    if not isinstance(facts, dict):
        raise ValueError(f"{path}: not a checkpoint")
    return facts

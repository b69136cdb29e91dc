"""The phone app: a static web page that names a flower offline with the exported model.

`build_app(checkpoint, out=...)` writes the model (fp32; static int8 with precision="int8"),
specialised for one photo at a time, `model.json` (names and preprocessing, which
onnxruntime-web cannot read from the ONNX metadata), the page and service worker shipped in
`helpers/webapp/`, and the onnxruntime-web wasm runtime from npm. `serve(folder, port=...)`
serves it on loopback with the headers that let the wasm runtime use threads.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import math
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from . import export
from .checkpoint import load_checkpoint
from .runtime import UserError
from .storage import cache_dir

WEBAPP = Path(__file__).resolve().parent / "webapp"
STATIC = ["index.html", "app.js", "preprocess.js", "style.css", "manifest.webmanifest",
          "icons/icon-192.png", "icons/icon-512.png"]
# The wasm backend's loader and runtime: all the app needs from the onnxruntime-web package.
ORT_FILES = ["ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm"]
MIME_TYPES = {".wasm": "application/wasm", ".mjs": "text/javascript", ".js": "text/javascript",
              ".webmanifest": "application/manifest+json", ".onnx": "application/octet-stream",
              ".json": "application/json"}


class AppError(UserError):
    """The app cannot be built; the message names the file or tool at fault and what to do."""


def draw_icon(size: int) -> Image.Image:
    """The app's icon, drawn (no photo): a five-petal flower on green, `size` pixels square."""
    scale = 4  # drawn large, then reduced: smooth edges
    big = size * scale
    image = Image.new("RGB", (big, big), (47, 107, 58))
    draw = ImageDraw.Draw(image)
    centre, petal = big / 2, big * 0.17
    for i in range(5):
        angle = math.pi / 2 + i * 2 * math.pi / 5
        x, y = centre + petal * 1.15 * math.cos(angle), centre - petal * 1.15 * math.sin(angle)
        draw.ellipse((x - petal, y - petal, x + petal, y + petal), fill=(250, 246, 236))
    core = big * 0.11
    draw.ellipse((centre - core, centre - core, centre + core, centre + core),
                 fill=(240, 180, 40))
    return image.resize((size, size), Image.Resampling.LANCZOS)


def app_metadata(model, *, precision: str) -> dict[str, Any]:
    """export.metadata as typed JSON values, plus the precision: what app.js reads."""
    raw = export.metadata(model)
    parsed = {key: json.loads(raw[key]) for key in ("class_names", "class_ids", "mean", "std")}
    return {**parsed, "input_size": int(raw["input_size"]),
            "resize_size": int(raw["resize_size"]), "interpolation": raw["interpolation"],
            "output": raw["output"], "temperature": float(raw["temperature"]),
            "unsure_below": float(raw["unsure_below"]), "precision": precision}


PRECISIONS = ("fp32", "int8")
FP32_WHY = ("fp32 (the default: in the browser as fast as int8 or faster on CPUs without "
            "VNNI, and the checkpoint's own answers; --int8 for a file 3 times smaller)")


def calibration_folder(ckpt: dict[str, Any], calibration: str | os.PathLike | None,
                       ) -> tuple[Path, str]:
    """The folder of photos to calibrate the int8 model on, and the precision in words."""
    if calibration is not None:
        if not Path(calibration).is_dir():
            raise AppError(f"{calibration}: no such folder of calibration photos; give the "
                           "training images' folder")
        return Path(calibration), f"int8, calibrated on {calibration}"
    recorded = (ckpt.get("metrics") or {}).get("data_dir") or (ckpt.get("config") or {}).get(
        "data_dir")
    if not recorded:
        raise AppError("int8: the checkpoint does not record its training folder; give "
                       "--calibration DIR (training photos), or leave out --int8 for fp32")
    train = Path(recorded) / "train"
    if not train.is_dir():
        raise AppError(f"int8: the training folder the checkpoint records ({train}) is gone; "
                       "give --calibration DIR, or leave out --int8 for fp32")
    return train, f"int8, calibrated on the training folder {train}"


def ort_dist() -> Path:
    """onnxruntime-web's dist/ folder, installed by `npm ci` from the pinned lock file once."""
    cache = cache_dir() / "webapp-npm"
    dist = cache / "node_modules" / "onnxruntime-web" / "dist"
    lock = (WEBAPP / "package-lock.json").read_bytes()
    installed = cache / "package-lock.json"
    if (installed.is_file() and installed.read_bytes() == lock
            and all((dist / name).is_file() for name in ORT_FILES)):
        return dist
    npm = shutil.which("npm")
    if npm is None:
        raise AppError("npm not found: install Node.js (with npm) to fetch onnxruntime-web, "
                       "e.g. apt-get install npm")
    cache.mkdir(parents=True, exist_ok=True)
    for name in ("package.json", "package-lock.json"):
        shutil.copy(WEBAPP / name, cache / name)
    done = subprocess.run([npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund"],
                          cwd=cache, capture_output=True, text=True)
    if done.returncode != 0 or not all((dist / name).is_file() for name in ORT_FILES):
        lines = (done.stderr or done.stdout).strip().splitlines() or ["no output"]
        raise AppError(f"{cache}: npm ci failed ({lines[-1]}); check the network or npm")
    return dist


def _service_worker(out: Path, files: list[str]) -> None:
    """sw.js with the list of files to cache and a version from their contents."""
    digest = hashlib.sha256()
    for name in files:
        digest.update(name.encode() + (out / name).read_bytes())
    text = (WEBAPP / "sw.js").read_text()
    text = text.replace("__VERSION__", digest.hexdigest()[:12])
    text = text.replace("__FILES__", json.dumps(["./", *files]))
    (out / "sw.js").write_text(text)


def build_app(checkpoint: str | os.PathLike, *, out: str | os.PathLike,
              precision: str = "fp32", calibration: str | os.PathLike | None = None,
              ) -> dict[str, Any]:
    """Write the offline app for a checkpoint into `out`; returns its precision and files.

    precision "fp32" (default) or "int8": static QDQ int8, calibrated on `calibration` or
    else on the training folder the checkpoint records.
    """
    if precision not in PRECISIONS:
        raise AppError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if calibration is not None and precision != "int8":
        raise AppError("--calibration applies to the int8 model only: add --int8")
    model, ckpt = load_checkpoint(checkpoint)
    folder, why = (calibration_folder(ckpt, calibration) if precision == "int8"
                   else (None, FP32_WHY))
    dist = ort_dist()  # before the slow export: a missing npm fails fast
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        exported = export.export_onnx(model, Path(tmp) / "exported.onnx")
        one = export.one_image_onnx(model, exported, out=Path(tmp) / "model.onnx")
        if folder is None:
            shutil.copy(one, out / "model.onnx")
        else:
            export.quantize_onnx(model, one, out=out / "model.onnx", calibration=folder)
    meta = app_metadata(model, precision=precision)
    (out / "model.json").write_text(json.dumps(meta, indent=1))
    for name in STATIC:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(WEBAPP / name, out / name)
    (out / "ort").mkdir(exist_ok=True)
    for name in ORT_FILES:
        shutil.copy(dist / name, out / "ort" / name)
    files = [*STATIC, "model.json", "model.onnx", *(f"ort/{n}" for n in ORT_FILES)]
    _service_worker(out, files)
    return {"out": str(out), "precision": precision, "why": why,
            "model_mb": (out / "model.onnx").stat().st_size / 1e6,
            "files": [*files, "sw.js"]}


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Static files with cross-origin isolation (wasm threads) and the app's MIME types."""

    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map, **MIME_TYPES}

    def end_headers(self) -> None:
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.send_header("Cache-Control", "no-cache")  # the service worker does the caching
        super().end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: one line per file is noise here


def make_server(folder: str | os.PathLike, *, port: int = 8000) -> http.server.HTTPServer:
    """An HTTP server for `folder` on 127.0.0.1:port (0: any free port), not yet serving."""
    if not (Path(folder) / "index.html").is_file():
        raise AppError(f"{folder}: no index.html; build the app first (python -m helpers app)")
    handler = functools.partial(_Handler, directory=str(folder))
    try:
        return http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    except OSError as err:
        raise AppError(f"127.0.0.1:{port}: cannot serve there ({err.strerror}); choose "
                       "another port") from None


def serve(folder: str | os.PathLike, *, port: int = 8000) -> None:
    """Serve the app folder on loopback until Ctrl-C, printing its URL."""
    with make_server(folder, port=port) as server:
        print(f"serving {folder} at http://127.0.0.1:{server.server_address[1]}/ (Ctrl-C stops)",
              flush=True)
        server.serve_forever()

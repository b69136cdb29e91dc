"""The phone app: a static web page that names a flower offline with the exported model.

`build_app(checkpoint, out=...)` writes the model (fp32; static int8 with precision="int8"),
specialised for one photo at a time, `model.json` (names and preprocessing, which
onnxruntime-web cannot read from the ONNX metadata), the page and service worker shipped in
`helpers/serve/app_page/`, its icons (drawn), and the onnxruntime-web wasm runtime from npm
(checked against the tarball package-lock.json pins), each file whole or not at all.
`serve(folder, port=...)` serves it on loopback with the headers that let the wasm runtime
use threads (static_server.py).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import http.server
import io
import json
import math
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image, ImageDraw

from helpers.core.errors import AppError, DiskFullError
from helpers.core.files import (
    FULL_DISK,
    atomic_copy,
    atomic_write_bytes,
    cache_dir,
    disk_full_message,
    file_sha256,
)
from helpers.serve.static_server import StaticHandler, StaticServer

if TYPE_CHECKING:
    from helpers.model.classifier import Classifier

PAGE = Path(__file__).resolve().parent / "app_page"  # the page's sources, copied as they are
STATIC = ["index.html", "app.js", "preprocess.js", "style.css", "manifest.webmanifest"]
ICONS = {f"icons/icon-{size}.png": size for size in (192, 512)}  # drawn by draw_icon
# The wasm backend's loader and runtime: all the app needs from the onnxruntime-web package.
ORT_FILES = ["ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm"]
HOST = "127.0.0.1"  # loopback only


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


def app_metadata(model: Classifier, *, precision: str) -> dict[str, Any]:
    """export.metadata as typed JSON values, plus the precision: what app.js reads."""
    from helpers.serve import export

    raw = export.metadata(model)
    parsed = {key: json.loads(raw[key]) for key in ("class_names", "class_ids", "mean", "std")}
    return {**parsed, "input_size": int(raw["input_size"]),
            "resize_size": int(raw["resize_size"]), "interpolation": raw["interpolation"],
            "output": raw["output"], "temperature": float(raw["temperature"]),
            "unsure_below": float(raw["unsure_below"]),
            # JSON has no infinity: null is a model without a known verdict (never strange)
            "novel_above": (float(raw["novel_above"]) if math.isfinite(float(raw["novel_above"]))
                            else None),
            "precision": precision}


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


def _lock_entry() -> tuple[str, str]:
    """onnxruntime-web's version and tarball integrity (sha512) pinned in package-lock.json."""
    entry = json.loads((PAGE / "package-lock.json").read_text())["packages"][
        "node_modules/onnxruntime-web"]
    return entry["version"], entry["integrity"]


def _npm(npm: str, cache: Path, *args: str) -> None:
    """Run one npm command in the cache folder; a failure is one line naming the folder."""
    done = subprocess.run([npm, *args, "--ignore-scripts", "--no-audit", "--no-fund"],
                          cwd=cache, capture_output=True, text=True)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines() or ["no output"]
        raise AppError(f"{cache}: npm {args[0]} failed ({lines[-1]}); check the network or npm")


def _tarball_digests(npm: str, cache: Path, version: str, integrity: str) -> dict[str, str]:
    """The sha256 of each runtime file in the onnxruntime-web tarball (from npm's cache or its
    registry), the tarball checked against the lock file's integrity first."""
    with tempfile.TemporaryDirectory(dir=cache, prefix=".pack-") as tmp:
        _npm(npm, cache, "pack", f"onnxruntime-web@{version}", "--pack-destination", tmp)
        tgz = next(Path(tmp).glob("*.tgz"), None)
        algorithm, _, expected = integrity.partition("-")
        data = tgz.read_bytes() if tgz is not None else b""
        if base64.b64encode(hashlib.new(algorithm, data).digest()).decode() != expected:
            raise AppError(f"{cache}: npm's onnxruntime-web {version} tarball does not match "
                           "package-lock.json's integrity; run `npm cache verify` and retry")
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            return {name: hashlib.sha256(tar.extractfile(f"package/dist/{name}").read())
                    .hexdigest() for name in ORT_FILES}


def _intact(dist: Path, digests: dict[str, str]) -> bool:
    """True when every runtime file in dist/ has the sha256 recorded for it."""
    return all((dist / name).is_file() and file_sha256(dist / name) == digests.get(name)
               for name in ORT_FILES)


def ort_dist() -> Path:
    """onnxruntime-web's dist/ folder, installed by `npm ci` from the pinned lock file once,
    its runtime files checked against the tarball the lock file pins before every use."""
    cache = cache_dir() / "webapp-npm"
    dist = cache / "node_modules" / "onnxruntime-web" / "dist"
    version, integrity = _lock_entry()
    checked = cache / "ort-files.json"  # {integrity, sha256 of each file}: written once checked
    try:
        record = json.loads(checked.read_text())
    except (OSError, ValueError):
        record = None
    if (isinstance(record, dict) and record.get("integrity") == integrity
            and _intact(dist, record.get("files") or {})):
        return dist
    npm = shutil.which("npm")
    if npm is None:
        raise AppError("npm not found: install Node.js (with npm) to fetch onnxruntime-web, "
                       "e.g. apt-get install npm")
    checked.unlink(missing_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    for name in ("package.json", "package-lock.json"):
        atomic_copy(PAGE / name, cache / name)
    digests = _tarball_digests(npm, cache, version, integrity)
    if not _intact(dist, digests):  # not installed, or damaged (an interrupted npm ci)
        _npm(npm, cache, "ci")
    if not _intact(dist, digests):
        raise AppError(f"{dist}: onnxruntime-web's runtime files differ from the tarball "
                       f"package-lock.json pins even after a fresh npm ci; delete {cache} and "
                       "check npm and the disk")
    atomic_write_bytes(json.dumps({"integrity": integrity, "files": digests}).encode(), checked)
    return dist


def _service_worker(out: Path, files: list[str]) -> None:
    """sw.js with the list of files to cache and a version from their contents."""
    digest = hashlib.sha256()
    for name in files:
        digest.update(name.encode() + (out / name).read_bytes())
    text = (PAGE / "sw.js").read_text()
    text = text.replace("__VERSION__", digest.hexdigest()[:12])
    text = text.replace("__FILES__", json.dumps(["./", *files]))
    atomic_write_bytes(text.encode(), out / "sw.js")


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
    if Path(out).exists() and not Path(out).is_dir():
        raise AppError(f"{out}: --out is a file; give a folder to write the app into")
    from helpers.model.checkpoint import (
        load_checkpoint,  # torch: here, so that a bad port fails at once
    )

    model, ckpt = load_checkpoint(checkpoint)
    folder, why = (calibration_folder(ckpt, calibration) if precision == "int8"
                   else (None, FP32_WHY))
    dist = ort_dist()  # before the slow export: a missing npm fails fast
    out = Path(out)
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        files = _write_app(model, out, dist=dist, calibration=folder, precision=precision)
    except BaseException as err:
        full = isinstance(err, OSError) and err.errno in FULL_DISK
        message = disk_full_message(out) if full else ""
        if created:  # nothing half-written: an app folder this build made goes again
            shutil.rmtree(out, ignore_errors=True)
        if full:  # --out's disk (the export's temporary files are on it too), not a temp file
            raise DiskFullError(message) from None
        raise
    return {"out": str(out), "precision": precision, "why": why,
            "model_mb": (out / "model.onnx").stat().st_size / 1e6, "files": files}


def _write_app(model, out: Path, *, dist: Path, calibration: Path | None,
               precision: str) -> list[str]:
    """Every file of the app into `out`, each written whole (temporary file, then rename)."""
    from helpers.serve import export

    with tempfile.TemporaryDirectory(dir=out, prefix=".build-") as tmp:  # on --out's disk
        exported = export.export_onnx(model, Path(tmp) / "exported.onnx")
        if calibration is None:
            export.one_image_onnx(model, exported, out=out / "model.onnx")
        else:
            one = export.one_image_onnx(model, exported, out=Path(tmp) / "one.onnx")
            export.quantize_onnx(model, one, out=out / "model.onnx", calibration=calibration)
    meta = app_metadata(model, precision=precision)
    atomic_write_bytes(json.dumps(meta, indent=1).encode(), out / "model.json")
    for name in STATIC:
        atomic_copy(PAGE / name, out / name)
    for name, size in ICONS.items():
        icon = io.BytesIO()
        draw_icon(size).save(icon, "PNG", optimize=True)
        atomic_write_bytes(icon.getvalue(), out / name)
    for name in ORT_FILES:
        atomic_copy(dist / name, out / "ort" / name)
    files = [*STATIC, *ICONS, "model.json", "model.onnx", *(f"ort/{n}" for n in ORT_FILES)]
    _service_worker(out, files)
    return [*files, "sw.js"]


def make_server(folder: str | os.PathLike, *, port: int = 8000,
                built: bool = True) -> http.server.HTTPServer:
    """An HTTP server for `folder` on 127.0.0.1:port (0: any free port), not yet serving.

    built=False binds the port before the app is built, so a bad port fails before the build.
    """
    if not 0 <= port <= 65535:
        raise AppError(f"port {port}: not a TCP port; choose one from 1 to 65535 (e.g. 8000)")
    if built and not (Path(folder) / "index.html").is_file():
        raise AppError(f"{folder}: no index.html; build the app first (python -m helpers app)")
    handler = functools.partial(StaticHandler, directory=str(folder))
    try:
        return StaticServer((HOST, port), handler)
    except OSError as err:
        raise AppError(f"{HOST}:{port}: cannot serve there ({err.strerror}); choose "
                       "another port") from None


def run_server(server: http.server.HTTPServer) -> None:
    """Serve until Ctrl-C, printing the URL; the server is closed afterwards."""
    with server:
        folder = server.RequestHandlerClass.keywords["directory"]
        print(f"serving {folder} at http://{HOST}:{server.server_address[1]}/ (Ctrl-C stops)",
              flush=True)
        server.serve_forever()


def serve(folder: str | os.PathLike, *, port: int = 8000) -> None:
    """Serve the app folder on loopback until Ctrl-C, printing its URL."""
    run_server(make_server(folder, port=port))

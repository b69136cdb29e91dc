"""The phone app: its JS preprocessing against process_image, the build, the server, .ort."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import tomllib
import urllib.request
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from conftest import ROOT, make_image_folder, write_checkpoint
from helpers import cli
from helpers.core.errors import AppError
from helpers.data.preprocess import Preprocess, process_image
from helpers.model import checkpoint
from helpers.model.classifier import build_model
from helpers.serve import export, webapp

NODE = shutil.which("node")
needs_node = pytest.mark.skipif(NODE is None, reason="node is not installed")
needs_npm = pytest.mark.skipif(shutil.which("npm") is None, reason="npm is not installed")

# Runs preprocess.js on raw pixels: argv = module, pixels file, meta JSON, output file.
NODE_DRIVER = """
import fs from "node:fs";
import { pathToFileURL } from "node:url";
const [module, pixelsFile, metaJson, outFile] = process.argv.slice(2);
const { preprocess } = await import(pathToFileURL(module).href);
const meta = JSON.parse(metaJson);
const pixels = new Uint8Array(fs.readFileSync(pixelsFile));
const out = preprocess(pixels, meta.width, meta.height, meta.channels, meta);
fs.writeFileSync(outFile, Buffer.from(out.buffer));
"""


def js_preprocess(pixels: np.ndarray, meta: dict, tmp_path: Path) -> np.ndarray:
    """preprocess.js under node on an H x W x C uint8 array: a 3 x S x S float32 array."""
    driver = tmp_path / "driver.mjs"
    driver.write_text(NODE_DRIVER)
    (tmp_path / "pixels.raw").write_bytes(np.ascontiguousarray(pixels).tobytes())
    h, w, c = pixels.shape
    meta = {**meta, "width": w, "height": h, "channels": c}
    subprocess.run([NODE, str(driver), str(webapp.PAGE / "preprocess.js"),
                    str(tmp_path / "pixels.raw"), json.dumps(meta), str(tmp_path / "out.raw")],
                   check=True, capture_output=True, timeout=60)
    size = meta["input_size"]
    return np.fromfile(tmp_path / "out.raw", dtype=np.float32).reshape(3, size, size)


@needs_node
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("size", [(500, 375), (375, 500), (301, 257), (40, 31), (256, 256),
                                  (1000, 333)])
def test_js_preprocessing_is_process_image_exactly(size, interpolation, tmp_path):
    """PIL's resampling re-done in JS: bit-identical tensors, upscaling and downscaling."""
    rng = np.random.default_rng(sum(size))
    w, h = size
    # Noise (every coefficient matters) beside smooth gradients (rounding matters).
    pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    pixels[: h // 2] = np.linspace(0, 255, w, dtype=np.float32)[None, :, None].astype(np.uint8)
    meta = {"input_size": 224, "resize_size": 256, "interpolation": interpolation,
            "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    expected = process_image(Image.fromarray(pixels), spec=Preprocess.from_metadata(meta))
    # The browser hands over RGBA (getImageData): the alpha channel must be ignored.
    rgba = np.concatenate([pixels, rng.integers(0, 256, (h, w, 1), dtype=np.uint8)], axis=2)
    for array in (pixels, rgba):
        np.testing.assert_array_equal(js_preprocess(array, meta, tmp_path), expected)


@needs_node
def test_js_crop_rounds_halves_like_python(tmp_path):
    """A long side of 341 - 224 = 117 px to share: Python's round(58.5) is 58, not 59."""
    pixels = np.random.default_rng(0).integers(0, 256, (375, 500, 3), dtype=np.uint8)
    meta = {"input_size": 224, "resize_size": 256, "interpolation": "bicubic",
            "mean": [0.5] * 3, "std": [0.5] * 3}
    assert int(256 * 500 / 375) - 224 == 117
    np.testing.assert_array_equal(js_preprocess(pixels, meta, tmp_path),
                                  process_image(Image.fromarray(pixels)))


def test_package_data_lists_every_file_of_the_page():
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["helpers.serve"]
    shipped = [p.relative_to(webapp.PAGE.parent).as_posix()
               for p in webapp.PAGE.rglob("*") if p.is_file()]
    assert "node_modules" not in " ".join(shipped)
    assert all(any(fnmatch(name, g) for g in globs) for name in shipped), shipped
    assert {*webapp.STATIC, "sw.js", "package.json", "package-lock.json"} <= {
        Path(name).relative_to("app_page").as_posix() for name in shipped}
    lock = json.loads((webapp.PAGE / "package-lock.json").read_text())
    assert lock["packages"]["node_modules/onnxruntime-web"]["version"] == "1.30.0"


def test_serve_sends_isolation_headers_and_mime_types(tmp_path):
    for name in ("index.html", "a.wasm", "b.mjs", "manifest.webmanifest"):
        (tmp_path / name).write_text("x")
    server = webapp.make_server(tmp_path, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}/"
        types = {}
        for name in ("", "a.wasm", "b.mjs", "manifest.webmanifest"):
            with urllib.request.urlopen(base + name, timeout=10) as response:
                assert response.headers["Cross-Origin-Opener-Policy"] == "same-origin"
                assert response.headers["Cross-Origin-Embedder-Policy"] == "require-corp"
                types[name] = response.headers["Content-Type"]
    finally:
        server.shutdown()
        server.server_close()
    assert types["a.wasm"] == "application/wasm" and types["b.mjs"] == "text/javascript"
    assert types["manifest.webmanifest"] == "application/manifest+json"
    assert types[""].startswith("text/html")


def test_serve_refuses_a_folder_without_the_app(tmp_path):
    with pytest.raises(AppError, match=str(tmp_path)):
        webapp.make_server(tmp_path, port=0)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A random-weight Lite0 for 3 classes that records its (synthetic) training folder."""
    folder = make_image_folder(tmp_path_factory.mktemp("app") / "flowers", ["1", "2", "10"],
                               per_class=3)
    torch.manual_seed(0)
    clf = build_model("efficientnet_lite0", {"1": 0, "10": 1, "2": 2},
                            ["pink primrose", "globe thistle", "hard-leaved pocket orchid"],
                            hidden_units=0, pretrained=False)
    clf.temperature, clf.unsure_below = 1.5, 0.6
    path = tmp_path_factory.mktemp("ck") / "checkpoint.pth"
    return write_checkpoint(clf, path, metrics={"data_dir": str(folder)}), folder


def test_int8_calibrates_on_the_photos_at_hand_or_says_what_to_give(tiny_ckpt, tmp_path):
    _, folder = tiny_ckpt
    recorded = {"metrics": {"data_dir": str(folder)}}
    assert webapp.calibration_folder(recorded, None) == (
        folder / "train", f"int8, calibrated on the training folder {folder / 'train'}")
    assert webapp.calibration_folder({}, folder / "valid")[0] == folder / "valid"
    with pytest.raises(AppError, match="does not record its training folder"):
        webapp.calibration_folder({"config": {}, "metrics": {}}, None)
    with pytest.raises(AppError, match=f"training folder .*{tmp_path}.* is gone"):
        webapp.calibration_folder({"metrics": {"data_dir": str(tmp_path)}}, None)
    with pytest.raises(AppError, match="no such folder"):
        webapp.calibration_folder({}, tmp_path / "missing")


def test_precision_is_explicit(tiny_ckpt, tmp_path):
    """fp32 unless asked for int8; calibration photos alone do not switch it."""
    ckpt, folder = tiny_ckpt
    with pytest.raises(AppError, match="--calibration applies to the int8 model only"):
        webapp.build_app(ckpt, out=tmp_path / "app", calibration=folder / "train")
    with pytest.raises(AppError, match="choose one of fp32, int8"):
        webapp.build_app(ckpt, out=tmp_path / "app", precision="fp16")
    assert cli.main(["app", str(ckpt), "--out", str(tmp_path / "app"), "--calibration",
                     str(folder / "train")]) == 1
    assert not (tmp_path / "app").exists()


def test_missing_npm_is_one_clear_line(tiny_ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing to run here: no npm
    assert cli.main(["app", str(tiny_ckpt[0]), "--out", str(tmp_path / "app")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: npm not found: install Node.js") and err.count("\n") == 1
    assert not (tmp_path / "app").exists()  # it failed before the slow export


def _check_app_files(out: Path, precision: str) -> None:
    """Every file of the app, model.json's facts, the service worker's list, no CDN."""
    for name in [*webapp.STATIC, "sw.js", "model.json", "model.onnx",
                 *(f"ort/{n}" for n in webapp.ORT_FILES)]:
        assert (out / name).is_file(), name
    for name, size in webapp.ICONS.items():  # drawn at build time, no photo
        icon = Image.open(out / name)
        assert icon.size == (size, size)
        np.testing.assert_array_equal(np.asarray(icon.convert("RGB")),
                                      np.asarray(webapp.draw_icon(size)))
    meta = json.loads((out / "model.json").read_text())
    assert meta["class_names"] == ["pink primrose", "globe thistle", "hard-leaved pocket orchid"]
    assert meta["class_ids"] == ["1", "10", "2"] and meta["precision"] == precision
    assert (meta["input_size"], meta["resize_size"], meta["interpolation"]) == (224, 256,
                                                                                "bicubic")
    assert meta["mean"] == meta["std"] == [0.5] * 3
    assert (meta["temperature"], meta["unsure_below"]) == (1.5, 0.6)
    sw = (out / "sw.js").read_text()
    assert "__VERSION__" not in sw and '"model.onnx"' in sw and '"ort/ort.wasm.min.mjs"' in sw
    # No CDN: every script and runtime the page loads comes from the app itself.
    for name in ("index.html", "app.js"):
        assert "https://" not in (out / name).read_text()


@pytest.mark.slow  # a process of its own
@needs_npm
def test_build_app_writes_a_complete_fp32_app_by_default(tiny_ckpt, tmp_path, capsys):
    ckpt, folder = tiny_ckpt
    out = tmp_path / "app"
    assert cli.main(["app", str(ckpt), "--out", str(out)]) == 0
    assert "; fp32 (the default" in capsys.readouterr().out
    _check_app_files(out, "fp32")
    # One photo at a time, shapes static: the exported shape arithmetic (TF "same" padding)
    # is folded into the convolutions, standard ONNX operators only, no quantization.
    nodes = _nodes(out / "model.onnx")
    ops = {n.op_type for n in nodes}
    assert not ops & {"Shape", "Gather", "Pad", "Ceil", "QuantizeLinear", "DequantizeLinear"}
    assert all(n.domain in ("", "ai.onnx") for n in nodes), ops
    session = ort.InferenceSession(str(out / "model.onnx"))
    assert session.get_inputs()[0].shape == [1, 3, 224, 224]
    # The same probabilities as the model in PyTorch (float32 rounding apart).
    clf, _ = checkpoint.load_checkpoint(ckpt)
    wrapper = export.Probabilities(clf).eval()
    for image in sorted((folder / "test").rglob("*.jpg")):
        x = process_image(image)[None]
        probs = session.run(None, {"images": x})[0]
        with torch.no_grad():
            expected = wrapper(torch.from_numpy(x)).numpy()
        assert probs.shape == (1, 3)
        np.testing.assert_allclose(probs, expected, atol=1e-5)


@pytest.mark.slow  # a process of its own
@needs_npm
def test_build_app_writes_a_complete_int8_app(tiny_ckpt, tmp_path, capsys):
    ckpt, folder = tiny_ckpt
    out = tmp_path / "app"
    assert cli.main(["app", str(ckpt), "--out", str(out), "--int8"]) == 0
    printed = capsys.readouterr().out
    assert f"int8, calibrated on the training folder {folder / 'train'}" in printed
    _check_app_files(out, "int8")
    session = ort.InferenceSession(str(out / "model.onnx"))
    assert any(n.op_type == "QuantizeLinear" for n in _nodes(out / "model.onnx"))
    x = process_image(folder / "test" / "2" / "img_0.jpg")[None]
    probs = session.run(None, {"images": x})[0]
    assert probs.shape == (1, 3) and abs(float(probs.sum()) - 1) < 1e-5


def _nodes(path: Path):
    import onnx

    return onnx.load(path).graph.node


@pytest.mark.slow
def test_ort_export_gives_the_same_top5_as_onnx(tiny_ckpt, tmp_path):
    ckpt, folder = tiny_ckpt
    assert cli.main(["export", str(ckpt), "-o", str(tmp_path / "m.onnx")]) == 0
    assert cli.main(["export", str(ckpt), "--format", "ort", "-o", str(tmp_path / "m.ort")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.ort"]
    onnx_session = ort.InferenceSession(str(tmp_path / "m.onnx"))
    ort_session = ort.InferenceSession(str(tmp_path / "m.ort"))
    for image in sorted((folder / "test").rglob("*.jpg")):
        x = process_image(image)[None]
        a, b = (s.run(None, {"images": x})[0][0] for s in (onnx_session, ort_session))
        np.testing.assert_allclose(a, b, atol=1e-5)
        assert list(np.argsort(-a)) == list(np.argsort(-b))

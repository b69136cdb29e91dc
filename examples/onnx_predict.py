"""Name the flower in a photo with the exported ONNX model: needs onnxruntime, numpy, pillow.

    python examples/onnx_predict.py checkpoint.onnx photo.jpg [--top_k 5]

Everything needed to prepare the image and name the classes is read from the model's
metadata, so this file stands alone: no torch, no helpers package. The probabilities are
already calibrated inside the graph (the logits are divided by the fitted temperature).
"""

import argparse
import json

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps

RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def preprocess(path: str, meta: dict) -> np.ndarray:
    """Shorter side to resize_size, centre crop, 0..1, normalise, 1 x 3 x H x W."""
    image = ImageOps.exif_transpose(Image.open(path))
    if image.mode in ("RGBA", "LA", "P", "PA"):  # transparency over white
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
    image = image.convert("RGB")
    size, resize = int(meta["input_size"]), int(meta["resize_size"])
    w, h = image.size
    new = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
    image = image.resize(new, RESAMPLE[meta["interpolation"]])
    left, top = int(round((new[0] - size) / 2.0)), int(round((new[1] - size) / 2.0))
    image = image.crop((left, top, left + size, top + size))
    x = np.asarray(image, dtype=np.float32) / 255.0
    x = (x - np.array(json.loads(meta["mean"]), np.float32)) / np.array(json.loads(meta["std"]),
                                                                         np.float32)
    return x.transpose(2, 0, 1)[None].copy()


def main() -> None:
    parser = argparse.ArgumentParser(description="top-K flower names from an ONNX model")
    parser.add_argument("model")
    parser.add_argument("image")
    parser.add_argument("--top_k", type=int, default=5)
    args = parser.parse_args()
    session = ort.InferenceSession(args.model, providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    probs = session.run(None, {"images": preprocess(args.image, meta)})[0][0]
    names = json.loads(meta["class_names"])
    for rank, i in enumerate(np.argsort(probs)[::-1][: args.top_k], 1):
        print(f"{rank}. {names[i]}  {probs[i]:.2%}")
    threshold = float(meta.get("unsure_below", 0.0))  # absent from older exports: never unsure
    if probs.max() < threshold:
        print(f"unsure: top probability {probs.max():.2%} below the threshold {threshold:.2%}")


if __name__ == "__main__":
    main()

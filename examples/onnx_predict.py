"""Name the flower in a photo with the exported ONNX model: needs onnxruntime, numpy, pillow.

    python examples/onnx_predict.py checkpoint.onnx photo.jpg [--top_k 5]

Everything needed to prepare the image and name the classes is read from the model's
metadata, so this file stands alone: no torch, no helpers package. The probabilities are
already calibrated inside the graph (the logits are divided by the fitted temperature).
"""

import argparse
import json
import sys

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


def main() -> int:
    """Print the top-K names of one photo; a bad model or photo is one line and exit 1."""
    parser = argparse.ArgumentParser(description="top-K flower names from an ONNX model")
    parser.add_argument("model")
    parser.add_argument("image")
    parser.add_argument("--top_k", type=int, default=5)
    args = parser.parse_args()
    try:
        session = ort.InferenceSession(args.model, providers=["CPUExecutionProvider"])
        meta = session.get_modelmeta().custom_metadata_map
        if "class_names" not in meta:
            raise ValueError("no class names in its metadata; export it with "
                             "python -m helpers export")
    except Exception as err:  # missing, truncated, not ONNX, or not one of ours
        reason = str(err).strip().splitlines()[0][:120] if str(err).strip() else "unreadable"
        print(f"error: {args.model}: not a usable ONNX model ({reason})", file=sys.stderr)
        return 1
    try:
        x = preprocess(args.image, meta)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        print(f"error: {args.image}: not a readable image ({err}); use a JPEG, PNG or WebP",
              file=sys.stderr)
        return 1
    outputs = session.run(None, {"images": x})
    probs = outputs[0][0]
    names = json.loads(meta["class_names"])
    # The known verdict: a second output, the photo's novelty, above the model's threshold
    # (absent from older exports: always known).
    if len(outputs) > 1 and outputs[1][0] > float(meta.get("novel_above", "inf")):
        print(f"not a flower I know (closest: {names[int(probs.argmax())]}; novelty "
              f"{outputs[1][0]:.1f} above the threshold {float(meta['novel_above']):.1f})")
    for rank, i in enumerate(np.argsort(probs)[::-1][: args.top_k], 1):
        print(f"{rank}. {names[i]}  {probs[i]:.2%}")
    threshold = float(meta.get("unsure_below", 0.0))  # absent from older exports: never unsure
    if probs.max() < threshold:
        print(f"unsure: top probability {probs.max():.2%} below the threshold {threshold:.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

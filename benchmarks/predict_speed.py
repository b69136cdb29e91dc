"""How fast `predict.py` answers: whole-process wall time and peak memory, median of runs.

    python benchmarks/predict_speed.py                      # a Lite0 model (random head)
    python benchmarks/predict_speed.py build/main/checkpoint.pth --runs 5

Three cases, each a fresh `python predict.py ...` process timed from start to exit:
one photo of the data set's size; a folder of such photos (about 288 x 380 px); a folder
of 12-megapixel phone-sized photos (4000 x 3000 px JPEGs made from the first ones). Prints
a table: median wall time, photos/s (photos over whole-process wall time), peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from helpers.core.device import cpu_flags  # noqa: E402


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one process, from start to exit."""
    tic = time.perf_counter()
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT,
                               env=env)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - tic
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{process.stderr.read().decode()}")
    return wall, usage.ru_maxrss / 1024


def make_checkpoint(folder: Path) -> Path:
    """A Lite0 classifier for the 102 flowers with its engine (the weights do not matter)."""
    import torch

    from helpers.model.classifier import build_model
    from helpers.serve import inference

    torch.manual_seed(0)
    clf = build_model("efficientnet_lite0", {str(i): i - 1 for i in range(1, 103)},
                            hidden_units=0)
    return inference.save_model(clf, folder / "checkpoint.pth")


def main(argv: list[str] | None = None) -> int:
    """Measure the three cases and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", help="default: a Lite0 model made here")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "flowers",
                        help="the flowers data (its test/ photos are used)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--photos", type=int, default=300, help="photos in the folder case")
    parser.add_argument("--phone", type=int, default=30, help="12-megapixel photos")
    args = parser.parse_args(argv)
    from PIL import Image

    photos = sorted((args.data / "test").rglob("*.jpg"))[: args.photos]
    with tempfile.TemporaryDirectory(prefix="predict-speed-") as tmp:
        tmp = Path(tmp)
        ckpt = Path(args.checkpoint) if args.checkpoint else make_checkpoint(tmp)
        folder, phone = tmp / "photos", tmp / "phone"
        folder.mkdir()
        phone.mkdir()
        for p in photos:
            (folder / p.name).symlink_to(p.resolve())
        for p in photos[: args.phone]:
            Image.open(p).convert("RGB").resize((4000, 3000), Image.Resampling.BICUBIC).save(
                phone / p.name, quality=90)
        base = [sys.executable, str(ROOT / "predict.py")]
        cases = {"one photo": ([str(photos[0])], 1),
                 f"folder of {len(photos)} photos (~288x380)": ([str(folder)], len(photos)),
                 f"folder of {args.phone} photos of 12 MP": ([str(phone)], args.phone)}
        print(f"CPU flags: {cpu_flags()}")
        print("| engine runtime | case | wall s (median) | photos/s | peak RSS MB |")
        print("|---|---|---|---|---|")
        for engine_runtime in ("onnxruntime", "openvino"):
            # the engine runs what the cached recipe chose on this CPU: here, each in turn
            cache = tmp / f"cache-{engine_runtime}"
            cache.mkdir()
            (cache / "trunk_runtime.json").write_text(json.dumps({"runtime": engine_runtime}))
            env = os.environ | {"FLOWERS_CACHE": str(cache)}
            timed(base + [str(photos[0]), str(ckpt)], env)  # the engine is current, caches warm
            for name, (target, count) in cases.items():
                runs = [timed(base + target + [str(ckpt), "--json"], env)
                        for _ in range(args.runs)]
                wall = statistics.median(w for w, _ in runs)
                rss = max(r for _, r in runs)
                print(f"| {engine_runtime} | {name} | {wall:.2f} | {count / wall:.0f} "
                      f"| {rss:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

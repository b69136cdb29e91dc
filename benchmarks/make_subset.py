"""A small copy of the flowers data that travels to a GPU machine: N classes x K images.

    python benchmarks/make_subset.py [--source DIR] [--out build/gpu_subset] [--classes 102]
                                     [--train 12] [--eval 3] [--side 256]

Each photo is recompressed as JPEG with its shorter side at most --side pixels (the
training crops are 224; the eval transform resizes to 256), so the subset of the default
size fits beside the project in a 64 MiB working tree. Prints the number of images and size.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from PIL import Image

SOURCE = Path(os.environ.get("FLOWERS_DIR") or "/work/shared/data/flowers")


def shrink(source: Path, target: Path, *, side: int, quality: int) -> int:
    """Write `source` as a JPEG whose shorter side is at most `side`; returns its bytes."""
    with Image.open(source) as image:
        image.draft("RGB", (side, side))  # decode at a reduced scale: much faster for JPEG
        image = image.convert("RGB")
        scale = side / min(image.size)
        if scale < 1:
            image = image.resize((round(image.width * scale), round(image.height * scale)),
                                 Image.Resampling.BICUBIC)
        image.save(target, "JPEG", quality=quality, optimize=True)
    return target.stat().st_size


def make_subset(source: Path, out: Path, *, classes: int, per_split: dict[str, int],
                side: int, quality: int) -> tuple[int, int]:
    """Copy the first `classes` class folders, the first images of each split; (count, bytes)."""
    if not (source / "train").is_dir():
        sys.exit(f"error: {source}: no train/ folder; pass --source, the course split of the "
                 "flowers data")
    if out.exists():
        shutil.rmtree(out)
    names = sorted(os.listdir(source / "train"), key=lambda n: (len(n), n))[:classes]
    count = size = 0
    for split, k in per_split.items():
        for name in names:
            folder = out / split / name
            folder.mkdir(parents=True)
            for photo in sorted((source / split / name).iterdir())[:k]:
                size += shrink(photo, folder / photo.name, side=side, quality=quality)
                count += 1
    if (source / "cat_to_name.json").is_file():
        shutil.copy(source / "cat_to_name.json", out / "cat_to_name.json")
    return count, size


def main() -> None:
    """Parse the options, make the subset, print what it holds."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source", type=Path, default=SOURCE,
                   help="the course split (train/ valid/ test/) (default %(default)s)")
    p.add_argument("--out", type=Path, default=Path("build/gpu_subset"))
    p.add_argument("--classes", type=int, default=102)
    p.add_argument("--train", type=int, default=12, help="train images per class")
    p.add_argument("--eval", type=int, default=3, help="valid and test images per class")
    p.add_argument("--side", type=int, default=256, help="largest shorter side, in pixels")
    p.add_argument("--quality", type=int, default=85, help="JPEG quality")
    args = p.parse_args()
    count, size = make_subset(args.source, args.out, classes=args.classes,
                              per_split={"train": args.train, "valid": args.eval,
                                         "test": args.eval},
                              side=args.side, quality=args.quality)
    print(f"{args.out}: {args.classes} classes, {count} images, {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()

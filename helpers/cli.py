"""Command lines: `python -m helpers pipeline|...`; user mistakes end in one line and exit 1."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import fields
from pathlib import Path

from .backbones import BACKBONES, BackboneError
from .checkpoint import CheckpointError
from .data import DataError
from .images import ImageError
from .train import TrainConfig

USER_ERRORS = (DataError, ImageError, CheckpointError, BackboneError)
DEFAULTS = TrainConfig()


def _add_train_options(p: argparse.ArgumentParser) -> None:
    """The options that fill a TrainConfig."""
    p.add_argument("--arch", default=DEFAULTS.arch, choices=list(BACKBONES),
                   help=f"pretrained backbone (default {DEFAULTS.arch}, offline)")
    p.add_argument("--hidden_units", type=int, default=DEFAULTS.hidden_units,
                   help="hidden units of the head; 0 for a linear head (default %(default)s)")
    p.add_argument("--dropout", type=float, default=DEFAULTS.dropout,
                   help="dropout before the last layer (default %(default)s)")
    p.add_argument("--learning_rate", type=float, default=DEFAULTS.learning_rate,
                   help="Adam learning rate of the head (default %(default)s)")
    p.add_argument("--epochs", type=int, default=DEFAULTS.epochs,
                   help="passes over the training images (default %(default)s)")
    p.add_argument("--batch_size", type=int, default=DEFAULTS.batch_size,
                   help="images per step (default %(default)s)")
    p.add_argument("--seed", type=int, default=DEFAULTS.seed, help="random seed (default 0)")
    p.add_argument("--fp32", action="store_true",
                   help="plain fp32 and default memory format (default: bf16/fp16 autocast and "
                        "channels_last where the hardware supports them)")
    p.add_argument("--gpu", action="store_true", help="train on the GPU (cuda or mps)")


def _config(args: argparse.Namespace) -> TrainConfig:
    """A TrainConfig from parsed options."""
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    return TrainConfig(**values, fast=not args.fp32)


def _device(gpu: bool):
    """The device asked for: a GPU when --gpu (an error if there is none), else the CPU."""
    from .train import get_device

    device = get_device(gpu=gpu)
    if gpu and device.type == "cpu":
        raise DataError("--gpu given but no CUDA or MPS device is available; drop --gpu")
    return device


def pipeline(args: argparse.Namespace) -> None:
    """Train on the flowers data, report valid/test accuracy, save, reload, predict, chart."""
    from . import backbones, checkpoint, data, download, model, plots, predict, train

    config = _config(args)
    device = _device(args.gpu) if args.gpu else train.get_device()
    out = Path(args.out)
    start = time.perf_counter()
    root = download.ensure_data(args.data_dir, source=args.source)
    spec = backbones.get_backbone(config.arch)
    sets = data.load_datasets(root, spec)
    print(f"data {root}: " + ", ".join(f"{s} {v['images']} images / {v['classes']} classes"
                                       for s, v in data.summarize(sets).items()))
    names = data.class_names(sets["train"].class_to_idx, data.load_category_names(args.names))
    train.seed_everything(config.seed)
    clf = model.build_model(config.arch, sets["train"].class_to_idx, names,
                            config.hidden_units, config.dropout)
    counts = model.count_parameters(clf)
    print(f"model {config.arch} on {device}: {counts['trainable']:,} trainable and "
          f"{counts['frozen']:,} frozen parameters")
    loaders = data.make_loaders(sets, config.batch_size, seed=config.seed)
    history = train.fit(clf, loaders, config, device, progress=sys.stderr.isatty())
    metrics = {split: train.evaluate(clf, loaders[split], device, config.fast, progress=False)
               for split in ("valid", "test") if split in loaders}
    for split, m in metrics.items():
        print(f"{split}: top-1 {m['top1']:.2%}  top-5 {m['top5']:.2%}  ({m['n']} images)")
    path = checkpoint.save_checkpoint(clf, out / "checkpoint.pth", config,
                                      {"history": history, **metrics})
    print(f"checkpoint: {path}")
    plots.save_figure(plots.plot_history(history), out / "history.png")

    reloaded, _ = checkpoint.load_checkpoint(path, device)
    ds = sets.get("test", sets["valid"])
    image_path, label = ds.samples[0]
    result = predict.predict(image_path, reloaded, topk=5)
    true_name = reloaded.class_names[label]
    print(f"{image_path} (true: {true_name}):")
    for p, name in zip(result.probs, result.names, strict=True):
        print(f"  {p:7.2%}  {name}")
    fig = plots.plot_prediction(data.open_image(image_path), result, true_name=true_name)
    print(f"top-5 chart: {plots.save_figure(fig, out / 'top5.png')}")
    summary = {"config": vars(args) | {"data_dir": str(root)}, "history": history, **metrics,
               "seconds": time.perf_counter() - start}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"done in {summary['seconds']:.0f} s; figures in {out / 'metrics.json'}")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `python -m helpers`."""
    parser = argparse.ArgumentParser(prog="python -m helpers", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pipeline", help="the main job: train, evaluate, save, predict one image",
                       description=pipeline.__doc__)
    p.add_argument("--data_dir", help="data folder (default $FLOWERS_DIR, else ./flowers; "
                                      "downloaded when missing)")
    p.add_argument("--source", default="course", choices=["course", "flowers102"],
                   help="where to download the data from when it is missing")
    p.add_argument("--names", help="JSON file of class folder -> flower name "
                                   "(default: the project's cat_to_name.json)")
    p.add_argument("--out", default="build/main", help="output folder (default %(default)s)")
    _add_train_options(p)
    p.set_defaults(func=pipeline)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a command; a user mistake prints one line on stderr and returns 1."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0

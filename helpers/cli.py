"""Command lines: `python -m helpers pipeline|train|predict|evaluate|export|app|cache`.

Exit status: 0 on success, 2 for usage errors (argparse), 1 for every other failure,
with one line on stderr and no traceback.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
import warnings
from dataclasses import fields
from pathlib import Path

from .backbones import BACKBONES, BackboneError
from .checkpoint import CheckpointError
from .data import DataError
from .images import ImageError
from .train import TrainConfig

DEFAULTS = TrainConfig()


class UserError(RuntimeError):
    """A mistake in what the user asked for; the message says what to do."""


class Interrupted(UserError):
    """Training was stopped (Ctrl-C or SIGTERM) after saving a resumable state."""


USER_ERRORS = (UserError, DataError, ImageError, CheckpointError, BackboneError, ValueError,
               OSError)


def _add_train_options(p: argparse.ArgumentParser) -> None:
    """The options that fill a TrainConfig, each saying what it means in the default recipe."""
    p.add_argument("--arch", default=DEFAULTS.arch, choices=list(BACKBONES),
                   help=f"pretrained backbone (default {DEFAULTS.arch}: offline weights)")
    p.add_argument("--recipe", default=DEFAULTS.recipe,
                   choices=["auto", "cached", "full", "course"],
                   help="auto (default): on a CPU fine-tune the last stage on cached "
                        "activations, on a GPU the whole network; course: frozen backbone, "
                        "every augmented image through it every epoch")
    p.add_argument("--learning_rate", type=float, default=DEFAULTS.learning_rate,
                   help="learning rate of the head (default %(default)s; the backbone's "
                        f"fine-tuned layers use --backbone_lr, default {DEFAULTS.backbone_lr})")
    p.add_argument("--backbone_lr", type=float, default=DEFAULTS.backbone_lr,
                   help="learning rate of the fine-tuned backbone layers (default %(default)s)")
    p.add_argument("--hidden_units", type=int, default=DEFAULTS.hidden_units,
                   help="hidden units of the head (default %(default)s: a linear head; the "
                        "course used 512)")
    p.add_argument("--dropout", type=float, default=DEFAULTS.dropout,
                   help="dropout before the head's last layer (default %(default)s)")
    p.add_argument("--epochs", type=int, default=DEFAULTS.epochs,
                   help="fine-tuning epochs over all views of the training images, after "
                        "a linear probe (default %(default)s)")
    p.add_argument("--batch_size", type=int, default=DEFAULTS.batch_size,
                   help="samples per step (default %(default)s)")
    p.add_argument("--seed", type=int, default=DEFAULTS.seed,
                   help="random seed of weights, views and order (default %(default)s)")
    p.add_argument("--fp32", action="store_true",
                   help="plain fp32, default memory format (default: bf16/fp16 autocast and "
                        "channels_last where the hardware has them)")
    p.add_argument("--gpu", action="store_true", help="use the GPU (CUDA or Apple MPS)")


def _config(args: argparse.Namespace) -> TrainConfig:
    """A TrainConfig from parsed options; the course recipe starts from the course's values."""
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    given["fast"] = not args.fp32
    if args.recipe == "course":
        changed = {k: v for k, v in given.items() if v != getattr(DEFAULTS, k)}
        return TrainConfig.course(**changed)
    return TrainConfig(**given)


def _device(gpu: bool):
    """The GPU when --gpu (an error if there is none), else the CPU."""
    import torch

    from .train import get_device

    if not gpu:
        return torch.device("cpu")
    device = get_device()
    if device.type == "cpu":
        raise UserError("--gpu given but no CUDA or MPS GPU is available; run without --gpu")
    return device


def _train(args: argparse.Namespace, data_root: Path, out: Path, device) -> tuple:
    """Load the data, build and train the model, evaluate valid/test, save the checkpoint."""
    from . import checkpoint, data, evaluate, model, recipes, train

    resume = checkpoint.read_resume(args.resume) if getattr(args, "resume", None) else None
    config = TrainConfig(**resume["resume_config"]) if resume else _config(args)
    start = time.perf_counter()
    sets, clf = recipes.prepare(data_root, config, args.names)
    print(f"data {data_root}: " + ", ".join(f"{s} {v['images']} images / {v['classes']} classes"
                                            for s, v in data.summarize(sets).items()))
    recipe = recipes.resolve_recipe(config, device)
    print(f"model {config.arch} on {device}, recipe {recipe}")
    state = out / "last.pth"
    try:
        history = recipes.run_recipe(clf, sets, config, device, progress=sys.stderr.isatty(),
                                     start=start, state_path=state, resume=resume)
    except KeyboardInterrupt:
        if state.is_file():
            raise Interrupted(f"interrupted; resume with: python train.py {data_root} "
                              f"--save_dir {out} --resume {state}") from None
        raise
    counts = model.count_parameters(clf)
    print(f"trained {counts['trainable']:,} parameters, {counts['frozen']:,} frozen")
    probs = {split: recipes.split_probs(clf, sets[split], config, device)
             for split in ("valid", "test") if split in sets}
    metrics: dict = {split: train.accuracy(*p) for split, p in probs.items()}
    for split, m in metrics.items():
        print(f"{split}: top-1 {m['top1']:.2%}  top-5 {m['top5']:.2%}  ({m['n']} images)")
    if "valid" in probs:  # the temperature and unsure threshold travel in the checkpoint
        metrics["calibration"] = c = evaluate.calibrate(clf, *probs["valid"])
        print(f"calibrated on valid: temperature {c['temperature']:.2f}, ECE "
              f"{c['ece_before']:.1%} -> {c['ece_after']:.1%}, unsure below "
              f"{c['unsure_below']:.0%}")
    metrics["seconds"] = time.perf_counter() - start
    path = checkpoint.save_checkpoint(clf, out / "checkpoint.pth", config,
                                      {"history": history, **metrics})
    print(f"checkpoint: {path}")
    return path, sets, history, metrics


def cmd_train(args: argparse.Namespace) -> None:
    """Train on DATA_DIR (train/ and valid/, test/ if present) and save DIR/checkpoint.pth."""
    _train(args, Path(args.data_dir), Path(args.save_dir), _device(args.gpu))


def cmd_pipeline(args: argparse.Namespace) -> None:
    """Train on the flowers data, report valid/test accuracy, save, reload, predict, chart."""
    from . import checkpoint, data, download, plots, predict, train

    device = _device(True) if args.gpu else train.get_device()
    root = download.ensure_data(args.data_dir, source=args.source)
    out = Path(args.out)
    path, sets, history, metrics = _train(args, root, out, device)
    plots.save_figure(plots.plot_history(history), out / "history.png")
    reloaded, _ = checkpoint.load_checkpoint(path, device)
    image_path, label = sets.get("test", sets["valid"]).samples[0]
    result = predict.predict(image_path, reloaded, topk=5)
    true_name = reloaded.class_names[label]
    print(f"{image_path} (true: {true_name}):")
    for p, name in zip(result.probs, result.names, strict=True):
        print(f"  {p:7.2%}  {name}")
    fig = plots.plot_prediction(data.open_image(image_path), result, true_name=true_name)
    print(f"top-5 chart: {plots.save_figure(fig, out / 'top5.png')}")
    summary = {"data_dir": str(root), "history": history, **metrics}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"done in {metrics['seconds']:.0f} s; figures in {out / 'metrics.json'}")


def cmd_predict(args: argparse.Namespace) -> None:
    """Print the top-K flower names and probabilities for an image, or each image of a folder."""
    from . import checkpoint, data, images, predict

    if args.top_k < 1:
        raise UserError(f"--top_k must be at least 1, not {args.top_k}")
    target = Path(args.image)
    if target.is_dir():
        paths = sorted(p for p in target.rglob("*") if p.is_file() and images.is_image_file(p))
        if not paths:
            raise UserError(f"{target}: no image files (.jpg, .png, .webp, ...) in this folder")
    else:
        paths = [target]
        images.open_image(target)  # a bad image fails before the model is loaded
    model, _ = checkpoint.load_checkpoint(args.checkpoint, _device(args.gpu))
    if args.category_names:
        names = data.load_category_names(args.category_names)
        model.class_names = data.class_names(model.class_to_idx, names)
    results = []
    for path in paths:
        r = predict.predict(path, model, topk=args.top_k)
        results.append({"image": str(path), "predictions": [
            {"name": n, "class": c, "probability": round(p, 6)}
            for p, c, n in zip(r.probs, r.classes, r.names, strict=True)],
            "unsure": r.is_unsure(model.unsure_below)})
    if args.json:
        print(json.dumps(results if target.is_dir() else results[0], indent=2))
        return
    for item in results:
        if len(results) > 1:
            print(item["image"])
        for rank, pred in enumerate(item["predictions"], 1):
            print(f"{rank}. {pred['name']}  {pred['probability']:.2%}  (class {pred['class']})")
        if item["unsure"]:
            print(f"unsure: top probability {item['predictions'][0]['probability']:.2%} below "
                  f"the threshold {model.unsure_below:.2%}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    """Top-1 and top-5 accuracy of a checkpoint over an ImageFolder."""
    from torch.utils.data import DataLoader

    from . import checkpoint, data, train

    device = _device(args.gpu)
    model, _ = checkpoint.load_checkpoint(args.checkpoint, device)
    dataset = data.image_folder(args.folder, data.eval_transform(model.spec))
    if dataset.class_to_idx != model.class_to_idx:
        raise UserError(f"{args.folder}: its class folders differ from the checkpoint's "
                        f"{len(model.class_to_idx)} classes; evaluate on the same classes")
    loader = DataLoader(dataset, batch_size=64, num_workers=1)
    m = train.evaluate(model, loader, device, progress=sys.stderr.isatty())
    print(f"top-1 {m['top1']:.2%}  top-5 {m['top5']:.2%}  ({m['n']} images)")


def cmd_export(args: argparse.Namespace) -> None:
    """Write the model as ONNX (fp32, or int8 with --int8), .ort, or TorchScript / torch.export."""
    from . import checkpoint, export

    if args.int8 and args.format == "torchscript":
        raise UserError("--int8 applies to --format onnx or ort only")
    if args.int8 and not args.calibration:
        raise UserError("--int8 needs --calibration FOLDER: training images to calibrate on")
    model, _ = checkpoint.load_checkpoint(args.checkpoint)
    suffix = {"onnx": ".onnx", "ort": ".ort", "torchscript": ".pt"}[args.format]
    default = Path(args.checkpoint).with_suffix((".int8" if args.int8 else "") + suffix)
    out = Path(args.output) if args.output else default
    onnx_out = out.with_suffix(".tmp.onnx") if args.format == "ort" else out
    if args.format == "torchscript":
        path = export.export_torch(model, out)
    elif args.int8:
        fp32 = export.export_onnx(model, out.with_suffix(".fp32.tmp.onnx"))
        try:
            path = export.quantize_onnx(model, fp32, onnx_out, args.calibration)
        finally:
            fp32.unlink(missing_ok=True)
    else:
        path = export.export_onnx(model, onnx_out)
    if args.format == "ort":
        try:
            path = export.export_ort(path, out)
        finally:
            onnx_out.unlink(missing_ok=True)
    print(f"{path} ({path.stat().st_size / 1e6:.1f} MB)")


def cmd_app(args: argparse.Namespace) -> None:
    """Build the offline phone app (web page + model) into --out; --serve serves it on loopback."""
    from . import webapp

    try:
        built = webapp.build_app(args.checkpoint, out=args.out, calibration=args.calibration)
        print(f"app in {built['out']}: {len(built['files'])} files, model "
              f"{built['model_mb']:.1f} MB; {built['why']}")
        if args.serve is not None:
            webapp.serve(built["out"], port=args.serve)
    except webapp.AppError as err:
        raise UserError(str(err)) from None


def cmd_cache(args: argparse.Namespace) -> None:
    """Show the size of the activation cache, or clear it."""
    from . import data, features

    if args.clear:
        print(f"cleared {features.clear_cache() / 1e6:.0f} MB from {data.cache_dir()}")
    else:
        print(f"{data.cache_dir()}: {features.cache_size() / 1e6:.0f} MB of cached activations")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `python -m helpers`."""
    parser = argparse.ArgumentParser(prog="python -m helpers", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pipeline", help="the main job: train, evaluate, save, predict one image",
                       description=cmd_pipeline.__doc__)
    p.add_argument("--data_dir", help="data folder (default $FLOWERS_DIR, else ./flowers; "
                                      "downloaded when missing)")
    p.add_argument("--source", default="course", choices=["course", "flowers102"],
                   help="where to download the data from when it is missing")
    p.add_argument("--out", default="build/main", help="output folder (default %(default)s)")
    p.add_argument("--names", help="JSON file of class folder -> name (default cat_to_name.json)")
    _add_train_options(p)
    p.set_defaults(func=cmd_pipeline)

    p = sub.add_parser("train", help="train a classifier and save a checkpoint",
                       description=cmd_train.__doc__)
    p.add_argument("data_dir", help="folder with train/ and valid/ (and test/) class folders")
    p.add_argument("--save_dir", default="checkpoints", help="where checkpoint.pth goes "
                                                             "(default %(default)s)")
    p.add_argument("--names", help="JSON file of class folder -> name (default cat_to_name.json)")
    p.add_argument("--resume", help="continue an interrupted run from its last.pth (the "
                                    "saved settings are used)")
    _add_train_options(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("predict", help="top-K flower names for an image or a folder",
                       description=cmd_predict.__doc__)
    p.add_argument("image", help="an image file, or a folder of them")
    p.add_argument("checkpoint", help="a checkpoint.pth written by train")
    p.add_argument("--top_k", type=int, default=5, help="how many names (default %(default)s)")
    p.add_argument("--category_names", help="JSON file of class -> name (default: the names "
                                            "saved in the checkpoint)")
    p.add_argument("--gpu", action="store_true", help="use the GPU (CUDA or Apple MPS)")
    p.add_argument("--json", action="store_true", help="print JSON: an object for an image, "
                                                       "an array for a folder")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("evaluate", help="top-1/top-5 of a checkpoint over an image folder",
                       description=cmd_evaluate.__doc__)
    p.add_argument("checkpoint")
    p.add_argument("folder", help="an ImageFolder: one folder of images per class")
    p.add_argument("--gpu", action="store_true", help="use the GPU (CUDA or Apple MPS)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("export", help="write the model as ONNX or TorchScript for applications",
                       description=cmd_export.__doc__)
    p.add_argument("checkpoint")
    p.add_argument("--format", choices=["onnx", "ort", "torchscript"], default="onnx",
                   help="onnx (default); ort: ONNX Runtime Mobile for native apps; torchscript")
    p.add_argument("--int8", action="store_true", help="onnx/ort: static int8 quantization")
    p.add_argument("--calibration", help="--int8: a folder of training images to calibrate on")
    p.add_argument("-o", "--output", help="output file (default: beside the checkpoint)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("app", help="build the offline phone app (web page + model); --serve it",
                       description=cmd_app.__doc__)
    p.add_argument("checkpoint", help="a checkpoint.pth written by train")
    p.add_argument("--out", required=True, help="folder to write the app into")
    p.add_argument("--calibration", help="training photos to calibrate the int8 model on "
                                         "(default: the training folder the checkpoint records)")
    p.add_argument("--serve", nargs="?", type=int, const=8000, metavar="PORT",
                   help="then serve it on http://127.0.0.1:PORT (default port %(const)s)")
    p.set_defaults(func=cmd_app)

    p = sub.add_parser("cache", help="size of the activation cache; --clear deletes it",
                       description=cmd_cache.__doc__)
    p.add_argument("--clear", action="store_true", help="delete the cached activations")
    p.set_defaults(func=cmd_cache)
    return parser


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Run a command; a user mistake prints one line on stderr and returns 1."""
    args = build_parser().parse_args(argv)
    warnings.showwarning = lambda message, *_, **__: print(f"warning: {message}",
                                                           file=sys.stderr)
    signal.signal(signal.SIGTERM, _interrupt)  # a polite kill is handled like Ctrl-C
    try:
        args.func(args)
    except USER_ERRORS as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"error: {message}", file=sys.stderr)
        return 130 if isinstance(err, Interrupted) else 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0

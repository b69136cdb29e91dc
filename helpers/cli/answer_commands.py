"""`predict` and `evaluate`: answers from a trained model's prediction engine.

`predict` never imports torch when the engine beside the checkpoint is current: it answers
one photo in well under a second. A missing, damaged or stale engine is rebuilt once from
the checkpoint (that needs torch, and a few seconds).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from helpers.core.errors import ImageError, UserError
from helpers.core.files import file_sha256, not_a_file
from helpers.core.text import shown
from helpers.data.images import is_image_file
from helpers.serve.engine import Engine, open_engine


def load_engine(checkpoint: str, *, gpu: bool = False) -> Engine:
    """The checkpoint's engine: the one beside it if current, else rebuilt from it."""
    path = Path(checkpoint)
    if not path.is_file():
        raise UserError(f"{path}: {not_a_file(path, 'checkpoint')}")
    engine = open_engine(path)
    if engine is None:
        from helpers.model.checkpoint import load_checkpoint
        from helpers.serve.inference import write_engine

        digest = file_sha256(path)
        model, _ = load_checkpoint(path)  # a damaged checkpoint fails here, in one line
        if file_sha256(path) != digest:
            raise UserError(f"{path} was replaced while it was read (is a training run saving "
                            "there?); run the command again when it has finished")
        print(f"preparing the prediction engine of {path} (once)", file=sys.stderr)
        engine = write_engine(model, path, checkpoint_sha256=digest)
    if gpu:
        print("warning: --gpu: predictions run on the CPU with ONNX Runtime (a few ms a "
              "photo)", file=sys.stderr)
    return engine


def list_images(folder: Path) -> list[Path]:
    """Every image file under a folder, sorted, hidden folders left out."""
    found = sorted(p for p in folder.rglob("*") if p.is_file() and is_image_file(p)
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not found:
        raise UserError(f"{folder}: no image files (.jpg, .png, .webp, ...) in this folder")
    return found


def _result(path: Path, scores, engine: Engine, top_k: int) -> dict:
    """One image's JSON result: its top-K, whether unsure, whether known and its novelty
    (null for a model without a known verdict), or the error that stopped it."""
    if isinstance(scores, ImageError):
        return {"image": str(path), "error": str(scores)}
    answers = engine.answer(scores, topk=top_k)
    r = engine.prediction(answers)
    return {"image": str(path), "predictions": [
        {"name": n, "class": c, "probability": round(p, 6)}
        for p, c, n in zip(r.probs, r.classes, r.names, strict=True)],
        "unsure": bool(answers.unsure[0]), "known": r.known,
        "novelty": None if r.novelty is None else round(r.novelty, 4)}


def _print_text(item: dict, engine: Engine, *, many: bool) -> None:
    """One result as text lines (the image's path first when there are several)."""
    if many:
        print(shown(item["image"]))
    if item["known"] is False:
        print(f"not a flower I know (closest: {shown(item['predictions'][0]['name'])}; novelty "
              f"{item['novelty']:.1f} above the threshold {engine.novel_above:.1f})")
    for rank, pred in enumerate(item["predictions"], 1):
        print(f"{rank}. {shown(pred['name'])}  {pred['probability']:.2%}  "
              f"(class {shown(pred['class'])})")
    if item["unsure"]:
        print(f"unsure: top probability {item['predictions'][0]['probability']:.2%} below "
              f"the threshold {engine.unsure_below:.2%}")


def cmd_predict(args: argparse.Namespace) -> None:
    """Print the top-K flower names and probabilities for an image, or each image of a folder."""
    if args.top_k < 1:
        raise UserError(f"--top_k must be at least 1, not {args.top_k}")
    target = Path(args.image)
    many = target.is_dir()
    paths = list_images(target) if many else [target]
    if not many:
        from helpers.data.images import open_image

        open_image(target)  # a bad photo fails in one line before the model is loaded
    engine = load_engine(args.checkpoint, gpu=args.gpu)
    if args.category_names:
        from helpers.data.names import class_names, load_category_names

        mapping = {c: i for i, c in enumerate(engine.class_ids)}
        engine.class_names = class_names(mapping, load_category_names(args.category_names))
    if args.top_k > len(engine.class_ids):
        print(f"warning: --top_k {args.top_k}: the model knows {len(engine.class_ids)} classes; "
              f"showing all {len(engine.class_ids)}", file=sys.stderr)
    failed = 0
    if args.json and many:
        print("[", flush=True)
    for n, (path, scores) in enumerate(engine.run_paths(paths)):
        item = _result(path, scores, engine, args.top_k)
        if "error" in item:
            failed += 1
            print(f"error: {item['error']}", file=sys.stderr, flush=True)
        if args.json:
            text = json.dumps(item, indent=2)
            print(("  " if many else "") + text.replace("\n", "\n  " if many else "\n")
                  + ("," if many and n < len(paths) - 1 else ""), flush=True)
        elif "error" not in item:
            _print_text(item, engine, many=many)
    if args.json and many:
        print("]", flush=True)
    if failed and args.strict:
        raise UserError(f"{failed} of {len(paths)} images could not be read (--strict)")


def cmd_evaluate(args: argparse.Namespace) -> None:
    """Top-1 and top-5 accuracy of a checkpoint over a folder of class folders."""
    from helpers.data.folders import image_folder
    from helpers.train.evaluate import evaluate_model

    engine = load_engine(args.checkpoint, gpu=args.gpu)
    dataset = image_folder(args.folder)
    mapping = {c: i for i, c in enumerate(engine.class_ids)}
    if dataset.class_to_idx != mapping:
        raise UserError(f"{args.folder}: its class folders differ from the checkpoint's "
                        f"{len(mapping)} classes; evaluate on the same classes")
    m = evaluate_model(engine, dataset.samples)
    for _, why in m["bad"]:
        print(f"error: {why}", file=sys.stderr)
    known = ("" if m["not_known"] is None
             else f"  not known {m['not_known']:.2%}")
    print(f"top-1 {m['top1']:.2%}  top-5 {m['top5']:.2%}{known}  ({m['n']} images"
          + (f", {len(m['bad'])} unreadable left out)" if m["bad"] else ")"))
    if m["bad"] and args.strict:
        raise UserError(f"{len(m['bad'])} images could not be read (--strict)")


def add_commands(sub: argparse._SubParsersAction) -> None:
    """The `predict` and `evaluate` commands."""
    p = sub.add_parser("predict", help="top-K flower names for an image or a folder",
                       description=cmd_predict.__doc__)
    p.add_argument("image", help="an image file, or a folder of them")
    p.add_argument("checkpoint", help="a checkpoint.pth written by train")
    p.add_argument("--top_k", type=int, default=5, help="how many names (default %(default)s)")
    p.add_argument("--category_names", help="JSON file of class -> name (default: the names "
                                            "saved in the checkpoint)")
    p.add_argument("--gpu", action="store_true", help="accepted for the course's interface; "
                                                      "predictions run on the CPU")
    p.add_argument("--json", action="store_true", help="print JSON: an object for an image, "
                                                       "an array for a folder")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 when any image of a folder cannot be read (default: name it "
                        "on stderr and in the JSON, report the others, exit 0)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("evaluate", help="top-1/top-5 of a checkpoint over an image folder",
                       description=cmd_evaluate.__doc__)
    p.add_argument("checkpoint")
    p.add_argument("folder", help="one folder of images per class (e.g. the test split)")
    p.add_argument("--gpu", action="store_true", help="accepted; evaluation runs on the CPU")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 when any image cannot be read (default: name it, go on)")
    p.set_defaults(func=cmd_evaluate)

"""`teach`: add a kind the model does not know from a folder of its photos, or forget one."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from helpers.core.errors import UserError
from helpers.core.files import not_a_file


def cmd_teach(args: argparse.Namespace) -> None:
    """Add a class to a trained model from 5-20 photos (or --forget a taught one), in seconds:
    a new checkpoint with its engine, the old one untouched."""
    from helpers.cli.answer_commands import list_images
    from helpers.core.files import atomic_write_bytes, check_writable
    from helpers.data.images import open_image

    source, out = Path(args.checkpoint), Path(args.out)
    if not source.is_file():
        raise UserError(f"{source}: {not_a_file(source, 'checkpoint')}")
    if out.resolve() == source.resolve():
        raise UserError(f"{out}: --out must be a new checkpoint, not the one taught from")
    if (args.photos is None) == (args.forget is None):
        raise UserError("give a folder of photos with --name, or --forget NAME")
    photos: list[Path] = []
    if args.photos is not None:
        if not args.name or not args.name.strip() or any(ord(c) < 32 for c in args.name):
            raise UserError("--name must be the new kind's name (printable, not empty)")
        folder = Path(args.photos)
        if not folder.is_dir():
            raise UserError(f"{folder}: not a folder; give a folder of the new kind's photos")
        photos = list_images(folder)
        for photo in photos:
            open_image(photo)  # a bad photo fails in one line before the model is loaded
    check_writable(out.parent)
    from helpers.config import TrainConfig
    from helpers.model.checkpoint import load_checkpoint
    from helpers.serve.inference import save_model
    from helpers.train.teach import forget, teach

    model, ckpt = load_checkpoint(source)
    if args.forget is not None:
        done = {"forgot": args.forget, "class": forget(model, name=args.forget)}
    else:
        done = teach(model, photos, name=args.name.strip())
    metrics = dict(ckpt.get("metrics") or {})
    metrics["taught"] = [{"class": c, "name": model.class_names[model.class_to_idx[c]]}
                         for c in model.taught]
    metrics["taught_from"] = str(source)
    saved = ckpt.get("config") or {}
    config = TrainConfig.from_dict(saved) if saved else None  # the settings travel with it
    save_model(model, out, config=config, metrics=metrics)
    atomic_write_bytes(json.dumps(metrics, indent=2, default=str).encode(),
                       out.with_name(out.stem + ".metrics.json"))
    if "forgot" in done:
        print(f"forgot {done['forgot']!r} (class {done['class']}); {len(model.class_names)} "
              f"classes in {out}")
    else:
        print(f"taught {done['name']!r} from {done['photos']} photos in "
              f"{done['seconds']:.1f} s; {len(model.class_names)} classes in {out}")


def add_commands(sub: argparse._SubParsersAction) -> None:
    """The `teach` command."""
    p = sub.add_parser("teach", help="add a kind from a folder of its photos (or --forget one)",
                       description=cmd_teach.__doc__)
    p.add_argument("checkpoint", help="a checkpoint.pth written by train (or by teach)")
    p.add_argument("photos", nargs="?", help="a folder of 5-20 photos of the new kind")
    p.add_argument("--name", help="the new kind's name, as answers will say it")
    p.add_argument("--forget", metavar="NAME", help="remove this taught kind instead")
    p.add_argument("--out", required=True, help="the new checkpoint (its engine beside it)")
    p.set_defaults(func=cmd_teach)

"""`export` and `cache`: files made from a trained model, and the caches behind the recipes."""

from __future__ import annotations

import argparse
from pathlib import Path

from helpers.core.errors import UserError


def cmd_export(args: argparse.Namespace) -> None:
    """Write the model as ONNX (fp32, or int8 with --int8), .ort, or TorchScript / torch.export."""
    from helpers.model import checkpoint
    from helpers.serve import export

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
            path = export.quantize_onnx(model, fp32, out=onnx_out, calibration=args.calibration)
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
    from helpers.serve import webapp

    # The port is taken before the build: a bad or busy one fails in a second, not after it.
    server = (webapp.make_server(args.out, port=args.serve, built=False)
              if args.serve is not None else None)
    try:
        built = webapp.build_app(args.checkpoint, out=args.out,
                                 precision="int8" if args.int8 else "fp32",
                                 calibration=args.calibration)
        print(f"app in {built['out']}: {len(built['files'])} files, model "
              f"{built['model_mb']:.1f} MB; {built['why']}")
        if server is not None:
            webapp.run_server(server)
    finally:
        if server is not None:
            server.server_close()


def port_number(text: str) -> int:
    """An argparse type: a TCP port from 1 to 65535."""
    try:
        port = int(text)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port: give one from 1 to 65535")
    return port


def cmd_cache(args: argparse.Namespace) -> None:
    """Show the size of the caches (activations, ONNX trunks, engines), or clear them."""
    from helpers.core.files import cache_dir
    from helpers.train.cache import cache_size, clear_cache

    if args.clear:
        print(f"cleared {clear_cache() / 1e6:.0f} MB from {cache_dir()}")
    else:
        print(f"{cache_dir()}: {cache_size() / 1e6:.0f} MB of cached activations, ONNX trunks "
              "and prediction engines")


def add_commands(sub: argparse._SubParsersAction) -> None:
    """The `export` and `cache` commands."""
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
    p.add_argument("--int8", action="store_true",
                   help="a static int8 model (3 times smaller, no faster in the browser) "
                        "instead of fp32")
    p.add_argument("--calibration", help="--int8: training photos to calibrate on "
                                         "(default: the training folder the checkpoint records)")
    p.add_argument("--serve", nargs="?", type=port_number, const=8000, metavar="PORT",
                   help="then serve it on http://127.0.0.1:PORT (default port %(const)s)")
    p.set_defaults(func=cmd_app)

    p = sub.add_parser("cache", help="size of the caches; --clear deletes them",
                       description=cmd_cache.__doc__)
    p.add_argument("--clear", action="store_true",
                   help="delete every cached artefact (activations, ONNX trunks, engines)")
    p.set_defaults(func=cmd_cache)

"""`train` and `pipeline`: train on a folder of photos, calibrate, report, save."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from helpers.config import TUNED, TrainConfig
from helpers.core.distributed import Distributed, relaunch
from helpers.core.errors import FolderError, Interrupted, RunStopped, UserError
from helpers.core.files import atomic_write_bytes
from helpers.core.text import shown
from helpers.model.backbones import BACKBONES

if TYPE_CHECKING:
    import torch

    from helpers.train.run import Result

DEFAULTS = TrainConfig()
COURSE = TrainConfig.course()
FULL = TrainConfig.full()


def add_train_options(p: argparse.ArgumentParser) -> None:
    """The options that fill a TrainConfig; only those typed are applied (see config.settle)."""
    def option(name: str, **kwargs) -> None:
        p.add_argument(f"--{name}", default=argparse.SUPPRESS, **kwargs)

    option("arch", choices=list(BACKBONES),
           help=f"pretrained backbone (default {DEFAULTS.arch}: offline weights)")
    option("recipe", choices=["auto", "cached", "full", "course"],
           help="auto (default): on a CPU fine-tune the last stage on cached activations, on "
                "a GPU the whole network (full, whose own defaults are "
                f"{FULL.epochs} epochs of {FULL.batch_size}, backbone lr {FULL.backbone_lr}); "
                "course: the course's recipe (frozen backbone, "
                "every augmented image through it every epoch), whose own defaults are "
                f"{COURSE.epochs} epochs, {COURSE.hidden_units} hidden units, Adam "
                f"{COURSE.learning_rate}")
    option("learning_rate", type=float,
           help=f"learning rate of the head (default {DEFAULTS.learning_rate}; the backbone's "
                f"fine-tuned layers use --backbone_lr)")
    option("backbone_lr", type=float,
           help=f"learning rate of the fine-tuned backbone layers (default {DEFAULTS.backbone_lr})")
    option("hidden_units", type=int,
           help=f"hidden units of the head (default {DEFAULTS.hidden_units}: a linear head; "
                "the course used 512)")
    option("dropout", type=float,
           help=f"dropout before the head's last layer, in [0, 1) (default {DEFAULTS.dropout})")
    option("epochs", type=int,
           help=f"epochs of training, each a pass over every training image once (in the "
                f"cached recipe in one of its views, after a linear probe of "
                f"{DEFAULTS.probe_epochs} passes of the head alone) (default {DEFAULTS.epochs}; "
                "more with few images a class: see --views)")
    option("views", type=int,
           help=f"augmented views of each training image in the cached recipe, besides the "
                f"centre (default: {TUNED[1][1]} views and {TUNED[1][2]} epochs with "
                f"{TUNED[1][0]} or more images a class, up to {TUNED[0][1]} views and "
                f"{TUNED[0][2]} epochs with {TUNED[0][0]} or fewer)")
    option("batch_size", type=int,
           help=f"samples per step and process (default {DEFAULTS.batch_size}); under "
                "torchrun with N processes a step takes N x that, and learning rates are not "
                "scaled: N processes of batch b train as one process of batch N x b")
    option("augmentation", choices=["crop", "camera", "mixed"],
           help=f"training augmentation (default {DEFAULTS.augmentation}): crop is random "
                "crops, flips and small rotations; camera adds the shifts of phone photos "
                "(zoomed out, tilted, blur, shake, low resolution, JPEG, noise, light, "
                "colour); mixed is half one, half the other (by view in the cached recipe)")
    option("seed", type=int,
           help=f"random seed of weights, views and order (default {DEFAULTS.seed})")
    p.add_argument("--fp32", action="store_true",
                   help="plain fp32, default memory format (default: bf16/fp16 autocast and "
                        "channels_last where the hardware has them)")
    p.add_argument("--no_augment", dest="augment", action="store_false",
                   default=argparse.SUPPRESS,
                   help="train on the evaluation transform (no random crops, flips or views)")
    p.add_argument("--compile", action="store_true", default=argparse.SUPPRESS,
                   help="torch.compile the trained network (minutes to compile; pays on long "
                        "GPU runs)")
    p.add_argument("--gpu", action="store_true",
                   help="use the GPU (CUDA or Apple MPS); under torchrun each process uses "
                        "the GPU of its LOCAL_RANK")
    p.add_argument("--names", "--category_names", dest="names",
                   help="JSON file of class folder -> name (default: DATA/cat_to_name.json, "
                        "else the flower names for the 102 flower folders, else the folder "
                        "names)")
    p.add_argument("--valid_fraction", type=float, default=0.2,
                   help="share of each class held out for validation when there is no "
                        "valid/ folder (default %(default)s)")
    p.add_argument("--test_fraction", type=float, default=0.2,
                   help="share of each class held out for testing when there is no test/ "
                        "folder (default %(default)s)")
    p.add_argument("--fixes", help="a fixes file (JSON: photos to leave out or relabel, paths "
                   "relative to the data folder), as `python -m helpers doctor` and the notebook "
                   "write it; the data folder itself is never changed")
    p.add_argument("--final", action="store_true",
                   help="after choosing epochs, temperature and threshold on valid, train a "
                        "final model on train+valid with those choices and save it")


def typed_options(args: argparse.Namespace) -> dict[str, Any]:
    """The settings the user typed (TrainConfig fields); config.settle fills in the rest."""
    typed = {name: getattr(args, name) for name in TrainConfig.__dataclass_fields__
             if hasattr(args, name)}
    if args.fp32:
        typed["fast"] = False
    return typed


def check_resume_options(args: argparse.Namespace) -> None:
    """Refuse, before any work, settings typed with --resume: a resumed run is the saved run,
    continued bit for bit (its schedule was planned for its own epochs)."""
    if not getattr(args, "resume", None):
        return
    typed = [f"--{name}" for name in TrainConfig.__dataclass_fields__ if hasattr(args, name)]
    typed += ["--fp32"] if args.fp32 else []
    typed += ["--no_augment"] if hasattr(args, "augment") else []
    if typed:
        raise UserError(f"--resume continues the run with its saved settings; {', '.join(typed)} "
                        "cannot change them: drop them, or start a new run without --resume")


def device_for(gpu: bool) -> torch.device:
    """The GPU when --gpu (an error if there is none), else the CPU."""
    import torch

    from helpers.core.device import get_device

    if not gpu:
        return torch.device("cpu")
    device = get_device()
    if device.type == "cpu":
        raise UserError("--gpu given but no CUDA or MPS GPU is available; run without --gpu")
    return device


@contextlib.contextmanager
def distributed(gpu: bool) -> Iterator[tuple[Distributed, torch.device]]:
    """This process's place and device; under torchrun (WORLD_SIZE > 1) in the process group
    for the block, with only rank 0's lines printed (errors are printed by every rank)."""
    dist = Distributed.from_environment()
    device = dist.place(device_for(gpu))
    with dist.joined(device), contextlib.ExitStack() as quiet:
        if not dist.is_main:
            nowhere = quiet.enter_context(open(os.devnull, "w"))  # noqa: SIM115
            quiet.enter_context(contextlib.redirect_stdout(nowhere))
            quiet.enter_context(warnings.catch_warnings(action="ignore"))
        yield dist, device


def train_command(args: argparse.Namespace, *, data_root: Path, out: Path, device: torch.device,
                  again: str, flag: str, dist: Distributed | None = None) -> Result | None:
    """run.set_up and run.run with the options typed, its figures printed; None on ranks
    other than 0.

    `again` is the command line that starts this run again and `flag` the option naming
    `out`: a stopped run says how to resume it, a refused folder which option chooses another.
    """
    from helpers.train.run import hold, run, set_up

    check_resume_options(args)
    try:
        with hold(out, dist=dist) as folder:  # first: a refused run reads no photo
            setup = set_up(data_root, typed=typed_options(args), device_type=device.type,
                           resume=getattr(args, "resume", None), names_file=args.names,
                           fixes=args.fixes, valid_fraction=args.valid_fraction,
                           test_fraction=args.test_fraction)
            done = run(setup, device=device, out=folder, final=args.final, dist=dist)
    except FolderError as err:
        raise UserError(f"{err} ({flag})") from None
    except RunStopped as err:
        raise Interrupted(_how_to_resume(err, again=again + _data_options(args))) from None
    if done is not None:
        print_figures(done)
    return done


def _data_options(args: argparse.Namespace) -> str:
    """The options that decide the data: a resumed run needs them again."""
    return "".join(f" --{name} {getattr(args, name)}" for name, default in (
        ("fixes", None), ("names", None), ("valid_fraction", 0.2), ("test_fraction", 0.2))
        if getattr(args, name) != default)


def _how_to_resume(err: RunStopped, *, again: str) -> str:
    """A stopped run's line, ending with the command that resumes it."""
    if err.state is None:
        return str(err)
    if err.final:
        return (f"{err}; train the final model again with: {again} --resume {err.state} "
                "--final")
    return f"{err}; resume with: {again} --resume {err.state}"


def print_figures(done: Result) -> None:
    """The figures of a run: valid and test, calibration, the final model's test, the path."""
    first = done.metrics.get("first_run", done.figures)
    for split in ("valid", "test"):
        if split in first:
            m = first[split]
            print(f"{split}: top-1 {m['top1']:.2%}  top-5 {m['top5']:.2%}  ({m['n']} images)")
    c = done.figures.get("calibration") or {}
    if c.get("skipped"):
        print(f"not calibrated ({c['skipped']}): temperature 1, never unsure")
    elif c:
        print(f"calibrated on valid: temperature {c['temperature']:.2f}, ECE "
              f"{c['ece_before']:.1%} -> {c['ece_after']:.1%}, unsure below "
              f"{c['unsure_below']:.0%}")
    final = done.metrics.get("final", {}).get("test")
    if final:
        print(f"final test: top-1 {final['top1']:.2%}  top-5 {final['top5']:.2%}  "
              f"({final['n']} images); ECE with the first run's temperature {final['ece']:.1%}")
    if done.checkpoint is not None:
        print(f"checkpoint: {done.checkpoint}")


def cmd_train(args: argparse.Namespace) -> None:
    """Train on DATA_DIR (train/ and valid/, test/ if present) and save DIR/checkpoint.pth.

    Under torchrun (`torchrun --nproc_per_node=N train.py DATA ...`) N processes train the
    full or course recipe with DistributedDataParallel; see docs/gpu.md.
    """
    with distributed(args.gpu) as (dist, device):
        train_command(args, data_root=Path(args.data_dir), out=Path(args.save_dir),
                      device=device, dist=dist, flag="--save_dir",
                      again=relaunch(f"python train.py {args.data_dir} "
                                     f"--save_dir {args.save_dir}"))


def cmd_pipeline(args: argparse.Namespace) -> None:
    """Train on the flowers data, report valid/test accuracy, save, reload, predict, chart."""
    from helpers.core.device import get_device
    from helpers.data import download
    from helpers.data.images import open_image
    from helpers.insight import plots
    from helpers.serve import prediction

    if Distributed.from_environment().world_size > 1:
        raise UserError("pipeline runs on one process; under torchrun run train.py DATA_DIR")
    device = device_for(True) if args.gpu else get_device()
    root = download.ensure_data(args.data_dir, source=args.source)
    out = Path(args.out)
    done = train_command(args, data_root=root, out=out, device=device, flag="--out",
                         again=f"python -m helpers pipeline --data_dir {root} --out {out}")
    plots.save_figure(plots.plot_history(done.history), out / "history.png")
    sets = done.data.sets
    image_path, label = sets.get("test", sets["valid"]).samples[0]
    result = prediction.predict(image_path, done.model, topk=5)
    true_name = done.model.class_names[label]
    print(f"{shown(str(image_path))} (true: {shown(true_name)}):")
    for p, name in zip(result.probs, result.names, strict=True):
        print(f"  {p:7.2%}  {shown(name)}")
    fig = plots.plot_prediction(open_image(image_path), result, true_name=true_name)
    print(f"top-5 chart: {plots.save_figure(fig, out / 'top5.png')}")
    summary = {"data_dir": str(root), **done.metrics}
    atomic_write_bytes(json.dumps(summary, indent=2, default=str).encode(), out / "metrics.json")
    print(f"done in {done.timings['total']:.0f} s; figures in {out / 'metrics.json'}")


def add_commands(sub: argparse._SubParsersAction) -> None:
    """The `pipeline` and `train` commands."""
    p = sub.add_parser("pipeline", help="the main job: train, evaluate, save, predict one image",
                       description=cmd_pipeline.__doc__)
    p.add_argument("--data_dir", help="data folder (default $FLOWERS_DIR, else ./flowers; "
                                      "downloaded when missing)")
    p.add_argument("--source", default="course", choices=["course", "flowers102"],
                   help="where to download the data from when it is missing")
    p.add_argument("--out", default="build/main", help="output folder (default %(default)s)")
    p.add_argument("--resume", help="continue an interrupted run from its last.pth (the "
                                    "saved settings are used)")
    add_train_options(p)
    p.set_defaults(func=cmd_pipeline)

    p = sub.add_parser("train", help="train a classifier and save a checkpoint",
                       description=cmd_train.__doc__)
    p.add_argument("data_dir", help="folder with train/ and valid/ (and test/) class folders")
    p.add_argument("--save_dir", default="checkpoints", help="where checkpoint.pth goes "
                                                             "(default %(default)s)")
    p.add_argument("--resume", help="continue an interrupted run from its last.pth (the "
                                    "saved settings are used)")
    add_train_options(p)
    p.set_defaults(func=cmd_train)

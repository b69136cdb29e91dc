"""`train` and `pipeline`: train on a folder of photos, calibrate, report, save."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import tempfile
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from ..backbones import BACKBONES
from ..config import TUNED, TrainConfig, recipe_for
from ..distributed import Distributed
from ..runtime import StopFlag, Stopped, UserError, atomic_write_bytes
from . import Interrupted

if TYPE_CHECKING:
    import torch

DEFAULTS = TrainConfig()
COURSE = TrainConfig.course()
FULL = TrainConfig.full()


def add_train_options(p: argparse.ArgumentParser) -> None:
    """The options that fill a TrainConfig; only those typed are applied (see config_from)."""
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
           help=f"epochs over all views of the training images, after a linear probe "
                f"(default {DEFAULTS.epochs}; more with few images a class: see --views)")
    option("views", type=int,
           help=f"augmented views of each training image in the cached recipe, besides the "
                f"centre (default: {TUNED[1][1]} views and {TUNED[1][2]} epochs with "
                f"{TUNED[1][0]} or more images a class, up to {TUNED[0][1]} views and "
                f"{TUNED[0][2]} epochs with {TUNED[0][0]} or fewer)")
    option("batch_size", type=int,
           help=f"samples per step and process (default {DEFAULTS.batch_size}); under "
                "torchrun with N processes a step takes N x that, and learning rates are not "
                "scaled: N processes of batch b train as one process of batch N x b")
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
    p.add_argument("--final", action="store_true",
                   help="after choosing epochs, temperature and threshold on valid, train a "
                        "final model on train+valid with those choices and save it")


def config_from(args: argparse.Namespace, *, device_type: str = "cpu") -> TrainConfig:
    """A TrainConfig of the recipe's defaults and every option the user typed (those win)."""
    typed = {name: getattr(args, name) for name in TrainConfig.__dataclass_fields__
             if hasattr(args, name)}
    if args.fp32:
        typed["fast"] = False
    recipe = recipe_for(typed.get("recipe", "auto"), device_type)
    base = {"course": TrainConfig.course, "full": TrainConfig.full}.get(recipe, TrainConfig)
    return base(**typed)


def _for_data(config: TrainConfig, sets: dict, args: argparse.Namespace, *,
              device) -> TrainConfig:
    """The settings that follow the data, the options typed kept; one line says what changed."""
    from ..recipes import for_data, images_per_class

    typed = {name for name in TrainConfig.__dataclass_fields__ if hasattr(args, name)}
    adapted = for_data(config, sets, device, keep=typed)
    changed = [f"{name} {getattr(adapted, name)}" for name in TrainConfig.__dataclass_fields__
               if getattr(adapted, name) != getattr(config, name)]
    if changed:
        print(f"{images_per_class(sets):.0f} training images a class: {', '.join(changed)} "
              "(type an option to choose it yourself)")
    return adapted


def check_config(config: TrainConfig) -> None:
    """Refuse impossible settings before any work starts, one line each."""
    def positive(name: str, value: float) -> None:
        if not (math.isfinite(value) and value > 0):
            raise UserError(f"--{name} must be a finite number above 0, not {value}")

    positive("learning_rate", config.learning_rate)
    positive("backbone_lr", config.backbone_lr)
    if config.batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, not {config.batch_size}")
    if config.epochs < 1:
        raise UserError(f"--epochs must be at least 1, not {config.epochs}")
    if not 0 <= config.views <= 32:
        raise UserError(f"--views must be between 0 and 32, not {config.views}")
    if not 0.0 <= config.dropout < 1.0:
        raise UserError(f"--dropout must be in [0, 1), not {config.dropout}")
    if config.hidden_units < 0:
        raise UserError(f"--hidden_units must be 0 (a linear head) or more, "
                        f"not {config.hidden_units}")


def check_writable(folder: Path, option: str) -> None:
    """Refuse an output folder that cannot be written, before any work starts."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:  # a real write: permissions alone do not tell (root, read-only mounts, /proc)
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as err:
        raise UserError(f"{folder}: cannot write there ({probe}: {err.strerror or err}); "
                        f"choose another {option}") from None


def device_for(gpu: bool) -> torch.device:
    """The GPU when --gpu (an error if there is none), else the CPU."""
    import torch

    from ..runtime import get_device

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


def train_command(args: argparse.Namespace, *, data_root: Path, out: Path, device,
                  again: str, dist: Distributed | None = None) -> dict | None:
    """Load the data, train, calibrate on valid, report valid/test, save the checkpoint.

    `again` is the command line that resumes this run (shown when it is interrupted). With
    --final a second model trains on train+valid with the first run's choices and is saved.
    Under torchrun (`dist`) every rank trains; rank 0 alone reports and saves, and the others
    return None.
    """
    dist = dist or Distributed()
    option = "--save_dir" if "train" in again else "--out"
    check_resume_options(args)
    config = config_from(args, device_type=device.type)
    check_config(config)
    with saving_into(out, option=option, dist=dist):
        return _train(args, config, data_root=data_root, out=out, device=device, again=again,
                      dist=dist)


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


@contextlib.contextmanager
def saving_into(out: Path, *, option: str, dist: Distributed) -> Iterator[None]:
    """The block holds the save folder (storage.folder_lock, taken by rank 0): a second run
    into it fails at once in one line, on every rank."""
    from ..storage import folder_lock

    check_writable(out, option)
    with contextlib.ExitStack() as held:
        refused = ""
        if dist.is_main:
            try:
                held.enter_context(folder_lock(out, option=option))
            except UserError as err:
                refused = str(err)
        refused = dist.share(refused)
        if refused:
            raise UserError(refused)
        yield


def _train(args: argparse.Namespace, config: TrainConfig, *, data_root: Path, out: Path, device,
           again: str, dist: Distributed) -> dict | None:
    """train_command's work, in the held save folder."""
    from .. import checkpoint, model, recipes, splits

    start = time.perf_counter()
    found = splits.load_data(data_root, model.get_backbone(config.arch),
                             valid_fraction=args.valid_fraction,
                             test_fraction=args.test_fraction, names_file=args.names)
    for line in found.messages:
        print(line)
    sets = found.sets
    config = _for_data(config, sets, args, device=device)
    identity = {"class_to_idx": found.class_to_idx, "data_digest": found.digest(),
                "held_out": found.held_out}
    resume = None
    if getattr(args, "resume", None):
        resume = checkpoint.read_resume(args.resume, identity=identity)
        config = TrainConfig.from_dict(resume["identity"]["config"])
    if "valid" not in sets:
        raise UserError(f"{data_root}: no valid/ folder and --valid_fraction 0; training "
                        "needs validation images to choose the epoch and calibrate")
    clf = recipes.new_model(sets, config, names=found.names)
    recipe = recipes.resolve_recipe(config, device)
    print(f"model {config.arch} on {device}, recipe {recipe}")
    if dist.world_size > 1 and recipe == "cached":
        print(f"distributed: the cached recipe runs on one process; rank 0 trains, the other "
              f"{dist.world_size - 1} process(es) leave now (use --recipe full or course to "
              "train on every process)")
        if not dist.is_main:
            return None
        dist = Distributed()
    elif dist.world_size > 1:
        print(f"distributed: world size {dist.world_size}, backend {dist.backend}; a step "
              f"takes {dist.world_size} x {config.batch_size} = "
              f"{dist.world_size * config.batch_size} images, learning rates as given")
    run_id = resume["identity"]["run_id"] if resume else dist.share(uuid.uuid4().hex)
    state = out / "last.pth"
    trained = _run(clf, sets, config, device, state=state, resume=resume, again=again,
                   identity=identity | {"run_id": run_id}, dist=dist)
    metrics = _report(clf, sets, trained) if dist.is_main else {}
    metrics |= {"data_dir": str(found.root), "held_out": found.held_out,
                "timings": trained.timings}
    if args.final:
        clf, metrics = _final(clf, found, config, device, out=out, first=metrics,
                              history=trained.history, dist=dist,
                              again=f"{again} --resume {state} --final")
    if not dist.is_main:
        return None
    metrics["seconds"] = time.perf_counter() - start
    from ..inference import save_model

    path = save_model(clf, out / "checkpoint.pth", config=config,
                      metrics={"history": trained.history, **metrics})
    print(f"checkpoint: {path}")
    return {"path": path, "sets": sets, "history": trained.history, "metrics": metrics,
            "model": clf}


def _run(clf, sets: dict, config: TrainConfig, device, *, state: Path | None, resume: dict | None,
         again: str, identity: dict, dist: Distributed):
    """recipes.run_recipe under a stop flag: Ctrl-C or SIGTERM saves and says how to resume."""
    from .. import checkpoint, recipes

    stop = StopFlag()
    try:
        with stop.watch():
            return recipes.run_recipe(clf, sets, config, device, state_path=state,
                                      resume=resume, stop=stop, identity=identity, dist=dist)
    except Stopped as err:
        if state is not None and checkpoint.resume_belongs(state, identity["run_id"]):
            raise Interrupted(f"{err}; resume with: {again} --resume {state}") from None
        if state is None and again:  # a run without a state of its own: `again` says what to do
            raise Interrupted(f"{err}; {again}") from None
        raise Interrupted(f"{err}, before the first save; nothing to resume") from None


def _report(clf, sets: dict, trained) -> dict:
    """Valid and test figures through the model's engine, and its calibration, printed."""
    from ..evaluate import evaluate_model

    metrics: dict = {"calibration": trained.calibration}
    for split in ("valid", "test"):
        if split in sets:
            metrics[split] = m = evaluate_model(clf, sets[split].samples)
            print(f"{split}: top-1 {m['top1']:.2%}  top-5 {m['top5']:.2%}  ({m['n']} images)")
    c = trained.calibration
    if c and c.get("skipped"):
        print(f"not calibrated ({c['skipped']}): temperature 1, never unsure")
    elif c:
        print(f"calibrated on valid: temperature {c['temperature']:.2f}, ECE "
              f"{c['ece_before']:.1%} -> {c['ece_after']:.1%}, unsure below "
              f"{c['unsure_below']:.0%}")
    return metrics


def _final(first_model, found, config: TrainConfig, device, *, out: Path, first: dict,
           history: list[dict], dist: Distributed, again: str) -> tuple:
    """A final model trained on train+valid with the first run's choices (epochs, temperature,
    unsure threshold); its test figures checked, and which run gave which figure recorded.

    `again` resumes it: the first run's finished state, then the final model from its start.
    """
    from .. import recipes
    from ..evaluate import expected_calibration_error, topk_accuracy
    from ..inference import logits_of

    final_config = recipes.final_config(config, history)
    sets = recipes.all_labelled(found.sets)
    print(f"final model: train+valid ({len(sets['train'])} images), {final_config.epochs} epoch(s) "
          "as chosen on valid; temperature and threshold from the first run")
    final = recipes.new_model(sets, final_config, names=list(first_model.class_names))
    _run(final, sets, final_config, device, state=None, resume=None, dist=dist,
         again=f"the first run is saved; train the final model again with: {again}",
         identity={"run_id": uuid.uuid4().hex, "final": True})
    final.temperature, final.unsure_below = first_model.temperature, first_model.unsure_below
    metrics = {"first_run": {k: first[k] for k in ("valid", "test", "calibration") if k in first},
               "final": {"trained_on": "train+valid", "epochs": final_config.epochs,
                         "temperature_from": "first run (fitted on valid for the first model)"}}
    metrics |= {k: v for k, v in first.items() if k not in ("valid", "test", "calibration")}
    if "test" in found.sets and dist.is_main:
        from ..engine import softmax

        logits, labels, bad = logits_of(final, found.sets["test"].samples)  # one pass
        probs = softmax(logits, temperature=final.temperature)
        m = topk_accuracy(probs, labels) | {"bad": bad,
                                            "ece": expected_calibration_error(probs, labels)}
        metrics["final"]["test"] = metrics["test"] = m
        print(f"final test: top-1 {m['top1']:.2%}  top-5 {m['top5']:.2%}  ({m['n']} images); "
              f"ECE with the first run's temperature {m['ece']:.1%}")
    return final, metrics


def cmd_train(args: argparse.Namespace) -> None:
    """Train on DATA_DIR (train/ and valid/, test/ if present) and save DIR/checkpoint.pth.

    Under torchrun (`torchrun --nproc_per_node=N train.py DATA ...`) N processes train the
    full or course recipe with DistributedDataParallel; see docs/gpu.md.
    """
    with distributed(args.gpu) as (dist, device):
        train_command(args, data_root=Path(args.data_dir), out=Path(args.save_dir),
                      device=device, dist=dist,
                      again=f"python train.py {args.data_dir} --save_dir {args.save_dir}")


def cmd_pipeline(args: argparse.Namespace) -> None:
    """Train on the flowers data, report valid/test accuracy, save, reload, predict, chart."""
    from .. import download, plots, predict
    from ..images import open_image
    from ..runtime import get_device

    if Distributed.from_environment().world_size > 1:
        raise UserError("pipeline runs on one process; under torchrun run train.py DATA_DIR")
    device = device_for(True) if args.gpu else get_device()
    root = download.ensure_data(args.data_dir, source=args.source)
    out = Path(args.out)
    done = train_command(args, data_root=root, out=out, device=device,
                         again=f"python -m helpers pipeline --data_dir {root} --out {out}")
    plots.save_figure(plots.plot_history(done["history"]), out / "history.png")
    sets = done["sets"]
    image_path, label = sets.get("test", sets["valid"]).samples[0]
    result = predict.predict(image_path, done["model"], topk=5)
    true_name = done["model"].class_names[label]
    print(f"{image_path} (true: {true_name}):")
    for p, name in zip(result.probs, result.names, strict=True):
        print(f"  {p:7.2%}  {name}")
    fig = plots.plot_prediction(open_image(image_path), result, true_name=true_name)
    print(f"top-5 chart: {plots.save_figure(fig, out / 'top5.png')}")
    summary = {"data_dir": str(root), "history": done["history"], **done["metrics"]}
    atomic_write_bytes(json.dumps(summary, indent=2, default=str).encode(), out / "metrics.json")
    print(f"done in {done['metrics']['seconds']:.0f} s; figures in {out / 'metrics.json'}")


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

"""A whole run, from a folder of photos to a saved model, in one function.

`run` loads the data, settles the settings (config.settle), builds the classifier, trains
it by its recipe (calibrated on valid), measures valid and test through the engine, trains
a final model on train+valid when asked, and saves the checkpoint with its engine. The
command lines, the benchmarks and tune.py call it; the notebook calls the same steps one by
one. It logs progress through `log`; the caller prints the figures of the `Result`.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from helpers.config import TrainConfig, settle
from helpers.core.device import StopFlag
from helpers.core.distributed import Distributed
from helpers.core.errors import Interrupted, Stopped, UserError
from helpers.core.files import check_writable, folder_lock
from helpers.data import folders as data
from helpers.data import splits
from helpers.data.fixes import Fixes, read_fixes
from helpers.model import checkpoint
from helpers.model import classifier as model
from helpers.serve.inference import save_model
from helpers.train import evaluate, recipes


@dataclass
class Result:
    """What a run gives: the model, its settings and data, figures per split, timings, paths."""

    model: model.Classifier
    config: TrainConfig
    data: splits.DataSplits
    history: list[dict[str, Any]]
    figures: dict[str, dict[str, Any]]  # "valid", "test" of the saved model; "calibration"
    timings: dict[str, float]  # seconds a phase, and "total"
    checkpoint: Path | None = None  # None when nothing was saved (no `out`)
    metrics: dict[str, Any] = field(default_factory=dict)  # as saved in the checkpoint


def run(folder: str | os.PathLike, *, typed: Mapping[str, Any] | None = None,
        device: torch.device | None = None, out: str | os.PathLike | None = None,
        resume: str | os.PathLike | None = None, final: bool = False,
        names_file: str | os.PathLike | None = None, fixes: str | os.PathLike | None = None,
        valid_fraction: float = splits.VALID_FRACTION,
        test_fraction: float = splits.TEST_FRACTION, again: str = "",
        option: str = "--save_dir", dist: Distributed | None = None,
        log: Callable[[str], None] | None = print) -> Result | None:
    """Train on a folder of photos with the settings typed (the rest settled) and save into
    `out`; None on the ranks other than 0 under torchrun.

    `again` is the command that resumes the run (said when it is stopped); `option` names
    `out` in messages. A second run into the same `out` is refused at once.
    """
    typed = dict(typed or {})
    device = device or torch.device("cpu")
    dist = dist or Distributed()
    settle(typed, device_type=device.type)  # impossible settings fail before any work
    read = read_fixes(fixes) if fixes else None  # a bad fixes file too
    with _holding(out, option=option, dist=dist):
        return _run(Path(folder), typed=typed, device=device, out=out and Path(out),
                    resume=resume, final=final, names_file=names_file, fixes=read, again=again,
                    fractions=(valid_fraction, test_fraction), dist=dist, log=log or _quiet)


def _quiet(line: str) -> None:
    """A log that keeps every line to itself."""


@contextlib.contextmanager
def _holding(out: str | os.PathLike | None, *, option: str, dist: Distributed) -> Iterator[None]:
    """The block holds the save folder (storage.folder_lock, taken by rank 0): a second run
    into it fails at once in one line, on every rank."""
    if out is None:
        yield
        return
    check_writable(Path(out), option)
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


def _run(root: Path, *, typed: dict[str, Any], device: torch.device, out: Path | None,
         resume: str | os.PathLike | None, final: bool, names_file, fixes: Fixes | None,
         again: str, fractions: tuple[float, float], dist: Distributed,
         log: Callable[[str], None]) -> Result | None:
    """run's work, in the held save folder."""
    start = time.perf_counter()
    # A resumed run is the saved run: its backbone decides how the images are prepared.
    state = checkpoint.read_resume(resume) if resume else None
    saved = (state.get("identity", {}).get("config") or {}) if state else typed
    found = splits.load_data(root, model.get_backbone(saved.get("arch", TrainConfig.arch)).preprocess,
                             valid_fraction=fractions[0], test_fraction=fractions[1],
                             names_file=names_file, fixes=fixes)
    for line in found.messages:
        log(line)
    sets, per_class = found.sets, data.images_per_class(found.sets)
    before = settle(typed, device_type=device.type)
    config = settle(typed, device_type=device.type, images_per_class=per_class)
    changed = [f"{k} {getattr(config, k)}" for k in TrainConfig.__dataclass_fields__
               if getattr(config, k) != getattr(before, k)]
    if changed and not resume:
        log(f"{per_class:.0f} training images a class: {', '.join(changed)} (type an option "
            "to choose it yourself)")
    identity = {"class_to_idx": found.class_to_idx, "data_digest": found.digest(),
                "held_out": found.held_out}
    if state is not None:
        checkpoint.check_belongs(state, identity=identity, path=resume)
        config = TrainConfig.from_dict(state["identity"]["config"])
    if "valid" not in sets:
        raise UserError(f"{root}: no valid/ folder and --valid_fraction 0; training needs "
                        "validation images to choose the epoch and calibrate")
    clf = model.new_model(sets, config, names=found.names)
    recipe = recipes.resolve_recipe(config, device)
    log(f"model {config.arch} on {device}, recipe {recipe}")
    if dist.world_size > 1 and recipe == "cached":
        log(f"distributed: the cached recipe runs on one process; rank 0 trains, the other "
            f"{dist.world_size - 1} process(es) leave now (use --recipe full or course to "
            "train on every process)")
        if not dist.is_main:
            return None
        dist = Distributed()
    elif dist.world_size > 1:
        log(f"distributed: world size {dist.world_size}, backend {dist.backend}; a step takes "
            f"{dist.world_size} x {config.batch_size} = {dist.world_size * config.batch_size} "
            "images, learning rates as given")
    run_id = state["identity"]["run_id"] if state else dist.share(uuid.uuid4().hex)
    state_path = out / "last.pth" if out is not None else None
    trained = _stoppable(clf, sets, config, device, state=state_path, resume=state, again=again,
                         identity=identity | {"run_id": run_id}, dist=dist, log=log)
    timings = dict(trained.timings)
    tic = time.perf_counter()
    figures = ({split: evaluate.evaluate_model(clf, sets[split].samples)
                for split in ("valid", "test") if split in sets} if dist.is_main else {})
    figures["calibration"] = trained.calibration
    timings["evaluate"] = time.perf_counter() - tic
    metrics = figures | {"data_dir": str(found.root), "held_out": found.held_out}
    if final:
        tic = time.perf_counter()
        clf, metrics = _final(clf, found, config, device, first=metrics, history=trained.history,
                              dist=dist, log=log, again=f"{again} --resume {state_path} --final")
        figures["test"] = metrics.get("test", figures.get("test"))
        timings["final"] = time.perf_counter() - tic
    if not dist.is_main:
        return None
    timings["total"] = time.perf_counter() - start
    metrics |= {"history": trained.history, "timings": timings, "seconds": timings["total"]}
    path = None
    if out is not None:
        path = save_model(clf, out / "checkpoint.pth", config=config, metrics=metrics)
    return Result(model=clf, config=config, data=found, history=trained.history,
                  figures=figures, timings=timings, checkpoint=path, metrics=metrics)


def _stoppable(clf: model.Classifier, sets: dict, config: TrainConfig, device: torch.device, *,
               state: Path | None, resume: dict | None, again: str, identity: dict,
               dist: Distributed, log: Callable[[str], None]) -> recipes.Trained:
    """recipes.run_recipe under a stop flag: Ctrl-C or SIGTERM saves and says how to resume."""
    stop = StopFlag()
    try:
        with stop.watch():
            return recipes.run_recipe(clf, sets, config, device, state_path=state, resume=resume,
                                      stop=stop, identity=identity, dist=dist, log=log)
    except Stopped as err:
        if state is not None and again and checkpoint.resume_belongs(state, identity["run_id"]):
            raise Interrupted(f"{err}; resume with: {again} --resume {state}") from None
        if state is None and again:  # a run without a state of its own: `again` says what to do
            raise Interrupted(f"{err}; {again}") from None
        raise Interrupted(f"{err}, before the first save; nothing to resume") from None


def _final(first_model: model.Classifier, found: splits.DataSplits, config: TrainConfig,
           device: torch.device, *, first: dict, history: list[dict], dist: Distributed,
           log: Callable[[str], None], again: str) -> tuple[model.Classifier, dict]:
    """A final model trained on train+valid with the first run's choices (epochs, temperature,
    unsure threshold); its test figures, and which run gave which figure, recorded.

    `again` resumes it: the first run's finished state, then the final model from its start.
    """
    final_config = recipes.final_config(config, history)
    sets = recipes.all_labelled(found.sets)
    log(f"final model: train+valid ({len(sets['train'])} images), {final_config.epochs} "
        "epoch(s) as chosen on valid; temperature and threshold from the first run")
    final = model.new_model(sets, final_config, names=list(first_model.class_names))
    _stoppable(final, sets, final_config, device, state=None, resume=None, dist=dist, log=log,
               again=f"the first run is saved; train the final model again with: {again}",
               identity={"run_id": uuid.uuid4().hex, "final": True})
    final.temperature, final.unsure_below = first_model.temperature, first_model.unsure_below
    metrics = {"first_run": {k: first[k] for k in ("valid", "test", "calibration") if k in first},
               "final": {"trained_on": "train+valid", "epochs": final_config.epochs,
                         "temperature_from": "first run (fitted on valid for the first model)"}}
    metrics |= {k: v for k, v in first.items() if k not in ("valid", "test", "calibration")}
    if "test" in found.sets and dist.is_main:
        metrics["final"]["test"] = metrics["test"] = evaluate.evaluate_model(
            final, found.sets["test"].samples)
    return final, metrics

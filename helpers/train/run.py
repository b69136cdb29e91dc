"""A whole run, from a folder of photos to a saved model, in two calls.

`set_up` loads the data and settles the settings, once (config.settle), or takes them from
the saved state of the run it resumes; `run` builds the classifier, trains it by its recipe
(calibrated on valid), measures valid and test through the engine, trains a final model on
train+valid when asked, and saves the checkpoint with its engine. The command lines, the
benchmarks and tune.py call both; the notebook runs the same steps one by one. The library
speaks in values: a stopped run raises RunStopped carrying the path of its resumable state,
and the command line says how to resume it.
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

from helpers.config import TrainConfig, check_typed, followed_data, settle
from helpers.core.device import StopFlag
from helpers.core.distributed import Distributed
from helpers.core.errors import FolderError, RunStopped, Stopped, UserError
from helpers.core.files import check_writable, folder_lock
from helpers.data.fixes import read_fixes
from helpers.data.folders import images_per_class
from helpers.data.splits import TEST_FRACTION, VALID_FRACTION, DataSplits, load_data
from helpers.model.backbones import get_backbone
from helpers.model.checkpoint import check_belongs, read_resume, resume_belongs
from helpers.model.classifier import Classifier, new_model
from helpers.serve.inference import save_model
from helpers.train import recipes
from helpers.train.evaluate import evaluate_model


@dataclass
class Setup:
    """What a run trains on and how: the data, the settled settings, and the saved state of
    the run it resumes (with its path), if any."""

    data: DataSplits
    config: TrainConfig
    notes: list[str]  # what the data decided, for the user: split carved out, views, epochs
    resume: Path | None = None
    state: dict[str, Any] | None = None

    @property
    def identity(self) -> dict[str, Any]:
        """What a resumable state of this run must match: classes, data, held-out split."""
        return {"class_to_idx": self.data.class_to_idx, "data_digest": self.data.digest(),
                "held_out": self.data.held_out}


@dataclass
class Result:
    """What a run gives: the model, its settings and data, figures per split, timings, paths."""

    model: Classifier
    config: TrainConfig
    data: DataSplits
    history: list[dict[str, Any]]
    figures: dict[str, dict[str, Any]]  # "valid", "test" of the saved model; "calibration"
    timings: dict[str, float]  # seconds a phase, and "total"
    checkpoint: Path | None = None  # None when nothing was saved (no `out`)
    metrics: dict[str, Any] = field(default_factory=dict)  # as saved in the checkpoint


def set_up(folder: str | os.PathLike, *, typed: Mapping[str, Any] | None = None,
           device_type: str = "cpu", resume: str | os.PathLike | None = None,
           names_file: str | os.PathLike | None = None, fixes: str | os.PathLike | None = None,
           valid_fraction: float = VALID_FRACTION,
           test_fraction: float = TEST_FRACTION) -> Setup:
    """The data of a folder of photos and the run's settings: those typed, the rest settled
    for the recipe and the data; a resumed run's are its saved ones. Impossible settings and
    a bad fixes file fail before the photos are read."""
    typed = dict(typed or {})
    check_typed(typed, device_type=device_type)
    read = read_fixes(fixes) if fixes else None
    state = read_resume(resume) if resume else None
    saved = (state.get("identity", {}).get("config") or {}) if state else typed
    # A resumed run is the saved run: its backbone decides how the images are prepared.
    spec = get_backbone(saved.get("arch", TrainConfig.arch)).preprocess
    found = load_data(folder, spec, valid_fraction=valid_fraction, test_fraction=test_fraction,
                      names_file=names_file, fixes=read)
    if "valid" not in found.sets:
        raise UserError(f"{found.root}: no valid/ folder and a valid fraction of 0; training "
                        "needs validation images to choose the epoch and calibrate")
    notes = list(found.messages)
    if state is not None:
        config = TrainConfig.from_dict(saved)
    else:
        per_class = images_per_class(found.sets)
        config = settle(typed, device_type=device_type, images_per_class=per_class)
        if chosen := followed_data(config, typed=typed):
            notes.append(f"{per_class:.0f} training images a class: "
                         f"{', '.join(f'{k} {v}' for k, v in chosen.items())} (type an option "
                         "to choose it yourself)")
    setup = Setup(data=found, config=config, notes=notes, resume=resume and Path(resume),
                  state=state)
    if state is not None:
        check_belongs(state, identity=setup.identity, path=resume)
    return setup


@dataclass(frozen=True)
class SaveFolder:
    """An output folder held by this run (see `hold`): no other run saves into it meanwhile."""

    path: Path


@contextlib.contextmanager
def hold(out: str | os.PathLike, *, dist: Distributed | None = None) -> Iterator[SaveFolder]:
    """Hold a save folder for the block (files.folder_lock, taken by rank 0): a second run
    into it fails at once in one line, on every rank. Hold it before `set_up`, and a refused
    run reads no photo."""
    out, dist = Path(out), dist or Distributed()
    check_writable(out)
    with contextlib.ExitStack() as held:
        refused = ""
        if dist.is_main:
            try:
                held.enter_context(folder_lock(out))
            except UserError as err:
                refused = str(err)
        refused = dist.share(refused)
        if refused:
            raise FolderError(refused)
        yield SaveFolder(out)


def run(setup: Setup, *, device: torch.device | None = None,
        out: str | os.PathLike | SaveFolder | None = None, final: bool = False,
        dist: Distributed | None = None, log: Callable[[str], None] | None = print,
        ) -> Result | None:
    """Train what `setup` says, measure and save into `out` (FOLDER/checkpoint.pth with its
    engine, FOLDER/last.pth to resume); None on the ranks other than 0 under torchrun.

    `out` is held for the run (a folder already held by `hold` is used as it is); a run
    stopped by a signal raises RunStopped with the path of its resumable state.
    """
    device = device or torch.device("cpu")
    dist = dist or Distributed()
    with contextlib.ExitStack() as held:
        if out is not None and not isinstance(out, SaveFolder):
            out = held.enter_context(hold(out, dist=dist))
        for line in setup.notes:
            (log or _quiet)(line)
        return _run(setup, device=device, out=out and out.path, final=final, dist=dist,
                    log=log or _quiet)


def _quiet(line: str) -> None:
    """A log that keeps every line to itself."""


def _run(setup: Setup, *, device: torch.device, out: Path | None, final: bool,
         dist: Distributed, log: Callable[[str], None]) -> Result | None:
    """run's work, in the held save folder."""
    start = time.perf_counter()
    found, config, state = setup.data, setup.config, setup.state
    sets = found.sets
    clf = new_model(sets, config, names=found.names)
    log(f"model {config.arch} on {device}, recipe {config.recipe}")
    if dist.world_size > 1 and config.recipe == "cached":
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
    trained = _stoppable(clf, sets, config, device, state=state_path, resume=state,
                         identity=setup.identity | {"run_id": run_id}, dist=dist, log=log)
    timings = dict(trained.timings)
    tic = time.perf_counter()
    figures = ({split: evaluate_model(clf, sets[split].samples)
                for split in ("valid", "test") if split in sets} if dist.is_main else {})
    figures["calibration"] = trained.calibration
    timings["evaluate"] = time.perf_counter() - tic
    metrics = figures | {"data_dir": str(found.root), "held_out": found.held_out}
    if final:
        tic = time.perf_counter()
        clf, metrics = _final(clf, found, config, device, first=metrics, history=trained.history,
                              dist=dist, log=log, first_state=state_path)
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


def _stoppable(clf: Classifier, sets: dict, config: TrainConfig, device: torch.device, *,
               state: Path | None, resume: dict | None, identity: dict, dist: Distributed,
               log: Callable[[str], None], final: bool = False,
               first_state: Path | None = None) -> recipes.Trained:
    """recipes.run_recipe under a stop flag: Ctrl-C or SIGTERM saves what can be resumed and
    raises RunStopped naming it (for a final model, the first run's finished state)."""
    stop = StopFlag()
    try:
        with stop.watch():
            return recipes.run_recipe(clf, sets, config, device, state_path=state, resume=resume,
                                      stop=stop, identity=identity, dist=dist, log=log)
    except Stopped as err:
        if final:  # the first run is done: resuming its state trains the final model again
            saved = f"; the first run is saved in {first_state}" if first_state else ""
            raise RunStopped(f"{err} in the final model{saved}", state=first_state,
                             final=True) from None
        if state is not None and resume_belongs(state, identity["run_id"]):
            raise RunStopped(f"{err}; saved in {state}", state=state) from None
        raise RunStopped(f"{err}, before the first save; nothing to resume") from None


def _final(first_model: Classifier, found: DataSplits, config: TrainConfig,
           device: torch.device, *, first: dict, history: list[dict], dist: Distributed,
           log: Callable[[str], None], first_state: Path | None) -> tuple[Classifier, dict]:
    """A final model trained on train+valid with the first run's choices (epochs, temperature,
    unsure threshold); its test figures, and which run gave which figure, recorded.

    Stopped, it is trained again from its start by resuming the first run's finished state.
    """
    final_config = recipes.final_config(config, history)
    sets = recipes.all_labelled(found.sets)
    log(f"final model: train+valid ({len(sets['train'])} images), {final_config.epochs} "
        "epoch(s) as chosen on valid; temperature and threshold from the first run")
    final = new_model(sets, final_config, names=list(first_model.class_names))
    _stoppable(final, sets, final_config, device, state=None, resume=None, dist=dist, log=log,
               identity={"run_id": uuid.uuid4().hex, "final": True}, final=True,
               first_state=first_state)
    final.temperature, final.unsure_below = first_model.temperature, first_model.unsure_below
    final.novel_above = first_model.novel_above  # its novelty is fitted on train+valid
    metrics = {"first_run": {k: first[k] for k in ("valid", "test", "calibration") if k in first},
               "final": {"trained_on": "train+valid", "epochs": final_config.epochs,
                         "temperature_from": "first run (fitted on valid for the first model)"}}
    metrics |= {k: v for k, v in first.items() if k not in ("valid", "test", "calibration")}
    if "test" in found.sets and dist.is_main:
        metrics["final"]["test"] = metrics["test"] = evaluate_model(final,
                                                                    found.sets["test"].samples)
    return final, metrics

"""Try one variant of the training recipe on a data folder; choose by valid accuracy.

    python benchmarks/tune.py views=4 tail_stages=2 epochs=6
    python benchmarks/tune.py --fewshot views=6 epochs=6
    python benchmarks/tune.py --shifted augmentation=camera

Each key=value overrides a field of TrainConfig; the others follow the data as in train.py.
The data is FLOWERS_DIR; `--fewshot` uses the benchmark's few-shot regime drawn from it (10
training and 10 validation images a class, seed 0, made once in build/fewshot, so that the
activation cache serves every later variant). Prints the valid history, the valid and test
accuracy and the wall time as one JSON line (the test split only reports). `--shifted` also
measures the trained model on the valid split's camera shifts (benchmarks/robustness.py):
their mean, the worst shift's mean and each shift's.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from helpers.config import TrainConfig  # noqa: E402
from helpers.core.device import get_device  # noqa: E402
from helpers.data.folders import data_dir
from helpers.train import run


def main(argv: list[str]) -> None:
    """Train the variant given by key=value arguments and print its figures as JSON."""
    types = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    casts = {"int": int, "float": float, "str": str, "bool": lambda v: v.lower() == "true"}
    fewshot, shifted = "--fewshot" in argv, "--shifted" in argv
    pairs = [a.split("=", 1) for a in argv if a not in ("--fewshot", "--shifted")]
    changes = {k: casts[types[k]](v) for k, v in pairs}
    device = get_device()
    root = data_dir()
    if fewshot:
        from benchmark import fewshot as draw

        few = Path(__file__).resolve().parent.parent / "build" / "fewshot"
        if not few.is_dir():  # drawn beside it, then renamed: never half a folder
            partial = few.with_name("fewshot.partial")
            shutil.rmtree(partial, ignore_errors=True)
            draw(root, partial, seed=0).rename(few)
        root = few
    setup = run.set_up(root, typed=changes, device_type=device.type)  # as train.py runs
    done = run.run(setup, device=device, log=None)
    config, result = done.config, done.figures
    figures = {"changes": changes, "views": config.views, "epochs": config.epochs,
               "valid": [round(r["valid_top1"], 4) for r in done.history],
               "valid_final": result["valid"]["top1"],
               "test": result.get("test", {}).get("top1"),
               "train_s": round(done.timings["total"] - done.timings["evaluate"]),
               "eval_s": round(done.timings["evaluate"])}
    if shifted:
        from robustness import measure

        valid = done.data.sets["valid"]
        m = measure(done.model, valid.samples, split_root=Path(valid.root), log=None)
        figures["shifted_valid"] = {"mean": round(m["mean"], 4), "worst": round(m["worst"], 4),
                                    "worst_shift": m["worst_shift"],
                                    "per_shift": {k: round(v, 4)
                                                  for k, v in m["per_shift"].items()}}
    print(json.dumps(figures))


if __name__ == "__main__":
    main(sys.argv[1:])

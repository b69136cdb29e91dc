"""Try one variant of the training recipe on the course split; choose by valid accuracy.

    python benchmarks/tune.py views=4 tail_stages=2 epochs=6

Each key=value overrides a field of TrainConfig. Prints the valid history, the valid and
test accuracy and the phases' wall time as one JSON line (the test split only reports).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time

from helpers import data, recipes, train


def main(argv: list[str]) -> None:
    types = {f.name: f.type for f in dataclasses.fields(train.TrainConfig)}
    casts = {"int": int, "float": float, "str": str, "bool": lambda v: v.lower() == "true"}
    changes = {k: casts[types[k]](v) for k, v in (a.split("=", 1) for a in argv)}
    config = train.TrainConfig(**changes)
    device = train.get_device()
    start = time.perf_counter()
    sets, clf = recipes.prepare(data.data_dir(), config)
    history = recipes.run_recipe(clf, sets, config, device, progress=False, start=start)
    trained = time.perf_counter()
    result = {split: recipes.evaluate_split(clf, sets[split], config, device)
              for split in ("valid", "test")}
    print(json.dumps({"changes": changes, "valid": [round(r["valid_top1"], 4) for r in history],
                      "valid_final": result["valid"]["top1"], "test": result["test"]["top1"],
                      "test_top5": result["test"]["top5"], "train_s": round(trained - start),
                      "eval_s": round(time.perf_counter() - trained)}))


if __name__ == "__main__":
    main(sys.argv[1:])

"""The data doctor on the course split: what it finds, how well it finds planted label errors,
and how long it takes.

    FLOWERS_DIR=../shared/data/flowers nice .venv/bin/python benchmarks/doctor.py

1. The doctor on the data as it is, from an empty cache (a fresh FLOWERS_CACHE unless
   --warm): the trunk runtime measured, every photo's activations extracted. Prints the
   exact and near-duplicate groups by kind (the course split has copies across splits, e.g.
   train/31/image_08077.jpg = valid/31/image_08067.jpg) and the other findings.
2. Planted label errors: a seeded 2 % of the training photos relabelled to another class at
   random (through a fixes file's relabel, the data folder untouched), the doctor run again
   (its activations now cached); recall is the share of planted photos among the top 2 % of
   suspects (as many suspects as planted photos). Goal: >= 80 %.
3. With --train, three trainings by the default recipe (run.set_up and run.run, as train.py): on
   the data as it is (test top-1 on the whole test split, and without the test photos
   that have a copy or near-copy in train or valid), on the planted data, and on the
   planted data less the doctor's top suspects (as many as planted), through fixes files.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from helpers.core.files import atomic_write_bytes  # noqa: E402
from helpers.data.fixes import Fixes  # noqa: E402
from helpers.data.folders import data_dir  # noqa: E402
from helpers.insight.doctor import examine  # noqa: E402
from helpers.train import evaluate, run  # noqa: E402

KINDS = ("within-class", "across-classes", "across-splits")
KNOWN_LEAK = ["train/31/image_08077.jpg", "valid/31/image_08067.jpg"]


def planted_errors(report: dict, *, root: Path, share: float, seed: int) -> dict[str, str]:
    """A seeded share of the training photos, each with another class folder at random."""
    rng = random.Random(seed)
    classes = sorted(report["counts"]["classes"])
    train = sorted(p.relative_to(root).as_posix() for p in (root / "train").rglob("*.jpg"))
    chosen = rng.sample(train, round(share * len(train)))
    return {path: rng.choice([c for c in classes if c != path.split("/")[1]])
            for path in chosen}


def main() -> None:
    """Run the doctor twice (as is, then with planted errors) and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(data_dir()), help="default: $FLOWERS_DIR")
    parser.add_argument("--share", type=float, default=0.02, help="share of train relabelled")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warm", action="store_true", help="keep $FLOWERS_CACHE (not cold)")
    parser.add_argument("--train", action="store_true", help="also train: as is, planted, "
                        "planted less the top suspects (three default-recipe runs)")
    args = parser.parse_args()
    root = Path(args.data).resolve()
    if not args.warm:
        os.environ["FLOWERS_CACHE"] = tempfile.mkdtemp(prefix="doctor-bench-cache-")

    tic = time.perf_counter()
    report = examine(root, log=print)
    cold = time.perf_counter() - tic
    relabel = planted_errors(report, root=root, share=args.share, seed=args.seed)
    tic = time.perf_counter()
    planted = examine(root, fixes=Fixes(relabel=relabel, source="planted"), log=None)
    warm = time.perf_counter() - tic
    top = [issue["path"] for issue in planted["label_issues"][:len(relabel)]]
    found = len(set(top) & set(relabel))

    exact, near = (Counter(g["kind"] for g in report[key]) for key in ("duplicates",
                                                                        "near_duplicates"))
    leak = any(sorted(g["paths"]) == KNOWN_LEAK and g["kind"] == "across-splits"
               for g in report["duplicates"])
    from helpers.core.device import cpu_flags

    print(f"\nCPU: {os.cpu_count()} cores, flags: {cpu_flags()}")
    print(f"data: {root} ({report['counts']['total']} photos), cache "
          f"{'kept' if args.warm else 'empty at the start'}\n")
    print("| measure | value |\n|---|---|")
    for kind in KINDS:
        print(f"| exact duplicate groups, {kind} | {exact[kind]} |")
    for kind in KINDS:
        print(f"| near-duplicate groups, {kind} | {near[kind]} |")
    print(f"| {' = '.join(KNOWN_LEAK)} found across splits | {'yes' if leak else 'no'} |")
    print(f"| suspected label errors (as is) | {len(report['label_issues'])} |")
    print(f"| strangers and unusable files (as is) | {len(report['strangers'])} |")
    print(f"| imbalance (largest / smallest class) | {report['counts']['imbalance']} |")
    print(f"| planted label errors ({args.share:.0%} of train, seed {args.seed}) | "
          f"{len(relabel)} |")
    print(f"| planted among the top {len(relabel)} suspects (recall, goal >= 80 %) | "
          f"{found} ({found / max(len(relabel), 1):.1%}) |")
    print(f"| suspects flagged with planted errors | {len(planted['label_issues'])} |")
    print(f"| doctor wall time, empty cache (extraction included) | {cold:.0f} s |")
    print(f"| doctor wall time, activations cached | {warm:.0f} s |")
    if args.train:
        trainings(root, report=report, relabel=relabel, top=top)


def leaked_test_photos(report: dict) -> set[str]:
    """Test photos with an exact or near copy in train or valid (groups across splits)."""
    leaked = set()
    for group in report["duplicates"] + report["near_duplicates"]:
        if len({path.split("/")[0] for path in group["paths"]}) > 1:
            leaked |= {path for path in group["paths"] if path.startswith("test/")}
    return leaked


def trainings(root: Path, *, report: dict, relabel: dict[str, str], top: list[str]) -> None:
    """Train as is, planted, planted less the top suspects; print valid and test top-1."""
    import json

    leaked = leaked_test_photos(report)
    rows = []
    with tempfile.TemporaryDirectory(prefix="doctor-fixes-") as tmp:
        for name, fixes in (("as is", None), ("planted", {"relabel": relabel}),
                            ("planted, top suspects left out",
                             {"relabel": {k: v for k, v in relabel.items() if k not in top},
                              "exclude": top})):
            path = None
            if fixes is not None:
                path = atomic_write_bytes(json.dumps(fixes).encode(), Path(tmp) / "fixes.json")
            tic = time.perf_counter()
            done = run.run(run.set_up(root, fixes=path), log=None)
            row = {"name": name, "valid": done.figures["valid"]["top1"],
                   "test": done.figures["test"]["top1"], "seconds": time.perf_counter() - tic}
            if fixes is None:
                kept = [(p, y) for p, y in done.data.sets["test"].samples
                        if Path(p).relative_to(root).as_posix() not in leaked]
                row["test_no_leaks"] = evaluate.evaluate_model(done.model, kept)["top1"]
                row["test_no_leaks_n"] = len(kept)
            rows.append(row)
            print(f"trained {name}: {row}", flush=True)
    print(f"\n{len(leaked)} test photos have a copy or near-copy in train or valid\n")
    print("| training data | valid top-1 | test top-1 | seconds |\n|---|---|---|---|")
    for r in rows:
        extra = (f" ({r['test_no_leaks']:.2%} on the {r['test_no_leaks_n']} test photos "
                 "without a copy in train or valid)" if "test_no_leaks" in r else "")
        print(f"| {r['name']} | {r['valid']:.2%} | {r['test']:.2%}{extra} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()

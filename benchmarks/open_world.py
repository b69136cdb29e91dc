"""The open world: photos of kinds a model never learned, photos that are no flowers, and
teaching it a kind from a few photos.

For each of `--draws` seeded draws, `--held_out` kinds are drawn from the data's own classes
and left out of train, valid and test; the default recipe trains on the rest (its known
verdict fitted on those training flowers, its threshold on those valid flowers, as train.py
does). Then, through the prediction engine (the path predict.py takes):

- the held-out kinds' test photos and the stranger photos (helpers/insight/strangers.py:
  package sample photos, their crops, flat colours, gradients, noise, textures, screens):
  AUROC of the novelty against the known test photos, FPR at 95 % TPR (the share of them
  taken for known when 95 % of known test photos are kept), the share flagged at the
  model's own threshold; and the same for the top probability alone (the "unsure" signal);
- the known test photos: top-1 and the share flagged;
- teach: each held-out kind taught from `--teach_photos` of its training photos; their test
  top-1, the known kinds' top-1 before and after, and the seconds for all.

Nothing here is tuned: the score, its threshold and teach's rule were fixed before this ran.

    FLOWERS_DIR=../shared/data/flowers .venv/bin/python benchmarks/open_world.py --draws 3
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from helpers.core.device import cpu_flags, seed_everything  # noqa: E402
from helpers.data.folders import data_dir  # noqa: E402
from helpers.insight.strangers import write_strangers  # noqa: E402
from helpers.model.classifier import new_model  # noqa: E402
from helpers.serve.answers import answer  # noqa: E402
from helpers.serve.inference import scores_of  # noqa: E402
from helpers.train import recipes  # noqa: E402
from helpers.train.run import set_up  # noqa: E402
from helpers.train.teach import teach  # noqa: E402


def auroc(known: np.ndarray, strange: np.ndarray) -> float:
    """The chance that a stranger scores higher than a known photo (ties count half)."""
    both = np.concatenate([known, strange])
    ranks = np.argsort(np.argsort(both, kind="stable"), kind="stable") + 1.0
    for value in np.unique(both):  # mean ranks for ties
        tied = both == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    r = ranks[len(known):].sum()
    return float((r - len(strange) * (len(strange) + 1) / 2) / (len(known) * len(strange)))


def fpr_at_95(known: np.ndarray, strange: np.ndarray) -> float:
    """The share of strangers taken for known at the score that keeps 95 % of known photos."""
    return float((strange <= np.quantile(known, 0.95, method="higher")).mean())


def restrict(dataset, keep: list[str]):
    """The set with only the classes `keep`, indexed as ImageFolder would index them."""
    index = {c: i for i, c in enumerate(sorted(keep))}
    old = {i: c for c, i in dataset.class_to_idx.items()}
    part = dataset.subset([(p, index[old[y]]) for p, y in dataset.samples if old[y] in index])
    part.classes, part.class_to_idx = sorted(keep), index
    return part


def photos_of(dataset, classes: list[str]) -> dict[str, list[str]]:
    """The photo paths of each class folder of a set."""
    old = {i: c for c, i in dataset.class_to_idx.items()}
    found: dict[str, list[str]] = {c: [] for c in classes}
    for path, y in dataset.samples:
        if old[y] in found:
            found[old[y]].append(path)
    return found


def signals(model, paths: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Novelty, top probability and top-1 index of each photo, through the engine."""
    scores, _, _ = scores_of(model, [(p, 0) for p in paths])
    a = answer(scores.logits, temperature=model.temperature, novelty=scores.novelty,
               novel_above=model.novel_above)
    return a.novelty, a.probs.max(1), a.probs.argmax(1)


def doubted(model, novelty: np.ndarray, top: np.ndarray) -> float:
    """The share of photos either not known or unsure, at the model's own thresholds."""
    return float(((novelty > model.novel_above) | (top < model.unsure_below)).mean())


def one_draw(setup, draw: int, *, held_out: int, teach_photos: int,
             strangers: dict[str, list[Path]]) -> dict[str, Any]:
    """Train without `held_out` drawn kinds; measure the verdict and teach."""
    import torch

    found = setup.data
    classes = sorted(found.class_to_idx)
    rng = np.random.default_rng(1000 + draw)
    held = sorted(rng.choice(classes, size=held_out, replace=False).tolist())
    known = [c for c in classes if c not in held]
    sets = {k: restrict(v, known) for k, v in found.sets.items()}
    names = {c: found.names[found.class_to_idx[c]] for c in classes}
    config = setup.config
    seed_everything(config.seed)
    tic = time.perf_counter()
    model = new_model(sets, config, names=[names[c] for c in sorted(known)])
    recipes.run_recipe(model, sets, config, torch.device("cpu"), log=None)
    trained_s = time.perf_counter() - tic
    test_known = [p for p, _ in sets["test"].samples]
    labels = np.asarray(sets["test"].targets)
    held_photos = photos_of(found.sets["test"], held)
    held_test = [p for c in held for p in held_photos[c]]
    stranger_paths = [str(p) for group in strangers.values() for p in group]
    nov_k, top_k, pred_k = signals(model, test_known)
    nov_h, top_h, _ = signals(model, held_test)
    nov_s, top_s, _ = signals(model, stranger_paths)
    threshold = model.novel_above
    row: dict[str, Any] = {
        "draw": draw, "held_out": held, "train_seconds": trained_s,
        "known_top1": float((pred_k == labels).mean()),
        "known_flagged": float((nov_k > threshold).mean()), "n_known": len(test_known),
        "known_doubted": doubted(model, nov_k, top_k)}
    for what, nov, top in (("held_out_kinds", nov_h, top_h), ("not_flowers", nov_s, top_s)):
        row[what] = {"n": len(nov), "auroc": auroc(nov_k, nov), "fpr95": fpr_at_95(nov_k, nov),
                     "flagged": float((nov > threshold).mean()),
                     "doubted": doubted(model, nov, top),
                     "auroc_top_probability": auroc(-top_k, -top),
                     "fpr95_top_probability": fpr_at_95(-top_k, -top)}
    start = 0
    for group, paths in strangers.items():
        part = nov_s[start:start + len(paths)]
        row["not_flowers"][f"flagged_{group}"] = float((part > threshold).mean())
        start += len(paths)
    # Teach each held-out kind from its first photos of a seeded shuffle of train/.
    train_photos = photos_of(found.sets["train"], held)
    tic = time.perf_counter()
    for c in held:
        chosen = rng.permutation(train_photos[c])[:teach_photos].tolist()
        teach(model, chosen, name=names[c], class_id=c)
    taught_s = time.perf_counter() - tic
    index = model.class_to_idx
    _, _, pred_after = signals(model, test_known)
    nov_h2, _, pred_h = signals(model, held_test)
    truth_h = np.asarray([index[c] for c in held for _ in held_photos[c]])
    # known photos keep their old indices: the taught classes come after them
    row["teach"] = {"photos_each": teach_photos, "seconds_all": taught_s,
                    "taught_top1": float((pred_h == truth_h).mean()),
                    "taught_flagged_after": float((nov_h2 > threshold).mean()),
                    "known_top1_after": float((pred_after == labels).mean())}
    return row


def report(rows: list[dict[str, Any]]) -> str:
    """The mean over draws as a markdown table."""
    def mean(get) -> str:
        values = [get(r) for r in rows]
        return f"{np.mean(values):.3f}" + (f" ± {np.std(values):.3f}" if len(values) > 1 else "")

    lines = ["| photos | n | AUROC (novelty) | FPR at 95 % TPR | flagged at the threshold | "
             "not known or unsure | AUROC (top probability) | FPR at 95 % TPR (top "
             "probability) |", "|---|---|---|---|---|---|---|---|"]
    for what, label in (("held_out_kinds", "kinds held out of training"),
                        ("not_flowers", "photos that are no flowers")):
        cells = [mean(lambda r, w=what, k=key: r[w][k]) for key in
                 ("auroc", "fpr95", "flagged", "doubted", "auroc_top_probability",
                  "fpr95_top_probability")]
        lines.append(f"| {label} | {rows[0][what]['n']} | " + " | ".join(cells) + " |")
    lines.append(f"| known test photos | {rows[0]['n_known']} | | | "
                 f"{mean(lambda r: r['known_flagged'])} | {mean(lambda r: r['known_doubted'])}"
                 " | | |")
    groups = [k.removeprefix("flagged_") for k in rows[0]["not_flowers"] if
              k.startswith("flagged_")]
    lines += ["", "no flowers flagged, by group: " + ", ".join(
        f"{g} {mean(lambda r, g=g: r['not_flowers'][f'flagged_{g}'])}" for g in groups), "",
        "| teach | known top-1 before | known top-1 after | taught kinds' top-1 | taught "
        "kinds flagged after | seconds for all |", "|---|---|---|---|---|---|",
        f"| {rows[0]['teach']['photos_each']} photos each, {len(rows[0]['held_out'])} kinds | "
        f"{mean(lambda r: r['known_top1'])} | {mean(lambda r: r['teach']['known_top1_after'])}"
        f" | {mean(lambda r: r['teach']['taught_top1'])} | "
        f"{mean(lambda r: r['teach']['taught_flagged_after'])} | "
        f"{mean(lambda r: r['teach']['seconds_all'])} |"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Run the draws and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=None, help="data folder (default $FLOWERS_DIR)")
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--first_draw", type=int, default=0,
                        help="the first draw's number (fresh draws: 3 and on)")
    parser.add_argument("--held_out", type=int, default=10)
    parser.add_argument("--teach_photos", type=int, default=5)
    parser.add_argument("--json", help="write every draw's figures here too")
    parser.add_argument("--settings", default="{}",
                        help="training settings as JSON (tests: a tiny backbone)")
    args = parser.parse_args(argv)
    setup = set_up(Path(args.data) if args.data else data_dir(),
                   typed=json.loads(args.settings))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        strangers = write_strangers(tmp)
        for draw in range(args.first_draw, args.first_draw + args.draws):
            rows.append(one_draw(setup, draw, held_out=args.held_out,
                                 teach_photos=args.teach_photos, strangers=strangers))
            print(json.dumps(rows[-1]), flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(rows, indent=1))
    print(f"\n{args.draws} draw(s) of {args.held_out} kinds held out, "
          f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, flags {cpu_flags()}\n")
    print(report(rows))


if __name__ == "__main__":
    main()

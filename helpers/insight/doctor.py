"""The data doctor: what is wrong with a folder of photos, found before training on it.

- exact duplicates (the same bytes) and near-duplicates (re-encoded, resized, cropped or
  recoloured copies: perceptual hashes and backbone features, helpers/likeness.py);
- suspected label errors: out-of-sample probabilities of a k-fold logistic regression on
  the pooled features, ranked by self-confidence, confident learning's flag beside (cleanlab);
- strangers: photos far from every other (no flower, a blank frame), unreadable or tiny files;
- images per class and imbalance.

The features come through the activation cache of the cached recipe, keyed as training
keys them: training on the folder afterwards extracts nothing twice.
"""

from __future__ import annotations

import os
import time
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from helpers.config import TrainConfig
from helpers.data.fixes import Fixes, apply_fixes
from helpers.data.images import check_image, list_image_files
from helpers.data.splits import DataSplits, duplicate_groups, load_data
from helpers.insight.likeness import image_facts, near_duplicate_groups, neighbours, unit
from helpers.model.backbones import get_backbone
from helpers.train.cache import ActivationCache

DEFAULTS = TrainConfig()
FOLDS = 5  # out-of-sample probabilities: each photo judged by a model that never saw it
L2 = 1e-3  # the logistic regression's penalty on standardised features
STRANGER_FENCE = 4.0  # a stranger is farther from its nearest photos than the median by
# this many (scaled) MADs
STRANGER_RATIO = 2.5  # ... and this many times as far as those nearest photos are from theirs
# or beyond STRANGER_FENCE from its nearest photos and this far from every class: none of the
# 725 photos of four real 12-class folders of flowers was both (2026-12-04), fitted on
# flowers alone
CLASS_FENCE = 5.0
TINY = 32  # pixels: a shorter side below it is a thumbnail or an icon, not a photo
BLANK = 2.0  # grey-level spread below which a frame is blank


def _pooled(tail: torch.nn.Module, acts: torch.Tensor) -> np.ndarray:
    """The tail's pooled features of cached activations, float32 (as the probe trains on)."""
    tail.eval()
    with torch.inference_mode():
        return torch.cat([tail(part.float()).float() for part in acts.split(256)]).numpy()


def features(loaded: DataSplits, *, arch: str = DEFAULTS.arch,
             tail_stages: int = DEFAULTS.tail_stages,
             log: Callable[[str], None] | None = print) -> tuple[np.ndarray, torch.Tensor]:
    """Pooled backbone features and flattened trunk maps (fp16) of every photo of every set,
    in set order, from their centre views through the activation cache (as training keys it)."""
    spec = get_backbone(arch)
    cache = ActivationCache(spec, spec.build(True), tail_stages=tail_stages,
                            device=torch.device("cpu"), log=log)
    pooled, maps = [], []
    for ds in (ds for ds in loaded.sets.values() if len(ds)):
        acts = cache.get(ds, "centre")
        pooled.append(_pooled(cache.tail, acts))
        maps.append(acts.contiguous().flatten(1))
    cache.release()
    return np.concatenate(pooled), torch.cat(maps)


def _softmax_regression(x: torch.Tensor, y: torch.Tensor, classes: int) -> torch.nn.Linear:
    """A multinomial logistic regression, L2-penalised, fitted by full-batch L-BFGS."""
    model = torch.nn.Linear(x.shape[1], classes)
    torch.nn.init.zeros_(model.weight)
    torch.nn.init.zeros_(model.bias)
    solver = torch.optim.LBFGS(model.parameters(), max_iter=50, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        solver.zero_grad()
        value = torch.nn.functional.cross_entropy(model(x), y) + L2 * model.weight.square().sum()
        value.backward()
        return value

    solver.step(loss)
    return model


def out_of_sample_probs(features: np.ndarray, labels: np.ndarray, *, classes: int,
                        folds: int = FOLDS, seed: int = 0) -> np.ndarray:
    """Class probabilities of each photo from a logistic regression fitted on the other folds
    (float32 L-BFGS: about 10 s for the course split on 2 cores)."""
    from sklearn.model_selection import StratifiedKFold

    x = unit(features.astype(np.float32))
    x = torch.from_numpy((x - x.mean(0)) / np.maximum(x.std(0), 1e-6))
    y = torch.from_numpy(labels).long()
    fewest = int(np.bincount(labels, minlength=classes)[np.unique(labels)].min())
    splitter = StratifiedKFold(n_splits=max(2, min(folds, fewest)), shuffle=True,
                               random_state=seed)
    probs = np.zeros((len(x), classes))
    with warnings.catch_warnings():  # a class of one photo: it is judged by the others
        warnings.simplefilter("ignore", UserWarning)
        parts = list(splitter.split(x.numpy(), labels))
    for fit, held in parts:
        model = _softmax_regression(x[fit], y[fit], classes)
        with torch.no_grad():
            probs[held] = torch.softmax(model(x[held]), 1).numpy()
    return probs


def label_issues(probs: np.ndarray, labels: np.ndarray) -> list[tuple[int, float, bool]]:
    """(row, score, confident) of the photos whose out-of-sample prediction is another class,
    most suspicious first: score is 1 minus the given label's probability (cleanlab's
    self-confidence), confident whether confident learning (cleanlab) flags it too."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    # Ranking every disagreement by self-confidence found 91 % of planted errors in the top
    # 2 % of the course split; confident learning's filter alone, 73 % (benchmarks/doctor.py).
    score = 1.0 - get_label_quality_scores(labels, probs, method="self_confidence")
    counts = np.bincount(labels, minlength=probs.shape[1])
    confident = find_label_issues(labels, probs, filter_by="prune_by_noise_rate") if min(
        counts) > 1 else np.zeros(len(labels), bool)  # cleanlab needs two photos a class
    rows = np.nonzero((probs.argmax(1) != labels) | confident)[0]
    order = rows[np.argsort(-score[rows], kind="stable")]
    return [(int(i), float(score[i]), bool(confident[i])) for i in order]


def class_distance(features: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """How far each photo is from every class: its cosine distance to the nearest class mean
    (its own class's mean without it), over that class's median distance of its members."""
    rows = unit(features.astype(np.float64))
    classes = int(labels.max()) + 1
    sums = np.zeros((classes, rows.shape[1]))
    np.add.at(sums, labels, rows)
    sizes = np.bincount(labels, minlength=classes).astype(np.float64)
    means = unit(sums / np.maximum(sizes, 1)[:, None])
    cos = rows @ means.T
    own = sums[labels] - rows  # its class without it
    alone = sizes[labels] <= 1
    own_cos = np.einsum("nd,nd->n", rows, unit(own)) if not alone.all() else np.zeros(len(rows))
    cos[np.arange(len(rows)), labels] = np.where(alone, -1.0, own_cos)
    cos[:, sizes == 0] = -1.0
    distance = 1.0 - cos
    spread = np.array([np.median(distance[labels == c, c]) if sizes[c] > 1 else np.nan
                       for c in range(classes)])
    spread = np.where(np.isfinite(spread), spread, np.nanmedian(spread) if
                      np.isfinite(spread).any() else 1.0)
    return (distance / np.maximum(spread, 1e-6)[None]).min(1)


def _robust_z(values: np.ndarray) -> np.ndarray:
    """(value - median) in scaled median absolute deviations."""
    median = float(np.median(values))
    mad = 1.4826 * float(np.median(np.abs(values - median)))
    return (values - median) / max(mad, 1e-6 + 0.01 * abs(median))


def stranger_scores(features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each photo's strangeness, the sum of two robust z-scores: its mean cosine distance to
    its nearest other photos, and its distance from every class (class_distance); and
    whether it is a stranger: beyond STRANGER_FENCE from its neighbours, and either
    STRANGER_RATIO times as far from them as they are from theirs (a sparse class is no
    stranger) or beyond CLASS_FENCE from every class."""
    index, cosine = neighbours(features)
    distance = 1.0 - cosine.mean(1)
    ratio = distance / np.maximum(distance[index].mean(1), 1e-6)
    by_neighbours = _robust_z(distance)
    by_classes = _robust_z(class_distance(features, labels))
    strangeness = by_neighbours + by_classes
    far = (by_neighbours > STRANGER_FENCE) & ((ratio > STRANGER_RATIO)
                                              | (by_classes > CLASS_FENCE))
    return strangeness, far


def unreadable(loaded: DataSplits) -> list[tuple[str, str]]:
    """(relative path, why) of the image files in the class folders that were not loaded."""
    root, kept = loaded.root, {p for ds in loaded.sets.values() for p, _ in ds.samples}
    tops = [root / s for s in ("train", "valid", "test") if (root / s).is_dir()] or [root]
    found = []
    for top in tops:
        for folder in loaded.class_to_idx:
            for path in list_image_files(top / folder)[0] if (top / folder).is_dir() else []:
                if path not in kept:
                    found.append((Path(path).relative_to(root).as_posix(),
                                  check_image(path) or "left out"))
    return found


def _kind(members: list[int], labels: np.ndarray, splits: list[str]) -> str:
    """across-classes (a label conflict), across-splits (a leak) or within-class."""
    if len({int(labels[i]) for i in members}) > 1:
        return "across-classes"
    return "across-splits" if len({splits[i] for i in members}) > 1 else "within-class"


def counts(labels: np.ndarray, splits: list[str], *, folders: list[str],
           names: list[str]) -> dict[str, Any]:
    """Photos per class and split, and the imbalance (largest class over smallest)."""
    per = Counter(zip(labels.tolist(), splits, strict=True))
    present = sorted(set(splits), key=("train", "valid", "test").index)
    classes = {folder: {"name": names[c], **{s: per[(c, s)] for s in present},
                        "total": sum(per[(c, s)] for s in present)}
               for c, folder in enumerate(folders)}
    totals = [row["total"] for row in classes.values()]
    return {"classes": classes, "splits": {s: splits.count(s) for s in present},
            "total": len(splits), "largest": max(totals), "smallest": min(totals),
            "imbalance": round(max(totals) / max(min(totals), 1), 2)}


def examine(data: str | os.PathLike, *, names_file: str | os.PathLike | None = None,
            fixes: Fixes | None = None, valid_fraction: float = 0.2,
            test_fraction: float = 0.2, log: Callable[[str], None] | None = print
            ) -> dict[str, Any]:
    """Everything the doctor finds in a data folder, as one JSON-ready dict (paths relative).

    The folder is read as training reads it (any layout, the same carved splits); `fixes`
    are applied to the loaded photos first, so a fixed folder can be checked again.
    """
    tic = time.perf_counter()
    loaded = load_data(data, get_backbone(DEFAULTS.arch).preprocess, valid_fraction=valid_fraction,
                       test_fraction=test_fraction, names_file=names_file)
    root, folders = loaded.root, sorted(loaded.class_to_idx, key=loaded.class_to_idx.get)
    loaded_samples = [(p, c) for ds in loaded.sets.values() for p, c in ds.samples]
    where = {p: s for s, ds in loaded.sets.items() for p, _ in ds.samples}
    samples = apply_fixes(loaded_samples, fixes=fixes, root=root,
                          class_to_idx=loaded.class_to_idx) if fixes else loaded_samples
    # features of the photos as loaded, so that the cached activations serve a fixed folder
    pooled, maps = features(loaded, log=log)
    rows = {p: i for i, (p, _) in enumerate(loaded_samples)}
    kept = [rows[p] for p, _ in samples]
    pooled, maps = pooled[kept], maps[kept]
    paths = [p for p, _ in samples]
    rel = [Path(p).relative_to(root).as_posix() for p in paths]
    labels = np.array([c for _, c in samples])
    splits = [where[p] for p in paths]
    hashes, sizes, spread = image_facts(paths)
    exact = duplicate_groups(paths)
    near = near_duplicate_groups(pooled, maps, hashes, exact=exact)
    probs = out_of_sample_probs(pooled, labels, classes=len(folders))
    strangeness, far = stranger_scores(pooled, labels)

    def group(members: list[int]) -> dict[str, Any]:
        members = sorted(members, key=lambda i: rel[i])
        return {"kind": _kind(members, labels, splits), "paths": [rel[i] for i in members],
                "classes": [folders[labels[i]] for i in members],
                "splits": [splits[i] for i in members]}

    strangers = [{"path": path, "score": None, "why": why} for path, why in unreadable(loaded)
                 if path not in (fixes.exclude if fixes else ())]
    for i in range(len(rel)):
        if min(sizes[i]) < TINY:
            why = f"tiny ({sizes[i][0]} x {sizes[i][1]} pixels)"
        elif spread[i] < BLANK:
            why = "blank frame"
        elif far[i]:
            why = "far from every other photo"
        else:
            continue
        strangers.append({"path": rel[i], "score": round(float(strangeness[i]), 2), "why": why})
    # unreadable files first, then the strangest
    strangers.sort(key=lambda s: (s["score"] is not None, -(s["score"] or 0.0)))
    odd = {s["path"] for s in strangers}  # a photo of no class has no wrong class either
    issues = [{"path": rel[i], "given": folders[labels[i]],
               "suggested": folders[int(probs[i].argmax())], "score": round(score, 4),
               "given_name": loaded.names[labels[i]],
               "suggested_name": loaded.names[int(probs[i].argmax())], "split": splits[i],
               "confident": sure} for i, score, sure in label_issues(probs, labels)
              if rel[i] not in odd]
    return {"data": str(root), "duplicates": [group(g) for g in exact],
            "near_duplicates": [group(g) for g in near], "label_issues": issues,
            "strangers": strangers,
            "counts": counts(labels, splits, folders=folders, names=loaded.names),
            "messages": loaded.messages, "seconds": round(time.perf_counter() - tic, 1)}

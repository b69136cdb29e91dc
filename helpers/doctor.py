"""The data doctor: what is wrong with a folder of photos, found before training on it.

- exact duplicates (the same bytes) and near-duplicates (re-encoded, resized, cropped or
  recoloured copies: a perceptual hash and the cosine of the backbone's pooled features);
- suspected label errors: out-of-sample probabilities of a k-fold logistic regression on
  the pooled features, ranked by confident learning (cleanlab);
- strangers: photos far from every other (no flower, a blank frame), unreadable or tiny files;
- images per class and imbalance.

The features come through the activation cache of the cached recipe, keyed as training
keys them: training on the folder afterwards extracts nothing twice.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .backbones import get_backbone
from .cache import ActivationCache
from .config import TrainConfig
from .fixes import Fixes, apply_fixes
from .images import check_image, list_image_files
from .splits import DataSplits, duplicate_groups, load_data

DEFAULTS = TrainConfig()
FOLDS = 5  # out-of-sample probabilities: each photo judged by a model that never saw it
NEAR_COSINE = 0.93  # pooled features this alike are the same photo, edited
NEAR_HASH_BITS = 10  # of 64: perceptual hashes this close, with features at least ...
NEAR_HASH_COSINE = 0.85  # ... this alike, are the same photo too
NEIGHBOURS = 5  # a stranger is far from its nearest few photos
STRANGER_FENCE = 4.0  # ... farther than the median by this many (scaled) MADs
TINY = 32  # pixels: a shorter side below it is a thumbnail or an icon, not a photo
BLANK = 2.0  # grey-level spread below which a frame is blank


def _pooled(tail: torch.nn.Module, acts: torch.Tensor) -> np.ndarray:
    """The tail's pooled features of cached activations, float32 (as the probe trains on)."""
    tail.eval()
    with torch.inference_mode():
        return torch.cat([tail(part.float()).float() for part in acts.split(256)]).numpy()


def pooled_features(loaded: DataSplits, *, arch: str = DEFAULTS.arch,
                    tail_stages: int = DEFAULTS.tail_stages,
                    log: Callable[[str], None] | None = print) -> dict[str, np.ndarray]:
    """Pooled backbone features of each set's centre views, through the activation cache."""
    spec = get_backbone(arch)
    cache = ActivationCache(spec, spec.build(True), tail_stages=tail_stages,
                            device=torch.device("cpu"), log=log)
    features = {split: _pooled(cache.tail, cache.get(ds, "centre"))
                for split, ds in loaded.sets.items()}
    cache.release()
    return features


def image_facts(paths: list[str]) -> tuple[np.ndarray, list[tuple[int, int]], np.ndarray]:
    """Each image's 64-bit perceptual hash, its (width, height), and its grey-level spread."""
    from imagehash import phash
    from PIL import Image

    def facts(path: str) -> tuple[int, tuple[int, int], float]:
        with Image.open(path) as image:
            size = image.size
            image.draft("L", (64, 64))  # JPEG: decode at a fraction of the size, fast
            grey = image.convert("L")
        bits = phash(grey).hash.flatten()
        spread = float(np.asarray(grey.resize((32, 32)), dtype=np.float32).std())
        return int("".join("1" if b else "0" for b in bits), 2), size, spread

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        found = list(pool.map(facts, paths))
    hashes = np.array([h for h, _, _ in found], dtype=np.uint64)
    return hashes, [s for _, s, _ in found], np.array([s for _, _, s in found])


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def neighbours(features: np.ndarray, *, k: int = NEIGHBOURS) -> tuple[np.ndarray, np.ndarray]:
    """Indices and cosines of each row's k most alike other rows, most alike first."""
    unit = _unit(features.astype(np.float32))
    k = max(1, min(k, len(unit) - 1))
    index, cosine = [], []
    for start in range(0, len(unit), 1024):
        sims = unit[start:start + 1024] @ unit.T
        rows = np.arange(len(sims))
        sims[rows, rows + start] = -np.inf  # never one's own neighbour
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        top_sims = np.take_along_axis(sims, top, axis=1)
        order = np.argsort(-top_sims, axis=1)
        index.append(np.take_along_axis(top, order, axis=1))
        cosine.append(np.take_along_axis(top_sims, order, axis=1))
    return np.concatenate(index), np.concatenate(cosine)


def _hash_pairs(hashes: np.ndarray, *, bits: int) -> list[tuple[int, int]]:
    """Pairs (i < j) of perceptual hashes at most `bits` apart."""
    pairs = []
    for start in range(0, len(hashes), 1024):
        distance = np.bitwise_count(hashes[start:start + 1024, None] ^ hashes[None, :])
        for i, j in zip(*np.nonzero(distance <= bits), strict=True):
            if start + i < j:
                pairs.append((int(start + i), int(j)))
    return pairs


def _groups(pairs: list[tuple[int, int]], n: int) -> list[list[int]]:
    """Connected groups (two or more) of a graph on n nodes given by its edges."""
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in pairs:
        parent[find(i)] = find(j)
    members: dict[int, list[int]] = {}
    for i in range(n):
        members.setdefault(find(i), []).append(i)
    return sorted((g for g in members.values() if len(g) > 1), key=lambda g: g[0])


def near_duplicate_groups(features: np.ndarray, hashes: np.ndarray, *,
                          exact: list[list[int]]) -> list[list[int]]:
    """Groups of edited copies: features alike, or hashes close and features fairly alike;
    groups made only of byte-identical files (already reported as such) are left out."""
    index, cosine = neighbours(features)
    pairs = [(i, int(j)) for i in range(len(index)) for j, c in zip(index[i], cosine[i],
                                                                     strict=True)
             if c >= NEAR_COSINE]
    unit = _unit(features.astype(np.float32))
    pairs += [(i, j) for i, j in _hash_pairs(hashes, bits=NEAR_HASH_BITS)
              if float(unit[i] @ unit[j]) >= NEAR_HASH_COSINE]
    same = {i: group[0] for group in exact for i in group}
    return [g for g in _groups(pairs, len(features)) if len({same.get(i, i) for i in g}) > 1]


def out_of_sample_probs(features: np.ndarray, labels: np.ndarray, *, classes: int,
                        folds: int = FOLDS, seed: int = 0) -> np.ndarray:
    """Class probabilities of each photo from a logistic regression fitted on the other folds."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    x = _unit(features.astype(np.float32))
    x = (x - x.mean(0)) / np.maximum(x.std(0), 1e-6)
    folds = max(2, min(folds, int(np.bincount(labels, minlength=classes).max())))
    probs = np.full((len(x), classes), 1.0 / classes)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for fit, held in splitter.split(x, labels):
        model = LogisticRegression(C=0.05, max_iter=200).fit(x[fit], labels[fit])
        probs[held] = 0.0
        probs[np.ix_(held, model.classes_)] = model.predict_proba(x[held])
    return probs


def label_issues(probs: np.ndarray, labels: np.ndarray) -> list[tuple[int, float]]:
    """(row, score) of the photos confident learning finds mislabelled, most suspicious first;
    score is 1 minus the given label's out-of-sample probability."""
    from cleanlab.filter import find_label_issues

    # cleanlab counts classes from the labels; a class with under two photos breaks its
    # per-class thresholds, so those photos are judged by the given label's probability alone.
    counts = np.bincount(labels, minlength=probs.shape[1])
    flagged = find_label_issues(labels, probs, filter_by="prune_by_noise_rate",
                                min_examples_per_class=1) if min(counts) > 1 else \
        probs.argmax(1) != labels
    rows = np.nonzero(flagged)[0]
    scores = 1.0 - probs[rows, labels[rows]]
    order = np.argsort(-scores, kind="stable")
    return [(int(rows[i]), float(scores[i])) for i in order]


def stranger_scores(features: np.ndarray) -> tuple[np.ndarray, float]:
    """Each photo's mean cosine distance to its nearest others, and the fence beyond which it
    is a stranger (the median plus STRANGER_FENCE scaled median absolute deviations)."""
    _, cosine = neighbours(features)
    distance = 1.0 - cosine.mean(1)
    median = float(np.median(distance))
    mad = 1.4826 * float(np.median(np.abs(distance - median)))
    return distance, median + STRANGER_FENCE * max(mad, 0.01)


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
    loaded = load_data(data, get_backbone(DEFAULTS.arch), valid_fraction=valid_fraction,
                       test_fraction=test_fraction, names_file=names_file)
    root, folders = loaded.root, sorted(loaded.class_to_idx, key=loaded.class_to_idx.get)
    feats = pooled_features(loaded, log=log)
    samples = [(p, c) for ds in loaded.sets.values() for p, c in ds.samples]
    where = {p: s for s, ds in loaded.sets.items() for p, _ in ds.samples}
    rows = {p: i for i, (p, _) in enumerate(samples)}
    features = np.concatenate([feats[s] for s in loaded.sets])
    if fixes:
        samples = apply_fixes(samples, fixes=fixes, root=root, class_to_idx=loaded.class_to_idx)
        features = features[[rows[p] for p, _ in samples]]
    paths = [p for p, _ in samples]
    rel = [Path(p).relative_to(root).as_posix() for p in paths]
    labels = np.array([c for _, c in samples])
    splits = [where[p] for p in paths]
    hashes, sizes, spread = image_facts(paths)
    exact = duplicate_groups(paths)
    near = near_duplicate_groups(features, hashes, exact=exact)
    probs = out_of_sample_probs(features, labels, classes=len(folders))
    distance, fence = stranger_scores(features)

    def group(members: list[int]) -> dict[str, Any]:
        members = sorted(members, key=lambda i: rel[i])
        return {"kind": _kind(members, labels, splits), "paths": [rel[i] for i in members],
                "classes": [folders[labels[i]] for i in members],
                "splits": [splits[i] for i in members]}

    strangers = [{"path": path, "score": 1.0, "why": why} for path, why in unreadable(loaded)]
    for i in range(len(rel)):
        if min(sizes[i]) < TINY:
            why = f"tiny ({sizes[i][0]} x {sizes[i][1]} pixels)"
        elif spread[i] < BLANK:
            why = "blank frame"
        elif distance[i] > fence:
            why = "far from every other photo"
        else:
            continue
        strangers.append({"path": rel[i], "score": round(float(distance[i]), 4), "why": why})
    strangers.sort(key=lambda s: -s["score"])
    issues = [{"path": rel[i], "given": folders[labels[i]],
               "suggested": folders[int(probs[i].argmax())], "score": round(score, 4),
               "given_name": loaded.names[labels[i]],
               "suggested_name": loaded.names[int(probs[i].argmax())], "split": splits[i]}
              for i, score in label_issues(probs, labels)]
    return {"data": str(root), "duplicates": [group(g) for g in exact],
            "near_duplicates": [group(g) for g in near], "label_issues": issues,
            "strangers": strangers,
            "counts": counts(labels, splits, folders=folders, names=loaded.names),
            "messages": loaded.messages, "seconds": round(time.perf_counter() - tic, 1)}

"""Testing a trained classifier: accuracy and the metrics of where it fails and how sure it is.

The metrics take class probabilities (N x C) and labels (N), as NumPy arrays or tensors.
`evaluate_model` measures a model on a dataset through its prediction engine, the one
inference path of a trained model (engine.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy.cluster.hierarchy import leaves_list, linkage
from scipy.spatial.distance import squareform

from .engine import Engine, softmax
from .inference import logits_of
from .model import Classifier

ArrayLike = np.ndarray | torch.Tensor


def to_numpy(x: ArrayLike) -> np.ndarray:
    """A NumPy array of a tensor (detached, on the CPU) or of anything array-like."""
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def as_arrays(probs: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities as float64 and labels as int64 NumPy arrays."""
    return to_numpy(probs).astype(np.float64), to_numpy(labels).astype(np.int64)


def confusion_matrix(probs: ArrayLike, labels: ArrayLike) -> np.ndarray:
    """Counts of top-1 predictions: rows are the true classes, columns the predicted ones."""
    probs, labels = as_arrays(probs, labels)
    matrix = np.zeros((probs.shape[1],) * 2, dtype=np.int64)
    np.add.at(matrix, (labels, probs.argmax(1)), 1)
    return matrix


def per_class_accuracy(probs: ArrayLike, labels: ArrayLike,
                       names: list[str] | None = None) -> list[dict[str, Any]]:
    """Top-1 accuracy of every class: index, name, accuracy (nan with no samples) and n."""
    matrix = confusion_matrix(probs, labels)
    counts = matrix.sum(1)
    names = names or [str(i) for i in range(len(matrix))]
    return [{"index": i, "name": names[i], "n": int(counts[i]),
             "accuracy": float(matrix[i, i] / counts[i]) if counts[i] else float("nan")}
            for i in range(len(matrix))]


def worst_classes(probs: ArrayLike, labels: ArrayLike, names: list[str] | None = None,
                  n: int = 10) -> list[dict[str, Any]]:
    """The `n` classes with the lowest top-1 accuracy (classes without samples left out)."""
    scores = [s for s in per_class_accuracy(probs, labels, names) if s["n"]]
    return sorted(scores, key=lambda s: (s["accuracy"], -s["n"]))[:n]


def cluster_order(confusion: np.ndarray) -> np.ndarray:
    """An ordering of the classes that puts classes confused with each other side by side.

    Average-linkage clustering of the symmetrised, row-normalised confusion rates; the
    optimal leaf ordering then places the most confused neighbours next to each other.
    """
    confusion = np.asarray(confusion, dtype=np.float64)
    rates = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
    similarity = rates + rates.T
    np.fill_diagonal(similarity, 0)
    if len(confusion) < 3 or similarity.max() <= 0:
        return np.arange(len(confusion))
    distance = 1 - similarity / similarity.max()
    np.fill_diagonal(distance, 0)
    tree = linkage(squareform(distance, checks=False), method="average", optimal_ordering=True)
    return leaves_list(tree)


def confused_pairs(confusion: np.ndarray, names: list[str] | None = None, n: int = 10,
                   symmetric: bool = False) -> list[dict[str, Any]]:
    """The `n` largest off-diagonal cells: count, true and predicted class and their names.

    With `symmetric`, A taken for B and B for A count together, under the larger direction.
    """
    confusion = np.asarray(confusion)
    names = names or [str(i) for i in range(len(confusion))]
    off = confusion.astype(np.int64).copy()
    np.fill_diagonal(off, 0)
    if symmetric:  # each unordered pair once, under its larger direction (ties: upper)
        upper = np.triu(np.ones(off.shape, dtype=bool), 1)
        off = np.where((off > off.T) | ((off == off.T) & upper), off + off.T, 0)
    cells = np.argsort(-off, axis=None, kind="stable")[:n]
    pairs = []
    for true, pred in zip(*np.unravel_index(cells, off.shape), strict=True):
        if off[true, pred] > 0:
            pairs.append({"count": int(off[true, pred]), "true": int(true),
                          "predicted": int(pred), "true_name": names[true],
                          "predicted_name": names[pred]})
    return pairs


def highest_loss(probs: ArrayLike, labels: ArrayLike, n: int = 12) -> list[dict[str, Any]]:
    """The `n` samples with the highest loss: index, true, predicted, their probabilities."""
    probs, labels = as_arrays(probs, labels)
    rows = np.arange(len(labels))
    true_p = probs[rows, labels]
    predicted = probs.argmax(1)
    return [{"index": int(i), "true": int(labels[i]), "predicted": int(predicted[i]),
             "probability": float(probs[i, predicted[i]]), "true_probability": float(true_p[i]),
             "loss": float(-np.log(max(true_p[i], 1e-12)))}
            for i in np.argsort(true_p, kind="stable")[:n]]


def nll(probs: ArrayLike, labels: ArrayLike) -> float:
    """Mean negative log-likelihood of the true classes."""
    probs, labels = as_arrays(probs, labels)
    return float(-np.log(np.maximum(probs[np.arange(len(labels)), labels], 1e-12)).mean())


def reliability(probs: ArrayLike, labels: ArrayLike, bins: int = 15) -> dict[str, np.ndarray]:
    """Reliability-diagram data: per equal-width bin of top-1 confidence, its edges, mean
    confidence, accuracy (nan where empty) and count."""
    probs, labels = as_arrays(probs, labels)
    confidence, correct = probs.max(1), probs.argmax(1) == labels
    which = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(which, confidence, minlength=bins) / count
        accuracy = np.bincount(which, correct.astype(np.float64), minlength=bins) / count
    return {"edges": np.linspace(0, 1, bins + 1), "confidence": mean_conf,
            "accuracy": accuracy, "count": count}


def ece_of_bins(r: dict[str, np.ndarray]) -> float:
    """The expected calibration error of reliability data (see expected_calibration_error)."""
    seen = r["count"] > 0
    gap = np.abs(r["accuracy"][seen] - r["confidence"][seen])
    return float((gap * r["count"][seen]).sum() / max(r["count"].sum(), 1))


def expected_calibration_error(probs: ArrayLike, labels: ArrayLike, bins: int = 15) -> float:
    """ECE: the count-weighted mean |accuracy - confidence| over equal-width confidence bins."""
    return ece_of_bins(reliability(probs, labels, bins))












def unsure_summary(probs: ArrayLike, labels: ArrayLike, threshold: float) -> dict[str, float]:
    """How often predictions are unsure, and the top-1 accuracy of the sure and unsure ones."""
    probs, labels = as_arrays(probs, labels)
    unsure = probs.max(1) < threshold
    correct = probs.argmax(1) == labels
    return {"unsure_rate": float(unsure.mean()) if len(labels) else 0.0,
            "top1_sure": float(correct[~unsure].mean()) if (~unsure).any() else float("nan"),
            "top1_unsure": float(correct[unsure].mean()) if unsure.any() else float("nan")}


def topk_accuracy(probs: ArrayLike, labels: ArrayLike) -> dict[str, float]:
    """Mean negative log-likelihood, top-1 and top-5 accuracy, counted over samples."""
    probs, labels = as_arrays(probs, labels)
    n = len(labels)
    if n == 0:
        return {"loss": float("nan"), "top1": float("nan"), "top5": float("nan"), "n": 0}
    best = np.argsort(-probs, axis=1, kind="stable")[:, :5]
    return {"loss": nll(probs, labels), "top1": float((best[:, 0] == labels).mean()),
            "top5": float((best == labels[:, None]).any(1).mean()), "n": n}


def evaluate_model(model: Classifier | Engine, samples: list[tuple[str, int]],
                   ) -> dict[str, Any]:
    """Top-1/top-5 (calibrated loss) of a trained model on (path, label) samples, through its
    engine; unreadable images are left out and listed under "bad"."""
    logits, labels, bad = logits_of(model, samples)
    measured = topk_accuracy(softmax(logits, temperature=model.temperature), labels)
    return {**measured, "bad": bad}

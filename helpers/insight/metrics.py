"""Where a trained classifier fails: the confusion matrix and its clustered order, per-class
accuracy and the worst classes, the most confused pairs, the highest-loss samples. They take
class probabilities (N x C) and labels (N), as NumPy arrays or tensors."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.cluster.hierarchy import leaves_list, linkage
from scipy.spatial.distance import squareform

from helpers.train.evaluate import ArrayLike, as_arrays


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

"""Insight into a trained classifier: where it fails, how sure it is, and whether to trust that.

The metrics take class probabilities (N x C) and labels (N), as NumPy arrays or tensors.
`report` runs them all: it fits the temperature and the unsure threshold on the valid
split (setting them on the model) and measures the test split.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy.cluster.hierarchy import leaves_list, linkage
from scipy.optimize import minimize_scalar
from scipy.spatial.distance import squareform
from scipy.special import log_softmax, softmax

from .model import Classifier

ArrayLike = np.ndarray | torch.Tensor


def to_numpy(x: ArrayLike) -> np.ndarray:
    """A NumPy array of a tensor (detached, on the CPU) or of anything array-like."""
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _inputs(probs: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    return to_numpy(probs).astype(np.float64), to_numpy(labels).astype(np.int64)


def confusion_matrix(probs: ArrayLike, labels: ArrayLike) -> np.ndarray:
    """Counts of top-1 predictions: rows are the true classes, columns the predicted ones."""
    probs, labels = _inputs(probs, labels)
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
    probs, labels = _inputs(probs, labels)
    rows = np.arange(len(labels))
    true_p = probs[rows, labels]
    predicted = probs.argmax(1)
    return [{"index": int(i), "true": int(labels[i]), "predicted": int(predicted[i]),
             "probability": float(probs[i, predicted[i]]), "true_probability": float(true_p[i]),
             "loss": float(-np.log(max(true_p[i], 1e-12)))}
            for i in np.argsort(true_p, kind="stable")[:n]]


def nll(probs: ArrayLike, labels: ArrayLike) -> float:
    """Mean negative log-likelihood of the true classes."""
    probs, labels = _inputs(probs, labels)
    return float(-np.log(np.maximum(probs[np.arange(len(labels)), labels], 1e-12)).mean())


def reliability(probs: ArrayLike, labels: ArrayLike, bins: int = 15) -> dict[str, np.ndarray]:
    """Reliability-diagram data: per equal-width bin of top-1 confidence, its edges, mean
    confidence, accuracy (nan where empty) and count."""
    probs, labels = _inputs(probs, labels)
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


def log_probs(probs: ArrayLike) -> np.ndarray:
    """Logits from probabilities: their logarithm, equal to the logits up to a per-row constant,
    which is all that temperature scaling needs."""
    return np.log(np.maximum(to_numpy(probs).astype(np.float64), 1e-300))


def apply_temperature(logits: ArrayLike, temperature: float) -> np.ndarray:
    """Calibrated probabilities: softmax(logits / temperature)."""
    return softmax(to_numpy(logits).astype(np.float64) / temperature, axis=1)


def fit_temperature(logits: ArrayLike, labels: ArrayLike,
                    bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """The temperature T minimising the NLL of softmax(logits / T); fit it on the valid split."""
    logits, labels = _inputs(logits, labels)
    rows = np.arange(len(labels))

    def loss(log_t: float) -> float:
        return float(-log_softmax(logits / np.exp(log_t), axis=1)[rows, labels].mean())

    # One parameter, a smooth loss: a bounded scalar search over log T is exact and fast.
    result = minimize_scalar(loss, bounds=np.log(bounds), method="bounded",
                             options={"xatol": 1e-6})
    return float(np.exp(result.x))


def choose_unsure_threshold(probs: ArrayLike, labels: ArrayLike,
                            target_accuracy: float = 0.99) -> float:
    """The lowest top-1 probability t such that predictions at or above t are right at least
    `target_accuracy` of the time (on the valid split, calibrated probabilities).

    A prediction whose top probability is below t is "unsure". 0.0 when every prediction
    can be kept (never unsure); 1.0 when not even the most confident ones reach the target.
    """
    probs, labels = _inputs(probs, labels)
    confidence = probs.max(1)
    order = np.argsort(-confidence, kind="stable")
    correct = (probs.argmax(1) == labels)[order]
    kept_accuracy = np.cumsum(correct) / np.arange(1, len(correct) + 1)
    good = np.flatnonzero(kept_accuracy >= target_accuracy)
    if len(good) == 0:
        return 1.0
    if good[-1] == len(correct) - 1:
        return 0.0
    return float(confidence[order][good[-1]])


def calibrate(model: Classifier, probs: ArrayLike, labels: ArrayLike,
              target_accuracy: float = 0.99) -> dict[str, float]:
    """Fit model.temperature and model.unsure_below on valid probabilities; returns the facts."""
    logits = log_probs(probs)
    model.temperature = fit_temperature(logits, labels)
    calibrated = apply_temperature(logits, model.temperature)
    model.unsure_below = choose_unsure_threshold(calibrated, labels, target_accuracy)
    return {"temperature": model.temperature, "unsure_below": model.unsure_below,
            "ece_before": expected_calibration_error(probs, labels),
            "ece_after": expected_calibration_error(calibrated, labels),
            "nll_before": nll(probs, labels), "nll_after": nll(calibrated, labels)}


def unsure_summary(probs: ArrayLike, labels: ArrayLike, threshold: float) -> dict[str, float]:
    """How often predictions are unsure, and the top-1 accuracy of the sure and unsure ones."""
    probs, labels = _inputs(probs, labels)
    unsure = probs.max(1) < threshold
    correct = probs.argmax(1) == labels
    return {"unsure_rate": float(unsure.mean()) if len(labels) else 0.0,
            "top1_sure": float(correct[~unsure].mean()) if (~unsure).any() else float("nan"),
            "top1_unsure": float(correct[unsure].mean()) if unsure.any() else float("nan")}


def report(model: Classifier, datasets: dict, config: Any, device: torch.device | str,
           worst: int = 10, pairs: int = 10, high_loss: int = 12,
           target_accuracy: float = 0.99, progress: bool = False) -> dict[str, Any]:
    """Calibrate on valid (sets model.temperature and model.unsure_below), then measure test.

    Returns top-1/top-5, ECE and NLL before and after the temperature, the unsure rate,
    per-class accuracy, the confusion matrix with its clustered order, the most confused
    pairs, the highest-loss samples, reliability data, and the calibrated test
    probabilities. Without a test split the valid split is measured under "test"
    (optimistically: it also chose the temperature); "split" says which.
    """
    from .recipes import split_probs
    from .train import accuracy

    device = torch.device(device)
    valid = split_probs(model, datasets["valid"], config, device, progress)
    split = "test" if "test" in datasets else "valid"
    raw, labels = valid if split == "valid" else split_probs(model, datasets[split], config,
                                                              device, progress)
    fitted = calibrate(model, *valid, target_accuracy)
    probs = apply_temperature(log_probs(raw), model.temperature)
    names, labels = list(model.class_names), to_numpy(labels).astype(np.int64)
    confusion = confusion_matrix(probs, labels)
    measured = {**accuracy(torch.as_tensor(probs), torch.as_tensor(labels)),
                "ece_before": expected_calibration_error(raw, labels),
                "ece_after": expected_calibration_error(probs, labels),
                "nll_before": nll(raw, labels), "nll_after": nll(probs, labels),
                **unsure_summary(probs, labels, model.unsure_below)}
    return {"split": split, "temperature": model.temperature,
            "unsure_below": model.unsure_below,
            "valid": {k: v for k, v in fitted.items() if k not in ("temperature", "unsure_below")},
            "test": measured,
            "per_class": per_class_accuracy(probs, labels, names),
            "worst": worst_classes(probs, labels, names, worst),
            "confusion": confusion, "order": cluster_order(confusion),
            "pairs": confused_pairs(confusion, names, pairs),
            "high_loss": highest_loss(probs, labels, high_loss),
            "reliability": {"before": reliability(raw, labels),
                            "after": reliability(probs, labels)},
            "probs": probs, "labels": labels, "predicted": probs.argmax(1)}

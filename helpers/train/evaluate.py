"""Testing a trained classifier: accuracy and the metrics of where it fails and how sure it is.

The metrics take class probabilities (N x C) and labels (N), as NumPy arrays or tensors.
`evaluate_model` measures a model on a dataset through its prediction engine and
answers.answer, the one inference path of a trained model.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from helpers.model.classifier import Classifier
from helpers.serve.answers import Answers, answer
from helpers.serve.engine import Engine
from helpers.serve.inference import scores_of

ArrayLike = np.ndarray | torch.Tensor


def to_numpy(x: ArrayLike) -> np.ndarray:
    """A NumPy array of a tensor (detached, on the CPU) or of anything array-like."""
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def as_arrays(probs: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities as float64 and labels as int64 NumPy arrays."""
    return to_numpy(probs).astype(np.float64), to_numpy(labels).astype(np.int64)


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


def unsure_summary(answers: Answers, labels: ArrayLike) -> dict[str, float]:
    """How often answers are unsure, and the top-1 accuracy of the sure and unsure ones."""
    labels = to_numpy(labels).astype(np.int64)
    unsure = answers.unsure
    correct = answers.probs.argmax(1) == labels
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
    """Top-1/top-5, calibrated loss and ECE of a trained model on (path, label) samples,
    through its engine, and the share of them called "not a flower I know" (None without a
    known verdict); unreadable images are left out and listed under "bad"."""
    scores, labels, bad = scores_of(model, samples)
    answers = answer(scores.logits, temperature=model.temperature, novelty=scores.novelty,
                     novel_above=model.novel_above)
    probs = answers.probs
    flagged = (None if answers.known is None or not len(labels)
               else float((~answers.known).mean()))
    return {**topk_accuracy(probs, labels), "ece": expected_calibration_error(probs, labels),
            "not_known": flagged, "bad": bad}

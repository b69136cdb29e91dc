"""From logits to answers, in one place: the calibrated probabilities (softmax of the logits
divided by the model's temperature), the top K, and the "unsure" verdict at the model's
threshold. The engine, `predict.py`, evaluation, the report, the main job's figures,
calibration and the exports' checks all call `answer`, so they agree on every image.
NumPy only: the torch-free prediction path uses it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np


class Prediction(NamedTuple):
    """Top-K probabilities, class folders and names, highest first."""

    probs: list[float]
    classes: list[str]
    names: list[str]

    def is_unsure(self, threshold: float) -> bool:
        """True when the top probability is below `threshold` (a model's unsure_below)."""
        # A method, not a fourth field: `probs, classes, names = predict(...)` keeps working.
        return bool(self.probs) and self.probs[0] < threshold


@dataclass(frozen=True)
class Answers:
    """The answers to a batch: calibrated probabilities (N x C, float64), the top K class
    indices of every row (most probable first) and which rows are unsure."""

    probs: np.ndarray
    top: np.ndarray
    unsure: np.ndarray

    def prediction(self, row: int, *, class_ids: list[str], names: list[str]) -> Prediction:
        """Row `row` as a Prediction: output index -> class folder -> name."""
        order = self.top[row]
        return Prediction([float(self.probs[row, i]) for i in order],
                          [class_ids[i] for i in order], [names[i] for i in order])


def answer(logits: np.ndarray, *, temperature: float = 1.0, unsure_below: float = 0.0,
           topk: int = 5) -> Answers:
    """Calibrated probabilities softmax(logits / temperature), the top `topk` of each row (all
    classes at most) and the rows whose top probability is below `unsure_below`."""
    z = np.asarray(logits, dtype=np.float64).reshape(len(logits), -1) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    probs = e / e.sum(axis=1, keepdims=True)
    top = np.argsort(-probs, axis=1, kind="stable")[:, :max(0, min(topk, probs.shape[1]))]
    return Answers(probs=probs, top=top, unsure=probs.max(axis=1, initial=0.0) < unsure_below)

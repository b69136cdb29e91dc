"""From logits to answers, in one place: the calibrated probabilities (softmax of the logits
divided by the model's temperature), the top K, the "unsure" verdict at the model's
threshold, and the "known" verdict (novelty at or below the model's novel_above; see
model/novelty.py). The engine, `predict.py`, evaluation, the report, the main job's figures,
calibration and the exports' checks all call `answer`, so they agree on every image.
NumPy only: the torch-free prediction path uses it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np


class Scores(NamedTuple):
    """What the model's graph returns for a batch: logits (N x C) and novelty (N, or None
    for a model without a known verdict)."""

    logits: np.ndarray
    novelty: np.ndarray | None

    def row(self, i: int) -> Scores:
        """The scores of row i alone, as a batch of one."""
        return Scores(self.logits[i:i + 1], None if self.novelty is None
                      else self.novelty[i:i + 1])


class _Top(NamedTuple):
    probs: list[float]
    classes: list[str]
    names: list[str]


class Prediction(_Top):
    """Top-K probabilities, class folders and names, highest first; `known` (False: not a
    flower the model knows; None: the model has no known verdict) and its `novelty`.

    Three fields: `probs, classes, names = predict(...)` keeps working.
    """

    known: bool | None
    novelty: float | None

    def __new__(cls, probs: list[float], classes: list[str], names: list[str], *,
                known: bool | None = None, novelty: float | None = None) -> Prediction:
        self = super().__new__(cls, probs, classes, names)
        self.known, self.novelty = known, novelty
        return self

    def is_unsure(self, threshold: float) -> bool:
        """True when the top probability is below `threshold` (a model's unsure_below)."""
        # A method, not a fourth field: `probs, classes, names = predict(...)` keeps working.
        return bool(self.probs) and self.probs[0] < threshold


@dataclass(frozen=True)
class Answers:
    """The answers to a batch: calibrated probabilities (N x C, float64), the top K class
    indices of every row (most probable first), which rows are unsure, the novelty of each
    row and which rows are known (None for a model without a known verdict)."""

    probs: np.ndarray
    top: np.ndarray
    unsure: np.ndarray
    novelty: np.ndarray | None = None
    known: np.ndarray | None = None

    def prediction(self, row: int, *, class_ids: list[str], names: list[str]) -> Prediction:
        """Row `row` as a Prediction: output index -> class folder -> name."""
        order = self.top[row]
        return Prediction([float(self.probs[row, i]) for i in order],
                          [class_ids[i] for i in order], [names[i] for i in order],
                          known=None if self.known is None else bool(self.known[row]),
                          novelty=None if self.novelty is None else float(self.novelty[row]))


def answer(logits: np.ndarray, *, temperature: float = 1.0, unsure_below: float = 0.0,
           novelty: np.ndarray | None = None, novel_above: float = float("inf"),
           topk: int = 5) -> Answers:
    """Calibrated probabilities softmax(logits / temperature), the top `topk` of each row (all
    classes at most), the rows whose top probability is below `unsure_below`, and the rows
    known (novelty at or below `novel_above`; None without a novelty)."""
    z = np.asarray(logits, dtype=np.float64).reshape(len(logits), -1) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    probs = e / e.sum(axis=1, keepdims=True)
    top = np.argsort(-probs, axis=1, kind="stable")[:, :max(0, min(topk, probs.shape[1]))]
    known = None
    if novelty is not None:
        novelty = np.asarray(novelty, dtype=np.float64).reshape(-1)
        known = novelty <= novel_above
    return Answers(probs=probs, top=top, unsure=probs.max(axis=1, initial=0.0) < unsure_below,
                   novelty=novelty, known=known)

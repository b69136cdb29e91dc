"""Calibration: a temperature that makes the probabilities honest, and the "unsure" threshold.

Both are fitted on the valid split as the last step of training (recipes.run_recipe), so a
model has them from the moment it is trained; the checkpoint, the engine and every export
carry them.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

from helpers.model.classifier import Classifier
from helpers.serve.answers import answer
from helpers.serve.inference import scores_of
from helpers.train.evaluate import (
    ArrayLike,
    as_arrays,
    expected_calibration_error,
    nll,
    reliability,
    to_numpy,
)


def fit_temperature(logits: ArrayLike, labels: ArrayLike, *,
                    bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """The temperature T minimising the NLL of softmax(logits / T); fit it on the valid split."""
    logits, labels = as_arrays(logits, labels)
    rows = np.arange(len(labels))

    def loss(log_t: float) -> float:
        return float(-log_softmax(logits / np.exp(log_t), axis=1)[rows, labels].mean())

    # One parameter, a smooth loss: a bounded scalar search over log T is exact and fast.
    result = minimize_scalar(loss, bounds=np.log(bounds), method="bounded",
                             options={"xatol": 1e-6})
    return float(np.exp(result.x))


def choose_unsure_threshold(probs: ArrayLike, labels: ArrayLike, *,
                            target_accuracy: float = 0.99) -> float:
    """The lowest top-1 probability t such that predictions at or above t are right at least
    `target_accuracy` of the time (on the valid split, calibrated probabilities).

    A prediction whose top probability is below t is "unsure". 0.0 when every prediction
    can be kept (never unsure); 1.0 when not even the most confident ones reach the target.
    """
    probs, labels = as_arrays(probs, labels)
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


class CalibrationWarning(UserWarning):
    """Too few held-out images to calibrate: the plain softmax is kept, never unsure."""


# Below this many validation images a fitted temperature says more about the few images than
# about the model: with all of them right, the NLL falls without end as T -> 0 (4 images gave
# T = 0.05 and "unsure below 0 %"), and a threshold for 99 % right cannot be told from 1 %.
MIN_CALIBRATION_IMAGES = 30


def calibrate(model: Classifier, logits: ArrayLike, labels: ArrayLike, *,
              target_accuracy: float = 0.99) -> dict[str, Any]:
    """Fit model.temperature and model.unsure_below on valid logits; returns the facts.

    With fewer than MIN_CALIBRATION_IMAGES images, a CalibrationWarning says so and the model
    keeps temperature 1 and no unsure threshold.
    """
    raw = answer(to_numpy(logits)).probs
    n = len(to_numpy(labels))
    if n < MIN_CALIBRATION_IMAGES:
        warnings.warn(f"only {n} validation image(s): too few to calibrate (it needs "
                      f"{MIN_CALIBRATION_IMAGES} or more); probabilities stay the plain softmax "
                      "and no answer is marked unsure; add photos to valid/ or raise "
                      "--valid_fraction", CalibrationWarning, stacklevel=2)
        model.temperature, model.unsure_below = 1.0, 0.0
        return {"temperature": 1.0, "unsure_below": 0.0, "fitted_on": None, "n": n,
                "skipped": f"{n} validation images; calibration needs "
                           f"{MIN_CALIBRATION_IMAGES} or more"}
    model.temperature = fit_temperature(logits, labels)
    calibrated = answer(to_numpy(logits), temperature=model.temperature).probs
    model.unsure_below = choose_unsure_threshold(calibrated, labels,
                                                 target_accuracy=target_accuracy)
    return {"temperature": model.temperature, "unsure_below": model.unsure_below,
            "fitted_on": "valid", "n": len(to_numpy(labels)),
            "ece_before": expected_calibration_error(raw, labels),
            "ece_after": expected_calibration_error(calibrated, labels),
            "nll_before": nll(raw, labels), "nll_after": nll(calibrated, labels)}


def judge(logits: ArrayLike, labels: ArrayLike, *, temperature: float) -> dict[str, Any]:
    """How honest the probabilities of a split are before and after a temperature: ECE and
    NLL, and the reliability-diagram data of each (judge on test what was fitted on valid)."""
    logits = to_numpy(logits)
    raw, scaled = answer(logits).probs, answer(logits, temperature=temperature).probs
    return {"temperature": temperature,
            "ece_before": expected_calibration_error(raw, labels),
            "ece_after": expected_calibration_error(scaled, labels),
            "nll_before": nll(raw, labels), "nll_after": nll(scaled, labels),
            "reliability_before": reliability(raw, labels),
            "reliability_after": reliability(scaled, labels)}


KEEP_KNOWN = 0.95  # the share of valid flowers the known verdict keeps (the target)


def choose_novel_above(novelty: ArrayLike, *, keep: float = KEEP_KNOWN) -> float:
    """The novelty above which a photo is "not a flower I know": the `keep` quantile of the
    valid flowers' novelty (a share 1 - keep of them is flagged)."""
    return float(np.quantile(to_numpy(novelty), keep, method="higher"))


def calibrate_on(model: Classifier, samples: list[tuple[str, int]], *,
                 target_accuracy: float = 0.99) -> dict[str, Any]:
    """calibrate on the logits of (path, label) samples (the valid split) through the
    model's engine, the path every answer takes; and, where the model has a novelty score,
    its known threshold on the same photos."""
    scores, labels, _ = scores_of(model, samples)
    facts = calibrate(model, scores.logits, labels, target_accuracy=target_accuracy)
    if scores.novelty is not None and "skipped" not in facts:
        model.novel_above = choose_novel_above(scores.novelty)
        facts |= {"novel_above": model.novel_above, "known_kept": KEEP_KNOWN}
    return facts

"""The insight report: where a trained model fails and how far its probabilities can be trusted.

It takes the model and the data, nothing of how the model was trained: the model's own
temperature and unsure threshold (fitted on the valid split when it was trained) are
judged on the test split, through the model's prediction engine.
"""

from __future__ import annotations

from typing import Any

from helpers.insight.metrics import (
    cluster_order,
    confused_pairs,
    confusion_matrix,
    highest_loss,
    per_class_accuracy,
    worst_classes,
)
from helpers.model.classifier import Classifier
from helpers.serve.answers import answer
from helpers.serve.engine import Engine
from helpers.serve.inference import logits_of
from helpers.train.calibration import judge
from helpers.train.evaluate import topk_accuracy, unsure_summary


def report(model: Classifier | Engine, samples: list[tuple[str, int]], *, worst: int = 10,
           pairs: int = 10, high_loss: int = 12) -> dict[str, Any]:
    """Measure a trained model on (path, label) samples (the test split): accuracy, per-class
    accuracy, the confusion matrix and its clustered order, the most confused pairs, the
    highest-loss samples, and calibration (ECE and NLL before and after the model's
    temperature, the unsure rate at its threshold, reliability data)."""
    logits, labels, bad = logits_of(model, samples)
    answers = answer(logits, temperature=model.temperature, unsure_below=model.unsure_below)
    probs = answers.probs
    names = list(model.class_names)
    confusion = confusion_matrix(probs, labels)
    judged = judge(logits, labels, temperature=model.temperature)
    measured = {**topk_accuracy(probs, labels),
                **{k: judged[k] for k in ("ece_before", "ece_after", "nll_before", "nll_after")},
                **unsure_summary(answers, labels)}
    kept = [s for s in samples if s[0] not in {path for path, _ in bad}]
    return {"temperature": model.temperature, "unsure_below": model.unsure_below,
            "test": measured, "bad": bad, "samples": kept,
            "per_class": per_class_accuracy(probs, labels, names),
            "worst": worst_classes(probs, labels, names, worst),
            "confusion": confusion, "order": cluster_order(confusion),
            "pairs": confused_pairs(confusion, names, pairs),
            "high_loss": highest_loss(probs, labels, high_loss),
            "reliability": {"before": judged["reliability_before"],
                            "after": judged["reliability_after"]},
            "logits": logits, "probs": probs, "labels": labels, "predicted": probs.argmax(1)}

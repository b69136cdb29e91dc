"""Pictures of what the model learned and where it fails: confusion matrix, reliability
diagram, worst classes, confused pairs, highest-loss samples and Grad-CAM."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from PIL import Image

from helpers.insight.plots import plot_topk_bars
from helpers.model.classifier import Classifier
from helpers.serve.engine import Engine
from helpers.serve.prediction import Prediction, view_for
from helpers.train.evaluate import ece_of_bins

Picture = Image.Image | np.ndarray


def plot_confusion(confusion: np.ndarray, order: Sequence[int] | None = None,
                   names: Sequence[str] | None = None, *, annotate: int = 10) -> Figure:
    """The confusion matrix with classes in `order` (so confusions cluster near the diagonal),
    counts on a log scale; the `annotate` largest mistakes ringed and numbered on the matrix,
    and named beside it ("1. sweet pea taken for wild pansy, 3 images")."""
    confusion = np.asarray(confusion)
    order = np.arange(len(confusion)) if order is None else np.asarray(order)
    names = list(names) if names is not None else [str(i) for i in range(len(confusion))]
    shown = confusion[np.ix_(order, order)]
    fig, (ax, ax_list) = plt.subplots(1, 2, figsize=(12, 7),
                                      gridspec_kw={"width_ratios": [1.45, 1]})
    masked = np.ma.masked_equal(shown, 0)  # empty cells stay white
    image = ax.imshow(masked, cmap="viridis", norm=LogNorm(vmin=1, vmax=max(shown.max(), 2)),
                      interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.8, label="images")
    off = shown.copy()
    np.fill_diagonal(off, 0)
    lines = []
    cells = [c for c in np.argsort(-off, axis=None, kind="stable")[:annotate] if off.flat[c] > 0]
    for rank, cell in enumerate(cells, 1):
        row, col = np.unravel_index(cell, off.shape)
        # A small number inside the ring: the names go in the list, so nothing overlaps.
        ax.plot(col, row, "o", ms=11, mfc="white", mec="red", mew=1.2, alpha=0.85)
        ax.text(col, row, str(rank), ha="center", va="center", fontsize=6, color="red",
                fontweight="bold")
        count = off[row, col]
        lines.append(f"{rank}. {names[order[row]]} taken for {names[order[col]]}, "
                     f"{count} image{'s' if count != 1 else ''}")
    if len(order) <= 30:  # beyond that, tick labels are unreadable
        labels = [names[i] for i in order]
        ax.set_xticks(range(len(order)), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(len(order)), labels, fontsize=7)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    ax.set(xlabel="predicted class", ylabel="true class",
           title="Confusion matrix (classes ordered so confusions cluster)")
    ax_list.axis("off")
    ax_list.set_title("The largest confusions", loc="left")
    ax_list.text(0, 1, "\n".join(lines) or "no confusions", va="top", fontsize=9,
                 transform=ax_list.transAxes, wrap=True)
    fig.tight_layout()
    return fig


def plot_reliability(before: dict[str, np.ndarray],
                     after: dict[str, np.ndarray] | None = None) -> Figure:
    """Reliability diagrams (accuracy against confidence per bin): before the temperature
    and, when given, after it; a perfectly calibrated model follows the diagonal."""
    panels = [("before temperature scaling", before)]
    if after is not None:
        panels.append(("after temperature scaling", after))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.5), squeeze=False)
    for ax, (title, bins) in zip(axes[0], panels, strict=True):
        edges = bins["edges"]
        width = np.diff(edges)
        accuracy = np.nan_to_num(bins["accuracy"])
        ax.bar(edges[:-1], accuracy, width=width, align="edge", edgecolor="black",
               color="tab:blue", alpha=0.8, label="accuracy")
        ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top probability)",
               ylabel="accuracy", title=f"{title}\nECE {ece_of_bins(bins):.2%}")
        ax.legend(loc="upper left")
    fig.tight_layout()
    return fig


def plot_worst_classes(scores: Sequence[dict[str, Any]]) -> Figure:
    """Horizontal bars of the worst classes' accuracy (as evaluate.worst_classes gives them)."""
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(scores) + 1.2))
    y = np.arange(len(scores))
    ax.barh(y, [s["accuracy"] for s in scores], color="tab:red")
    ax.set_yticks(y, [f"{s['name']} ({s['n']})" for s in scores])
    ax.invert_yaxis()
    ax.set(xlim=(0, 1), xlabel="top-1 accuracy", title="Worst classes (images in brackets)")
    fig.tight_layout()
    return fig


def _image_axes(count: int, per_row: int, width: float = 2.6):
    """A grid of image axes, axis lines off, enough for `count` images."""
    rows = max(1, -(-count // per_row))
    fig, axes = plt.subplots(rows, per_row, figsize=(width * per_row, (width + 0.5) * rows),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    return fig, axes.flat


def plot_confused_pairs(items: Sequence[tuple[Picture, Picture, str, str, int]],
                        pairs_per_row: int = 2) -> Figure:
    """For each (image, image, true name, predicted name, count): the true class's image,
    taken for the other class `count` times, beside an image of that other class."""
    fig, axes = _image_axes(2 * len(items), 2 * pairs_per_row)
    axes = list(axes)
    for i, (left, right, true_name, predicted_name, count) in enumerate(items):
        ax_a, ax_b = axes[2 * i], axes[2 * i + 1]
        ax_a.imshow(left)
        times = "once" if count == 1 else f"{count} times"
        ax_a.set_title(f"this {true_name}\nwas taken for a {predicted_name} ({times})",
                       fontsize=9, color="red")
        ax_b.imshow(right)
        ax_b.set_title(f"a {predicted_name}\n", fontsize=9)
    fig.tight_layout()
    return fig


def plot_high_loss(items: Sequence[tuple[Picture, str, str, float]], columns: int = 4) -> Figure:
    """For each (image, true name, predicted name, probability of the prediction): the image
    titled with what it is and what the model said."""
    fig, axes = _image_axes(len(items), columns)
    for ax, (image, true_name, predicted_name, probability) in zip(axes, items, strict=False):
        ax.imshow(image)
        ax.set_title(f"true: {true_name}\nsaid: {predicted_name} {probability:.0%}",
                     fontsize=9, color="green" if true_name == predicted_name else "red")
    fig.tight_layout()
    return fig


def plot_gradcam(image: Picture, cam: np.ndarray, prediction: Prediction, *,
                 true_name: str | None = None, unsure_below: float = 0.0) -> Figure:
    """The image, its Grad-CAM overlay and the top-K chart side by side; unsure ones say so."""
    from helpers.insight.gradcam import overlay

    fig, (ax_img, ax_cam, ax_bar) = plt.subplots(1, 3, figsize=(13, 3.6),
                                                 gridspec_kw={"width_ratios": [1, 1, 1.3]})
    for ax in (ax_img, ax_cam):
        ax.axis("off")
    ax_img.imshow(image)
    ax_img.set_title(f"true: {true_name}" if true_name else "image")
    ax_cam.imshow(overlay(image, cam))
    ax_cam.set_title(f"Grad-CAM: {prediction.names[0]}")
    plot_topk_bars(prediction, ax_bar, true_name)
    if prediction.is_unsure(unsure_below):
        ax_bar.set_title(f"unsure: top probability below {unsure_below:.0%}", color="darkorange")
    fig.tight_layout()
    return fig


def pair_items(report: dict[str, Any], model: Classifier | Engine, *,
               n: int = 6) -> list[tuple[np.ndarray, np.ndarray, str, str, int]]:
    """Gallery items for plot_confused_pairs from report.report's pairs: a misclassified
    image of the true class and a correctly classified one of the other."""
    labels, predicted = report["labels"], report["predicted"]
    paths = [path for path, _ in report["samples"]]
    items = []
    for pair in report["pairs"][:n]:
        wrong = np.flatnonzero((labels == pair["true"]) & (predicted == pair["predicted"]))
        other = np.flatnonzero((labels == pair["predicted"]) & (predicted == pair["predicted"]))
        other = other if len(other) else np.flatnonzero(labels == pair["predicted"])
        left = view_for(model, paths[wrong[0]])
        right = view_for(model, paths[other[0]]) if len(other) else np.ones_like(left)
        items.append((left, right, pair["true_name"], pair["predicted_name"], pair["count"]))
    return items


def high_loss_items(report: dict[str, Any], model: Classifier | Engine, *,
                    n: int = 8) -> list[tuple[np.ndarray, str, str, float]]:
    """Gallery items for plot_high_loss from report.report's highest-loss samples."""
    names = model.class_names
    return [(view_for(model, report["samples"][row["index"]][0]), names[row["true"]],
             names[row["predicted"]], row["probability"]) for row in report["high_loss"][:n]]

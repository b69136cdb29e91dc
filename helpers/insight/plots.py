"""Pictures of results: the top-K bar chart beside its image, and the training curves."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from PIL import Image

from helpers.core.files import atomic_write
from helpers.data.preprocess import Preprocess
from helpers.serve.prediction import Prediction

if TYPE_CHECKING:
    from torch.utils.data import Dataset

def plot_topk_bars(prediction: Prediction, ax: Axes | None = None,
                   true_name: str | None = None) -> Axes:
    """Horizontal bars of the top-K probabilities, the highest on top; the true name in green."""
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3))
    y = np.arange(len(prediction.probs))
    colors = ["tab:green" if n == true_name else "tab:blue" for n in prediction.names]
    ax.barh(y, prediction.probs, color=colors)
    ax.set_yticks(y, prediction.names)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("probability")
    for yi, p in zip(y, prediction.probs, strict=True):
        ax.text(min(p + 0.02, 0.85), yi, f"{p:.1%}", va="center")
    return ax


def plot_prediction(image: Image.Image | np.ndarray, prediction: Prediction,
                    title: str | None = None, true_name: str | None = None) -> Figure:
    """The image beside the horizontal bar chart of its top-K flower names."""
    fig, (ax_img, ax_bar) = plt.subplots(1, 2, figsize=(9, 3.5),
                                         gridspec_kw={"width_ratios": [1, 1.3]})
    ax_img.imshow(image)
    ax_img.axis("off")
    ax_img.set_title(title or (f"true: {true_name}" if true_name else prediction.names[0]))
    plot_topk_bars(prediction, ax_bar, true_name)
    fig.tight_layout()
    return fig


def plot_history(history: Sequence[dict[str, Any]]) -> Figure:
    """Loss and accuracy per epoch, training and validation side by side: the linear probe
    (if any) named as such, whole epochs on the x-axis, the epoch kept marked."""
    epochs = [row["epoch"] for row in history]
    labels = [("probe" if row.get("phase") == "linear probe"
               else str(row.get("phase_epoch", row["epoch"]))) for row in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, metric, title in ((ax_loss, "loss", "Loss"), (ax_acc, "top1", "Accuracy")):
        ax.plot(epochs, [r[f"train_{metric}"] for r in history], "o-", label="train")
        ax.plot(epochs, [r[f"valid_{metric}"] for r in history], "o-", label="valid")
        kept = [r for r in history if r.get("kept")]
        if kept:
            ax.axvline(kept[0]["epoch"], color="green", ls="--", lw=1, label="epoch kept")
        ax.set_xticks(epochs, labels)
        ax.set(xlabel="epoch", title=title,
               ylabel="cross-entropy loss" if metric == "loss" else "top-1 accuracy")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, path: str | os.PathLike) -> Path:
    """Write a figure to a PNG file (folders made as needed) and close it."""
    try:
        return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110,
                                                         bbox_inches="tight"))
    finally:
        plt.close(fig)


def show_images(images: Sequence[np.ndarray], titles: Sequence[str], *, spec: Preprocess,
                columns: int = 4) -> Figure:
    """A grid of processed (3 x H x W, normalised) images with their titles."""
    from helpers.serve.prediction import imshow

    rows = -(-len(images) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, title in zip(axes.flat, images, titles, strict=False):
        imshow(image, ax, title, spec=spec)
    fig.tight_layout()
    return fig


def plot_prediction_grid(items: Sequence[tuple[Image.Image, Prediction, str]],
                         columns: int = 2) -> Figure:
    """For each (image, prediction, true name): the image beside its top-K bar chart."""
    rows = -(-len(items) // columns)
    fig, axes = plt.subplots(rows, 2 * columns, figsize=(8 * columns, 3 * rows), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 1.4] * columns})
    for ax in axes.flat:
        ax.axis("off")
    for i, (image, prediction, true_name) in enumerate(items):
        row, col = divmod(i, columns)
        ax_img, ax_bar = axes[row, 2 * col], axes[row, 2 * col + 1]
        ax_img.imshow(image)
        ok = prediction.names[0] == true_name
        ax_img.set_title(f"{'✓' if ok else '✗'} {true_name}", color="green" if ok else "red")
        ax_bar.axis("on")
        plot_topk_bars(prediction, ax_bar, true_name)
    fig.tight_layout()
    return fig


def show_samples(dataset: Dataset, names: Sequence[str], *, spec: Preprocess,
                 count: int = 8) -> Figure:
    """`count` images spread over a dataset, as its transform makes them, with their names."""
    step = max(1, len(dataset) // count)
    samples = [dataset[i] for i in range(0, len(dataset), step)][:count]
    return show_images([np.asarray(x) for x, _ in samples], [names[y] for _, y in samples],
                       spec=spec)

"""Draw the README's pictures from a trained checkpoint; no photograph of the data set.

    python benchmarks/figures.py build/main/checkpoint.pth

Writes to assets/: the top-5 bars of a test image (bars only), the training curves, the
confusion matrix, the reliability diagram, and Grad-CAM on scikit-image's bundled photos
(not flowers, not from the data set). Prints the unsure rates on the test split and on
those photos.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import skimage.data  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from helpers.core.device import get_device  # noqa: E402
from helpers.data import splits  # noqa: E402
from helpers.data.folders import data_dir  # noqa: E402
from helpers.insight import gradcam, plots, report  # noqa: E402
from helpers.insight import report_plots as insight_plots  # noqa: E402
from helpers.model import checkpoint  # noqa: E402
from helpers.serve import prediction  # noqa: E402

PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "camera", "cat", "hubble_deep_field",
          "immunohistochemistry", "retina"]


def main(ckpt_path: str) -> None:
    """Draw every README picture from the checkpoint and print the unsure rates."""
    assets = ROOT / "assets"
    device = get_device()
    model, saved = checkpoint.load_checkpoint(ckpt_path, device)
    sets = splits.load_data(data_dir(), model.preprocess).sets
    history = saved["metrics"]["history"]
    plots.save_figure(plots.plot_history(history), assets / "training_curves.png")
    image_path, label = sets["test"].samples[0]
    fig, ax = plt.subplots(figsize=(5, 3))
    plots.plot_topk_bars(prediction.predict(image_path, model), ax,
                         true_name=model.class_names[label])
    ax.set_title(f"top-5 for a test image of {model.class_names[label]}")
    plots.save_figure(fig, assets / "top5_bars.png")

    insight = report.report(model, sets["test"].samples)
    plots.save_figure(insight_plots.plot_confusion(insight["confusion"], insight["order"],
                                                   model.class_names), assets / "confusion.png")
    plots.save_figure(insight_plots.plot_reliability(insight["reliability"]["before"],
                                                     insight["reliability"]["after"]),
                      assets / "reliability.png")
    t = insight["test"]
    print(f"temperature {insight['temperature']:.2f}; test ECE {t['ece_before']:.2%} -> "
          f"{t['ece_after']:.2%}; unsure below {model.unsure_below:.1%}: "
          f"{t['unsure_rate']:.1%} of test images unsure")

    unsure = 0
    for name in PHOTOS:
        photo = Image.fromarray(getattr(skimage.data, name)())
        result = prediction.predict(photo, model)
        unsure += result.probs[0] < model.unsure_below
        print(f"  {name}: {result.names[0]} {result.probs[0]:.1%}")
    print(f"scikit-image photos (not flowers): {unsure}/{len(PHOTOS)} unsure")
    photo = Image.fromarray(skimage.data.coffee())
    shown, cam = gradcam.explain(model, photo)
    fig = insight_plots.plot_gradcam(shown, cam, prediction.predict(photo, model),
                                     unsure_below=model.unsure_below)
    plots.save_figure(fig, assets / "gradcam_coffee.png")


if __name__ == "__main__":
    main(sys.argv[1])

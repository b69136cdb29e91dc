"""Fitting the known verdict's novelty score (model/novelty.py) on the training flowers.

The score's class means and shared covariance come from the training photos' centre views
alone (their pooled features, from the cached activations where the recipe has them); a few
valid photos' features a class are kept for teach (its negatives), outside the score;
its threshold is set on the valid flowers by calibration.calibrate_on. Nothing else reaches
the fitting: no photo that is not a flower, no kind held out of training.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader
from torchvision import datasets

from helpers.core.device import autocast, ignore_stop_signals
from helpers.data.transforms import eval_transform
from helpers.model.classifier import Classifier
from helpers.train.cache import ActivationCache


@torch.inference_mode()
def training_features(model: Classifier, dataset: datasets.ImageFolder, device: torch.device,
                      *, cache: ActivationCache | None = None,
                      batch_size: int = 64) -> torch.Tensor:
    """The pooled features of every training photo's centre view (N x D, float32)."""
    model.eval()
    if cache is not None:  # the trunk's cached activations through the trained tail
        acts = cache.get(dataset, "centre")
        cache.tail.eval().to(device)
        return torch.cat([cache.tail(batch.to(device).float()).float().cpu()
                          for batch in acts.split(256)])
    plain = datasets.ImageFolder(dataset.root, transform=eval_transform(model.preprocess))
    plain.samples = list(dataset.samples)
    loader = DataLoader(plain, batch_size=batch_size, num_workers=min(4, torch.get_num_threads()),
                        worker_init_fn=ignore_stop_signals)  # the main process stops
    out = []
    for images, _ in loader:
        with autocast(device, enabled=device.type == "cuda"):
            out.append(model.features(images.to(device)).float().cpu())
    return torch.cat(out)


def fit_known(model: Classifier, dataset: datasets.ImageFolder, device: torch.device, *,
              cache: ActivationCache | None = None,
              valid: datasets.ImageFolder | None = None) -> dict[str, float]:
    """Fit the model's novelty score on a training set, and remember a few `valid` photos'
    features a class for teach (training photos' where there is no valid set); returns how
    many photos and seconds."""
    import time

    tic = time.perf_counter()
    features = training_features(model, dataset, device, cache=cache)
    model.novelty.fit(features, torch.tensor(dataset.targets),
                      num_classes=len(model.class_names))
    if valid is not None and len(valid):  # never the score's fitting: teach's negatives only
        model.novelty.remember(training_features(model, valid, device, cache=cache),
                               torch.tensor(valid.targets))
    model.novelty.to(device)
    return {"photos": len(features), "seconds": time.perf_counter() - tic}

"""Teach a trained model a kind it does not know from a few photos, or forget a taught one.

Nothing of the trunk trains: the new class's weights are imprinted (Qi et al. 2018) from the
mean direction of its photos' pooled features (each photo and its mirror image), scaled to
the mean length of the learned classes' weights, with their mean bias; then that one row is
refitted for a moment (cross-entropy, the learned rows frozen, every photo weighing the same)
on its photos against the few valid photos' features a class the model remembers
(model/novelty.py; photos it never trained on, so scored as new photos will be). The known verdict
learns its class mean. The learned classes' weights are untouched, so their scores are
unchanged; a photo of theirs changes answer only where the new class scores higher. Taught
classes are listed in `model.taught` (checkpoint and metrics).
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch
from PIL import Image
from torch import nn

from helpers.core.errors import UserError
from helpers.data.preprocess import process_image
from helpers.model.classifier import Classifier

MIN_PHOTOS = 3
REFIT_STEPS, REFIT_LR = 100, 0.05  # fixed before any held-out kind was taught (Adam, one row)


def _linear(model: Classifier) -> nn.Linear:
    """The model's class layer, when its head is linear (the default recipe's)."""
    layers = [m for m in model.head if isinstance(m, nn.Linear)]
    if len(layers) != 1:
        raise UserError("teach needs a model with a linear head (the default recipe's); this "
                        "one has a hidden layer: retrain with --hidden_units 0")
    return layers[0]


@torch.inference_mode()
def photo_features(model: Classifier, photos: list[str | os.PathLike | Image.Image]
                   ) -> torch.Tensor:
    """The pooled features of each photo's centre view and its mirror image (2N x D)."""
    batch = np.stack([process_image(p, spec=model.preprocess) for p in photos])
    x = torch.from_numpy(np.concatenate([batch, batch[..., ::-1].copy()]))
    model.eval()
    device = next(model.parameters()).device
    return torch.cat([model.features(part.to(device)).float().cpu() for part in x.split(32)])


def teach(model: Classifier, photos: list[str | os.PathLike | Image.Image], *, name: str,
          class_id: str | None = None) -> dict[str, float | int | str]:
    """Add the class `name` (folder `class_id`, default the name) from its photos, in place;
    returns what was taught, from how many photos, in how many seconds."""
    tic = time.perf_counter()
    class_id = class_id or name
    layer = _linear(model)
    if name in model.class_names or class_id in model.class_to_idx:
        raise UserError(f"the model already knows {name!r}; choose another --name, or "
                        f"--forget it first")
    photos = list(photos)
    if len(photos) < MIN_PHOTOS:
        raise UserError(f"{len(photos)} photo(s) of {name!r}; teach needs {MIN_PHOTOS} or more "
                        "(5 to 20 work well)")
    features = photo_features(model, photos).clone()  # a normal tensor: the refit needs grads
    direction = features / features.norm(dim=1, keepdim=True).clamp_min(1e-12)
    mean = direction.mean(0)
    mean = mean / mean.norm().clamp_min(1e-12)
    with torch.no_grad():
        weight = layer.weight.norm(dim=1).mean() * mean.to(layer.weight)
        bias = layer.bias.mean()
    if len(model.novelty.memory):
        weight, bias = _refit(layer, weight, bias, positives=features.to(layer.weight),
                              negatives=model.novelty.memory.to(layer.weight),
                              labels=model.novelty.memory_labels.to(layer.weight.device))
    with torch.no_grad():
        new = nn.Linear(layer.in_features, layer.out_features + 1).to(layer.weight)
        new.weight.copy_(torch.cat([layer.weight, weight[None]]))
        new.bias.copy_(torch.cat([layer.bias, bias.reshape(1)]))
    _replace(model, layer, new)
    if model.novelty.fitted:
        model.novelty.add_class(features.to(model.novelty.whiten.device))
    index = len(model.class_names)
    model.class_to_idx[class_id] = index
    model.idx_to_class[index] = class_id
    model.class_names.append(name)
    model.taught.append(class_id)
    return {"name": name, "class": class_id, "photos": len(photos),
            "seconds": time.perf_counter() - tic}


def _refit(layer: nn.Linear, weight: torch.Tensor, bias: torch.Tensor, *,
           positives: torch.Tensor, negatives: torch.Tensor,
           labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The new row (weight, bias) after a short cross-entropy refit, the learned rows frozen:
    its photos should score it highest, the remembered photos their own class; every photo
    weighs the same, so the new kind is one class among many, as it will be asked."""
    w = weight.detach().clone().requires_grad_(True)
    b = bias.detach().clone().reshape(1).requires_grad_(True)
    x = torch.cat([positives, negatives])
    targets = torch.cat([torch.full((len(positives),), layer.out_features, dtype=torch.long,
                                    device=labels.device), labels.long()])
    with torch.no_grad():
        fixed = layer(x)
    scale = float(weight.norm())  # steps in proportion to the row's size
    optimizer = torch.optim.Adam([w, b], lr=REFIT_LR * scale / weight.numel() ** 0.5)
    with torch.enable_grad():
        for _ in range(REFIT_STEPS):
            logits = torch.cat([fixed, (x @ w + b)[:, None]], dim=1)
            loss = nn.functional.cross_entropy(logits, targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return w.detach(), b.detach()[0]


def forget(model: Classifier, *, name: str) -> str:
    """Remove the taught class named `name`, in place; returns its class folder."""
    taught = {model.class_names[model.class_to_idx[c]]: c for c in model.taught}
    if name not in taught:
        known = ", ".join(repr(n) for n in taught) or "none"
        raise UserError(f"{name!r} is not a taught class of this model (taught: {known}); only "
                        "classes added by teach can be forgotten")
    class_id = taught[name]
    index = model.class_to_idx[class_id]
    layer = _linear(model)
    keep = [i for i in range(layer.out_features) if i != index]
    with torch.no_grad():
        new = nn.Linear(layer.in_features, len(keep)).to(layer.weight)
        new.weight.copy_(layer.weight[keep])
        new.bias.copy_(layer.bias[keep])
    _replace(model, layer, new)
    if model.novelty.fitted:
        model.novelty.drop_class(index)
    order = [model.idx_to_class[i] for i in keep]
    model.class_names = [model.class_names[i] for i in keep]
    model.class_to_idx = {c: i for i, c in enumerate(order)}
    model.idx_to_class = dict(enumerate(order))
    model.taught.remove(class_id)
    return class_id


def _replace(model: Classifier, old: nn.Linear, new: nn.Linear) -> None:
    """Put `new` where `old` sits in the model's head."""
    for i, module in enumerate(model.head):
        if module is old:
            model.head[i] = new
            return
    raise AssertionError("the class layer is not in the head")

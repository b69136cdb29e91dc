"""Model and training: shapes, frozen gradients, initial loss, overfitting, determinism."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from helpers import data, model, train

CLASSES = {str(i): i for i in range(12)}


@pytest.fixture(scope="module")
def lite0() -> model.Classifier:
    torch.manual_seed(0)
    return model.build_model("efficientnet_lite0", CLASSES, hidden_units=64, dropout=0.0)


def test_output_shape_and_parameter_counts(lite0):
    x = torch.randn(2, 3, 96, 96)
    assert lite0.eval()(x).shape == (2, 12)
    counts = model.count_parameters(lite0)
    assert counts["trainable"] == 1280 * 64 + 64 + 64 * 12 + 12
    assert counts["frozen"] == sum(p.numel() for p in lite0.backbone.parameters())


def test_linear_head_when_no_hidden_units():
    head = model.build_head(1280, 102, hidden_units=0)
    assert [type(m) for m in head] == [nn.Dropout, nn.Linear]
    assert head[1].in_features == 1280 and head[1].out_features == 102


def test_only_head_gets_gradients_and_frozen_batchnorm_stays_put(lite0):
    bn = next(m for m in lite0.backbone.modules() if isinstance(m, nn.BatchNorm2d))
    before = bn.running_mean.clone()
    lite0.train()
    assert not lite0.backbone.training and lite0.head.training
    lite0.zero_grad()
    loss = lite0(torch.randn(4, 3, 64, 64)).logsumexp(1).mean()
    loss.backward()
    for name, p in lite0.named_parameters():
        if name.startswith("head."):
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        else:
            assert p.grad is None, name
    assert torch.equal(bn.running_mean, before)


def test_initial_loss_is_close_to_log_k(lite0):
    torch.manual_seed(1)
    x, y = torch.randn(16, 3, 64, 64), torch.randint(0, 12, (16,))
    with torch.no_grad():
        loss = nn.functional.cross_entropy(lite0.eval()(x), y).item()
    assert abs(loss - math.log(12)) < 0.5


def test_overfits_one_batch():
    torch.manual_seed(0)
    clf = model.build_model("efficientnet_lite0", CLASSES, hidden_units=64, dropout=0.0)
    x, y = torch.randn(12, 3, 64, 64), torch.arange(12)
    with torch.no_grad():
        features = clf.backbone.eval()(x)  # frozen: the same on every step
    optimizer = torch.optim.Adam(clf.head.parameters(), lr=1e-2)
    for _ in range(100):
        loss = nn.functional.cross_entropy(clf.head(features), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05
    assert torch.equal(clf.eval()(x).argmax(1), y)


def _train_once(folder, seed: int) -> dict[str, torch.Tensor]:
    config = train.TrainConfig(epochs=1, batch_size=12, seed=seed, hidden_units=32)
    sets = data.load_datasets(folder, model.get_backbone(config.arch), ("train", "valid"))
    train.seed_everything(seed)
    clf = model.build_model(config.arch, sets["train"].class_to_idx, hidden_units=32)
    loaders = data.make_loaders(sets, config.batch_size, num_workers=0, seed=seed)
    history = train.fit(clf, loaders, config, torch.device("cpu"), progress=False, log=None)
    assert len(history) == 1 and 0.0 <= history[0]["valid_top1"] <= 1.0
    return {k: v.clone() for k, v in clf.head.state_dict().items()}


def test_same_seed_same_weights(tiny_folder):
    a, b, c = (_train_once(tiny_folder, s) for s in (3, 3, 4))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_fit_learns_and_keeps_best_epoch(tiny_folder):
    config = train.TrainConfig(epochs=3, batch_size=12, learning_rate=3e-3, hidden_units=64)
    sets = data.load_datasets(tiny_folder, model.get_backbone(config.arch))
    train.seed_everything(0)
    clf = model.build_model(config.arch, sets["train"].class_to_idx, hidden_units=64)
    loaders = data.make_loaders(sets, config.batch_size, num_workers=0)
    history = train.fit(clf, loaders, config, torch.device("cpu"), progress=False, log=None)
    assert [r["epoch"] for r in history] == [1, 2, 3]
    best = max(r["valid_top1"] for r in history)
    result = train.evaluate(clf, loaders["valid"], torch.device("cpu"), progress=False)
    assert result["n"] == 36 and result["top1"] == pytest.approx(best)
    assert result["top5"] >= result["top1"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_get_device_falls_back_to_cpu():
    assert train.get_device(gpu=False).type == "cpu"
    assert train.get_device().type in {"cuda", "mps", "cpu"}

"""Model and training: shapes, frozen gradients, initial loss, overfitting, determinism."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from helpers.config import TrainConfig
from helpers.core.device import StopFlag, get_device
from helpers.core.errors import Stopped
from helpers.data import splits
from helpers.data.folders import make_loaders
from helpers.model.backbones import get_backbone
from helpers.model.classifier import Classifier, build_head, build_model, new_model
from helpers.train import evaluate, loop, recipes

CLASSES = {str(i): i for i in range(12)}


@pytest.fixture(scope="module")
def lite0() -> Classifier:
    torch.manual_seed(0)
    return build_model("efficientnet_lite0", CLASSES, hidden_units=64, dropout=0.0)


def test_output_shape_and_parameter_counts(lite0):
    x = torch.randn(2, 3, 96, 96)
    assert lite0.eval()(x).shape == (2, 12)
    trainable = sum(p.numel() for p in lite0.parameters() if p.requires_grad)
    assert trainable == 1280 * 64 + 64 + 64 * 12 + 12
    assert sum(p.numel() for p in lite0.parameters() if not p.requires_grad) == \
        sum(p.numel() for p in lite0.backbone.parameters())


def test_linear_head_when_no_hidden_units():
    head = build_head(1280, 102, hidden_units=0)
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
    clf = build_model("efficientnet_lite0", CLASSES, hidden_units=64, dropout=0.0)
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


TINY = "test_efficientnet"  # timm's tiny EfficientNet: random weights, fast


def _course(folder, **changes):
    """The course recipe's plan for a tiny model on a folder: (config, sets, model, plan)."""
    config = TrainConfig.course(**({"arch": TINY, "epochs": 1, "batch_size": 12,
                                    "hidden_units": 32} | changes))
    sets = splits.load_data(folder, get_backbone(config.arch).preprocess).sets
    clf = new_model(sets, config)
    return config, sets, clf, recipes.course_plan(clf, sets, config, torch.device("cpu"))


def _train_once(folder, seed: int) -> dict[str, torch.Tensor]:
    _, _, clf, plan = _course(folder, seed=seed)
    history = loop.fit(plan, torch.device("cpu"), log=None)
    assert len(history) == 1 and 0.0 <= history[0]["valid_top1"] <= 1.0
    return {k: v.clone() for k, v in clf.head.state_dict().items()}


def test_same_seed_same_weights(tiny_folder):
    a, b, c = (_train_once(tiny_folder, s) for s in (3, 3, 4))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_fit_learns_and_keeps_best_epoch(tiny_folder):
    _, sets, clf, plan = _course(tiny_folder, epochs=3, learning_rate=3e-3, hidden_units=64)
    logged = []
    history = loop.fit(plan, torch.device("cpu"), log=logged.append)
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert [r["phase"] for r in history] == ["train"] * 3
    assert sum(r["kept"] for r in history) == 1
    best = max(r["valid_top1"] for r in history)
    assert next(r for r in history if r["kept"])["valid_top1"] == best
    assert logged[0].startswith("train: ") and "parameters train" in logged[0]
    loader = make_loaders({"valid": sets["valid"]}, batch_size=12, num_workers=0)["valid"]
    result = evaluate.topk_accuracy(*loop.predict_probs(clf, loader, torch.device("cpu")))
    assert result["n"] == 36 and result["top1"] == pytest.approx(best)
    assert result["top5"] >= result["top1"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_a_plan_without_validation_keeps_the_last_epoch(tiny_folder):
    _, _, clf, plan = _course(tiny_folder, epochs=2)
    plan.validate = None
    history = loop.fit(plan, torch.device("cpu"), log=None)
    assert [r["kept"] for r in history] == [False, True]
    assert all(r["valid_top1"] != r["valid_top1"] for r in history)  # nan: nothing measured


def test_stop_flag_ends_at_a_batch_boundary_and_saves(tiny_folder, tmp_path):
    _, _, clf, plan = _course(tiny_folder, epochs=2, batch_size=6)
    stop = StopFlag()
    phase = plan.phases[0]
    real_step = phase.optimizer.step

    def step_then_signal(*args, **kwargs):
        out = real_step(*args, **kwargs)
        stop.request()  # as the signal handler would, in the middle of the epoch
        return out

    phase.optimizer.step = step_then_signal
    with pytest.raises(Stopped, match="after 1 batches of train 1/2"):
        loop.fit(plan, torch.device("cpu"), log=None, state_path=tmp_path / "last.pth",
                  stop=stop)
    state = torch.load(tmp_path / "last.pth", weights_only=True)
    assert (state["phase"], state["epoch"], state["batches_done"]) == (0, 0, 1)


def test_get_device_falls_back_to_cpu():
    assert get_device(gpu=False).type == "cpu"
    assert get_device().type in {"cuda", "mps", "cpu"}


def test_a_tie_in_valid_top1_is_broken_by_the_lower_valid_loss(tiny_folder):
    """Equal top-1 on valid (as happens on few images): the epoch with the lower valid loss
    is kept, not the first one (the linear probe used to win every tie)."""
    _, _, clf, plan = _course(tiny_folder, epochs=3)
    judged = iter([{"loss": 0.144, "top1": 1.0, "top5": 1.0},
                   {"loss": 0.057, "top1": 1.0, "top5": 1.0},
                   {"loss": 0.090, "top1": 1.0, "top5": 1.0}])
    plan.validate = lambda: next(judged)
    kept_weights = {}
    real_validate = plan.validate

    def remember():
        kept_weights[len(kept_weights)] = {k: v.clone() for k, v in clf.state_dict().items()}
        return real_validate()

    plan.validate = remember
    history = loop.fit(plan, torch.device("cpu"), log=None)
    assert [r["kept"] for r in history] == [False, True, False]
    assert all(torch.equal(v, kept_weights[1][k]) for k, v in clf.state_dict().items())

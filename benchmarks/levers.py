"""Each lever of the cached recipe's fine-tune measured alone on the course split's valid set.

    python benchmarks/levers.py extract                 # activations of every view, once
    python benchmarks/levers.py train '{"views": 3, "epochs": 12, "frozen_bn": true}'
    python benchmarks/levers.py table                   # every variant of the README table

`extract` runs the frozen trunk (OpenVINO, f32) over train/valid/test of FLOWERS_DIR: centre
crops at 224 px, augmented views aug1..aug6 (the train transform, seeded per image), and
the whole shorter side at 288 px (9 x 9 stage maps, for augmentation in activation space);
it writes them to build/levers/. `train` fine-tunes the last stage and a new head on them as
the cached recipe does (linear probe, AdamW, one-cycle, label smoothing, bf16 autocast where
the CPU has it) and prints the valid top-1 after every epoch as one JSON line. Variants:

- "batches": "all" (every view of every image every epoch, the old default), "one" (each
  image once an epoch in one view drawn at random) or "crops" (the 288-px maps: a random
  7 x 7 crop and a random mirror each epoch, "scale": maps first rescaled at random);
- "frozen_bn", "flip" (mirror cached maps at random), "mixup" (alpha), "epochs", "views",
  "eval" ("c224" or "s288").
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from helpers.core.device import autocast_dtype, cpu_flags  # noqa: E402
from helpers.data.folders import data_dir, image_folder  # noqa: E402
from helpers.data.transforms import eval_transform, train_transform  # noqa: E402
from helpers.model import backbones  # noqa: E402
from helpers.model.classifier import build_head, weights_digest  # noqa: E402
from helpers.train import cache, cached_recipe, trunk  # noqa: E402

OUT = ROOT / "build" / "levers"
TABLE = [  # the variants of the README's table, seed 0 unless given
    {"batches": "all", "epochs": 4},
    {"batches": "all", "epochs": 4, "frozen_bn": True},
    {"batches": "all", "epochs": 4, "flip": True},
    {"batches": "all", "epochs": 4, "mixup": 0.4},
    {"batches": "crops", "epochs": 8},
    {"batches": "crops", "epochs": 8, "eval": "s288"},
    {"batches": "one", "epochs": 8},
    {"batches": "one", "epochs": 6, "frozen_bn": True},
    {"batches": "one", "epochs": 8, "frozen_bn": True},
    {"batches": "one", "epochs": 8, "frozen_bn": True, "seed": 1},
    {"batches": "one", "epochs": 10, "frozen_bn": True},
    {"batches": "one", "epochs": 12, "frozen_bn": True},
    {"batches": "one", "epochs": 10, "frozen_bn": True, "views": 5},
    {"batches": "one", "epochs": 12, "frozen_bn": True, "views": 7},
]


def extract(only: list[str] | None = None) -> None:
    """Write the activations of every view the variants use (or of the `only` ones, named
    split-view) to build/levers/; views already written are kept."""
    from torchvision import transforms

    spec = backbones.get_backbone("efficientnet_lite0")
    trunk_, _ = cache.split_backbone(spec.build(True).eval(), 1)
    digest = weights_digest(trunk_).hexdigest()
    whole = transforms.Compose([  # the whole shorter side, square: 9 x 9 maps at 288 px
        transforms.Resize(288, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(288), transforms.ToTensor(),
        transforms.Normalize(spec.preprocess.mean, spec.preprocess.std)])
    c256 = transforms.Compose([  # a larger centre crop of the same photo: 8 x 8 maps
        transforms.Resize(288, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(256), transforms.ToTensor(),
        transforms.Normalize(spec.preprocess.mean, spec.preprocess.std)])
    mirror = transforms.RandomHorizontalFlip(p=1.0)
    jobs = [(s, "c224", eval_transform(spec.preprocess), 224) for s in ("train", "valid", "test")]
    jobs += [(s, "s288", whole, 288) for s in ("train", "valid", "test")]
    jobs += [("train", f"aug{v}", train_transform(spec.preprocess), 224) for v in range(1, 7)]
    for s in ("valid", "test"):  # test-time views: the mirror image, a larger crop
        jobs += [(s, "c224f", transforms.Compose([mirror, eval_transform(spec.preprocess)]), 224),
                 (s, "c256", c256, 256), (s, "c256f", transforms.Compose([mirror, c256]), 256)]
    OUT.mkdir(parents=True, exist_ok=True)
    for split, name, transform, size in jobs:
        if (only and f"{split}-{name}" not in only) or (OUT / f"{split}-{name}.pt").exists():
            continue
        dataset = image_folder(data_dir() / split)
        run = trunk.make_runner("openvino", trunk_, digest=digest, input_size=size,
                                device=torch.device("cpu"))
        seed = int(name[3:]) if name.startswith("aug") else 0
        tic = time.perf_counter()
        acts = cache.extract(run, cache.SeededView(dataset, transform, seed), desc=name)
        torch.save({"a": acts, "y": torch.tensor(dataset.targets)}, OUT / f"{split}-{name}.pt")
        print(f"{split} {name} {tuple(acts.shape)} {len(acts) / (time.perf_counter() - tic):.0f}"
              " images/s", flush=True)


def _load(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    saved = torch.load(OUT / f"{name}.pt", weights_only=True)
    return saved["a"], saved["y"]


def _batches(kind: str, views: list[torch.Tensor], big: torch.Tensor | None, y: torch.Tensor,
             g: torch.Generator, *, scale: tuple[float, float], batch_size: int = 128):
    """One epoch of (activations, labels) batches of the variant `kind`."""
    n = len(y)
    if kind == "all":
        x_all, y_all = torch.cat(views), y.repeat(len(views))
        for idx in torch.randperm(len(y_all), generator=g).split(batch_size):
            yield x_all[idx].float(), y_all[idx]
        return
    if kind == "one":
        pick = torch.randint(len(views), (n,), generator=g)
        for idx in torch.randperm(n, generator=g).split(batch_size):
            yield torch.stack([views[int(pick[i])][i] for i in idx]).float(), y[idx]
        return
    for idx in torch.randperm(n, generator=g).split(batch_size):
        src = big[idx].float()  # the maps rescaled at random within `scale`, then cropped
        side = max(7, round(src.shape[-1] * float(torch.empty(1).uniform_(*scale, generator=g))))
        if side != src.shape[-1]:
            src = F.interpolate(src, size=(side, side), mode="bilinear", antialias=True)
        ox = torch.randint(0, side - 6, (len(idx),), generator=g)
        oy = torch.randint(0, side - 6, (len(idx),), generator=g)
        xb = torch.stack([src[k, :, oy[k]:oy[k] + 7, ox[k]:ox[k] + 7] for k in range(len(idx))])
        mirror = torch.rand(len(idx), generator=g) < 0.5
        xb[mirror] = xb[mirror].flip(3)
        yield xb, y[idx]


def train(batches: str = "one", epochs: int = 12, views: int = 3, seed: int = 0,
          frozen_bn: bool = False, flip: bool = False, mixup: float = 0.0,
          eval: str = "c224", scale: tuple[float, float] = (1.0, 1.0),
          also: tuple[str, ...] = ()) -> dict:
    """Probe, then fine-tune the tail and head on the cached views; returns the figures.
    `also` names more valid views judged every epoch besides `eval` (a "+" between names
    averages their probabilities: "c224+c224f" is flip test-time augmentation)."""
    torch.manual_seed(seed)
    spec = backbones.get_backbone("efficientnet_lite0")
    _, tail = cache.split_backbone(spec.build(True), 1)
    head = build_head(spec.num_features, 102, hidden_units=0, dropout=0.2)
    net = cached_recipe.CachedModel(tail, head, freeze_bn=frozen_bn).to(
        memory_format=torch.channels_last)
    dtype = autocast_dtype(torch.device("cpu"))

    def autocast():
        return torch.autocast("cpu", dtype or torch.bfloat16, enabled=dtype is not None)

    names = ["c224"] + [f"aug{v}" for v in range(1, views)]
    if batches == "crops":
        big, y = _load("train-s288")
        centre, views_ = big[..., 1:8, 1:8], []
    else:
        big, views_ = None, [_load(f"train-{n}")[0] for n in names]
        centre, y = views_[0], _load("train-c224")[1]
    x_valid, y_valid = _load(f"valid-{eval}")
    judged = {name: name.split("+") for name in also}
    extra = {v: _load(f"valid-{v}")[0] for parts in judged.values() for v in parts}
    more: dict[str, list[float]] = {name: [] for name in judged}
    net.eval()  # the linear probe on pooled centre features, as the recipe's first phase
    with torch.no_grad(), autocast():
        features = torch.cat([tail(b.float()).float() for b in centre.split(256)])
    optimizer = torch.optim.AdamW(head.parameters(), 3e-3, weight_decay=0.05)
    g = torch.Generator().manual_seed(seed)  # the probe's order; the fine-tune's: seed + 1
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=3e-3, total_steps=20 * math.ceil(len(y) / 256), pct_start=0.15)
    head.train()
    for _ in range(20):
        for idx in torch.randperm(len(y), generator=g).split(256):
            loss = F.cross_entropy(head(features[idx]), y[idx], label_smoothing=0.1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    per_epoch = math.ceil(len(y) * (len(names) if batches == "all" else 1) / 128)
    optimizer = torch.optim.AdamW([{"params": tail.parameters(), "lr": 1e-3},
                                   {"params": head.parameters(), "lr": 3e-3}],
                                  weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[1e-3, 3e-3], total_steps=epochs * per_epoch, pct_start=0.15)
    history, tic, g = [], time.perf_counter(), torch.Generator().manual_seed(seed + 1)
    for _ in range(epochs):
        net.train()
        for xb, yb in _batches(batches, views_, big, y, g, scale=scale):
            if flip:
                mirror = torch.rand(len(yb), generator=g) < 0.5
                xb[mirror] = xb[mirror].flip(3)
            xb = xb.contiguous(memory_format=torch.channels_last)
            with autocast():
                if mixup > 0:
                    lam = float(torch.distributions.Beta(mixup, mixup).sample())
                    perm = torch.randperm(len(yb), generator=g)
                    out = net(lam * xb + (1 - lam) * xb[perm]).float()
                    loss = (lam * F.cross_entropy(out, yb, label_smoothing=0.1)
                            + (1 - lam) * F.cross_entropy(out, yb[perm], label_smoothing=0.1))
                else:
                    loss = F.cross_entropy(net(xb).float(), yb, label_smoothing=0.1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        net.eval()

        def probs(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad(), autocast():
                return torch.cat([net(b.float().contiguous(memory_format=torch.channels_last))
                                  .float().softmax(1) for b in x.split(256)])

        history.append(round((probs(x_valid).argmax(1) == y_valid).float().mean().item() * 100, 2))
        views_probs = {v: probs(x) for v, x in extra.items()}
        for name, parts in judged.items():
            p = torch.stack([views_probs[v] for v in parts]).mean(0)
            more[name].append(round((p.argmax(1) == y_valid).float().mean().item() * 100, 2))
    test = {}  # the last epoch's model on test, reported only (nothing is chosen on it)
    if also:
        for name in (eval, *judged):
            p = torch.stack([probs(_load(f"test-{v}")[0]) for v in name.split("+")]).mean(0)
            test[name] = round((p.argmax(1) == _load("test-c224")[1]).float().mean().item()
                               * 100, 2)
    return {"batches": batches, "epochs": epochs, "views": views, "seed": seed,
            "frozen_bn": frozen_bn, "flip": flip, "mixup": mixup, "eval": eval,
            "steps": epochs * per_epoch, "valid_best": max(history), "valid_last": history[-1],
            "valid": history, "also": more, "test_last": test,
            "seconds": round(time.perf_counter() - tic)}


def main(argv: list[str]) -> None:
    """extract | train JSON | table."""
    print(f"CPU flags: {cpu_flags()}", flush=True)
    if argv[0] == "extract":
        extract(argv[1:] or None)
    elif argv[0] == "train":
        print(json.dumps(train(**json.loads(argv[1]))), flush=True)
    else:
        print("| batches | views | epochs | frozen BN | other | steps | valid best | valid last |")
        print("|---|---|---|---|---|---|---|---|")
        for variant in TABLE:
            r = train(**variant)
            other = ", ".join(f"{k} {variant[k]}" for k in ("flip", "mixup", "eval", "seed")
                              if k in variant)
            print(f"| {r['batches']} | {r['views']} | {r['epochs']} | {r['frozen_bn']} "
                  f"| {other or '-'} | {r['steps']} | {r['valid_best']:.2f} % "
                  f"| {r['valid_last']:.2f} % |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["table"])

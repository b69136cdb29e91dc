"""Batches of cached tensors for the cached recipe: pooled features for the probe, and one
cached view per image per epoch for the fine-tune.

Each has a `generator` that the training loop reseeds at the start of every epoch, and each
draws all of an epoch's randomness when the epoch starts: a run resumed mid-epoch skips the
batches it did and sees exactly the ones it did not.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, TensorDataset


def tensor_loader(x: torch.Tensor, y: torch.Tensor, *, batch_size: int,
                  shuffle: bool = False) -> DataLoader:
    """Batches of cached tensors (shuffled by a generator the loop reseeds every epoch)."""
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle,
                      generator=torch.Generator())


class Passes:
    """A loader run `count` times over, as one epoch (the probe's passes over pooled features)."""

    def __init__(self, loader: DataLoader, count: int) -> None:
        self.loader, self.count = loader, count
        self.generator = loader.generator

    def __len__(self) -> int:
        return len(self.loader) * self.count

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for _ in range(self.count):
            yield from self.loader


class ViewBatches:
    """Every image once an epoch, each time as one of its cached views drawn at random.

    `views` holds the V views of N images view after view (V*N rows: view v of image i is
    row v*N + i). An epoch costs one view's worth of steps however many views were cached,
    and over the epochs each image is seen in all its views.
    """

    def __init__(self, views: torch.Tensor, labels: torch.Tensor, *, batch_size: int) -> None:
        if len(views) % len(labels):
            raise ValueError(f"{len(views)} cached rows are not whole views of "
                             f"{len(labels)} images")
        self.views, self.labels, self.batch_size = views, labels, batch_size
        self.count = len(views) // len(labels)
        self.generator = torch.Generator()

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.labels)
        order = torch.randperm(n, generator=self.generator)
        view = torch.randint(self.count, (n,), generator=self.generator)
        for images in order.split(self.batch_size):
            yield self.views[view[images] * n + images], self.labels[images]

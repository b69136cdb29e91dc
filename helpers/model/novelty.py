"""The "known" verdict's score: how far a photo's features lie from every class it learned.

Novelty is the Mahalanobis distance of a photo's L2-normalised pooled features to the
nearest class mean, under one covariance shared by all classes (Lee et al. 2018, with the
normalisation of Mueller and Hein 2025, "Mahalanobis++"), fitted on the training flowers
alone: the class means and the covariance come from training photos, and the threshold
that says "not a flower I know" from valid flowers (the share of them it may flag). No
photo that is not a flower, and no kind held out of training, takes part.

The score is part of the model: a module with the whitening matrix and the whitened class
means as buffers, so the checkpoint holds it, the exported graph computes it beside the
logits (engine, exports and the app read the same number) and a taught class adds its mean.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

SHRINK = 1e-3  # of the mean variance, added to the covariance's diagonal (chosen a priori)
MEMORY_PER_CLASS = 8  # features kept a class: what teach refits a new class against


def normalised(features: Tensor) -> Tensor:
    """Features scaled to unit length (float64 for the fitting's sums)."""
    features = features.double()
    return features / features.norm(dim=1, keepdim=True).clamp_min(1e-12)


class Novelty(nn.Module):
    """Squared Mahalanobis distance to the nearest class mean; empty until fitted."""

    def __init__(self, num_features: int = 0, num_classes: int = 0) -> None:
        super().__init__()
        self.register_buffer("whiten", torch.zeros(num_features, num_features))
        self.register_buffer("means", torch.zeros(num_classes, num_features))
        # A few photos' raw features a class (fp16) and their labels: teach's negatives
        self.register_buffer("memory", torch.zeros(0, num_features, dtype=torch.float16))
        self.register_buffer("memory_labels", torch.zeros(0, dtype=torch.long))

    @property
    def fitted(self) -> bool:
        """True once fitted (a model saved before the verdict existed has no score)."""
        return self.whiten.numel() > 0

    def forward(self, features: Tensor) -> Tensor:
        """The novelty of each row of pooled features (N), higher = stranger."""
        unit = features.float() / features.float().norm(dim=1, keepdim=True).clamp_min(1e-12)
        z = unit @ self.whiten
        # |z - m|^2 = |z|^2 - 2 z.m + |m|^2, smallest over the classes
        d = (z * z).sum(1, keepdim=True) - 2 * z @ self.means.T + (self.means ** 2).sum(1)
        return d.min(dim=1).values.clamp_min(0.0)

    def fit(self, features: Tensor, labels: Tensor, *, num_classes: int) -> Novelty:
        """Class means and shared covariance of training features (N x D) and labels (N)."""
        x = normalised(features)
        labels = labels.long()
        present = torch.bincount(labels, minlength=num_classes)
        if (present == 0).any():
            missing = torch.nonzero(present == 0).flatten().tolist()
            raise ValueError(f"no training features for class index(es) {missing[:5]}")
        means = torch.zeros(num_classes, x.shape[1], dtype=torch.float64)
        means.index_add_(0, labels, x)
        means /= present[:, None]
        centred = x - means[labels]
        cov = centred.T @ centred / len(x)
        cov += SHRINK * cov.diagonal().mean() * torch.eye(len(cov), dtype=cov.dtype)
        values, vectors = torch.linalg.eigh(cov)
        whiten = vectors @ torch.diag(values.rsqrt()) @ vectors.T  # cov^(-1/2), symmetric
        self.whiten = whiten.float()
        self.means = (means @ whiten).float()
        self.remember(features, labels)
        return self

    def remember(self, features: Tensor, labels: Tensor) -> None:
        """Keep MEMORY_PER_CLASS photos' features a class (seeded): teach's negatives."""
        labels = labels.long()
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
        kept = [i for c in range(int(labels.max()) + 1) for i in
                order[labels[order] == c][:MEMORY_PER_CLASS].tolist()]
        self.memory = features[kept].to(torch.float16)
        self.memory_labels = labels[kept].clone()

    def class_mean(self, features: Tensor) -> Tensor:
        """The whitened mean of a new class's features (a row for `means`)."""
        return (normalised(features).mean(0, keepdim=True).float() @ self.whiten)

    def add_class(self, features: Tensor) -> None:
        """Learn one more class from its photos' features (taught classes)."""
        index = len(self.means)
        self.means = torch.cat([self.means, self.class_mean(features)])
        kept = features[:MEMORY_PER_CLASS].to(self.memory)
        memory = self.memory if self.memory.shape[1:] == kept.shape[1:] else kept[:0]
        self.memory = torch.cat([memory, kept])
        self.memory_labels = torch.cat([self.memory_labels,
                                        torch.full((len(kept),), index, dtype=torch.long)])

    def drop_class(self, index: int) -> None:
        """Forget class `index` (its mean and its remembered features)."""
        keep = [i for i in range(len(self.means)) if i != index]
        self.means = self.means[keep]
        rows = self.memory_labels != index
        self.memory = self.memory[rows]
        labels = self.memory_labels[rows]
        self.memory_labels = labels - (labels > index).long()

"""Labelled 32×32 image sets as the π-MLP programs feed them to a network.

:class:`ImageSet` keeps uint8 images (on the device) and turns them into flat float inputs
batch by batch: optional crop+flip augmentation, per-channel standardization, flattening to
``3·32·32 = 3072`` values in channel-major order (no per-image rescaling).
:func:`fixed_subset` gives the fixed, nested subsets behind ``--train-size``/``--test-size``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from experiments.data.cifar import CIFAR10_MEAN, load_cifar10, normalize, random_crop_flip

__all__ = [
    "CIFAR10_PIXEL_MEAN",
    "CIFAR10_PIXEL_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageSet",
    "fixed_subset",
    "load_cifar10_set",
]

log = logging.getLogger("experiments")

# Per-channel pixel statistics of the CIFAR-10 training set on the 0..1 scale (the std is the
# std over all pixels of a channel; experiments.data.cifar.CIFAR10_STD is the smaller mean of
# per-image stds that the TrAct script uses). These are what the original π-limit programs
# normalized with.
CIFAR10_PIXEL_MEAN = CIFAR10_MEAN
CIFAR10_PIXEL_STD = (0.2470, 0.2435, 0.2616)
# The usual ImageNet statistics, used for downsampled ImageNet as well.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def fixed_subset(n_total: int, n: int | None, what: str, salt: int = 0) -> torch.Tensor | None:
    """Sorted indices of ``n`` of ``n_total`` items, the same for every seed and program.

    The subsets are nested: the first ``n`` of one fixed permutation, so
    ``--train-size 1000`` holds the images of ``--train-size 500``. ``None``: everything.
    """
    if n is None or n >= n_total:
        if n is not None and n > n_total:
            log.warning("%s: asked for %d items, only %d exist; using all", what, n, n_total)
        return None
    perm = torch.randperm(n_total, generator=torch.Generator().manual_seed(1234 + salt))
    return perm[:n].sort().values


@dataclass
class ImageSet:
    """Labelled 32×32 images (uint8, N × 3 × 32 × 32) and how to turn them into inputs.

    ``inputs(idx)`` standardizes each channel with ``mean``/``std`` and flattens the image to
    3072 values (channel-major: all red, then green, then blue); no per-image rescaling.
    With ``augment`` and a ``generator``, a random 4-pixel-padded crop and a random horizontal
    flip are applied to the uint8 pixels first.
    """

    images: torch.Tensor
    labels: torch.Tensor
    mean: tuple
    std: tuple
    num_classes: int
    name: str = "data"

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def dim(self) -> int:
        return int(np.prod(self.images.shape[1:]))

    def to(self, device) -> ImageSet:
        return ImageSet(
            self.images.to(device), self.labels.to(device), self.mean, self.std, self.num_classes, self.name
        )

    def inputs(
        self, idx=None, generator: torch.Generator | None = None, augment: bool = False
    ) -> torch.Tensor:
        x = self.images if idx is None else self.images[idx]
        if augment and generator is not None:
            x = random_crop_flip(x, generator)
        return normalize(x, self.mean, self.std).reshape(x.shape[0], -1)


def load_cifar10_set(root, train: bool, size: int | None = None) -> ImageSet:
    """CIFAR-10 train or test split (see experiments.data.cifar) with pixel statistics."""
    images, labels = load_cifar10(root, train=train)
    split = "train" if train else "test"
    idx = fixed_subset(len(labels), size, f"CIFAR-10 {split}", salt=0 if train else 1)
    if idx is not None:
        images, labels = images[idx], labels[idx]
    return ImageSet(images, labels, CIFAR10_PIXEL_MEAN, CIFAR10_PIXEL_STD, 10, f"CIFAR-10 {split}")

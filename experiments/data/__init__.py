"""Readers for the on-disk dataset formats the experiments use, and torch-only transforms.

Nothing is ever downloaded: the programs read files the user already has.
"""

from experiments.data.cifar import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    CorruptDatasetError,
    DatasetError,
    DatasetNotFoundError,
    cifar10_classes,
    cifar100_classes,
    load_cifar10,
    load_cifar100,
    normalize,
    random_crop_flip,
)

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "DatasetError",
    "DatasetNotFoundError",
    "CorruptDatasetError",
    "load_cifar10",
    "load_cifar100",
    "cifar10_classes",
    "cifar100_classes",
    "normalize",
    "random_crop_flip",
]

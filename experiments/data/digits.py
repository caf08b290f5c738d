"""scikit-learn's bundled handwritten digits (1797 images, 8×8, 10 classes) as CIFAR-shaped data.

For quick experiments on a machine without CIFAR or a GPU: the data ship inside scikit-learn,
so nothing is downloaded. Each 8×8 image (grey levels 0..16) is scaled to 0..255, enlarged to
``size × size`` by pixel repetition and copied to three channels, so CIFAR models take it
unchanged. The train/test split is stratified and fixed (it does not depend on the training
seed).
"""

from __future__ import annotations

import torch

__all__ = ["load_digits_split"]


def load_digits_split(size: int = 32, test_fraction: float = 0.25, split_seed: int = 0):
    """``(train_images, train_labels, test_images, test_labels)``: uint8 ``N × 3 × size × size``
    images and int64 labels; with the defaults 1347 training and 450 test images."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if size % 8:
        raise ValueError(f"size must be a multiple of 8, got {size}")
    digits = load_digits()
    pixels = torch.from_numpy(digits.images).mul(255.0 / 16.0).round().to(torch.uint8)
    scale = size // 8
    images = pixels.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    images = images.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(digits.target).long()
    train_idx, test_idx = train_test_split(
        torch.arange(len(labels)).numpy(),
        test_size=test_fraction,
        random_state=split_seed,
        stratify=labels.numpy(),
    )
    train_idx, test_idx = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    return images[train_idx], labels[train_idx], images[test_idx], labels[test_idx]

"""Feature kernels of trained nets, for kernel ridge regression (cifar10test, ImageNet transfer).

==========  ==========================================================================
kind        last-hidden-layer feature kernel
==========  ==========================================================================
infinite    ``s s' F00(ĝ·ĝ')`` of the preactivation ``g = net.features(x)`` entering the
            output layer (:func:`experiments.kernels.feature_kernel`)
finite      ``φ(h)·φ(h')`` of ``h = net.features(x)`` (empirical)
mup         ``φ(h)·φ(h')`` (empirical)
==========  ==========================================================================

(with ``--layernorm`` the feature is normalised first: ``s = 1``, ``h ← h/|h|``).
"""

from __future__ import annotations

import torch
from torch import nn

from experiments.data.images import ImageSet
from experiments.kernels import feature_kernel, kernel_ridge_regression

__all__ = ["feature_kernel_inputs", "feature_kernel_accuracy"]


def _linear_kernel(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    return A.double() @ B.double().T


@torch.no_grad()
def feature_kernel_inputs(
    net: nn.Module, kind: str, data: ImageSet, batch_size: int, normalize_features: bool = False
):
    """``(features, kernel_fn)`` of the last hidden layer, for kernel ridge regression.

    * infinite net: ``features`` = ``g`` (N × r), the preactivation entering the output layer,
      and ``kernel_fn`` = :func:`experiments.kernels.feature_kernel` (``s s' F00(ĝ·ĝ')``; with
      ``--layernorm`` or ``normalize_features``: ``F00(ĝ·ĝ')``);
    * finite π-net or μP net: ``features`` = ``φ(h)`` (N × n; ``h`` normalised first under
      layernorm, ``φ(h)/|φ(h)|`` with ``normalize_features``) and ``kernel_fn`` the dot product.

    Features are float32 on the net's device; kernel blocks are float64.
    """
    was_training = net.training
    net.eval()
    parts = []
    for start in range(0, len(data), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(data)), device=data.images.device)
        h = net.features(data.inputs(idx)).float()
        if kind != "infinite":
            if getattr(net, "layernorm", False):
                h = h / h.norm(dim=1, keepdim=True).clamp_min(1e-30)
            h = torch.relu(h)
            if normalize_features:
                h = h / h.norm(dim=1, keepdim=True).clamp_min(1e-30)
        parts.append(h)
    net.train(was_training)
    features = torch.cat(parts) if parts else torch.empty(0)
    if kind == "infinite":
        unit = normalize_features or getattr(net, "layernorm", False)

        def kernel_fn(A, B):
            return feature_kernel(A, B, layernorm=unit)

        return features, kernel_fn
    return features, _linear_kernel


def feature_kernel_accuracy(
    net: nn.Module, kind: str, train: ImageSet, test: ImageSet, args, progress: bool = True
) -> float:
    """Test accuracy of kernel ridge regression with the net's feature kernel (``--kernel-reg``,
    ``--krr-method``, ``--krr-float64``, ``--krr-block-size``)."""
    X_train, kernel_fn = feature_kernel_inputs(
        net, kind, train, args.test_batch_size, args.normalize_features
    )
    X_test, _ = feature_kernel_inputs(net, kind, test, args.test_batch_size, args.normalize_features)
    dtype = torch.float64 if args.krr_float64 else None
    return kernel_ridge_regression(
        kernel_fn,
        X_train,
        train.labels,
        X_test,
        test.labels,
        num_classes=train.num_classes,
        kernel_reg=args.kernel_reg,
        method=args.krr_method,
        dtype=dtype,
        block_size=args.krr_block_size,
        progress=progress,
    )

"""Kernel functions of the ReLU π-limit (docs/math.md §2).

For ``(z1, z2)`` standard Gaussians with correlation ``q`` and ``φ = ReLU``::

    F00(q) = E[φ(z1) φ(z2)]   = (sqrt(1-q²) + (π - arccos q) q) / (2π)
    F11(q) = E[φ'(z1) φ'(z2)] = (π - arccos q) / (2π)        = dF00/dq
    F02(q) = E[φ(z1) φ''(z2)] = sqrt(1-q²) / (2π)

and ``F00 = F02 + q F11``. For general norms the expectations scale:
``E[φ(ω·u) φ(ω·v)] = |u| |v| F00(û·v̂)`` for ``ω ~ N(0, I)``.

Every function clamps ``q`` to ``[-1, 1]``. ``F00`` and ``F11`` are autograd
Functions with closed-form derivatives, so differentiating them is safe at
``q = ±1`` (autograd through ``arccos``/``sqrt`` would give inf/NaN there).
The derivative of ``F11`` is ``1 / (2π sqrt(1-q²))``, which is unbounded at ±1;
it is capped at ``1 / (2π sqrt(EPS_SQRT))``.

The matrix forms (``VReLUmatrix`` and friends) are the ReLU V-transforms used
by the NNGP/NTK recursions and by feature kernels.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "F00",
    "F11",
    "F02",
    "F00_F11_F02",
    "kernels_2pi_",
    "relu_kernel",
    "relu_kernel_deriv",
    "VReLUmatrix",
    "VStepmatrix",
]

TWO_PI = 2.0 * math.pi
# floor of 1 - q² inside the derivative of F11 (which is unbounded at q = ±1)
EPS_SQRT = 1e-12


def _clamp(q: torch.Tensor) -> torch.Tensor:
    return q.clamp(-1.0, 1.0)


def kernels_2pi_(
    q: torch.Tensor, f11_out: torch.Tensor | None = None, f02_out: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(2π F11(q), 2π F02(q))`` from one ``arccos`` and one ``sin`` per entry; clamps ``q`` in place.

    With ``θ = arccos(q)``: ``2π F11 = π − θ`` and ``2π F02 = sin θ``. ``sin θ``
    equals ``sqrt(1 − q²)`` but keeps full relative precision near ``q = ±1``,
    where ``1 − q²`` cancels; every kernel value of the library goes through here,
    so there is one precision near ``q = ±1``. The common factor ``1/2π`` is left
    to the caller (the infinite layer applies it once to its output). ``*_out`` may
    be strided views of preallocated buffers. No autograd.
    """
    q.clamp_(-1.0, 1.0)
    theta = torch.arccos(q) if f11_out is None else torch.arccos(q, out=f11_out)
    f02 = torch.sin(theta) if f02_out is None else torch.sin(theta, out=f02_out)
    f11 = torch.sub(theta.new_full((), math.pi), theta, out=theta)
    return f11, f02


def F00_F11_F02(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All three kernel functions from one ``arccos`` and one ``sin`` (no autograd)."""
    with torch.no_grad():
        f11, f02 = kernels_2pi_(q.detach().clone())
        f11.div_(TWO_PI)
        f02.div_(TWO_PI)
        return f02 + q.detach().clamp(-1.0, 1.0) * f11, f11, f02


class _F11(torch.autograd.Function):
    """F11 with derivative ``1 / (2π sqrt(1-q²))``, capped at ``q = ±1``; twice differentiable."""

    @staticmethod
    def forward(ctx, q):
        ctx.save_for_backward(q)
        return F00_F11_F02(q)[1]

    @staticmethod
    def backward(ctx, grad):
        (q,) = ctx.saved_tensors
        qc = _clamp(q)
        return grad / (TWO_PI * torch.sqrt((1.0 - qc * qc).clamp_min(EPS_SQRT)))


class _F00(torch.autograd.Function):
    """F00 with derivative F11, itself differentiable: double backward (second-order
    methods, ``gradgradcheck``) includes the curvature ``F11' = 1 / (2π sqrt(1-q²))``."""

    @staticmethod
    def forward(ctx, q):
        # the input itself is saved (not a clamped copy), so that backward's F11(q)
        # stays connected to q's graph when backward is differentiated again
        ctx.save_for_backward(q)
        return F00_F11_F02(q)[0]

    @staticmethod
    def backward(ctx, grad):
        (q,) = ctx.saved_tensors
        return grad * _F11.apply(q)


def F00(q: torch.Tensor) -> torch.Tensor:
    """``E[φ(z1) φ(z2)]`` for unit variances and correlation ``q``; derivative ``F11``."""
    return _F00.apply(q)


def F11(q: torch.Tensor) -> torch.Tensor:
    """``E[φ'(z1) φ'(z2)]`` for unit variances and correlation ``q``."""
    return _F11.apply(q)


class _F02(torch.autograd.Function):
    """F02 with derivative ``-q / (2π sqrt(1-q²))``, capped near ``q = ±1``."""

    @staticmethod
    def forward(ctx, q):
        ctx.save_for_backward(q)
        return F00_F11_F02(q)[2]

    @staticmethod
    def backward(ctx, grad):
        (q,) = ctx.saved_tensors
        qc = _clamp(q)
        return -grad * qc / (TWO_PI * torch.sqrt((1.0 - qc * qc).clamp_min(EPS_SQRT)))


def F02(q: torch.Tensor) -> torch.Tensor:
    """``E[φ(z1) φ''(z2)]`` for unit variances and correlation ``q``.

    Its derivative ``-q / (2π sqrt(1-q²))`` is unbounded at ``q = ±1``; the
    square root's argument is floored at ``EPS_SQRT`` there.
    """
    return _F02.apply(q)


def _norms_and_correlation(X: torch.Tensor, Y: torch.Tensor | None, eps: float):
    sx = X.norm(dim=-1)
    if Y is None:
        Y, sy = X, sx
    else:
        sy = Y.norm(dim=-1)
    q = (X @ Y.transpose(-1, -2)) / (sx[..., :, None] * sy[..., None, :]).clamp_min(eps)
    return sx, sy, q


def relu_kernel(X: torch.Tensor, Y: torch.Tensor | None = None, eps: float = 1e-30) -> torch.Tensor:
    """``K[i, j] = E_ω[φ(ω·x_i) φ(ω·y_j)] = |x_i| |y_j| F00(x̂_i·ŷ_j)`` for row sets X, Y."""
    sx, sy, q = _norms_and_correlation(X, Y, eps)
    return sx[..., :, None] * sy[..., None, :] * F00(q)


def relu_kernel_deriv(X: torch.Tensor, Y: torch.Tensor | None = None, eps: float = 1e-30) -> torch.Tensor:
    """``K'[i, j] = E_ω[φ'(ω·x_i) φ'(ω·y_j)] = F11(x̂_i·ŷ_j)`` for row sets X, Y."""
    _, _, q = _norms_and_correlation(X, Y, eps)
    return F11(q)


def _cov_to_correlation(cov: torch.Tensor, eps: float):
    d = torch.sqrt(torch.diagonal(cov, dim1=-2, dim2=-1).clamp_min(0.0))
    outer = (d[..., :, None] * d[..., None, :]).clamp_min(eps)
    return d, cov / outer


def VReLUmatrix(cov: torch.Tensor, eps: float = 1e-30) -> torch.Tensor:
    """``E[φ(x) φ(x)ᵀ]`` for ``x ~ N(0, cov)``: the ReLU V-transform of a covariance matrix."""
    d, c = _cov_to_correlation(cov, eps)
    return d[..., :, None] * d[..., None, :] * F00(c)


def VStepmatrix(cov: torch.Tensor, eps: float = 1e-30) -> torch.Tensor:
    """``E[φ'(x) φ'(x)ᵀ]`` for ``x ~ N(0, cov)``: the V-transform of the ReLU derivative."""
    _, c = _cov_to_correlation(cov, eps)
    return F11(c)

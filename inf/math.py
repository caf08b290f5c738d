"""Kernel functions of the ReLU π-limit (spec §2).

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
    "F00", "F11", "F02", "F00_F11_F02", "relu_kernel", "relu_kernel_deriv",
    "VReLUmatrix", "VStepmatrix", "F00ReLUsqrt", "F11ReLUsqrt", "F02ReLUsqrt", "J1",
]

TWO_PI = 2.0 * math.pi
# floor of 1 - q² inside the derivative of F11 (which is unbounded at q = ±1)
EPS_SQRT = 1e-12


def _clamp(q: torch.Tensor) -> torch.Tensor:
    return q.clamp(-1.0, 1.0)


def _f11(q: torch.Tensor) -> torch.Tensor:
    return (math.pi - torch.arccos(q)) / TWO_PI


def _f02(q: torch.Tensor) -> torch.Tensor:
    return torch.sqrt((1.0 - q * q).clamp_min(0.0)) / TWO_PI


def F00_F11_F02(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All three kernel functions from one ``arccos`` and one ``sqrt`` (no autograd)."""
    q = _clamp(q)
    f11 = _f11(q)
    f02 = _f02(q)
    return f02 + q * f11, f11, f02


class _F11(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q):
        q = _clamp(q)
        ctx.save_for_backward(q)
        return _f11(q)

    @staticmethod
    def backward(ctx, grad):
        (q,) = ctx.saved_tensors
        return grad / (TWO_PI * torch.sqrt((1.0 - q * q).clamp_min(EPS_SQRT)))


class _F00(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q):
        q = _clamp(q)
        ctx.save_for_backward(q)
        f00, _, _ = F00_F11_F02(q)
        return f00

    @staticmethod
    def backward(ctx, grad):
        (q,) = ctx.saved_tensors
        # dF00/dq = F11, itself differentiable (for second-order methods)
        return grad * _F11.apply(q)


def F00(q: torch.Tensor) -> torch.Tensor:
    """``E[φ(z1) φ(z2)]`` for unit variances and correlation ``q``; derivative ``F11``."""
    return _F00.apply(q)


def F11(q: torch.Tensor) -> torch.Tensor:
    """``E[φ'(z1) φ'(z2)]`` for unit variances and correlation ``q``."""
    return _F11.apply(q)


def F02(q: torch.Tensor) -> torch.Tensor:
    """``E[φ(z1) φ''(z2)]`` for unit variances and correlation ``q``.

    Differentiable except at ``q = ±1``, where its derivative is unbounded;
    the gradient there is taken as 0 (the one-sided limit of ``-q/sqrt(1-q²)``
    times a zero-measure set) by construction of the clamp.
    """
    q = _clamp(q)
    return torch.sqrt((1.0 - q * q).clamp_min(EPS_SQRT)) / TWO_PI * (q.abs() < 1)


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


# Names of the original π-limit library, for users porting code.
def F00ReLUsqrt(c, vsqrt=1.0, v2sqrt=1.0):
    """``E[φ(z1) φ(z2)]`` for standard deviations ``vsqrt``, ``v2sqrt`` and correlation ``c``."""
    return F00(c) * vsqrt * v2sqrt


def F11ReLUsqrt(c, vsqrt=None, v2sqrt=None):
    """``E[φ'(z1) φ'(z2)]``; independent of the variances."""
    return F11(c)


def F02ReLUsqrt(c, vsqrt=1.0, v2sqrt=1.0):
    """``E[φ(z1) φ''(z2)] = sqrt(v (1-c²) / v2) / (2π)`` for standard deviations ``vsqrt``, ``v2sqrt``."""
    return F02(c) * vsqrt / v2sqrt


def J1(c):
    """The arc-cosine kernel of degree 1 normalised to ``J1(1) = 1``: ``2 F00(c)``."""
    return 2.0 * F00(c)

"""π-parameters and the projection onto ``span(Ω)``.

Two parameter kinds mark what an optimizer must do differently:

* :class:`InfPiParameter`: a tensor of an infinite layer's rows (``A``, the
  coefficients ``c``, ``B``; docs/math.md §1). Its owner is the layer's
  :class:`~inf.rows.RowStore`; only the coefficients train, by appending rows.
* :class:`FinPiParameter`: a finite π-net weight or bias whose gradient lives in
  ``span(Ω)`` on its output side (docs/math.md §6). Its owner is the finite layer,
  which projects the gradient once, right after it is accumulated.

The owner is reached through :func:`owner_of`, a direct reference kept on the
parameter as a weak reference. It is never pickled or deep-copied: owners attach
themselves again when they are built, unpickled, deep-copied or moved
(``.to()``), so the link survives everything a module goes through.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

__all__ = [
    "InfPiParameter",
    "FinPiParameter",
    "owner_of",
    "orthonormal_basis",
    "project_onto_span_",
    "project_onto_span",
    "projected_norm",
]

_OWNER = "_pi_owner"


def _rebuild(cls, data: torch.Tensor, requires_grad: bool):
    return cls(data, requires_grad)


class _OwnedParameter(nn.Parameter):
    """A parameter with a weak back-reference to the module that owns its update rule.

    Pickling keeps the class (torch's Parameter would come back as a plain one) and
    drops the reference; deep copies never carry it (torch copies no attributes).
    """

    def __reduce_ex__(self, proto):
        return (_rebuild, (type(self), self.data, self.requires_grad))


class InfPiParameter(_OwnedParameter):
    """A tensor of an infinite π-layer whose rows grow: ``A``, ``B`` or the coefficients.

    Only the coefficients are trained in the optimizer's sense (docs/math.md §5);
    ``A`` and ``B`` change only by appending rows, which the optimizer does when
    it steps the coefficients.
    """


class FinPiParameter(_OwnedParameter):
    """A finite π-net weight or bias whose gradient is projected onto ``span(Ω)``."""


def attach_owner(param: torch.Tensor, owner) -> None:
    """Let ``param`` reach ``owner`` (its RowStore or finite layer). Called by owners only."""
    param.__dict__[_OWNER] = weakref.ref(owner)


def owner_of(param: torch.Tensor):
    """The RowStore (infinite) or layer (finite) a π-parameter belongs to, or None."""
    ref = param.__dict__.get(_OWNER) if hasattr(param, "__dict__") else None
    return None if ref is None else ref()


def orthonormal_basis(omega: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis ``Q`` (n × k) of ``span(Ω)``; ``k = rank(Ω)``, so ``Q Qᵀ`` is the
    projection ``Ω (ΩᵀΩ)⁺ Ωᵀ`` (the identity when ``n ≤ r``)."""
    Q, R = torch.linalg.qr(omega.double())
    diag = R.diagonal().abs()
    keep = diag > diag.max() * max(omega.shape) * torch.finfo(torch.float64).eps
    return Q[:, keep].to(omega.dtype)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


@torch.no_grad()
def project_onto_span_(grad: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Project ``grad`` (n × ·, or n) onto ``span(Q)`` on its first axis, in place:
    ``G ← Q (Qᵀ G)`` with ``basis = Q`` (n × k, orthonormal columns).

    The one projection of the library (finite layers, clipping, MAML, projected NTKs).
    Extra memory is the k × cols matrix ``Qᵀ G`` (O(n·r) for an n × n gradient); the
    product is written straight into ``grad`` when it is a contiguous float32/float64
    tensor. Returns ``grad``.
    """
    cdt = _compute_dtype(grad)
    Q = basis.to(cdt)
    G2 = grad.to(cdt).reshape(grad.shape[0], -1)
    coords = Q.T @ G2  # k × cols
    if G2.is_contiguous() and G2.data_ptr() == grad.data_ptr() and G2.dtype == grad.dtype:
        torch.mm(Q, coords, out=G2)  # G2 is a view of grad: no n × cols temporary
    else:
        grad.copy_((Q @ coords).reshape(grad.shape))
    return grad


def project_onto_span(grad: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``Q (Qᵀ G)`` out of place and differentiable (MAML's second-order inner loop,
    per-example gradients); :func:`project_onto_span_` is the in-place version."""
    Q = basis.to(grad.dtype)
    return (Q @ (Q.T @ grad.reshape(grad.shape[0], -1))).reshape(grad.shape)


@torch.no_grad()
def projected_norm(grad: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``|Q Qᵀ G|_F = |Qᵀ G|_F`` without forming the projection."""
    cdt = _compute_dtype(grad)
    G = grad.to(cdt)
    return torch.linalg.vector_norm(basis.to(cdt).T @ G.reshape(G.shape[0], -1))

"""Gradient norms and clipping for π-nets (docs/math.md §5).

An infinite layer's gradient is its pending rows, whose Frobenius norm is
``sqrt(Σ_ij (A_i·A_j) F00(B_i·B_j))`` (:meth:`inf.rows.RowStore.pending_norm`);
a finite π-weight's gradient is already projected onto ``span(Ω)`` when backward
has accumulated it, so both widths clip the same amount.
"""

from __future__ import annotations

import torch
from torch import nn

from .parameters import InfPiParameter
from .rows import rows_of

__all__ = ["pi_grad_norms", "clip_grad_norm_"]


def _params(parameters) -> list[torch.Tensor]:
    if isinstance(parameters, torch.Tensor):
        return [parameters]
    if isinstance(parameters, nn.Module):
        return list(parameters.parameters())
    return list(parameters)


def pi_grad_norms(parameters) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(param, gradient norm)`` for every parameter with a gradient, π-aware.

    ``A``/``B`` of infinite layers are skipped: their gradient is counted once,
    through the coefficients.
    """
    out = []
    for p in _params(parameters):
        store = rows_of(p)
        if store is not None:
            if store.has_gradient:
                out.append((p, store.pending_norm()))
        elif isinstance(p, InfPiParameter):
            continue
        elif p.grad is not None:
            out.append((p, torch.linalg.vector_norm(p.grad.detach().float())))
    return out


def _scale_grad_(p: torch.Tensor, coef: torch.Tensor):
    store = rows_of(p)
    if store is not None:
        store.scale(float(coef))
    else:
        p.grad.mul_(coef.to(p.grad.dtype))


def clip_grad_norm_(parameters, max_norm: float, per_param: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """Clip gradients, π-parameters included (docs/math.md §5).

    Global clipping (default) scales every gradient by ``min(1, max_norm / total)``;
    ``per_param=True`` clips each parameter (an infinite layer's weight, a bias, a
    finite weight) to ``max_norm`` separately. ``max_norm <= 0`` disables clipping.
    Returns the total norm before clipping.
    """
    norms = pi_grad_norms(parameters)
    if not norms:
        return torch.zeros(())
    total = torch.sqrt(sum(n.double() ** 2 for _, n in norms))
    if max_norm is None or max_norm <= 0:
        return total
    if not torch.isfinite(total):
        raise FloatingPointError(f"gradient norm is {float(total)}; refusing to clip a non-finite gradient")
    if per_param:
        for p, n in norms:
            _scale_grad_(p, torch.clamp(max_norm / (n.double() + eps), max=1.0))
    else:
        coef = torch.clamp(max_norm / (total + eps), max=1.0)
        for p, _ in norms:
            _scale_grad_(p, coef)
    return total

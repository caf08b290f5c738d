"""The autograd Function of an infinite π-layer (spec §3–4).

For an input ``g`` (batch × r) with ``s = |g|`` per row and ``ĝ = g / s``, and
rows ``(A, c, B)``::

    q     = ĝ Bᵀ                                  (batch × M)
    g_out = s · (F00(q) ⊙ c) A                     (bias added by the layer)

Backward, with ``δ = ∂L/∂g_out`` and ``γ = (δ Aᵀ) ⊙ c``::

    ∂L/∂g = (γ ⊙ F11(q)) B + ĝ · Σ_m γ_m F02(q_m)

Layernorm variant: ``s = 1`` in the forward, and the gradient with respect to
``ĝ`` is carried back through the normalisation,
``∂L/∂g = (v − (v·ĝ) ĝ) / |g|`` with ``v = (γ ⊙ F11(q)) B``.

Backward also records the layer's gradient as rows ``(δ·s, ĝ)`` in the
layer's :class:`~inf.tensors.RowStore` (spec §5): one row per example and per
call. The coefficient tensor receives a zero ``.grad``: it marks that the layer
has a gradient (``zero_grad`` clears it), while the π-update itself never
changes existing coefficients except through weight decay and momentum. The
coefficients are not an autograd input: their shape changes as rows are
appended, which autograd's cached gradient accumulators do not allow.

Rows are processed in chunks of ``chunk_rows`` so the batch × M intermediates
stay bounded. Without chunking, forward keeps ``F11(q)`` and ``F02(q)`` for
backward, so ``arccos`` and ``sqrt`` run once per step; with chunking they are
recomputed chunk by chunk in backward (memory first).

``A`` and ``B`` may be stored in float16/bfloat16; the computation then runs
in float32 (float64 when the input is float64) and the result is cast back to
the input's dtype.
"""
from __future__ import annotations

import torch

from .math import F00_F11_F02

__all__ = ["InfPiLinearReLUFunction", "inf_pi_linear_relu", "pi_features", "compute_dtype",
           "auto_chunk_rows"]

_TINY = 1e-30


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (low-precision storage accumulates in float32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def pi_features(g: torch.Tensor, layernorm: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, ĝ)``: the norm of each row of ``g`` (1 under layernorm) and the unit rows.

    Differentiable with plain autograd (used by meta-learning and feature kernels).
    """
    norm = g.norm(dim=-1)
    ghat = g / norm.clamp_min(_TINY).unsqueeze(-1)
    s = torch.ones_like(norm) if layernorm else norm
    return s, ghat


def auto_chunk_rows(batch: int, rows: int, budget_bytes: int | None, itemsize: int = 4,
                    live_tensors: int = 4) -> int | None:
    """Row-chunk size that keeps ``live_tensors`` batch × chunk intermediates under ``budget_bytes``."""
    if budget_bytes is None:
        return None
    per_row = max(1, batch * itemsize * live_tensors)
    chunk = max(1, budget_bytes // per_row)
    return None if chunk >= rows else int(chunk)


def _chunks(M: int, chunk_rows: int | None):
    if not chunk_rows or chunk_rows >= M:
        yield 0, M
        return
    for start in range(0, M, chunk_rows):
        yield start, min(M, start + chunk_rows)


class InfPiLinearReLUFunction(torch.autograd.Function):
    """``g_out = s · (F00(ĝ Bᵀ) ⊙ c) A`` with the closed-form backward of spec §4.

    ``apply(g, A, coef, B, store, layernorm, chunk_rows, trigger)``; ``store`` is the
    :class:`~inf.tensors.RowStore` that receives the gradient rows, or None.
    """

    @staticmethod
    def forward(ctx, g, A, coef, B, store, layernorm, chunk_rows, trigger=None):
        cdt = compute_dtype(g, A, B)
        g32 = g.to(cdt)
        norm = g32.norm(dim=1)
        ghat = g32 / norm.clamp_min(_TINY)[:, None]
        M = A.shape[0]
        out = torch.zeros(g.shape[0], A.shape[1], dtype=cdt, device=g.device)
        keep = ctx.needs_input_grad[0] and (not chunk_rows or chunk_rows >= M)
        f11_saved = f02_saved = None
        for lo, hi in _chunks(M, chunk_rows):
            Bc = B[lo:hi].to(cdt)
            f00, f11, f02 = F00_F11_F02(ghat @ Bc.T)
            out.addmm_(f00.mul_(coef[lo:hi].to(cdt)), A[lo:hi].to(cdt))
            if keep:
                f11_saved, f02_saved = f11, f02
        if not layernorm:
            out.mul_(norm[:, None])
        ctx.store = store
        ctx.layernorm = layernorm
        ctx.chunk_rows = chunk_rows
        ctx.in_dtype = g.dtype
        # the rows are kept as detached aliases of the M rows seen here, not via
        # save_for_backward: appending temporary rows between forward and backward
        # (MAML) must neither trip autograd's version check nor change their shape
        ctx.rows = (A.detach(), coef.detach(), B.detach())
        ctx.coef_param = coef  # the parameter itself carries the gradient marker
        ctx.save_for_backward(ghat, norm, f11_saved, f02_saved)
        return out.to(g.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        ghat, norm, f11_saved, f02_saved = ctx.saved_tensors
        A, coef, B = ctx.rows
        cdt = ghat.dtype
        delta = grad_out.to(cdt)
        grad_g = None
        if ctx.needs_input_grad[0]:
            v = torch.zeros_like(ghat)
            radial = torch.zeros(ghat.shape[0], dtype=cdt, device=ghat.device)
            for lo, hi in _chunks(A.shape[0], ctx.chunk_rows):
                gamma = (delta @ A[lo:hi].to(cdt).T).mul_(coef[lo:hi].to(cdt))
                Bc = B[lo:hi].to(cdt)
                if f11_saved is not None:
                    f11, f02 = f11_saved, f02_saved
                else:
                    _, f11, f02 = F00_F11_F02(ghat @ Bc.T)
                if not ctx.layernorm:
                    radial += (gamma * f02).sum(1)
                v.addmm_(gamma.mul_(f11), Bc)
            if ctx.layernorm:
                # back through ĝ = g/|g|; the radial part of v is removed
                v = (v - (v * ghat).sum(1, keepdim=True) * ghat) / norm.clamp_min(_TINY)[:, None]
            else:
                v += radial[:, None] * ghat
            grad_g = v.to(ctx.in_dtype)
        if ctx.store is not None:
            coef_param = ctx.coef_param
            if coef_param.grad is None:
                # no marker: zero_grad() ran since these rows were recorded, so they are stale.
                # The marker (a zero .grad) says this layer has a gradient; zero_grad() removes it.
                ctx.store.clear_pending()
                coef_param.grad = torch.zeros_like(coef_param)
            scale = 1.0 if ctx.layernorm else norm[:, None]
            ctx.store.add_pending((delta * scale).to(A.dtype), ghat.to(B.dtype))
        grad_trigger = torch.zeros((), dtype=cdt, device=ghat.device) if ctx.needs_input_grad[7] else None
        return grad_g, None, None, None, None, None, None, grad_trigger


def inf_pi_linear_relu(g, A, coef, B, store=None, layernorm=False, chunk_rows=None):
    """Functional form of the infinite π-layer (no bias); see :class:`InfPiLinearReLUFunction`.

    With a ``store`` and grad mode on, backward runs even when nothing upstream
    requires grad (a fresh scalar "trigger" input makes sure of it), so a layer
    records its gradient rows even if the layers before it are frozen.
    """
    trigger = None
    if store is not None and torch.is_grad_enabled():
        trigger = torch.zeros((), device=g.device, requires_grad=True)
    return InfPiLinearReLUFunction.apply(g, A, coef, B, store, layernorm, chunk_rows, trigger)

"""Decomposition of a training trajectory on a basis of functions.

Two kinds of basis (docs/analysis.md §4 compares them):

**The paper's basis** (Ma, Guo & Fattahi 2022, "Behind the scenes of gradient descent"; the
default of ``experiments.analysis.trajectory``). From the *final* network's penultimate
features on N held-out examples, ``Φ = U S Vᵀ``, and its last layer W,
``u s vᵀ = svd(W V S / √N)``; basis function i is ``u_i ⊗ (U v_i)`` (a C × N array) and

    β_i(θ) = u_iᵀ f_θ(X)ᵀ U v_i / √N          (a scalar; β_i = s_i at the final network).

:func:`network_basis` builds it (:class:`FunctionBasis`); :func:`basis_gradients` gives
``‖∇_θ β_i‖`` and ``cos(∇β_i, ∇β_j)`` from exact parameter gradients (autograd of the scalar
β_i, one backward pass per i), or, with ``proj_dim``, approximately through a projected NTK.

**A kernel eigenbasis.** Take a kernel ``K`` on the training set (N × N) — the conjugate kernel
of a trained network's last hidden layer (the "after kernel"), or a tangent kernel — and its
orthonormal eigenvectors ``φ_1, φ_2, …`` (eigenvalues in decreasing order). The network's
outputs on the training set, ``f_t`` (N × O at training step t), are the sum
``f_t = Σ_i φ_i β_i(t)`` with coefficients ``β_i(t) = φ_iᵀ f_t`` (a vector of O numbers);
keeping every eigenvector the sum is exact. The targets have coefficients ``β*_i = φ_iᵀ y``.
In the kernel regime, under gradient flow on the squared loss with a fixed NTK ``Θ``,
``β_i(t) − β*_i`` decays like ``exp(−η λ_i t)`` on the NTK's eigenbasis.

The parameter gradient of a kernel-basis coefficient, ``∇_θ β_i = Σ_n φ_i[n] ∇_θ f(x_n)``,
has inner products given by the tangent kernel:

    ⟨∇β_i, ∇β_j⟩ = Σ_k φ_iᵀ Θ_kk φ_j = φ_iᵀ Θ_tr φ_j

(with O outputs ``β_i`` is a vector and the inner product is that of its O × P
Jacobians, hence the trace kernel ``Θ_tr = Σ_k Θ_kk``). For either basis the *gradient
independence* of the basis functions is

    max_{i ≠ j} |⟨∇β_i, ∇β_j⟩| / (‖∇β_i‖ ‖∇β_j‖)

over the leading functions: 0 when the coefficients can be learned independently, up to 1
when two gradients are parallel.

:class:`TrajectoryRecorder` stores ``f_t`` (optionally Θ_t, or parameter snapshots) during
any training loop — InfSGD on an infinite π-net included — and computes all of the above,
for a basis given up front or chosen after training.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..fileio import atomic_write

__all__ = [
    "FunctionBasis",
    "function_basis",
    "network_basis",
    "penultimate_features",
    "basis_gradients",
    "eigenbasis",
    "conjugate_kernel",
    "after_kernel",
    "beta_coefficients",
    "reconstruct",
    "gradient_gram",
    "gradient_independence",
    "tangent_kernel",
    "TrajectoryRecorder",
    "plot_beta_curves",
    "plot_beta_vs_gradnorm",
    "plot_independence",
]


def _square(K, name="kernel") -> torch.Tensor:
    K = torch.as_tensor(K).double()
    if K.ndim != 2 or K.shape[0] != K.shape[1]:
        raise ValueError(f"{name} must be a square N × N matrix, got shape {tuple(K.shape)}")
    if not torch.isfinite(K).all():
        raise ValueError(f"{name} contains NaN or inf")
    return K


def eigenbasis(K, top: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(eigenvalues, φ)`` of a symmetric kernel, eigenvalues in decreasing order and
    ``φ`` (N × m) with orthonormal columns; ``top`` keeps the leading m (default all)."""
    K = _square(K)
    K = 0.5 * (K + K.T)
    vals, vecs = torch.linalg.eigh(K)
    vals, vecs = vals.flip(0), vecs.flip(1)
    # a fixed sign per eigenvector (largest entry positive) makes curves comparable across runs
    signs = torch.sign(vecs.gather(0, vecs.abs().argmax(0, keepdim=True))).squeeze(0)
    vecs = vecs * torch.where(signs == 0, torch.ones_like(signs), signs)
    if top is not None:
        if top <= 0:
            raise ValueError(f"top must be positive, got {top}")
        vals, vecs = vals[:top], vecs[:, :top]
    return vals, vecs


def conjugate_kernel(features: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """``F Fᵀ`` (divided by the feature dimension with ``normalize``) for features N × D."""
    F = torch.as_tensor(features).double().reshape(len(features), -1)
    K = F @ F.T
    return K / F.shape[1] if normalize else K


def _is_pi_mlp(net) -> bool:
    return all(hasattr(net, a) for a in ("features", "readout", "output_layer"))


def _output_is_infinite(net) -> bool:
    from ..layers import InfPiLinearReLU

    return isinstance(getattr(net, "output_layer", None), InfPiLinearReLU)


@torch.no_grad()
def penultimate_features(
    net: nn.Module, X: torch.Tensor, feature_fn: Callable | None = None, batch_size: int = 1024
) -> torch.Tensor:
    """The features Φ (N × D, float64) that the last linear map of ``net`` reads, on ``X``.

    * ``feature_fn(net, x)`` when given;
    * finite π-nets and μP MLPs (``net.features`` / ``net.readout``): ``φ(h)`` with ``h =
      net.features(x)`` the preactivation entering the output layer (normalised first under
      layernorm), since their output layer is ``W φ(h) + b``;
    * any other model: ``net.features(x)`` (e.g. the CNNs of ``experiments.analysis.models``).

    Infinite π-nets have infinitely many features: use :func:`after_kernel` (their Gram
    matrix) instead. Runs in eval mode.
    """
    if feature_fn is None and _output_is_infinite(net):
        raise TypeError(
            "an infinite π-net has infinitely many penultimate features: use after_kernel(net, X)"
        )
    if feature_fn is None and not hasattr(net, "features"):
        raise TypeError(
            f"penultimate_features does not know the last hidden layer of {type(net).__name__}: "
            "give feature_fn(net, x) or define net.features(x)"
        )
    was_training = net.training
    net.eval()
    try:
        feats = []
        for i in range(0, len(X), batch_size):
            x = X[i : i + batch_size]
            if feature_fn is not None:
                h = torch.as_tensor(feature_fn(net, x))
            elif _is_pi_mlp(net):
                h = net.features(x)
                if getattr(net, "layernorm", False):
                    h = h / h.norm(dim=-1, keepdim=True).clamp_min(1e-30)
                h = torch.relu(h)
            else:
                h = net.features(x)
            feats.append(h.reshape(len(x), -1))
        return torch.cat(feats).double()
    finally:
        net.train(was_training)


@torch.no_grad()
def after_kernel(
    net: nn.Module, X: torch.Tensor, feature_fn: Callable | None = None, batch_size: int = 1024
) -> torch.Tensor:
    """The conjugate kernel of ``net``'s last hidden layer on ``X`` (N × N, float64).

    * infinite π-net (output layer an ``InfPiLinearReLU``): the last hidden state ``g``
      enters the output layer through the features ``φ(ω·g)``, ``ω ~ N(0, I)``, whose
      kernel is ``s s' F00(ĝ·ĝ')`` (``s = 1`` under layernorm);
    * finite π-net / μP MLP: ``Φ Φᵀ`` with ``Φ = φ(h)`` (:func:`penultimate_features`) —
      the finite version of the same kernel, since ``h ≈ n^-½ Ω g``;
    * any other model: ``feature_fn(net, x)`` or ``net.features(x)`` (penultimate
      features, N × D), and the kernel ``Φ Φᵀ / D``.
    """
    from ..functional import pi_features
    from ..math import F00

    if feature_fn is None and _output_is_infinite(net):
        was_training = net.training
        net.eval()
        try:
            H = torch.cat(
                [net.features(X[i : i + batch_size]) for i in range(0, len(X), batch_size)]
            ).double()
        finally:
            net.train(was_training)
        s, g = pi_features(H, getattr(net.output_layer, "layernorm", False))
        return s[:, None] * s[None, :] * F00(g @ g.T)
    F = penultimate_features(net, X, feature_fn, batch_size)
    if feature_fn is None and _is_pi_mlp(net):
        return F @ F.T
    return conjugate_kernel(F)


# ------------------------------------------------------------------ the paper's basis
class FunctionBasis:
    """The basis of Ma, Guo & Fattahi (2022), built from a *final* network on a held-out set.

    With Φ the final network's penultimate features on N held-out examples, ``Φ = U S Vᵀ``
    (thin SVD, zero singular values dropped) and the last layer W (C × D),
    ``u s vᵀ = svd(W V S / √N)`` (C × r, with r = rank Φ). Basis function i is the C × N
    array ``u_i (U v_i)ᵀ``, and the coefficient of a network θ is the scalar

        β_i(θ) = u_iᵀ f_θ(X)ᵀ U v_i / √N,

    so at the final network β_i = s_i (``f = Φ Wᵀ``). The basis functions are orthonormal
    (``u`` and ``U v`` have orthonormal columns), hence ``Σ_i β_i² ≤ ‖f_θ(X)‖² / N``.

    Attributes: ``U`` (N × r), ``S`` (r), ``u`` (C × m), ``s`` (m), ``v`` (r × m) with
    m = min(C, r), all float64.
    """

    def __init__(self, U, S, u, s, v):
        self.U, self.S, self.u, self.s, self.v = (torch.as_tensor(t).double() for t in (U, S, u, s, v))

    @property
    def N(self) -> int:
        return self.U.shape[0]

    def __len__(self) -> int:
        return self.s.shape[0]

    def directions(self) -> torch.Tensor:
        """``U v_i`` for every i: (m, N), orthonormal rows."""
        return (self.U @ self.v).T

    def weights(self, top: int | None = None) -> torch.Tensor:
        """``W_i = u_i (U v_i)ᵀ / √N``: (m, C, N), so that ``β_i = Σ W_i ⊙ f(X)ᵀ``."""
        m = len(self) if top is None else min(top, len(self))
        return torch.einsum("ci,ni->icn", self.u[:, :m], (self.U @ self.v[:, :m])) / math.sqrt(self.N)

    def _check(self, f) -> torch.Tensor:
        f = torch.as_tensor(f).double()
        f = f[..., None] if f.ndim == 1 else f
        if f.shape[-2] != self.N or f.shape[-1] != self.u.shape[0]:
            raise ValueError(f"outputs must be (N={self.N}) × (C={self.u.shape[0]}), got {tuple(f.shape)}")
        return f

    def grid(self, f) -> torch.Tensor:
        """``u_iᵀ fᵀ U v_j / √N`` for all i, j ≤ m: (…, m, m); its diagonal are the β_i."""
        f = self._check(f)
        return torch.einsum("ci,...nc,nr,rj->...ij", self.u, f, self.U, self.v) / math.sqrt(self.N)

    def coefficients(self, f) -> torch.Tensor:
        """``β_i`` of outputs ``f`` (N × C, or T × N × C for a trajectory): (m,) or (T, m)."""
        return self.grid(f).diagonal(dim1=-2, dim2=-1)

    def residual(self, f, top: int = 20) -> dict:
        """Fig. 2a of the paper: the grid entries ``u_iᵀ fᵀ U v_j / √N`` ranked by their size
        at the final network (i.e. ``s``), the first ``top`` of them at ``f``, and the norm
        of the other entries (``grid_residual``, the paper's residual) and of everything of
        ``f/√N`` outside those ``top`` (``total_residual``)."""
        f = self._check(f)
        final = torch.diag_embed(self.s).reshape(-1)
        order = torch.argsort(final.abs(), descending=True, stable=True)[:top]
        g = self.grid(f).reshape(-1)
        head = g[order]
        m = len(self)
        total = float((f.pow(2).sum() / self.N - head.pow(2).sum()).clamp_min(0).sqrt())
        return {
            "index": [(int(k) // m, int(k) % m) for k in order],
            "values": head,
            "grid_residual": float((g.pow(2).sum() - head.pow(2).sum()).clamp_min(0).sqrt()),
            "total_residual": total,
        }


def _rank(S: torch.Tensor, rtol: float) -> int:
    if len(S) == 0 or float(S[0]) <= 0:
        return 0
    return int((S > rtol * S[0]).sum())


def function_basis(
    features=None, readout_weight=None, *, outputs=None, kernel=None, rtol: float = 1e-10
) -> FunctionBasis:
    """The paper's basis (:class:`FunctionBasis`) of a final network on a held-out set.

    Give either

    * ``features`` Φ (N × D) and ``readout_weight`` W (C × D) — exactly the paper's
      ``svd(W V S / √N)``; valid when the network's output is ``Φ Wᵀ`` (a bias-free last
      layer, as in the authors' models); or
    * ``outputs`` f (N × C, the final network's outputs on the held-out set) with
      ``features`` Φ or a ``kernel`` Φ Φᵀ (N × N; e.g. :func:`after_kernel` of an infinite
      π-net). Since ``Φ V S = U S²`` and ``W Φᵀ = fᵀ``, ``W V S = fᵀ U``, so the same basis is
      ``svd(fᵀ U / √N)``; with a readout bias this also keeps the bias's part inside span U,
      and β_i = s_i still holds at the final network.

    Singular values (or eigenvalues) below ``rtol`` times the largest are dropped.
    """
    if (features is None) == (kernel is None):
        raise ValueError("give the final network's penultimate features or their kernel (exactly one)")
    if features is not None:
        Phi = torch.as_tensor(features).double().reshape(len(features), -1)
        if not torch.isfinite(Phi).all():
            raise ValueError("the features contain NaN or inf")
        U, S, Vh = torch.linalg.svd(Phi, full_matrices=False)
        r = _rank(S, rtol)
        U, S, V = U[:, :r], S[:r], Vh[:r].T
    else:
        K = _square(kernel)
        vals, vecs = torch.linalg.eigh(0.5 * (K + K.T))
        vals, vecs = vals.flip(0), vecs.flip(1)
        r = _rank(vals.clamp_min(0), rtol)
        U, S, V = vecs[:, :r], vals[:r].sqrt(), None
    N = U.shape[0]
    if r == 0:
        raise ValueError("the features are all zero: no basis")
    if readout_weight is not None:
        if V is None:
            raise ValueError("readout_weight needs the features (not their kernel)")
        W = torch.as_tensor(readout_weight).double()
        if W.ndim != 2 or W.shape[1] != Phi.shape[1]:
            raise ValueError(f"readout_weight must be C × D with D = {Phi.shape[1]}, got {tuple(W.shape)}")
        M = W @ V * S / math.sqrt(N)
    elif outputs is not None:
        f = torch.as_tensor(outputs).double()
        f = f[:, None] if f.ndim == 1 else f
        if f.shape[0] != N:
            raise ValueError(f"outputs on {f.shape[0]} examples but features on {N}")
        M = f.T @ U / math.sqrt(N)
    else:
        raise ValueError("give readout_weight (with features) or the final outputs")
    u, s, vh = torch.linalg.svd(M, full_matrices=False)
    # a fixed sign per pair (largest entry of u_i positive) makes runs comparable
    sign = torch.sign(u.gather(0, u.abs().argmax(0, keepdim=True))).squeeze(0)
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return FunctionBasis(U, S, u * sign, s, vh.T * sign)


def network_basis(
    net: nn.Module, X: torch.Tensor, feature_fn: Callable | None = None, batch_size: int = 1024
) -> FunctionBasis:
    """:func:`function_basis` of a final network on held-out inputs ``X``: the features
    from :func:`penultimate_features` (or the kernel :func:`after_kernel` for an infinite
    π-net) and the network's outputs."""
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            f = torch.cat([net(X[i : i + batch_size]) for i in range(0, len(X), batch_size)]).double()
    finally:
        net.train(was_training)
    f = f.reshape(len(f), -1)
    if feature_fn is None and _output_is_infinite(net):
        return function_basis(outputs=f, kernel=after_kernel(net, X, batch_size=batch_size))
    return function_basis(penultimate_features(net, X, feature_fn, batch_size), outputs=f)


def basis_gradients(
    net: nn.Module,
    X: torch.Tensor,
    basis: FunctionBasis,
    top: int | None = 10,
    batch_size: int = 512,
    proj_dim: int | None = None,
    seed: int = 0,
) -> dict:
    """``β_i(θ)``, ``‖∇_θ β_i‖`` and ``cos(∇β_i, ∇β_j)`` for i, j ≤ ``top`` at the network's
    current parameters, on the held-out inputs ``X`` of ``basis``.

    * finite models, ``proj_dim=None`` (default): exact — β_i is a scalar, so autograd gives
      its gradient with one backward pass per i (per chunk of ``X``) over all parameters
      with ``requires_grad``; memory ``top × P`` numbers. The model runs in eval mode.
    * ``proj_dim=K``: through the projected full NTK ``Θ ≈ (J R)(J R)ᵀ`` (:func:`pntk`,
      sketch seed ``seed``) — ``⟨∇β_i, ∇β_j⟩ = Σ W_i Θ W_j``; an approximation with
      relative error ~ K^-½: use a fresh ``seed`` for every call when following training.
    * infinite π-nets: through the exact tangent kernel :func:`inf_ntk` (the kernel of a
      plain InfSGD step, all learning-rate multipliers 1).

    Returns ``{"beta", "norms", "gram", "cos", "max_cos"}`` (float64; ``max_cos`` over i ≠ j).
    """
    W = basis.weights(top)  # k × C × N
    k = W.shape[0]
    if len(X) != basis.N:
        raise ValueError(f"the basis was built on {basis.N} examples, X has {len(X)}")
    if _output_is_infinite(net) or proj_dim is not None:
        if _output_is_infinite(net):
            from .inf_ntk import inf_ntk

            theta = inf_ntk(net, X, kind="full").double()
        else:
            from .pntk import pntk

            theta = pntk(net, X, proj_dim=proj_dim, kind="full", seed=seed).double()
        gram = torch.einsum("icn,nmcd,jdm->ij", W, theta, W)
        was_training = net.training
        net.eval()
        try:
            with torch.no_grad():
                f = torch.cat([net(X[i : i + batch_size]) for i in range(0, len(X), batch_size)]).double()
        finally:
            net.train(was_training)
        beta = torch.einsum("icn,nc->i", W, f.reshape(len(f), -1))
    else:
        params = [p for p in net.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no parameter with requires_grad")
        grads = torch.zeros(k, sum(p.numel() for p in params), dtype=torch.float64)
        beta = torch.zeros(k, dtype=torch.float64)
        was_training = net.training
        net.eval()
        try:
            for a in range(0, len(X), batch_size):
                out = net(X[a : a + batch_size])
                out = out.reshape(len(out), -1)
                w = W[:, :, a : a + batch_size].to(out.dtype)
                for i in range(k):
                    b = (out * w[i].T).sum()
                    g = torch.autograd.grad(b, params, retain_graph=i < k - 1, allow_unused=True)
                    grads[i] += torch.cat(
                        [
                            (torch.zeros_like(p) if gi is None else gi).reshape(-1).double()
                            for p, gi in zip(params, g)
                        ]
                    )
                    beta[i] += float(b.detach())
        finally:
            net.train(was_training)
        gram = grads @ grads.T
    out = gradient_independence(gram)
    return {"beta": beta, "norms": out["norms"], "gram": gram, "cos": out["cos"], "max_cos": out["max_cos"]}


def beta_coefficients(phi: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """``β = φᵀ f``: (m,) for f (N,), (m, O) for f (N, O)."""
    phi = torch.as_tensor(phi).double()
    f = torch.as_tensor(f).double()
    if f.shape[0] != phi.shape[0]:
        raise ValueError(f"the basis has {phi.shape[0]} rows but f has {f.shape[0]} examples")
    return phi.T @ f


def reconstruct(phi: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """``Σ_i φ_i β_i``: the outputs rebuilt from (some of) their coefficients."""
    return torch.as_tensor(phi).double() @ torch.as_tensor(beta).double()


def _trace_kernel(theta) -> torch.Tensor:
    theta = torch.as_tensor(theta).double()
    if theta.ndim == 4:
        if theta.shape[0] != theta.shape[1] or theta.shape[2] != theta.shape[3]:
            raise ValueError(f"a full tangent kernel must be (N, N, O, O), got {tuple(theta.shape)}")
        theta = theta.diagonal(dim1=2, dim2=3).sum(-1)
    return _square(theta, "tangent kernel")


def gradient_gram(phi: torch.Tensor, theta) -> torch.Tensor:
    """``G[i, j] = ⟨∇β_i, ∇β_j⟩ = φ_iᵀ Θ_tr φ_j`` from a tangent kernel on the training set
    (N × N trace kernel, or the full (N, N, O, O) kernel, whose trace is taken)."""
    phi = torch.as_tensor(phi).double()
    T = _trace_kernel(theta)
    if T.shape[0] != phi.shape[0]:
        raise ValueError(f"tangent kernel on {T.shape[0]} examples, basis on {phi.shape[0]}")
    return phi.T @ T @ phi


def gradient_independence(gram: torch.Tensor, top: int | None = None) -> dict:
    """From ``G = gradient_gram(φ, Θ)``: the gradient norms ``‖∇β_i‖``, the cosine matrix
    and ``max_{i≠j} |cos|`` over the leading ``top`` basis functions (default all)."""
    G = _square(gram, "gradient Gram matrix")
    if top is not None:
        if top < 2:
            raise ValueError(f"the independence measure needs at least 2 basis functions, got top={top}")
        G = G[:top, :top]
    norms = G.diagonal().clamp_min(0).sqrt()
    cos = G / (norms[:, None] * norms[None, :]).clamp_min(1e-300)
    off = cos.abs() - torch.diag(cos.diagonal().abs())
    return {"norms": norms, "cos": cos, "max_cos": float(off.max()) if len(G) > 1 else 0.0}


def tangent_kernel(
    net: nn.Module, X: torch.Tensor, proj_dim: int | None = 512, lr_mults=None, seed: int = 0
) -> torch.Tensor:
    """The trace tangent kernel on ``X``: exact for an infinite π-net (``inf_ntk``), the
    projected NTK (``proj_dim``; None: exact) of any other model."""
    from ..layers import InfPiLinearReLU
    from .inf_ntk import inf_ntk
    from .pntk import pntk

    if any(isinstance(m, InfPiLinearReLU) for m in net.modules()):
        return inf_ntk(net, X, lr_mults=lr_mults, kind="trace").double()
    return pntk(net, X, proj_dim=proj_dim, kind="trace", lr_mults=lr_mults, seed=seed)


class TrajectoryRecorder:
    """Records a network's outputs on a set of inputs (and optionally its tangent kernel or
    parameter snapshots) during training, and decomposes them on a basis.

    The paper's basis, on a held-out set::

        rec = TrajectoryRecorder(None, X_heldout, y_heldout)
        for step in range(steps):
            rec.record(net, step, snapshot=step % 10 == 0)
            ... optimizer step ...
        rec.set_function_basis(network_basis(net, X_heldout))
        rec.betas()                        # (T, m, 1): β_i(t); β_i = s_i at the end
        rec.compute_gradients(net, top=10)  # exact ∇β_i at the snapshots
        rec.grad_norms(), rec.independence(10)

    A kernel eigenbasis, on the training set::

        rec = TrajectoryRecorder(phi, X_train, y_train)   # phi may be None: set it later
        for step in range(steps):
            ... optimizer step ...
            rec.record(net, step)
        rec.set_basis(*eigenbasis(after_kernel(net, X_train)))  # e.g. the after kernel
        rec.beta_norms(), rec.grad_norms(), rec.independence()

    Args:
        phi: basis (N × m, orthonormal columns) or None.
        X, y: training inputs, and labels (int, N: one-hot targets with ``num_classes``
            columns) or targets (float, N or N × O).
        eigvals: eigenvalues of the basis (for plots), optional.
        kernel_fn: ``kernel_fn(net, X)`` → N × N trace tangent kernel, recorded every
            ``kernel_every``-th call of ``record`` (e.g. :func:`tangent_kernel`); None: none.
        batch_size: examples per forward pass when recording outputs.
    """

    def __init__(
        self,
        phi=None,
        X=None,
        y=None,
        *,
        eigvals=None,
        num_classes: int | None = None,
        kernel_fn: Callable | None = None,
        kernel_every: int = 1,
        batch_size: int = 1024,
        snapshots: bool = False,
    ):
        if X is None or y is None:
            raise ValueError("TrajectoryRecorder needs the training inputs X and targets y")
        if len(X) != len(y):
            raise ValueError(f"X has {len(X)} examples but y has {len(y)}")
        if kernel_every < 1:
            raise ValueError(f"kernel_every must be >= 1, got {kernel_every}")
        self.X = X
        y = torch.as_tensor(y)
        if not y.is_floating_point():
            k = int(num_classes or int(y.max()) + 1)
            self.targets = torch.nn.functional.one_hot(y.long(), k).double()
        else:
            self.targets = (y[:, None] if y.ndim == 1 else y).double()
        self.kernel_fn, self.kernel_every, self.batch_size = kernel_fn, kernel_every, batch_size
        self.steps: list[int] = []
        self.outputs: list[torch.Tensor] = []
        self.kernel_steps: list[int] = []
        self.kernels: list[torch.Tensor] = []
        self.phi = self.eigvals = self.basis = None
        self.snapshots = snapshots
        self.snapshot_steps: list[int] = []
        self._snapshots: list = []
        self.gradient_steps: list[int] = []
        self.gradient_results: list[dict] = []
        if phi is not None:
            self.set_basis(eigvals, phi)

    def set_basis(self, eigvals, phi) -> TrajectoryRecorder:
        """Use the basis ``phi`` (N × m); ``eigvals`` may be None. Argument order matches
        :func:`eigenbasis`, so ``rec.set_basis(*eigenbasis(K))`` works."""
        phi = torch.as_tensor(phi).double()
        if phi.ndim != 2 or phi.shape[0] != len(self.X):
            raise ValueError(
                f"the basis must be (N × m) with N = {len(self.X)} training examples, got {tuple(phi.shape)}"
            )
        self.phi = phi
        self.eigvals = None if eigvals is None else torch.as_tensor(eigvals).double()
        self.basis = None
        self.gradient_steps, self.gradient_results = [], []
        return self

    def set_function_basis(self, basis: FunctionBasis) -> TrajectoryRecorder:
        """Use the paper's basis (:func:`network_basis` of the final network on the recorded
        inputs): ``betas()`` are then the scalars ``β_i(t)`` (shape T × m × 1)."""
        if basis.N != len(self.X):
            raise ValueError(f"the basis was built on {basis.N} examples, the recorder holds {len(self.X)}")
        if basis.u.shape[0] != self.targets.shape[1]:
            raise ValueError(f"the basis has {basis.u.shape[0]} outputs, the targets {self.targets.shape[1]}")
        self.basis = basis
        self.phi = basis.directions().T
        self.eigvals = basis.s
        self.gradient_steps, self.gradient_results = [], []
        return self

    @torch.no_grad()
    def _outputs(self, net) -> torch.Tensor:
        was_training = net.training
        net.eval()
        try:
            outs = [net(self.X[i : i + self.batch_size]) for i in range(0, len(self.X), self.batch_size)]
        finally:
            net.train(was_training)
        out = torch.cat(outs).detach().double().cpu()
        return out[:, None] if out.ndim == 1 else out.reshape(len(out), -1)

    def record(self, net: nn.Module, step: int, kernel=None, snapshot: bool | None = None):
        """Store ``f_t`` on the recorded inputs (no gradients, no pending rows) and, every
        ``kernel_every``-th call, the tangent kernel (``kernel`` if given, else ``kernel_fn``);
        with ``snapshot`` (default: the recorder's ``snapshots``) also a copy of the
        parameters, for :meth:`compute_gradients`."""
        out = self._outputs(net)
        if out.shape[1] != self.targets.shape[1]:
            raise ValueError(
                f"the network has {out.shape[1]} outputs but the targets {self.targets.shape[1]}"
            )
        if self.steps and step <= self.steps[-1]:
            raise ValueError(f"steps must increase: got {step} after {self.steps[-1]}")
        want_kernel = kernel is not None or (
            self.kernel_fn is not None and len(self.steps) % self.kernel_every == 0
        )
        self.steps.append(int(step))
        self.outputs.append(out)
        if self.snapshots if snapshot is None else snapshot:
            self.snapshot_steps.append(int(step))
            if _output_is_infinite(net):
                self._snapshots.append(copy.deepcopy(net))
            else:
                self._snapshots.append(copy.deepcopy(net.state_dict()))
        if want_kernel:
            K = kernel if kernel is not None else self.kernel_fn(net, self.X)
            self.kernel_steps.append(int(step))
            self.kernels.append(_trace_kernel(K).cpu())

    # ------------------------------------------------------------------ analysis
    def _need_basis(self):
        if self.phi is None and self.basis is None:
            raise RuntimeError(
                "no basis yet: call set_basis(eigvals, phi), e.g. with eigenbasis(after_kernel(net, X))"
            )

    def betas(self) -> torch.Tensor:
        """``β_i(t)`` for every recorded step: (T, m, O) for a kernel basis, (T, m, 1) for the
        paper's basis."""
        self._need_basis()
        if self.basis is not None:
            if not self.outputs:
                return torch.zeros(0, len(self.basis), 1, dtype=torch.float64)
            return self.basis.coefficients(torch.stack(self.outputs))[..., None]
        if not self.outputs:
            return torch.zeros(0, self.phi.shape[1], self.targets.shape[1], dtype=torch.float64)
        return torch.einsum("nm,tno->tmo", self.phi, torch.stack(self.outputs))

    def beta_norms(self) -> torch.Tensor:
        """``|β_i(t)|`` (norm over outputs): (T, m)."""
        return self.betas().norm(dim=2)

    def beta_star(self) -> torch.Tensor:
        """The targets' coefficients ``β*_i = φ_iᵀ y``: (m, O) (paper's basis: (m, 1))."""
        self._need_basis()
        if self.basis is not None:
            return self.basis.coefficients(self.targets)[:, None]
        return beta_coefficients(self.phi, self.targets)

    def compute_gradients(
        self,
        net: nn.Module,
        top: int | None = 10,
        proj_dim: int | None = None,
        seed: int = 0,
        progress: bool = False,
    ) -> list[dict]:
        """With the paper's basis set and ``snapshots=True``: :func:`basis_gradients` at every
        recorded snapshot (loaded into a copy of ``net``). Exact by default; with
        ``proj_dim`` through a projected NTK with a fresh sketch per snapshot
        (seed ``seed + k``). ``grams()``, ``grad_norms()`` and ``independence()`` then use
        these instead of a recorded kernel."""
        if self.basis is None:
            raise RuntimeError("compute_gradients needs the paper's basis: call set_function_basis first")
        if not self._snapshots:
            raise RuntimeError("no snapshots were recorded: create the recorder with snapshots=True")
        from tqdm.auto import tqdm

        work = copy.deepcopy(net)
        results = []
        for k, snap in enumerate(tqdm(self._snapshots, desc="∇β", disable=not progress, leave=False)):
            model = snap if isinstance(snap, nn.Module) else work
            if not isinstance(snap, nn.Module):
                work.load_state_dict(snap)
            results.append(
                basis_gradients(
                    model,
                    self.X,
                    self.basis,
                    top=top,
                    batch_size=self.batch_size,
                    proj_dim=proj_dim,
                    seed=seed + k,
                )
            )
        self.gradient_steps, self.gradient_results = list(self.snapshot_steps), results
        return results

    def grams(self) -> torch.Tensor:
        """``⟨∇β_i, ∇β_j⟩`` at each step with a recorded kernel (or, with the paper's basis,
        at each snapshot of :meth:`compute_gradients`): (T_k, m, m)."""
        self._need_basis()
        if self.basis is not None:
            if not self.gradient_results:
                raise RuntimeError("call compute_gradients(net) first (paper's basis)")
            return torch.stack([r["gram"] for r in self.gradient_results])
        if not self.kernels:
            raise RuntimeError("no tangent kernel was recorded: pass kernel_fn (or kernel=) to record")
        return torch.stack([gradient_gram(self.phi, K) for K in self.kernels])

    def grad_norms(self) -> torch.Tensor:
        """``‖∇β_i‖`` at each step with a recorded kernel: (T_k, m)."""
        return self.grams().diagonal(dim1=1, dim2=2).clamp_min(0).sqrt()

    def independence(self, top: int | None = 10) -> torch.Tensor:
        """``max_{i≠j≤top} |cos(∇β_i, ∇β_j)|`` at each step with a recorded kernel: (T_k,)."""
        return torch.tensor(
            [gradient_independence(G, top)["max_cos"] for G in self.grams()], dtype=torch.float64
        )

    @property
    def grad_steps(self) -> list[int]:
        """The steps of :meth:`grams`: snapshot steps (paper's basis) or kernel steps."""
        return self.gradient_steps if self.basis is not None else self.kernel_steps

    def save(self, path) -> Path:
        """Everything recorded, as a ``.npz`` file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {
            "steps": np.array(self.steps),
            "targets": self.targets.numpy(),
            "outputs": torch.stack(self.outputs).numpy() if self.outputs else np.zeros((0,)),
            "kernel_steps": np.array(self.kernel_steps),
        }
        if self.kernels:
            arrays["kernels"] = torch.stack(self.kernels).numpy()
        if self.phi is not None:
            arrays["phi"] = self.phi.numpy()
        if self.eigvals is not None:
            arrays["eigvals"] = self.eigvals.numpy()
        if self.basis is not None:
            arrays["basis_U"], arrays["basis_u"] = self.basis.U.numpy(), self.basis.u.numpy()
            arrays["basis_s"], arrays["basis_v"] = self.basis.s.numpy(), self.basis.v.numpy()
            arrays["betas"] = self.betas()[..., 0].numpy()
        if self.gradient_results:
            arrays["gradient_steps"] = np.array(self.gradient_steps)
            arrays["grams"] = self.grams().numpy()
        return atomic_savez(path, **arrays)


def _atomic_text(path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    atomic_write(path, lambda fh: fh.write(text.encode()))
    return path


def atomic_savez(path, **arrays) -> Path:
    """``np.savez_compressed`` to a temporary file in the same folder, then renamed: a
    reader never sees a half-written file."""
    path = Path(path)
    atomic_write(path, lambda fh: np.savez_compressed(fh, **arrays))
    return path


# ---------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {
            "font.size": 13,
            "axes.titlesize": 14,
            "axes.labelsize": 14,
            "legend.fontsize": 11,
            "xtick.labelsize": 12,
            "ytick.labelsize": 12,
        }
    )
    return plt


def _xsteps(steps):
    s = np.asarray(steps, dtype=float)
    return s + 1.0  # log axis: step 0 is drawn at 1


def _basis_label(rec) -> str:
    return "paper's basis" if rec.basis is not None else "kernel eigenbasis"


def plot_beta_curves(
    rec: TrajectoryRecorder, path, top: int = 12, title: str | None = None, dpi: int = 100
) -> Path:
    """``|β_i(t)|`` of the leading basis functions against the step (left; dashed: ``|β*_i|``,
    the targets' coefficients — with the paper's basis the final ``s_i``) and the remaining
    fraction ``|β_i(t) − β*_i| / |β*_i|``
    (right): incremental learning shows as the curves finishing in the order of i.
    1400 px wide at the default dpi; every curve is in the legend."""
    plt = _plt()
    B = rec.betas()
    paper = rec.basis is not None
    star = rec.basis.s[:, None] if paper else rec.beta_star()
    m = min(top, B.shape[1])
    x = _xsteps(rec.steps)
    cmap = plt.cm.tab20 if m > 10 else plt.cm.tab10
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(14, 5.2))
    for i in range(m):
        c = cmap(i)
        a1.plot(x, B[:, i].norm(dim=1).numpy(), color=c, lw=2, label=rf"$\beta_{{{i + 1}}}$")
        a1.axhline(float(star[i].norm()), color=c, lw=1, ls="--")
        frac = (B[:, i] - star[i]).norm(dim=1) / star[i].norm().clamp_min(1e-300)
        a2.plot(x, frac.numpy(), color=c, lw=2, label=rf"$\beta_{{{i + 1}}}$")
    for a in (a1, a2):
        a.set_xscale("log")
        a.set_xlabel("step + 1")
        a.grid(alpha=0.3)
    ref = r"s_i" if paper else r"\beta^*_i"
    a1.set_ylabel(
        r"$|\beta_i(t)|$  (dashed: " + (r"final $s_i$)" if paper else r"$|\beta^*_i|$ of the targets)")
    )
    a2.set_ylabel(rf"$|\beta_i(t)-{ref}| \,/\, |{ref}|$")
    a2.set_ylim(0, 1.5)
    fig.legend(
        *a1.get_legend_handles_labels(),
        loc="center right",
        title="basis function",
        ncol=1 if m <= 12 else 2,
        frameon=False,
    )
    fig.suptitle(title or f"coefficients on the {_basis_label(rec)}")
    fig.tight_layout(rect=(0, 0, 0.88 if m <= 12 else 0.82, 1))
    return _save(fig, path, dpi)


def plot_beta_vs_gradnorm(
    rec: TrajectoryRecorder, path, top: int | None = 100, title: str | None = None, dpi: int = 100
) -> Path:
    """``|β_i|`` against ``‖∇β_i‖`` (log axes) for every basis function, coloured by the
    recorded step (colorbar)."""
    plt = _plt()
    import matplotlib as mpl

    norms = rec.grad_norms()
    B = rec.beta_norms()
    step_index = {s: k for k, s in enumerate(rec.steps)}
    steps = rec.grad_steps
    m = norms.shape[1] if top is None else min(top, norms.shape[1])
    norm = mpl.colors.LogNorm(vmin=1, vmax=max(steps) + 1)
    fig, ax = plt.subplots(figsize=(12, 7))
    for k, s in enumerate(steps):
        b = B[step_index[s], :m].numpy()
        g = norms[k, :m].numpy()
        ok = (b > 0) & (g > 0)
        ax.scatter(g[ok], b[ok], s=22, c=np.full(ok.sum(), s + 1.0), cmap="plasma", norm=norm, alpha=0.85)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(r"$\|\nabla_\theta \beta_i\|$")
    ax.set_ylabel(r"$|\beta_i|$")
    ax.grid(alpha=0.3, which="both")
    fig.colorbar(mpl.cm.ScalarMappable(norm=norm, cmap="plasma"), ax=ax, label="step + 1")
    ax.set_title(title or f"coefficient size against gradient size ({_basis_label(rec)}, {m} functions)")
    fig.tight_layout()
    return _save(fig, path, dpi)


def plot_independence(
    rec: TrajectoryRecorder,
    path,
    tops: tuple[int, ...] = (5, 10, 20),
    title: str | None = None,
    dpi: int = 100,
) -> Path:
    """The gradient-independence measure over training, for the leading 5, 10, 20 basis functions."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(12, 6))
    m = rec.grams().shape[1]
    x = _xsteps(rec.grad_steps)
    for top in [t for t in tops if t <= m] or [m]:
        ax.plot(x, rec.independence(top).numpy(), marker="o", ms=6, lw=2, label=f"i, j ≤ {top}")
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("step + 1")
    ax.set_ylabel(r"$\max_{i\neq j} |\cos(\nabla\beta_i, \nabla\beta_j)|$")
    ax.grid(alpha=0.3)
    ax.legend(title="basis functions")
    ax.set_title(title or f"gradient independence ({_basis_label(rec)})")
    fig.tight_layout()
    return _save(fig, path, dpi)


def _save(fig, path, dpi) -> Path:
    """Save atomically (temporary file, then rename)."""
    plt = _plt()
    path = Path(path)
    try:
        atomic_write(path, lambda fh: fig.savefig(fh, dpi=dpi, format=path.suffix.lstrip(".") or "png"))
    finally:
        plt.close(fig)
    return path

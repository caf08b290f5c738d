"""Decomposition of a training trajectory on the eigenbasis of a kernel.

Take a kernel ``K`` on the training set (N × N) — the conjugate kernel of a trained
network's last hidden layer (the "after kernel"), or a tangent kernel — and its
orthonormal eigenvectors ``φ_1, φ_2, …`` (eigenvalues in decreasing order). The network's
outputs on the training set, ``f_t`` (N × O at training step t), are the sum
``f_t = Σ_i φ_i β_i(t)`` with coefficients ``β_i(t) = φ_iᵀ f_t`` (a vector of O numbers);
keeping every eigenvector the sum is exact. The targets have coefficients ``β*_i = φ_iᵀ y``.

*Incremental learning* shows as the coefficients ``|β_i(t)|`` approaching ``|β*_i|`` one
after the other, in the order of the eigenvalues. In the kernel regime this is exact for
the tangent kernel: under gradient flow on the squared loss with a fixed NTK ``Θ``,
``β_i(t) − β*_i`` decays like ``exp(−η λ_i t)``.

The parameter gradient of a coefficient, ``∇_θ β_i = Σ_n φ_i[n] ∇_θ f(x_n)``, has inner
products given by the tangent kernel:

    ⟨∇β_i, ∇β_j⟩ = Σ_k φ_iᵀ Θ_kk φ_j = φ_iᵀ Θ_tr φ_j

(with O outputs ``β_i`` is a vector and the inner product is that of its O × P
Jacobians, hence the trace kernel ``Θ_tr = Σ_k Θ_kk``). So ``‖∇β_i‖² = φ_iᵀ Θ_tr φ_i`` and
the *gradient independence* of the basis functions is

    max_{i ≠ j} |⟨∇β_i, ∇β_j⟩| / (‖∇β_i‖ ‖∇β_j‖)

over the leading eigenvectors: 0 when the eigenvectors of K are also eigenvectors of Θ
(the coefficients can be learned independently), up to 1 when two gradients are
parallel. Θ may be exact (``inf_ntk`` for infinite π-nets, ``empirical_ntk``) or
projected (``pntk``).

:class:`TrajectoryRecorder` stores ``f_t`` (and, optionally, Θ_t) during any training
loop — InfSGD on an infinite π-net included — and computes all of the above, for a
basis given up front or chosen after training (the after kernel of the final network).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

__all__ = [
    "eigenbasis", "conjugate_kernel", "after_kernel", "beta_coefficients", "reconstruct", "gradient_gram",
    "gradient_independence", "tangent_kernel", "TrajectoryRecorder", "plot_beta_curves",
    "plot_beta_vs_gradnorm", "plot_independence",
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


@torch.no_grad()
def after_kernel(net: nn.Module, X: torch.Tensor, feature_fn: Callable | None = None,
                 batch_size: int = 1024) -> torch.Tensor:
    """The conjugate kernel of ``net``'s last hidden layer on ``X`` (N × N, float64).

    * infinite π-net (output layer an ``InfPiLinearReLU``): the last hidden state ``g``
      enters the output layer through the features ``φ(ω·g)``, ``ω ~ N(0, I)``, whose
      kernel is ``s s' F00(ĝ·ĝ')`` (``s = 1`` under layernorm);
    * finite π-net / μP MLP (``net(x, return_hidden=True)``): ``φ(h)·φ(h')`` with ``h``
      the last preactivation (normalised first under layernorm) — the finite version of
      the same kernel, since ``h ≈ n^-½ Ω g``;
    * any other model: ``feature_fn(net, x)`` or ``net.features(x)`` (penultimate
      features, N × D), and the kernel ``F Fᵀ / D``.
    """
    from ..functional import pi_features
    from ..layers import InfPiLinearReLU
    from ..math import F00

    was_training = net.training
    net.eval()
    try:
        layers = list(getattr(net, "layers", []))
        feats = []
        for i in range(0, len(X), batch_size):
            x = X[i:i + batch_size]
            if feature_fn is not None:
                feats.append(torch.as_tensor(feature_fn(net, x)).reshape(len(x), -1))
            elif layers and isinstance(layers[-1], (InfPiLinearReLU,)):
                feats.append(net(x, return_hidden=True)[1])
            elif layers and hasattr(layers[-1], "weight"):
                h = net(x, return_hidden=True)[1]
                if getattr(net, "layernorm", False):
                    h = h / h.norm(dim=-1, keepdim=True).clamp_min(1e-30)
                feats.append(torch.relu(h))
            elif hasattr(net, "features"):
                feats.append(net.features(x).reshape(len(x), -1))
            else:
                raise TypeError(f"after_kernel does not know the last hidden layer of {type(net).__name__}: "
                                "give feature_fn(net, x) or define net.features(x)")
        F = torch.cat(feats).double()
    finally:
        net.train(was_training)
    if feature_fn is None and layers and isinstance(layers[-1], InfPiLinearReLU):
        s, g = pi_features(F, getattr(layers[-1], "layernorm", False))
        return s[:, None] * s[None, :] * F00(g @ g.T)
    if feature_fn is None and layers and hasattr(layers[-1], "weight"):
        return F @ F.T
    return conjugate_kernel(F)


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


def tangent_kernel(net: nn.Module, X: torch.Tensor, proj_dim: int | None = 512, lr_mults=None,
                   seed: int = 0) -> torch.Tensor:
    """The trace tangent kernel on ``X``: exact for an infinite π-net (``inf_ntk``), the
    projected NTK (``proj_dim``; None: exact) of any other model."""
    from ..layers import InfPiLinearReLU
    from .inf_ntk import inf_ntk
    from .pntk import pntk

    if any(isinstance(m, InfPiLinearReLU) for m in net.modules()):
        return inf_ntk(net, X, lr_mults=lr_mults, kind="trace").double()
    return pntk(net, X, proj_dim=proj_dim, kind="trace", lr_mults=lr_mults, seed=seed)


class TrajectoryRecorder:
    """Records a network's outputs on the training set (and optionally its tangent kernel)
    during training, and decomposes them on a kernel eigenbasis.

    Usage::

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

    def __init__(self, phi=None, X=None, y=None, *, eigvals=None, num_classes: int | None = None,
                 kernel_fn: Callable | None = None, kernel_every: int = 1, batch_size: int = 1024):
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
        self.phi = self.eigvals = None
        if phi is not None:
            self.set_basis(eigvals, phi)

    def set_basis(self, eigvals, phi) -> "TrajectoryRecorder":
        """Use the basis ``phi`` (N × m); ``eigvals`` may be None. Argument order matches
        :func:`eigenbasis`, so ``rec.set_basis(*eigenbasis(K))`` works."""
        phi = torch.as_tensor(phi).double()
        if phi.ndim != 2 or phi.shape[0] != len(self.X):
            raise ValueError(f"the basis must be (N × m) with N = {len(self.X)} training examples, "
                             f"got {tuple(phi.shape)}")
        self.phi = phi
        self.eigvals = None if eigvals is None else torch.as_tensor(eigvals).double()
        return self

    @torch.no_grad()
    def _outputs(self, net) -> torch.Tensor:
        was_training = net.training
        net.eval()
        try:
            outs = [net(self.X[i:i + self.batch_size]) for i in range(0, len(self.X), self.batch_size)]
        finally:
            net.train(was_training)
        out = torch.cat(outs).detach().double().cpu()
        return out[:, None] if out.ndim == 1 else out.reshape(len(out), -1)

    def record(self, net: nn.Module, step: int, kernel=None):
        """Store ``f_t`` on the training set (no gradients, no pending rows) and, every
        ``kernel_every``-th call, the tangent kernel (``kernel`` if given, else ``kernel_fn``)."""
        out = self._outputs(net)
        if out.shape[1] != self.targets.shape[1]:
            raise ValueError(f"the network has {out.shape[1]} outputs but the targets {self.targets.shape[1]}")
        if self.steps and step <= self.steps[-1]:
            raise ValueError(f"steps must increase: got {step} after {self.steps[-1]}")
        want_kernel = kernel is not None or (self.kernel_fn is not None and len(self.steps) % self.kernel_every == 0)
        self.steps.append(int(step))
        self.outputs.append(out)
        if want_kernel:
            K = kernel if kernel is not None else self.kernel_fn(net, self.X)
            self.kernel_steps.append(int(step))
            self.kernels.append(_trace_kernel(K).cpu())

    # ------------------------------------------------------------------ analysis
    def _need_basis(self):
        if self.phi is None:
            raise RuntimeError("no basis yet: call set_basis(eigvals, phi), e.g. with eigenbasis(after_kernel(net, X))")

    def betas(self) -> torch.Tensor:
        """``β_i(t)`` for every recorded step: (T, m, O)."""
        self._need_basis()
        if not self.outputs:
            return torch.zeros(0, self.phi.shape[1], self.targets.shape[1], dtype=torch.float64)
        return torch.einsum("nm,tno->tmo", self.phi, torch.stack(self.outputs))

    def beta_norms(self) -> torch.Tensor:
        """``|β_i(t)|`` (norm over outputs): (T, m)."""
        return self.betas().norm(dim=2)

    def beta_star(self) -> torch.Tensor:
        """The targets' coefficients ``β*_i = φ_iᵀ y``: (m, O)."""
        self._need_basis()
        return beta_coefficients(self.phi, self.targets)

    def grams(self) -> torch.Tensor:
        """``⟨∇β_i, ∇β_j⟩`` at each step with a recorded kernel: (T_k, m, m)."""
        self._need_basis()
        if not self.kernels:
            raise RuntimeError("no tangent kernel was recorded: pass kernel_fn (or kernel=) to record")
        return torch.stack([gradient_gram(self.phi, K) for K in self.kernels])

    def grad_norms(self) -> torch.Tensor:
        """``‖∇β_i‖`` at each step with a recorded kernel: (T_k, m)."""
        return self.grams().diagonal(dim1=1, dim2=2).clamp_min(0).sqrt()

    def independence(self, top: int | None = 10) -> torch.Tensor:
        """``max_{i≠j≤top} |cos(∇β_i, ∇β_j)|`` at each step with a recorded kernel: (T_k,)."""
        return torch.tensor([gradient_independence(G, top)["max_cos"] for G in self.grams()], dtype=torch.float64)

    def save(self, path) -> Path:
        """Everything recorded, as a ``.npz`` file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"steps": np.array(self.steps), "targets": self.targets.numpy(),
                  "outputs": torch.stack(self.outputs).numpy() if self.outputs else np.zeros((0,)),
                  "kernel_steps": np.array(self.kernel_steps)}
        if self.kernels:
            arrays["kernels"] = torch.stack(self.kernels).numpy()
        if self.phi is not None:
            arrays["phi"] = self.phi.numpy()
        if self.eigvals is not None:
            arrays["eigvals"] = self.eigvals.numpy()
        np.savez_compressed(path, **arrays)
        return path


# ---------------------------------------------------------------------- plots
def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _xsteps(steps):
    s = np.asarray(steps, dtype=float)
    return s + 1.0  # log axis: step 0 is drawn at 1


def plot_beta_curves(rec: TrajectoryRecorder, path, top: int = 12, title: str | None = None, dpi: int = 80) -> Path:
    """``|β_i(t)|`` of the leading basis functions against the step (left; dashed: ``|β*_i|``)
    and the remaining fraction ``|β_i(t) − β*_i| / |β*_i|`` (right): incremental learning
    shows as the curves finishing in the order of i."""
    plt = _plt()
    B = rec.betas()
    star = rec.beta_star()
    m = min(top, B.shape[1])
    x = _xsteps(rec.steps)
    colors = plt.cm.viridis(np.linspace(0, 0.95, m))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
    for i in range(m):
        a1.plot(x, B[:, i].norm(dim=1).numpy(), color=colors[i], lw=1.4, label=f"{i + 1}" if i < 8 else None)
        a1.axhline(float(star[i].norm()), color=colors[i], lw=0.8, ls="--")
        frac = (B[:, i] - star[i]).norm(dim=1) / star[i].norm().clamp_min(1e-300)
        a2.plot(x, frac.numpy(), color=colors[i], lw=1.4)
    for a in (a1, a2):
        a.set_xscale("log")
        a.set_xlabel("step + 1")
        a.grid(alpha=0.3)
    a1.set_ylabel(r"$|\beta_i(t)|$  (dashed: $|\beta^*_i|$)")
    a2.set_ylabel(r"$|\beta_i(t)-\beta^*_i| \,/\, |\beta^*_i|$")
    a2.set_ylim(0, 1.5)
    a1.legend(title="i", fontsize=7, title_fontsize=7, ncol=2, loc="upper left")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path, dpi)


def plot_beta_vs_gradnorm(rec: TrajectoryRecorder, path, top: int | None = 100, title: str | None = None,
                          dpi: int = 80) -> Path:
    """``|β_i|`` against ``‖∇β_i‖`` (log axes), one colour per recorded kernel step."""
    plt = _plt()
    norms = rec.grad_norms()
    B = rec.beta_norms()
    step_index = {s: k for k, s in enumerate(rec.steps)}
    m = norms.shape[1] if top is None else min(top, norms.shape[1])
    colors = plt.cm.plasma(np.linspace(0, 0.9, len(rec.kernel_steps)))
    fig, ax = plt.subplots(figsize=(4.6, 3.6))
    for k, s in enumerate(rec.kernel_steps):
        b = B[step_index[s], :m].numpy()
        g = norms[k, :m].numpy()
        ok = (b > 0) & (g > 0)
        ax.scatter(g[ok], b[ok], s=8, color=colors[k], label=f"step {s}", alpha=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(r"$\|\nabla_\theta \beta_i\|$")
    ax.set_ylabel(r"$|\beta_i|$")
    ax.grid(alpha=0.3, which="both")
    if len(rec.kernel_steps) <= 8:
        ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path, dpi)


def plot_independence(rec: TrajectoryRecorder, path, tops: tuple[int, ...] = (5, 10, 20), title: str | None = None,
                      dpi: int = 80) -> Path:
    """The gradient-independence measure over training, for the leading 5, 10, 20 basis functions."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.6, 3.4))
    m = rec.phi.shape[1] if rec.phi is not None else 0
    x = _xsteps(rec.kernel_steps)
    for top in tops:
        if top <= m:
            ax.plot(x, rec.independence(top).numpy(), marker="o", ms=3, label=f"i, j ≤ {top}")
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("step + 1")
    ax.set_ylabel(r"$\max_{i\neq j} |\cos(\nabla\beta_i, \nabla\beta_j)|$")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path, dpi)


def _save(fig, path, dpi) -> Path:
    plt = _plt()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path

"""Kernel baselines: NNGP / NTK of deep ReLU MLPs, π-net feature kernels, and
kernel ridge regression (KRR) that scales to 50k training points.

Network and kernel conventions
==============================

The MLP has ``depth`` = L hidden layers of width n → ∞, ReLU ``φ``, input
dimension ``d`` and one readout layer.  With all parameters i.i.d. N(0, 1)::

    h¹(x)   = σ_w / sqrt(d) · W¹ x       + σ_b · b¹
    hˡ⁺¹(x) = σ_w / sqrt(n) · Wˡ⁺¹ φ(hˡ) + σ_b · bˡ⁺¹      (l = 1 … L)
    f(x)    = h^{L+1}(x)                                    (the readout)

with ``varw = σ_w²`` and ``varb = σ_b²``.  The forward pass is the same random
function as the "standard parametrization" with weights of variance
``varw / fan_in``, so the NNGP is the same for both.  Writing ``Σ⁰`` for the
covariance of the first preactivation ``h¹``::

    Σ⁰(x, x') = varw · x·x' / d + varb
    Σˡ(x, x') = varw · V(Σˡ⁻¹)(x, x') + varb             (l = 1 … L)
    V(Σ)(x, x')  = E[φ(u) φ(u')]  = sqrt(Σ(x,x) Σ(x',x')) · F00(ρ)
    V'(Σ)(x, x') = E[φ'(u) φ'(u')] = F11(ρ),    ρ = Σ(x,x') / sqrt(Σ(x,x) Σ(x',x'))

for ``(u, u') ~ N(0, Σ restricted to {x, x'})``.  **The readout is included**:
``mlp_nngp(..., depth=L)`` returns ``Σᴸ = Cov[f(x), f(x')]``, the covariance of
the network *output*.  ``depth=0`` is the linear model ``Σ⁰``.

The NTK is the tangent kernel with respect to the N(0, 1) parameters above
(the "NTK parametrization" of Jacot et al.; gradients w.r.t. every weight and
bias, readout included)::

    Θ⁰ = Σ⁰,     Θˡ = Σˡ + varw · V'(Σˡ⁻¹) · Θˡ⁻¹   (elementwise product),

and ``mlp_ntk(..., depth=L)`` returns ``Θᴸ(x, x') = ⟨∂f(x)/∂θ, ∂f(x')/∂θ⟩``.

The original library's NTK (``ntk_variant="pilim"``)
----------------------------------------------------

The paper's Table 1 NTK baseline was computed by the original code
(``relu_ntk_fn`` of santacml/pilim) with a different recursion.  Written in the
notation above, with ``P⁰ = x·x'/d``, ``Pˡ = V(Σˡ⁻¹)`` the post-activation
covariance of hidden layer ``l`` and ``J1 = 2·F00``, ``J0 = 2·F11`` (the
arc-cosine kernels normalised to 1 at correlation 1)::

    Θ̃⁰ = P⁰ + 1,     Θ̃ˡ = Pˡ + 1 + varw · J0(J1(ρˡ)) · Θ̃ˡ⁻¹,   ρˡ = correlation of Σˡ⁻¹

(learning-rate multipliers 1, as in every Table 1 command).  Compared with the
tangent kernel ``Θ`` it differs in three places, and in a fourth that only
matters for ``varw ≠ 1``:

1. every bias contributes ``+1`` per layer, whatever ``varb`` is (the tangent
   kernel has ``+ varb``: with ``varb = 0`` the biases have no gradient scale);
2. the ReLU-derivative kernel is evaluated at the *post*-activation
   correlation ``J1(ρ)`` instead of the preactivation correlation ``ρ``;
3. it is ``J0 = 2·F11``, i.e. the factor ½ of ``E[φ'(u) φ'(u')] = F11(ρ)`` is
   dropped (likely a bug there);
4. the weight terms are ``Pˡ`` rather than ``varw · Pˡ`` (equal at the
   original's default ``varw = 1``).

``mlp_ntk(..., ntk_variant="pilim")`` (and ``make_mlp_kernel("ntk",
ntk_variant="pilim")``, ``cifar10test --ntk --ntk-variant pilim``) computes
exactly this formula so that Table 1's NTK number can be reproduced; the
default ``"correct"`` is the tangent kernel ``Θ``.  The variant needs
``depth ≥ 1`` (the original fails at depth 0).  It leaves the NNGP unchanged.

Because ``Σˡ(x, x) = varw · Σˡ⁻¹(x, x) / 2 + varb`` only depends on ``|x|``,
each block ``K[X_i, Y_j]`` is computed from the two row blocks alone; all
functions here work block by block, in float64 unless told otherwise.

Kernel ridge regression
=======================

See :func:`kernel_ridge_regression` for the targets, the regularisation and
the two solvers, and :func:`krr_memory_bytes` for memory estimates.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from inf.math import F00_F11_F02, relu_kernel

__all__ = [
    "mlp_kernels",
    "mlp_nngp",
    "mlp_ntk",
    "make_mlp_kernel",
    "NTK_VARIANTS",
    "feature_kernel",
    "cholesky_inplace_",
    "cholesky_solve_inplace",
    "kernel_ridge_regression",
    "krr_targets",
    "krr_memory_bytes",
]

KernelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _std_floor(dtype: torch.dtype) -> float:
    """Smallest standard-deviation product used to form a correlation, for ``dtype``.

    A point whose variance is exactly 0 (``x = 0`` with ``varb = 0``) then gets correlation
    ``0 / floor = 0`` instead of ``0 / 0``.  The floor is the smallest normal number of the
    dtype (a fixed 1e-300 underflows to 0 in float32 and gave NaN there).
    """
    return torch.finfo(dtype).tiny


# ---------------------------------------------------------------------------
# NNGP / NTK of a deep ReLU MLP
# ---------------------------------------------------------------------------


def _check_hparams(depth: int, varw: float, varb: float) -> None:
    if int(depth) != depth or depth < 0:
        raise ValueError(f"depth must be a non-negative integer, got {depth!r}")
    if varw <= 0:
        raise ValueError(f"varw must be positive, got {varw!r}")
    if varb < 0:
        raise ValueError(f"varb must be non-negative, got {varb!r}")


NTK_VARIANTS = ("correct", "pilim")


def _check_variant(ntk_variant: str, depth: int) -> None:
    if ntk_variant not in NTK_VARIANTS:
        raise ValueError(f"ntk_variant must be one of {NTK_VARIANTS}, got {ntk_variant!r}")
    if ntk_variant == "pilim" and depth < 1:
        raise ValueError(
            "ntk_variant='pilim' needs depth >= 1 (the original formula is undefined for depth 0)"
        )


def _as_rows(X: torch.Tensor, dtype: torch.dtype, device) -> torch.Tensor:
    X = torch.as_tensor(X)
    if X.dim() != 2:
        X = X.reshape(X.shape[0], -1)
    return X.to(device=device, dtype=dtype)


def _mlp_block(
    X: torch.Tensor, Y: torch.Tensor, depth: int, varw: float, varb: float, want_ntk: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """NNGP (and NTK) between row blocks ``X`` (n×d) and ``Y`` (m×d), same dtype/device."""
    d = X.shape[1]
    # self-variances Σˡ(x, x) of the first preactivation
    vx = varw * (X * X).sum(1) / d + varb
    vy = varw * (Y * Y).sum(1) / d + varb
    sigma = torch.addmm(torch.full((), varb, dtype=X.dtype, device=X.device), X, Y.T, alpha=varw / d)
    theta = sigma.clone() if want_ntk else None
    for _ in range(depth):
        std = torch.sqrt(vx)[:, None] * torch.sqrt(vy)[None, :]
        rho = sigma / std.clamp_min(_std_floor(std.dtype))
        f00, f11, _ = F00_F11_F02(rho)
        # Σˡ = varw · std · F00(ρ) + varb, written in place of the old Σ
        sigma = torch.mul(std, f00, out=sigma).mul_(varw).add_(varb)
        if want_ntk:
            # Θˡ = Σˡ + varw · F11(ρ) · Θˡ⁻¹
            theta.mul_(f11).mul_(varw).add_(sigma)
        del std, rho, f00, f11
        vx = varw * vx / 2 + varb
        vy = varw * vy / 2 + varb
    return sigma, theta


def _pilim_block(
    X: torch.Tensor, Y: torch.Tensor, depth: int, varw: float, varb: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """NNGP ``Σᴸ`` and the original library's NTK ``Θ̃ᴸ`` (module docstring) between row blocks."""
    d = X.shape[1]
    floor = _std_floor(X.dtype)
    # P⁰: covariance of the input "activations", and the self-variances along it
    vx = (X * X).sum(1) / d
    vy = (Y * Y).sum(1) / d
    post = X @ Y.T / d
    theta = post + 1.0  # Θ̃⁰: first weight term (multiplier 1) and first bias (+1)
    for _ in range(depth):
        # preactivation variances and covariance of this hidden layer
        vx = varw * vx + varb
        vy = varw * vy + varb
        cov = post.mul_(varw).add_(varb)
        sx, sy = torch.sqrt(vx), torch.sqrt(vy)
        rho = cov / (sx[:, None] * sy[None, :]).clamp_min(floor)
        f00, _, _ = F00_F11_F02(rho)
        kappa = 2.0 * f00  # J1(ρ): the post-activation correlation
        _, f11_post, _ = F00_F11_F02(kappa)
        # post-activation covariance Pˡ = J1(ρ) · sqrt(vx/2 · vy/2)
        vx, vy = vx / 2, vy / 2
        post = kappa * (torch.sqrt(vx)[:, None] * torch.sqrt(vy)[None, :])
        # Θ̃ˡ = Pˡ + 1 + varw · J0(J1(ρ)) · Θ̃ˡ⁻¹, with J0 = 2·F11
        theta.mul_(f11_post).mul_(2.0 * varw).add_(post).add_(1.0)
        del rho, f00, kappa, f11_post, cov
    sigma = post.mul_(varw).add_(varb)  # Σᴸ = varw · Pᴸ + varb (readout layer)
    return sigma, theta


def _kernel_block(X, Y, depth, varw, varb, want_ntk, ntk_variant):
    if want_ntk and ntk_variant == "pilim":
        return _pilim_block(X, Y, depth, varw, varb)
    return _mlp_block(X, Y, depth, varw, varb, want_ntk)


def mlp_kernels(
    X: torch.Tensor,
    Y: torch.Tensor | None = None,
    *,
    depth: int,
    varw: float = 2.0,
    varb: float = 0.0,
    block_size: int = 4096,
    dtype: torch.dtype = torch.float64,
    device=None,
    progress: bool = False,
    ntk_variant: str = "correct",
) -> tuple[torch.Tensor, torch.Tensor]:
    """NNGP ``Σᴸ`` and NTK ``Θᴸ`` between the rows of ``X`` (N×d) and ``Y`` (M×d).

    Conventions in the module docstring (readout layer included).  Inputs with
    more than two dimensions are flattened per row.  ``Y=None`` means ``Y = X``.
    The N×M result is filled ``block_size × block_size`` at a time, so the
    temporaries are a few blocks; it lives on ``device`` (default: ``X``'s).
    ``ntk_variant="pilim"`` returns the original library's NTK formula instead
    (module docstring); the NNGP is the same for both.
    """
    return _blockwise(X, Y, depth, varw, varb, True, block_size, dtype, device, progress, ntk_variant)


def mlp_nngp(
    X: torch.Tensor,
    Y: torch.Tensor | None = None,
    *,
    depth: int,
    varw: float = 2.0,
    varb: float = 0.0,
    block_size: int = 4096,
    dtype: torch.dtype = torch.float64,
    device=None,
    progress: bool = False,
) -> torch.Tensor:
    """NNGP kernel ``Σᴸ(x, y) = Cov[f(x), f(y)]`` of the depth-``L`` ReLU MLP (see module docstring)."""
    return _blockwise(X, Y, depth, varw, varb, False, block_size, dtype, device, progress)[0]


def mlp_ntk(
    X: torch.Tensor,
    Y: torch.Tensor | None = None,
    *,
    depth: int,
    varw: float = 2.0,
    varb: float = 0.0,
    block_size: int = 4096,
    dtype: torch.dtype = torch.float64,
    device=None,
    progress: bool = False,
    ntk_variant: str = "correct",
) -> torch.Tensor:
    """NTK ``Θᴸ(x, y)`` of the depth-``L`` ReLU MLP in NTK parametrization (see module docstring).

    ``ntk_variant="pilim"``: the formula of the original library instead (module docstring).
    """
    return _blockwise(X, Y, depth, varw, varb, True, block_size, dtype, device, progress, ntk_variant)[1]


def _blockwise(X, Y, depth, varw, varb, want_ntk, block_size, dtype, device, progress, ntk_variant="correct"):
    _check_hparams(depth, varw, varb)
    _check_variant(ntk_variant, depth)
    if device is None:
        device = torch.as_tensor(X).device
    X = _as_rows(X, dtype, device)
    Y = X if Y is None else _as_rows(Y, dtype, device)
    if X.shape[1] != Y.shape[1]:
        raise ValueError(f"X has {X.shape[1]} features per row but Y has {Y.shape[1]}")
    N, M = X.shape[0], Y.shape[0]
    nngp = torch.empty(N, M, dtype=dtype, device=device)
    ntk = torch.empty(N, M, dtype=dtype, device=device) if want_ntk else None
    blocks = [(i, j) for i in range(0, N, block_size) for j in range(0, M, block_size)]
    for i, j in tqdm(blocks, desc="kernel blocks", disable=not progress, leave=False):
        s, t = _kernel_block(
            X[i : i + block_size], Y[j : j + block_size], depth, varw, varb, want_ntk, ntk_variant
        )
        nngp[i : i + block_size, j : j + block_size] = s
        if want_ntk:
            ntk[i : i + block_size, j : j + block_size] = t
    return nngp, ntk


def _mlp_kernel_fn(A, B, *, kind, depth, varw, varb, dtype, ntk_variant="correct"):
    A = _as_rows(A, dtype, A.device)
    B = _as_rows(B, dtype, A.device)
    s, t = _kernel_block(A, B, depth, varw, varb, kind == "ntk", ntk_variant)
    return t if kind == "ntk" else s


def make_mlp_kernel(
    kind: str = "nngp",
    *,
    depth: int,
    varw: float = 2.0,
    varb: float = 0.0,
    dtype: torch.dtype = torch.float64,
    ntk_variant: str = "correct",
) -> KernelFn:
    """A ``kernel_fn(A, B)`` (one block, no further blocking) for :func:`kernel_ridge_regression`.

    ``kind`` is ``"nngp"`` or ``"ntk"``; the other arguments are as in :func:`mlp_nngp`
    and :func:`mlp_ntk` (``ntk_variant`` only matters for ``"ntk"``).
    """
    if kind not in ("nngp", "ntk"):
        raise ValueError(f"kind must be 'nngp' or 'ntk', got {kind!r}")
    _check_hparams(depth, varw, varb)
    _check_variant(ntk_variant, depth if kind == "ntk" else max(depth, 1))
    return functools.partial(
        _mlp_kernel_fn, kind=kind, depth=depth, varw=varw, varb=varb, dtype=dtype, ntk_variant=ntk_variant
    )


# ---------------------------------------------------------------------------
# π-net feature kernel
# ---------------------------------------------------------------------------


def feature_kernel(
    features_X: torch.Tensor,
    features_Y: torch.Tensor | None = None,
    *,
    layernorm: bool = False,
    dtype: torch.dtype | None = torch.float64,
) -> torch.Tensor:
    """Kernel of the last hidden layer of an infinite-width π-net.

    ``features_X`` (N×r) holds, per input, the finite vector ``g`` that
    represents the last hidden preactivation (the input to the readout) of the
    π-limit: the infinite-width activation is ``φ(ω·g)`` for ``ω ~ N(0, I_r)``.
    The returned kernel is the covariance of those activations::

        K[i, j] = E_ω[φ(ω·g_i) φ(ω·g'_j)] = s_i s'_j F00(ĝ_i·ĝ'_j),   s = |g|, ĝ = g / |g|,

    i.e. :func:`inf.math.relu_kernel`.  With ``layernorm=True`` the features
    are first normalised (``s = s' = 1``), the kernel of a network whose last
    hidden layer is layer-normalised before the nonlinearity:
    ``K = F00(ĝ·ĝ')``.  ``dtype=None`` keeps the input dtype.
    """
    gX = torch.as_tensor(features_X)
    gY = gX if features_Y is None else torch.as_tensor(features_Y)
    if dtype is not None:
        gX, gY = gX.to(dtype), gY.to(dtype)
    if layernorm:
        gX = gX / gX.norm(dim=-1, keepdim=True).clamp_min(1e-30)
        gY = gY / gY.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    return relu_kernel(gX, gY)


# ---------------------------------------------------------------------------
# Blocked linear algebra that never holds a second N×N matrix
# ---------------------------------------------------------------------------


def cholesky_inplace_(A: torch.Tensor, block_size: int = 2048, progress: bool = False) -> torch.Tensor:
    """Overwrite the lower triangle of the SPD matrix ``A`` with its Cholesky factor ``L``.

    Only the lower triangle of ``A`` is read (the diagonal blocks' upper parts
    are zeroed; the rest of the upper triangle is left untouched and is never
    read).  Right-looking blocked algorithm: per block column, a small
    Cholesky, one triangular solve for the panel below it, then a rank-``b``
    update of the trailing lower triangle.  Extra memory: one panel
    (N × ``block_size``) plus one block, so a 50k × 50k float32 matrix needs
    10.0 GB (+0.4 GB panel at ``block_size=2048``) in all, where
    ``torch.linalg.cholesky`` needs a second 10 GB buffer for its result
    (measured at N = 8000 on CPU: +68 MB extra peak here, +252 MB = one more
    matrix for ``torch.linalg.cholesky``).  Works on CPU and CUDA; on CUDA keep
    TF32 matmuls off (PyTorch's default), since the trailing updates are
    float32 GEMMs whose rounding enters the factor.  About N³/3 flops (4·10¹³
    for N = 50 000).  Raises ``torch.linalg.LinAlgError`` if ``A`` is not
    numerically positive definite.  Returns ``A``.
    """
    n = A.shape[0]
    if A.dim() != 2 or A.shape[1] != n:
        raise ValueError(f"expected a square matrix, got shape {tuple(A.shape)}")
    starts = range(0, n, block_size)
    for k0 in tqdm(starts, desc="cholesky", disable=not progress, leave=False):
        k1 = min(k0 + block_size, n)
        try:
            Lkk = torch.linalg.cholesky(A[k0:k1, k0:k1])
        except torch.linalg.LinAlgError as err:
            raise torch.linalg.LinAlgError(
                f"Cholesky failed in the diagonal block starting at row {k0}: the (regularised) "
                f"matrix is not numerically positive definite in {A.dtype} ({err})"
            ) from None
        A[k0:k1, k0:k1] = Lkk
        if k1 == n:
            break
        panel = A[k1:, k0:k1]
        # L_ik = A_ik L_kk^{-T}
        panel.copy_(torch.linalg.solve_triangular(Lkk.T, panel, upper=True, left=False))
        # trailing update of the lower triangle, one block column at a time
        for j0 in range(k1, n, block_size):
            j1 = min(j0 + block_size, n)
            A[j0:, j0:j1].addmm_(panel[j0 - k1 :], panel[j0 - k1 : j1 - k1].T, alpha=-1.0)
    return A


def cholesky_solve_inplace(L: torch.Tensor, B: torch.Tensor, block_size: int = 2048) -> torch.Tensor:
    """Solve ``L Lᵀ X = B`` with ``L`` the lower triangle left by :func:`cholesky_inplace_`.

    Blocked forward and backward substitution that reads only the lower
    triangle of ``L`` and makes no N×N temporary.  ``B`` is N×C; returns a new
    N×C tensor in ``B``'s dtype (arithmetic in ``L``'s dtype).
    """
    n = L.shape[0]
    out_dtype = B.dtype
    Z = B.to(L.dtype).clone()
    # forward: L Z = B
    for k0 in range(0, n, block_size):
        k1 = min(k0 + block_size, n)
        rhs = Z[k0:k1]
        if k0 > 0:
            rhs = rhs - L[k0:k1, :k0] @ Z[:k0]
        Z[k0:k1] = torch.linalg.solve_triangular(L[k0:k1, k0:k1], rhs, upper=False)
    # backward: Lᵀ X = Z
    for k0 in reversed(range(0, n, block_size)):
        k1 = min(k0 + block_size, n)
        rhs = Z[k0:k1]
        if k1 < n:
            rhs = rhs - L[k1:, k0:k1].T @ Z[k1:]
        Z[k0:k1] = torch.linalg.solve_triangular(L[k0:k1, k0:k1].T, rhs, upper=True)
    return Z.to(out_dtype)


# ---------------------------------------------------------------------------
# Kernel ridge regression
# ---------------------------------------------------------------------------


def krr_targets(labels: torch.Tensor, num_classes: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Regression targets: centred one-hot, ``one_hot(y) − 1/C`` (``one_hot − 0.1`` for 10 classes).

    Each row sums to zero, so predicting 0 carries no class preference; the
    prediction is the argmax of the C regressed outputs.
    """
    Y = torch.nn.functional.one_hot(torch.as_tensor(labels).long(), num_classes).to(dtype)
    return Y - 1.0 / num_classes


def krr_memory_bytes(
    n_train: int,
    method: str = "cholesky",
    *,
    dtype: torch.dtype = torch.float32,
    block_size: int = 2048,
    num_classes: int = 10,
    n_features: int = 3072,
) -> int:
    """Rough peak memory (bytes) of :func:`kernel_ridge_regression` beyond the data itself.

    ``"cholesky"``: the N×N matrix in ``dtype`` plus one N×``block_size``
    panel and a few float64 kernel blocks.  ``"cg"``: no N×N matrix, only a
    few float64 blocks and N×C vectors.  For N = 50 000: float32 Cholesky ≈
    10.7 GB, float64 Cholesky ≈ 21.2 GB (too tight for 24 GB), CG ≈ 0.3 GB.
    """
    item = torch.empty((), dtype=dtype).element_size()
    # a float64 kernel block and ~4 elementwise temporaries of the same size
    blocks = 6 * block_size * block_size * 8 + 2 * block_size * n_features * 8
    vectors = 8 * n_train * num_classes * 8
    if method == "cholesky":
        return n_train * n_train * item + n_train * block_size * item + blocks + vectors
    if method == "cg":
        return blocks + vectors
    raise ValueError(f"method must be 'cholesky' or 'cg', got {method!r}")


def _diag_blocks(kernel_fn, X, block_size):
    return [kernel_fn(X[i : i + block_size], X[i : i + block_size]) for i in range(0, X.shape[0], block_size)]


def _build_train_matrix(kernel_fn, X, block_size, dtype, device, progress):
    """Lower block triangle of ``K(X, X)`` in ``dtype`` (diagonal blocks full); and mean diagonal."""
    n = X.shape[0]
    K = torch.empty(n, n, dtype=dtype, device=device)
    diag_sum = 0.0
    blocks = [(i, j) for i in range(0, n, block_size) for j in range(0, i + 1, block_size)]
    for i, j in tqdm(blocks, desc="train kernel", disable=not progress, leave=False):
        blk = kernel_fn(X[i : i + block_size], X[j : j + block_size])
        if i == j:
            diag_sum += float(torch.diagonal(blk).sum())
        K[i : i + block_size, j : j + block_size] = blk
        del blk
    return K, diag_sum / n


def _cg_solve(kernel_fn, X, Y, reg, diag, block_size, tol, maxiter, progress):
    """Jacobi-preconditioned CG for ``(K + reg I) A = Y``, all C columns at once, matrix-free."""
    n = X.shape[0]
    starts = list(range(0, n, block_size))

    def matvec(P):
        out = reg * P
        for i in starts:
            for j in starts:
                if j > i:
                    break
                blk = kernel_fn(X[i : i + block_size], X[j : j + block_size]).to(P.dtype)
                out[i : i + block_size] += blk @ P[j : j + block_size]
                if j != i:  # use symmetry: the (j, i) block is blkᵀ
                    out[j : j + block_size] += blk.T @ P[i : i + block_size]
        return out

    minv = 1.0 / (diag + reg)[:, None]
    A = torch.zeros_like(Y)
    R = Y.clone()
    Z = minv * R
    P = Z.clone()
    rz = (R * Z).sum(0)
    ynorm = Y.norm(dim=0).clamp_min(1e-300)
    bar = tqdm(range(maxiter), desc="cg", disable=not progress, leave=False)
    rel = float("inf")
    for _ in bar:
        AP = matvec(P)
        step = rz / (P * AP).sum(0).clamp_min(1e-300)
        A += step * P
        R -= step * AP
        rel = float((R.norm(dim=0) / ynorm).max())
        bar.set_postfix(rel_residual=f"{rel:.2e}")
        if rel < tol:
            break
        Z = minv * R
        rz_new = (R * Z).sum(0)
        P = Z + (rz_new / rz.clamp_min(1e-300)) * P
        rz = rz_new
    else:
        raise RuntimeError(
            f"CG did not reach relative residual {tol:g} in {maxiter} iterations "
            f"(reached {rel:.3g}); raise cg_maxiter or kernel_reg"
        )
    return A


def kernel_ridge_regression(
    kernel_fn: KernelFn,
    X_train: torch.Tensor,
    y_train: torch.Tensor,
    X_test: torch.Tensor,
    y_test: torch.Tensor | None = None,
    *,
    num_classes: int | None = None,
    kernel_reg: float = 1e-4,
    method: str = "cholesky",
    dtype: torch.dtype | None = None,
    block_size: int = 2048,
    train_subset: int | None = None,
    seed: int = 0,
    device=None,
    cg_tol: float = 1e-6,
    cg_maxiter: int = 2000,
    progress: bool = True,
    return_outputs: bool = False,
):
    """Kernel ridge regression classifier; returns the test accuracy.

    * ``kernel_fn(A, B)`` returns the (float64) kernel block between row sets
      ``A`` and ``B``, e.g. ``make_mlp_kernel("nngp", depth=3)`` or
      ``feature_kernel``.  It is only ever called on blocks of at most
      ``block_size`` rows each.
    * Targets: centred one-hot ``one_hot(y) − 1/C`` (:func:`krr_targets`;
      ``one_hot − 0.1`` for CIFAR-10); the class is the argmax of the outputs.
    * Regularisation: ``λ = kernel_reg · mean(diag K_train)`` is added to the
      diagonal, so ``kernel_reg`` is relative to the kernel's scale; the
      predictor is ``K(X_test, X_train) (K_train + λ I)⁻¹ Y``.
    * ``method="cholesky"``: the lower block triangle of ``K_train`` is built
      block by block straight into one N×N matrix of ``dtype`` (default
      float32), factorised in place (:func:`cholesky_inplace_`) and solved
      blockwise.  Memory ≈ N²·itemsize: 10.0 GB for N = 50 000 in float32
      (20 GB in float64).  Float32 may fail (or lose accuracy) for very small
      ``kernel_reg``; the error says so — raise ``kernel_reg``, use float64
      on fewer points, or ``method="cg"``.
    * ``method="cg"``: matrix-free Jacobi-preconditioned conjugate gradient in
      ``dtype`` (default float64), recomputing the kernel blocks at every
      iteration (exploiting symmetry: N²/2 kernel entries per iteration).
      Memory is O(N·C + block_size²), but it costs one kernel pass per
      iteration and needs more iterations the smaller ``kernel_reg`` is.
    * ``train_subset=n``: fallback when neither fits — train on ``n`` training
      points drawn uniformly without replacement (``seed``).
    * Test outputs are computed blockwise: ``block_size`` test rows against
      ``block_size`` train rows at a time.

    ``device`` (default: ``X_train``'s) holds the N×N matrix and does the
    arithmetic; inputs are moved there block by block.  ``y_test=None``
    returns ``None`` as accuracy.  With ``return_outputs=True`` the result is
    ``(accuracy, outputs)``, ``outputs`` the M×C float64 regression outputs.
    """
    if method not in ("cholesky", "cg"):
        raise ValueError(f"method must be 'cholesky' or 'cg', got {method!r}")
    if kernel_reg < 0:
        raise ValueError(f"kernel_reg must be non-negative, got {kernel_reg!r}")
    if dtype is None:
        dtype = torch.float32 if method == "cholesky" else torch.float64
    X_train = torch.as_tensor(X_train)
    y_train = torch.as_tensor(y_train).long().reshape(-1)
    X_test = torch.as_tensor(X_test)
    if X_train.shape[0] != y_train.shape[0]:
        raise ValueError(f"{X_train.shape[0]} training inputs but {y_train.shape[0]} labels")
    if device is None:
        device = X_train.device
    if num_classes is None:
        num_classes = int(y_train.max()) + 1
        if y_test is not None:
            num_classes = max(num_classes, int(torch.as_tensor(y_test).max()) + 1)
    if train_subset is not None and train_subset < X_train.shape[0]:
        gen = torch.Generator().manual_seed(seed)
        idx = torch.randperm(X_train.shape[0], generator=gen)[:train_subset].sort().values
        X_train, y_train = X_train[idx.to(X_train.device)], y_train[idx.to(y_train.device)]
    X_train = X_train.to(device)
    X_test = X_test.to(device)
    n = X_train.shape[0]
    Y = krr_targets(y_train.to(device), num_classes, torch.float64)

    if method == "cholesky":
        K, mean_diag = _build_train_matrix(kernel_fn, X_train, block_size, dtype, device, progress)
        reg = kernel_reg * mean_diag
        torch.diagonal(K).add_(reg)
        try:
            cholesky_inplace_(K, block_size, progress)
        except torch.linalg.LinAlgError as err:
            del K
            raise torch.linalg.LinAlgError(
                f"{err}. Try a larger kernel_reg (now {kernel_reg:g}), dtype=torch.float64 with "
                f"train_subset, or method='cg'."
            ) from None
        alpha = cholesky_solve_inplace(K, Y, block_size)
        del K
    else:
        diag = torch.cat([torch.diagonal(b) for b in _diag_blocks(kernel_fn, X_train, block_size)])
        diag = diag.to(device=device, dtype=dtype)
        reg = kernel_reg * float(diag.mean())
        alpha = _cg_solve(
            kernel_fn, X_train, Y.to(dtype), reg, diag, block_size, cg_tol, cg_maxiter, progress
        ).to(torch.float64)

    m = X_test.shape[0]
    outputs = torch.zeros(m, num_classes, dtype=torch.float64, device=device)
    blocks = [(i, j) for i in range(0, m, block_size) for j in range(0, n, block_size)]
    for i, j in tqdm(blocks, desc="test kernel", disable=not progress, leave=False):
        blk = kernel_fn(X_test[i : i + block_size], X_train[j : j + block_size]).to(torch.float64)
        outputs[i : i + block_size] += blk @ alpha[j : j + block_size]
    outputs = outputs.cpu()
    acc = None
    if y_test is not None:
        y_test = torch.as_tensor(y_test).long().reshape(-1).cpu()
        if y_test.shape[0] != m:
            raise ValueError(f"{m} test inputs but {y_test.shape[0]} labels")
        acc = float((outputs.argmax(1) == y_test).double().mean()) if m else float("nan")
    return (acc, outputs) if return_outputs else acc

"""Row compression: bounded-cost training of infinite π-layers (docs/math.md, "Row compression").

An infinite hidden or output layer computes ``g ↦ s·h(ĝ)`` with

    h(u) = Σ_i k(u, B_i) w_i,    w_i = c_i A_i,    k(u, v) = F00(u·v),

and training appends one row per example and step, so a step costs O(rows) and
a run O(steps²). This module replaces a layer's ``M`` rows by ``K ≪ M``
*landmark* rows ``U`` (a subset of the rows' own ``B``) carrying the weights

    W = K_UU⁻¹ K_UB w,

the orthogonal projection of ``h`` onto ``span{k(·, U_k)}`` in the kernel's
RKHS. Its error

    ε² = ‖h − Ph‖²_H = wᵀ(K_BB − K_BU K_UU⁻¹ K_UB) w

is reported (relative to ``‖h‖_H``, the L2 norm of the infinite-width weight)
and bounds every output of the layer: ``|Δh(u)| ≤ ε/√2`` for every unit ``u``
(so ``|Δ layer(g)| ≤ |g|·ε/√2`` without layernorm).

Landmarks come from a pivoted Cholesky factorization of ``K_BB``: greedy
(largest residual diagonal first), randomly pivoted (pivots drawn with
probability proportional to the residual diagonal; Chen, Epperly, Tropp and
Webber 2022) or adaptive (the pivot that lowers ε the most, the default).
All work in blocks of pivots so that the work is matrix products; ``block=1``
is the textbook one-pivot-at-a-time algorithm. Nearly dependent landmarks are
refused (:func:`pivot_threshold`), and so are weights too large for the
layer's float32 forward to evaluate (see :func:`compress_rows`). With the
factor ``F = K_BU L⁻ᵀ`` (``L Lᵀ = K_UU``) the weights are ``W = L⁻ᵀ (Fᵀ w)``
(two triangular solves, no normal equations) and
``ε² = ‖h‖²_H − ‖Fᵀ w‖²``, where ``‖h‖²_H = wᵀ K_BB w`` is accumulated over
row chunks: no M × M matrix is ever formed, memory is O(M·K).

Momentum: SGD's velocity is a function of the same form,
``V = Σ_i buf_i A_i k(·, B_i)``, and is projected with the same map. A
landmark then carries two rows: ``(W_k, c=1, buf=0)`` for the weight and
``(W^V_k, c=0, buf=1)`` for the velocity, so that SGD with momentum continues
exactly as it would from the projected weight and velocity.

Use :class:`RowBudget` during training (call it after ``optimizer.step()``),
or :func:`compress_layer` / :func:`compress_rows` directly.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .math import kernels_2pi_

__all__ = [
    "CompressionReport",
    "Landmarks",
    "kernel",
    "kernel_apply",
    "rkhs_gram",
    "pivoted_cholesky",
    "compress_rows",
    "compress_layer",
    "nested_compressions",
    "pivot_threshold",
    "infinite_layers",
    "RowBudget",
    "METHODS",
]

METHODS = ("rpcholesky", "greedy", "adaptive")
_TWO_PI = 2.0 * math.pi
# memory for one chunk of kernel entries (rows × M) when accumulating ‖h‖²_H
_CHUNK_BYTES = 64 * 2**20


# ------------------------------------------------------------------ kernel
def _f00_(q: torch.Tensor) -> torch.Tensor:
    """``F00(q)``, overwriting ``q`` (clamped); the one kernel evaluation of :mod:`inf.math`."""
    f11, f02 = kernels_2pi_(q)
    return f02.addcmul_(q, f11).mul_(1.0 / _TWO_PI)


def kernel(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """``k(X_i, Y_j) = F00(X_i·Y_j)`` for unit rows (``F00(1) = 1/2``), in the inputs' dtype.

    One ``arccos`` and one ``sin`` per entry (:func:`inf.math.kernels_2pi_`).
    """
    return _f00_(X @ Y.T)


def _kernel_diag(B: torch.Tensor) -> torch.Tensor:
    return _f00_((B * B).sum(1))


def _chunk(M: int, cols: int, chunk_bytes: int, itemsize: int = 8) -> int:
    return max(1, int(chunk_bytes // max(1, cols * itemsize * 3)))


def kernel_apply(B: torch.Tensor, Z: torch.Tensor, chunk_bytes: int = _CHUNK_BYTES) -> torch.Tensor:
    """``K_BB Z`` (M × p) for rows ``B`` (M × r) and ``Z`` (M × p), accumulated over row chunks of
    ``K_BB`` (O(chunk·M) memory, O(M²·(r+p)) time; each symmetric pair of chunks is evaluated once).

    With ``Z = w`` (``w_i = c_i A_i``), row ``i`` is ``h(B_i)``, the layer's function at its own rows.
    """
    M = B.shape[0]
    KZ = torch.zeros_like(Z)
    step = _chunk(M, M, chunk_bytes, B.element_size())
    for lo in range(0, M, step):
        hi = min(M, lo + step)
        Kc = kernel(B[lo:hi], B[lo:])
        KZ[lo:hi] += Kc @ Z[lo:]
        if hi < M:
            KZ[hi:] += Kc[:, hi - lo :].T @ Z[lo:hi]
    return KZ


def rkhs_gram(B: torch.Tensor, Z: torch.Tensor, chunk_bytes: int = _CHUNK_BYTES) -> torch.Tensor:
    """``Zᵀ K_BB Z`` (p × p), chunked (see :func:`kernel_apply`).

    With ``Z = w`` (``w_i = c_i A_i``) its trace is ``‖h‖²_H``, the squared L2 norm of the
    infinite-width weight ``a(ω) = Σ_i w_i φ(ω·B_i)``.
    """
    return Z.T @ kernel_apply(B, Z, chunk_bytes)


# ------------------------------------------------------- pivoted Cholesky
@dataclass
class Landmarks:
    """A partial pivoted Cholesky factorization ``K_BB ≈ F Fᵀ``.

    ``index``: the pivots (rows of ``B`` chosen as landmarks, in order); ``factor``:
    ``F`` (M × K) with ``F[index]`` lower triangular (``= L``, ``L Lᵀ = K_UU``);
    ``residual``: the diagonal of ``K_BB − F Fᵀ`` (M).
    """

    index: torch.Tensor
    factor: torch.Tensor
    residual: torch.Tensor

    @property
    def L(self) -> torch.Tensor:
        return self.factor[self.index]


def _small_pivoted_cholesky(S: torch.Tensor, threshold: float):
    """Greedy pivoted Cholesky of a small PSD matrix; pivots whose residual is at most
    ``threshold`` are rejected (numerically dependent). Returns (order, L)."""
    n = S.shape[0]
    R = S.clone()
    order, cols = [], []
    d = R.diagonal().clone()
    for _ in range(n):
        j = int(torch.argmax(d))
        if d[j] <= threshold:
            break
        col = R[:, j] / torch.sqrt(d[j])
        R -= torch.outer(col, col)
        d = R.diagonal().clone()
        d[order + [j]] = -math.inf
        order.append(j)
        cols.append(col)
    if not order:
        return [], S.new_zeros(0, 0)
    Lfull = torch.stack(cols, 1)  # n × a
    return order, Lfull[order]


def _adaptive_block(G, cand, RZ, Z, nb, threshold):
    """Pick up to ``nb`` pivots among ``cand`` one at a time, each maximizing the decrease of the
    residual error ``|r(B_j)|² / d_j``. ``G`` (M × pool) holds the residual columns of the pool at
    the start of the block; the block's own updates are applied lazily (left-looking), and the
    residual function ``RZ`` (M × p) is updated in place. Returns the chosen positions in ``cand``
    and the new factor columns (M × a)."""
    M, P = G.shape
    ar = torch.arange(P, device=G.device)
    diag = G[cand, ar].clone()
    RZc = RZ[cand].clone()
    C = G.new_zeros(M, nb)
    taken = torch.zeros(P, dtype=torch.bool, device=G.device)
    order = []
    for t in range(nb):
        ok = (diag > threshold) & ~taken
        if not bool(ok.any()):
            break
        score = torch.where(ok, RZc.pow(2).sum(1) / diag.clamp_min(threshold), diag.new_full((), -1.0))
        j = int(torch.argmax(score))
        col = G[:, j] - C[:, :t] @ C[cand[j], :t] if t else G[:, j].clone()
        col /= torch.sqrt(diag[j])
        C[:, t] = col
        colc = col[cand]
        diag -= colc * colc
        RZc -= torch.outer(colc, col @ Z)
        taken[j] = True
        order.append(j)
    C = C[:, : len(order)]
    RZ -= C @ (C.T @ Z)  # the residual function at every row, after the whole block
    return order, C


def pivoted_cholesky(
    B: torch.Tensor,
    rank: int,
    method: str = "rpcholesky",
    block: int = 64,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    threshold: float | None = None,
    on_block=None,
    weights: torch.Tensor | None = None,
    applied: torch.Tensor | None = None,
    pool: int = 4,
) -> Landmarks:
    """Choose up to ``rank`` landmark rows of ``B`` by pivoted Cholesky of ``K_BB``.

    Args:
        B: rows (M × r), unit vectors, any float dtype (computed in ``dtype``).
        rank: number of landmarks wanted (fewer are returned if ``K_BB`` has lower
            numerical rank).
        method: ``"greedy"`` (largest residual diagonal), ``"rpcholesky"`` (pivots drawn with
            probability ∝ residual diagonal) or ``"adaptive"`` (largest decrease of the error of
            the function with weights ``weights``: pivot ``j`` maximizes ``|r(B_j)|² / d_j``, with
            ``r`` the residual function and ``d_j`` the residual diagonal; needs ``weights`` and
            ``applied = K_BB · weights``).
        block: pivots chosen per round; each round is a matrix product with the M rows and a
            small pivoted Cholesky that rejects dependent pivots. 1 = the one-at-a-time algorithm.
        generator: random source of ``"rpcholesky"``.
        threshold: residual diagonal below which a pivot counts as dependent (default: 1e-12
            in float64, 1e-6 in float32, relative to k(u, u) = 1/2).
        on_block: ``callable(new_factor_columns) -> bool``; return True to stop early.
        pool: ``"adaptive"`` picks each block's pivots exactly greedily within the ``pool · block``
            rows of largest score (``block=1``: the exact one-at-a-time algorithm).
    """
    if method not in METHODS:
        raise ValueError(f"unknown landmark method {method!r}; choose one of {', '.join(METHODS)}")
    Bc = B.to(dtype)
    M = Bc.shape[0]
    rank = max(0, min(int(rank), M))
    if threshold is None:
        threshold = (1e-12 if dtype == torch.float64 else 1e-6) * 0.5
    d = _kernel_diag(Bc)
    if method == "adaptive":
        if weights is None or applied is None:
            raise ValueError("method 'adaptive' needs weights and applied = K_BB @ weights")
        Zw = weights.to(dtype)
        RZ = applied.to(dtype).clone()  # the residual function at every row, r(B_i)
    F = Bc.new_zeros(M, rank)
    chosen = torch.zeros(M, dtype=torch.bool, device=Bc.device)
    index: list[torch.Tensor] = []
    k = 0
    stalls = 0
    while k < rank:
        dpos = torch.where(chosen, torch.zeros_like(d), d.clamp_min(0.0))
        dmax = float(dpos.max()) if M else 0.0
        if dmax <= threshold:
            break
        nb = min(max(1, int(block)), rank - k)
        if method == "greedy":
            cand = torch.topk(dpos, nb).indices
        elif method == "adaptive":
            score = torch.where(
                dpos > threshold, RZ.pow(2).sum(1) / dpos.clamp_min(threshold), torch.zeros_like(d)
            )
            # a pool of the best candidates by the current scores; the block's pivots are then
            # chosen one at a time within the pool with exactly updated scores
            cand = torch.topk(score, min(M, pool * nb)).indices
        else:
            # the generator may live on another device than the rows (RowBudget's is a CPU one)
            probs = (
                dpos if generator is None or generator.device == dpos.device else dpos.to(generator.device)
            )
            cand = torch.multinomial(probs, nb, replacement=True, generator=generator).unique().to(Bc.device)
        cand = cand[dpos[cand] > threshold]
        if cand.numel() == 0:
            stalls += 1
            if stalls > 8:
                break
            continue
        G = kernel(Bc, Bc[cand])
        if k:
            G -= F[:, :k] @ F[cand, :k].T
        # the candidates' residuals recomputed from their columns (the running d loses accuracy
        # by cancellation): a rejected candidate is then not drawn again
        d[cand] = G[cand, torch.arange(cand.numel(), device=Bc.device)].clamp_min(0.0)
        if method == "adaptive":
            order, Fn = _adaptive_block(G, cand, RZ, Zw, nb, threshold)
        else:
            order, Ls = _small_pivoted_cholesky(G[cand], threshold)
        if not order:
            stalls += 1
            if stalls > 8:
                break
            continue
        stalls = 0
        order_t = torch.tensor(order, device=Bc.device)
        if method != "adaptive":
            # new factor columns: G[:, order] L_s⁻ᵀ, i.e. solve L_s X = G[:, order]ᵀ
            Fn = torch.linalg.solve_triangular(Ls, G[:, order_t].T, upper=False).T
        a = Fn.shape[1]
        F[:, k : k + a] = Fn
        piv = cand[order_t]
        index.append(piv)
        chosen[piv] = True
        d = d - (Fn * Fn).sum(1)
        d[chosen] = 0.0
        k += a
        if on_block is not None and on_block(Fn):
            break
    idx = torch.cat(index) if index else torch.zeros(0, dtype=torch.long, device=Bc.device)
    return Landmarks(idx, F[:, :k], d.clamp_min(0.0))


# ------------------------------------------------------------ compression
def pivot_threshold(*storage_dtypes: torch.dtype, compute: torch.dtype = torch.float64) -> float:
    """Default smallest landmark residual, relative to ``k(u,u) = 1/2``: 1e-10 when the rows are
    stored in float64, 1e-5 otherwise (the layer then evaluates in float32), and at least 1e-4
    when the factorization itself runs in float32, whose residuals carry errors of order
    ``√K·1e-7`` after K landmarks. It bounds the growth of the weights: each factor column divides
    by at most ``√threshold``; a smaller one lets rounding noise pick nearly dependent landmarks
    whose large, cancelling weights wreck the layer (measured: training diverged)."""
    rel = 1e-10 if all(d == torch.float64 for d in storage_dtypes) else 1e-5
    if compute != torch.float64:
        rel = max(rel, 1e-4)
    return 0.5 * rel


@dataclass
class CompressionReport:
    """What one compression of one layer did.

    ``eps``: ``‖h − Ph‖_H`` (absolute); ``rel_eps = eps / norm`` with ``norm = ‖h‖_H``; the
    layer's output moves by at most ``|g|·eps/√2`` per input ``g`` (``eps/√2`` under
    layernorm). ``velocity_eps`` / ``velocity_norm``: the same for the momentum velocity.
    """

    layer: str
    rows_before: int
    rows_after: int
    landmarks: int
    eps: float
    norm: float
    rel_eps: float
    velocity_eps: float | None
    velocity_norm: float | None
    method: str
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


def _project(F: torch.Tensor, L: torch.Tensor, Z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W, Fᵀ Z)`` with ``W = L⁻ᵀ Fᵀ Z = K_UU⁻¹ K_UB Z``."""
    FtZ = F.T @ Z
    W = torch.linalg.solve_triangular(L.T, FtZ, upper=True)
    return W, FtZ


def _row_scale(W: torch.Tensor) -> torch.Tensor:
    """A positive scale per row (its largest entry), so that stored A rows are O(1) (float16)."""
    s = W.abs().amax(1)
    return torch.where(s > 0, s, torch.ones_like(s))


@torch.no_grad()
def compress_rows(
    A: torch.Tensor,
    c: torch.Tensor,
    B: torch.Tensor,
    *,
    landmarks: int | None = None,
    tol: float | None = None,
    velocity: torch.Tensor | None = None,
    method: str = "adaptive",
    block: int = 64,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    name: str = "layer",
    threshold: float | None = None,
):
    """Project the rows ``(A, c, B)`` onto ``K`` landmark rows.

    Args:
        A (M × r_out), c (M), B (M × r): the rows; any float dtypes.
        landmarks: number of landmarks ``K`` (at most M).
        tol: instead (or in addition), stop adding landmarks once ``ε ≤ tol·‖h‖_H``.
        velocity: the momentum buffer (M) of the coefficients, or None. When given, the
            velocity ``Σ buf_i A_i k(·, B_i)`` is projected with the same map and each
            landmark gets a second row carrying it (``c = 0``, ``buf = scale``).
        method, block, generator: see :func:`pivoted_cholesky`.
        dtype: computation dtype (float64 default; float32 halves the O(M·K) memory).
        threshold: smallest residual ``d_j`` a landmark may have (default: :func:`pivot_threshold`
            of the storage dtype). Nearly dependent landmarks make ``K_UU`` ill-conditioned and
            the weights ``W`` large and cancelling, which the layer's float32 forward cannot
            evaluate accurately.

    Returns ``(A_new, c_new, B_new, velocity_new, report)``: ``A_new``/``B_new`` in the dtypes of
    ``A``/``B``, ``c_new`` and ``velocity_new`` in the dtype of ``c`` (``velocity_new`` None
    when ``velocity`` is None).
    """
    t0 = time.perf_counter()
    M = B.shape[0]
    if landmarks is None and tol is None:
        raise ValueError("compress_rows needs landmarks=K or tol=relative error (or both)")
    K = M if landmarks is None else int(landmarks)
    if K < 1:
        raise ValueError(f"landmarks must be >= 1, got {K}")
    if A.shape[0] != M or c.shape[0] != M:
        raise ValueError(f"A, c and B must have the same number of rows, got {A.shape[0]}, {c.shape[0]}, {M}")
    Bc = B.to(dtype)
    w = c.to(dtype)[:, None] * A.to(dtype)
    Z = w
    if velocity is not None:
        if velocity.shape[0] != M:
            raise ValueError(f"velocity has {velocity.shape[0]} entries for {M} rows")
        v = velocity.to(dtype)[:, None] * A.to(dtype)
        Z = torch.cat([w, v], 1)
    p = A.shape[1]
    KZ = kernel_apply(Bc, Z)
    G = Z.T @ KZ
    norm2 = float(G[:p, :p].trace())
    vnorm2 = float(G[p:, p:].trace()) if velocity is not None else None

    captured = [0.0]

    def stop(Fn):
        captured[0] += float((Fn.T @ w).pow(2).sum())
        return tol is not None and norm2 - captured[0] <= tol * tol * norm2

    if threshold is None:
        threshold = pivot_threshold(A.dtype, B.dtype, compute=dtype)
    lm = pivoted_cholesky(
        Bc,
        K,
        method=method,
        block=block,
        generator=generator,
        dtype=dtype,
        on_block=stop,
        weights=Z,
        applied=KZ,
        threshold=threshold,
    )
    return _assemble(A, c, B, lm, lm.index.numel(), Z, p, norm2, vnorm2, method, name, t0)


# largest Σ_k |W_k| / ‖h‖_H allowed (rows not float64, float64): the layer's float32 forward
# loses about 1e-7 of Σ_k |W_k| to rounding, so larger weights that cancel each other are
# an approximation it cannot evaluate
_MAX_WEIGHT_RATIO = {False: 1e4, True: 1e10}


def _conditioned_prefix(lm: Landmarks, K: int, Z, p: int, norm: float, limit: float):
    """``(W, Fᵀ Z, K')`` for the longest prefix ``K' ≤ K`` of the landmarks whose weights satisfy
    ``Σ_k |W_k| ≤ limit·‖h‖`` (prefixes of a pivoted Cholesky factorization are factorizations)."""

    def solve(k):
        F = lm.factor[:, :k]
        W, FtZ = _project(F, F[lm.index[:k]], Z)
        return W, FtZ, float(W[:, :p].norm(dim=1).sum()) <= limit * max(norm, 1e-300)

    W, FtZ, ok = solve(K)
    if ok or K <= 1:
        return W, FtZ, K
    lo, hi = 0, K  # invariant: prefix lo is fine (0 trivially), prefix hi is not
    best = None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        Wm, Fm, okm = solve(mid)
        if okm:
            lo, best = mid, (Wm, Fm)
        else:
            hi = mid
    if best is None:
        return (*solve(1)[:2], 1)
    return best[0], best[1], lo


def _assemble(
    A,
    c,
    B,
    lm: Landmarks,
    K: int,
    Z,
    p: int,
    norm2: float,
    vnorm2: float | None,
    method: str,
    name: str,
    t0: float,
):
    """New rows from the first ``K`` landmarks of ``lm`` (nested: a prefix of a pivoted
    Cholesky factorization is the factorization of its pivots)."""
    limit = _MAX_WEIGHT_RATIO[A.dtype == torch.float64]
    W, FtZ, K = _conditioned_prefix(lm, K, Z, p, math.sqrt(max(norm2, 0.0)), limit)
    F = lm.factor[:, :K]
    idx = lm.index[:K]
    L = F[idx]
    eps2 = norm2 - float(FtZ[:, :p].pow(2).sum())
    eps = math.sqrt(max(eps2, 0.0))
    U = B[idx]
    sw = _row_scale(W[:, :p])
    A_parts, c_parts, B_parts, v_parts = [W[:, :p] / sw[:, None]], [sw], [U], [torch.zeros_like(sw)]
    veps = None
    if vnorm2 is not None:
        veps = math.sqrt(max(vnorm2 - float(FtZ[:, p:].pow(2).sum()), 0.0))
        Wv = W[:, p:]
        keep = Wv.abs().amax(1) > 0  # a zero velocity needs no row
        sv = _row_scale(Wv[keep])
        A_parts.append(Wv[keep] / sv[:, None])
        c_parts.append(torch.zeros_like(sv))
        B_parts.append(U[keep])
        v_parts.append(sv)
    A_new = torch.cat(A_parts).to(A.dtype)
    c_new = torch.cat(c_parts).to(c.dtype)
    B_new = torch.cat(B_parts).to(B.dtype)
    v_new = torch.cat(v_parts).to(c.dtype) if vnorm2 is not None else None
    if A.dtype != W.dtype or c.dtype != W.dtype:
        # the error of the rows as stored (rounded to A's and c's dtypes):
        # ‖h − h_s‖² = ‖h‖² − 2 W_s·(K_UB w) + ‖Lᵀ W_s‖², with K_UB w = L Fᵀ w
        K_ = idx.numel()
        Ws = c_new[:K_].to(W.dtype)[:, None] * A_new[:K_].to(W.dtype)
        eps2 = norm2 - 2.0 * float((Ws * (L @ FtZ[:, :p])).sum()) + float((L.T @ Ws).pow(2).sum())
        eps = math.sqrt(max(eps2, 0.0))
    norm = math.sqrt(max(norm2, 0.0))
    report = CompressionReport(
        layer=name,
        rows_before=B.shape[0],
        rows_after=A_new.shape[0],
        landmarks=int(idx.numel()),
        eps=eps,
        norm=norm,
        rel_eps=eps / norm if norm > 0 else 0.0,
        velocity_eps=veps,
        velocity_norm=None if vnorm2 is None else math.sqrt(max(vnorm2, 0.0)),
        method=method,
        seconds=time.perf_counter() - t0,
    )
    return A_new, c_new, B_new, v_new, report


@torch.no_grad()
def nested_compressions(
    A: torch.Tensor,
    c: torch.Tensor,
    B: torch.Tensor,
    sizes,
    *,
    method: str = "adaptive",
    block: int = 64,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    name: str = "layer",
):
    """Compressions of the rows ``(A, c, B)`` to each number of landmarks in ``sizes`` from one
    factorization (the landmarks of a smaller size are a prefix of those of a larger one).

    Returns a list of ``(A_new, c_new, B_new, report)``, one per size (in the order given);
    ``report.seconds`` is the time of the shared factorization plus that size's projection.
    """
    t0 = time.perf_counter()
    Bc = B.to(dtype)
    Z = c.to(dtype)[:, None] * A.to(dtype)
    KZ = kernel_apply(Bc, Z)
    norm2 = float((Z * KZ).sum())
    sizes = [max(1, min(int(k), B.shape[0])) for k in sizes]
    lm = pivoted_cholesky(
        Bc,
        max(sizes),
        method=method,
        block=block,
        generator=generator,
        dtype=dtype,
        weights=Z,
        applied=KZ,
        threshold=pivot_threshold(A.dtype, B.dtype, compute=dtype),
    )
    out = []
    for k in sizes:
        k = min(k, lm.index.numel())
        A_new, c_new, B_new, _, rep = _assemble(A, c, B, lm, k, Z, A.shape[1], norm2, None, method, name, t0)
        out.append((A_new, c_new, B_new, rep))
    return out


# ------------------------------------------------------------ on layers
def _store(layer):
    store = getattr(layer, "rows", None)
    if store is None or not hasattr(store, "B"):
        raise TypeError(
            f"{type(layer).__name__} is not an infinite π-layer with rows; "
            "compress InfPiLinearReLU layers (InfMLP.hidden_layers, output_layer)"
        )
    return store


def _coefficients(store) -> nn.Parameter:
    return store.coefficients


def infinite_layers(net: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` for every infinite π-layer with rows in ``net`` (hidden and output)."""
    from .layers import InfPiLinearReLU

    return [(name, m) for name, m in net.named_modules() if isinstance(m, InfPiLinearReLU)]


@torch.no_grad()
def compress_layer(
    layer,
    rows: int | None = None,
    *,
    tol: float | None = None,
    optimizer=None,
    method: str = "adaptive",
    block: int = 64,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    name: str | None = None,
) -> CompressionReport:
    """Compress an infinite π-layer in place to at most ``rows`` rows (and/or to relative error ``tol``).

    With an ``optimizer`` (InfSGD) whose state holds a momentum buffer for the layer's
    coefficients, the velocity is projected with the same landmarks and each landmark keeps
    two rows (so ``rows // 2`` landmarks); the buffer is replaced accordingly.
    """
    store = _store(layer)
    if getattr(store, "sharded", False):
        raise ValueError(
            f"{getattr(store, 'name', 'layer')}: its rows are sharded over processes; compression "
            "works on a whole layer: gather it first (inf.distributed.gather_) or compress before "
            "sharding"
        )
    coef = _coefficients(store)
    M = store.num_rows
    state = optimizer.state.get(coef) if optimizer is not None else None
    buf = None if not state else state.get("momentum_buffer")
    if buf is not None:
        if buf.shape[0] < M:  # rows appended since the last step: their velocity is 0
            buf = torch.cat([buf, buf.new_zeros(M - buf.shape[0])])
        if not bool((buf != 0).any()):
            buf = buf[:M]
    K = None
    if rows is not None:
        if rows < 1:
            raise ValueError(f"rows must be >= 1, got {rows}")
        K = max(1, rows // 2) if buf is not None else rows
    A_new, c_new, B_new, v_new, report = compress_rows(
        store.A,
        coef.detach(),
        store.B,
        landmarks=K,
        tol=tol,
        velocity=buf,
        method=method,
        block=block,
        generator=generator,
        dtype=dtype,
        name=name or getattr(store, "name", "layer"),
    )
    store.set_rows(A_new, c_new, B_new)  # pending gradient rows (if any) are kept
    if buf is not None:
        state["momentum_buffer"] = v_new.to(device=buf.device, dtype=buf.dtype)
    return report


class RowBudget:
    """Keep every infinite layer of ``net`` at most ``max_rows`` rows; call after ``optimizer.step()``.

    When a layer has more than ``max_rows`` rows it is compressed to
    ``round(keep_fraction · max_rows)`` rows (so compressions are spread out and their
    cost amortized over the steps that refill the budget). The velocity of SGD with momentum is
    projected with the weight (pass the ``optimizer``); weight decay needs nothing.

    Example::

        budget = RowBudget(net, max_rows=4000, optimizer=opt)
        for x, y in data:
            opt.zero_grad(); loss_fn(net(x), y).backward(); opt.step()
            budget()                      # list of CompressionReport (usually empty)
        budget.metrics()                  # rows per layer, compressions, accumulated ε

    Args:
        net: a network with infinite π-layers (InfMLP).
        max_rows: the budget per layer.
        keep_fraction: rows kept at a compression, as a fraction of ``max_rows``.
        optimizer: the InfSGD training ``net`` (needed for exact momentum).
        method: landmarks, ``"adaptive"`` (default), ``"rpcholesky"`` or ``"greedy"`` (see
            :func:`pivoted_cholesky`); block: pivots per round.
        seed: seed of the random pivots (saved in :meth:`state_dict`, so resumed runs repeat).
        dtype: computation dtype of a compression: float32 (default) is twice as fast as
            float64; the reported ε then carries an absolute error of about ``3e-4·‖h‖_H``
            (it is ``sqrt(‖h‖² − ‖Ph‖²)``, a difference of float32 sums).
    """

    def __init__(
        self,
        net: nn.Module,
        max_rows: int,
        keep_fraction: float = 0.25,
        optimizer=None,
        method: str = "adaptive",
        block: int = 64,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
    ):
        if max_rows < 2:
            raise ValueError(
                f"max_rows must be >= 2 (got {max_rows}); use 0/None in programs to turn the budget off"
            )
        if not 0.0 < keep_fraction < 1.0:
            raise ValueError(f"keep_fraction must be in (0, 1), got {keep_fraction}")
        if method not in METHODS:
            raise ValueError(f"unknown landmark method {method!r}; choose one of {', '.join(METHODS)}")
        self.net, self.optimizer = net, optimizer
        self.max_rows = int(max_rows)
        self.keep_fraction = float(keep_fraction)
        self.method, self.block, self.dtype = method, int(block), dtype
        self.layers = infinite_layers(net)
        if not self.layers:
            raise ValueError("RowBudget: the network has no infinite π-layers with rows")
        self.generator = torch.Generator().manual_seed(int(seed))
        names = [n for n, _ in self.layers]
        self.compressions = {n: 0 for n in names}
        self.eps_sum = {n: 0.0 for n in names}
        self.rel_eps_sum = {n: 0.0 for n in names}
        self.seconds = 0.0
        self.history: list[dict] = []

    @property
    def keep_rows(self) -> int:
        return max(2, int(round(self.keep_fraction * self.max_rows)))

    def __call__(self) -> list[CompressionReport]:
        reports = []
        for name, layer in self.layers:
            if layer.rows.num_rows <= self.max_rows:
                continue
            rep = compress_layer(
                layer,
                self.keep_rows,
                optimizer=self.optimizer,
                method=self.method,
                block=self.block,
                generator=self.generator,
                dtype=self.dtype,
                name=name,
            )
            self.compressions[name] += 1
            self.eps_sum[name] += rep.eps
            self.rel_eps_sum[name] += rep.rel_eps
            self.seconds += rep.seconds
            self.history.append(rep.as_dict())
            reports.append(rep)
        return reports

    step = __call__

    def rows(self) -> dict[str, int]:
        return {n: layer.rows.num_rows for n, layer in self.layers}

    def metrics(self) -> dict:
        """Rows per layer, compressions done, accumulated ε (absolute and relative) per layer."""
        return {
            "rows": self.rows(),
            "compressions": dict(self.compressions),
            "eps_sum": dict(self.eps_sum),
            "rel_eps_sum": dict(self.rel_eps_sum),
            "compress_seconds": self.seconds,
        }

    def state_dict(self) -> dict:
        return {
            "max_rows": self.max_rows,
            "keep_fraction": self.keep_fraction,
            "method": self.method,
            "block": self.block,
            "generator": self.generator.get_state(),
            "compressions": dict(self.compressions),
            "eps_sum": dict(self.eps_sum),
            "rel_eps_sum": dict(self.rel_eps_sum),
            "seconds": self.seconds,
            "history": list(self.history),
        }

    def load_state_dict(self, state: dict):
        self.max_rows = int(state["max_rows"])
        self.keep_fraction = float(state["keep_fraction"])
        self.method, self.block = state["method"], int(state["block"])
        self.generator.set_state(state["generator"])
        self.compressions.update(state["compressions"])
        self.eps_sum.update(state["eps_sum"])
        self.rel_eps_sum.update(state["rel_eps_sum"])
        self.seconds = float(state["seconds"])
        self.history = list(state["history"])

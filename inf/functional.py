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

Rows are processed in blocks, so that no batch × M intermediate is ever
formed in one piece:

* ``chunk_rows`` is the memory budget's block (see :func:`auto_chunk_rows`):
  at most four batch × chunk intermediates are alive at a time.
* On the CPU the rows are cut further into cache-sized blocks of
  ``CPU_BLOCK_ROWS`` rows. For the small batches of training the products
  ``ĝ Bᵀ`` and ``δ Aᵀ`` are memory-bound, and one ``torch.mm`` over all M rows
  is markedly slower than the same product in blocks whose outputs stay in
  cache; the elementwise kernels then also run on cached data (measured in
  ``benchmarks/step_time.py``, see ``docs/performance.md``). This applies
  while torch runs at most ``CPU_BLOCK_MAX_THREADS`` threads (default 1), and
  at any thread count to batches of at least ``CPU_BLOCK_BATCH`` inputs, which
  are also cut into blocks of that many inputs (evaluation).

Transcendental work runs once per step: when the budget allows the batch × M
intermediates (``chunk_rows`` is None or ≥ M), forward writes ``2π F11(q)``
and ``2π F02(q)`` block by block into two batch × M buffers that backward reads;
otherwise backward recomputes them block by block (memory first). The module
switch :data:`SAVE_KERNELS` (or the ``save_kernels`` argument) forces either
choice; saving was measured faster (``benchmarks/step_time.py --compare-save``).

``A`` and ``B`` may be stored in float16/bfloat16; each block is converted
to float32 (float64 when the input is float64) just before its products, so
products accumulate in float32 with float32 coefficients, and the result is
cast back to the input's dtype. The accuracy cost is measured in
``benchmarks/memory.py`` and stated in ``docs/performance.md``.
"""
from __future__ import annotations

import math

import torch

__all__ = ["InfPiLinearReLUFunction", "inf_pi_linear_relu", "pi_features", "compute_dtype",
           "auto_chunk_rows", "block_rows", "SAVE_KERNELS", "CPU_BLOCK_ROWS",
           "CPU_BLOCK_MAX_THREADS", "CPU_BLOCK_BATCH",
           "CONVERT_BLOCK_ROWS"]

_TINY = 1e-30
_INV_2PI = 1.0 / (2.0 * math.pi)

#: Keep F11/F02 from forward for backward: None = when the memory budget allows the
#: batch × M buffers (no ``chunk_rows`` below M), True = always, False = recompute.
SAVE_KERNELS: bool | None = None

#: Rows per cache-sized block on the CPU (0 or None: blocks only for the memory budget).
CPU_BLOCK_ROWS: int | None = 1024

#: Inputs per cache-sized block on the CPU (large batches, e.g. evaluation). Batches of at
#: least this size are cut into cache blocks at any thread count.
CPU_BLOCK_BATCH: int | None = 512

#: Rows per block when A/B are stored in another dtype than the computation's (float16,
#: bfloat16): bounds the float32 copy of a block (65536 rows × 800 columns = 200 MB).
CONVERT_BLOCK_ROWS: int = 65536

#: Cache blocks of small batches are used only when torch runs at most this many
#: threads. Each block's products are a parallel region of their own: with small
#: batches the regions are short, their synchronization outweighs what blocking
#: gains, and on cores shared with other jobs every region also waits for the
#: scheduler (docs/performance.md).
CPU_BLOCK_MAX_THREADS: int = 1


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
    """Row-chunk size that keeps ``live_tensors`` batch × chunk intermediates under ``budget_bytes``.

    Forward and backward of :class:`InfPiLinearReLUFunction` hold at most four
    batch × chunk intermediates at a time (``q``, ``F11``, ``F02`` and ``F00``
    resp. ``γ``). None means that everything fits: no chunking is needed.
    """
    if budget_bytes is None:
        return None
    per_row = max(1, batch * itemsize * live_tensors)
    chunk = max(1, budget_bytes // per_row)
    return None if chunk >= rows else int(chunk)


def _cpu_blocking(device, batch: int) -> bool:
    """Cache blocks on the CPU: always at most :data:`CPU_BLOCK_MAX_THREADS` threads; with
    more threads only for batches of at least :data:`CPU_BLOCK_BATCH` inputs, whose blocks
    are big enough to amortize a parallel region each."""
    if torch.device(device).type != "cpu":
        return False
    return (torch.get_num_threads() <= CPU_BLOCK_MAX_THREADS
            or bool(CPU_BLOCK_BATCH and batch >= CPU_BLOCK_BATCH))


def block_rows(rows: int, chunk_rows: int | None, device: torch.device | str,
               converts: bool = False, batch: int = 1) -> int | None:
    """Rows per block actually processed: the budget's ``chunk_rows``, cut to
    :data:`CPU_BLOCK_ROWS` when CPU cache blocks apply (see :func:`block_batch`), and
    to :data:`CONVERT_BLOCK_ROWS` when the rows are converted to the compute dtype
    (``converts``); None means one block of all rows."""
    block = chunk_rows if chunk_rows and chunk_rows < rows else None
    if CPU_BLOCK_ROWS and rows > CPU_BLOCK_ROWS and _cpu_blocking(device, batch):
        block = min(block or rows, int(CPU_BLOCK_ROWS))
    if converts and CONVERT_BLOCK_ROWS and rows > CONVERT_BLOCK_ROWS:
        block = min(block or rows, int(CONVERT_BLOCK_ROWS))
    return block


def block_batch(batch: int, device: torch.device | str) -> int | None:
    """Inputs per block; None means all at once. CPU cache blocks apply when torch runs at
    most :data:`CPU_BLOCK_MAX_THREADS` threads, or for batches of at least
    :data:`CPU_BLOCK_BATCH` inputs at any thread count."""
    if CPU_BLOCK_BATCH and batch > CPU_BLOCK_BATCH and _cpu_blocking(device, batch):
        return int(CPU_BLOCK_BATCH)
    return None


def _chunks(M: int, chunk_rows: int | None):
    if not chunk_rows or chunk_rows >= M:
        yield 0, M
        return
    for start in range(0, M, chunk_rows):
        yield start, min(M, start + chunk_rows)


def _kernels_(q: torch.Tensor, f11_out: torch.Tensor | None = None, f02_out: torch.Tensor | None = None):
    """``(2π F11(q), 2π F02(q))`` from one ``arccos`` and one ``sin`` per entry; clamps ``q`` in place.

    With ``θ = arccos(q)``: ``2π F11 = π − θ`` and ``2π F02 = sin θ``. ``sin θ``
    equals ``sqrt(1 − q²)`` but keeps full relative precision near ``q = ±1``,
    where ``1 − q²`` cancels. The common factor ``1/2π`` is applied once to the
    layer's output (resp. input gradient) instead of to every entry. Four
    passes per block; ``*_out`` may be strided views of the saved buffers.
    At ``q = ±1`` the results are exact up to float rounding (``sin(fl(π))``
    is −9e-8 in float32).
    """
    q.clamp_(-1.0, 1.0)
    theta = torch.arccos(q) if f11_out is None else torch.arccos(q, out=f11_out)
    f02 = torch.sin(theta) if f02_out is None else torch.sin(theta, out=f02_out)
    f11 = torch.sub(theta.new_full((), math.pi), theta, out=theta)
    return f11, f02


def _rows(X: torch.Tensor, lo: int, hi: int, cdt: torch.dtype) -> torch.Tensor:
    block = X[lo:hi]
    return block if block.dtype == cdt else block.to(cdt)


class InfPiLinearReLUFunction(torch.autograd.Function):
    """``g_out = s · (F00(ĝ Bᵀ) ⊙ c) A`` with the closed-form backward of spec §4.

    ``apply(g, A, coef, B, store, layernorm, chunk_rows, trigger, save_kernels)``;
    ``store`` is the :class:`~inf.tensors.RowStore` that receives the gradient
    rows, or None; ``save_kernels`` overrides :data:`SAVE_KERNELS`.
    """

    @staticmethod
    def forward(ctx, g, A, coef, B, store, layernorm, chunk_rows, trigger=None, save_kernels=None):
        cdt = compute_dtype(g, A, B)
        g32 = g.to(cdt)
        norm = g32.norm(dim=1)
        ghat = g32 / norm.clamp_min(_TINY)[:, None]
        batch, M = g.shape[0], A.shape[0]
        save = SAVE_KERNELS if save_kernels is None else save_kernels
        if save is None:
            save = not chunk_rows or chunk_rows >= M
        keep = bool(ctx.needs_input_grad[0] and save)
        block = block_rows(M, chunk_rows, g.device, converts=A.dtype != cdt or B.dtype != cdt, batch=batch)
        bblock = block_batch(batch, g.device)
        blocked = (block is not None and block < M) or bblock is not None
        out = torch.zeros(batch, A.shape[1], dtype=cdt, device=g.device)
        f11_saved = f02_saved = None
        if keep and blocked:
            f11_saved = torch.empty(batch, M, dtype=cdt, device=g.device)
            f02_saved = torch.empty(batch, M, dtype=cdt, device=g.device)
        for lo, hi in _chunks(M, block):
            Bc, Ac, cc = _rows(B, lo, hi, cdt), _rows(A, lo, hi, cdt), coef[lo:hi]
            for blo, bhi in _chunks(batch, bblock):
                q = ghat[blo:bhi] @ Bc.T
                if keep and blocked:
                    f11, f02 = _kernels_(q, f11_saved[blo:bhi, lo:hi], f02_saved[blo:bhi, lo:hi])
                else:
                    f11, f02 = _kernels_(q)
                    if keep:
                        f11_saved, f02_saved = f11, f02
                # 2π F00 = 2π F02 + q 2π F11 (spec §2), times the coefficients
                f00 = torch.addcmul(f02, q, f11).mul_(cc)
                del q, f11, f02
                out[blo:bhi].addmm_(f00, Ac)
                del f00
            del Bc, Ac
        if layernorm:
            out.mul_(_INV_2PI)
        else:
            out.mul_(norm[:, None] * _INV_2PI)
        ctx.store = store
        ctx.layernorm = layernorm
        ctx.block, ctx.bblock = block, bblock
        ctx.in_dtype = g.dtype
        # the rows are kept as detached aliases of the M rows seen here, not via
        # save_for_backward: appending temporary rows between forward and backward
        # (MAML) must neither trip autograd's version check nor change their shape
        ctx.rows = (A.detach(), coef.detach(), B.detach())
        ctx.coef_param = coef  # the parameter itself carries the gradient marker
        ctx.save_for_backward(ghat, norm, f11_saved, f02_saved)
        return out if out.dtype == g.dtype else out.to(g.dtype)

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
            for lo, hi in _chunks(A.shape[0], ctx.block):
                Ac, Bc, cc = _rows(A, lo, hi, cdt), _rows(B, lo, hi, cdt), coef[lo:hi]
                for blo, bhi in _chunks(ghat.shape[0], ctx.bblock):
                    gamma = (delta[blo:bhi] @ Ac.T).mul_(cc)
                    if f11_saved is not None:
                        f11, f02 = f11_saved[blo:bhi, lo:hi], f02_saved[blo:bhi, lo:hi]
                    else:
                        f11, f02 = _kernels_(ghat[blo:bhi] @ Bc.T)
                    if not ctx.layernorm:
                        radial[blo:bhi] += torch.linalg.vecdot(gamma, f02)
                    v[blo:bhi].addmm_(gamma.mul_(f11), Bc)
                    del gamma, f11, f02
                del Ac, Bc
            if ctx.layernorm:
                # back through ĝ = g/|g|; the radial part of v is removed
                v.mul_(_INV_2PI)
                v = (v - (v * ghat).sum(1, keepdim=True) * ghat) / norm.clamp_min(_TINY)[:, None]
            else:
                v.addcmul_(radial[:, None], ghat).mul_(_INV_2PI)
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
        return grad_g, None, None, None, None, None, None, grad_trigger, None


def inf_pi_linear_relu(g, A, coef, B, store=None, layernorm=False, chunk_rows=None, save_kernels=None):
    """Functional form of the infinite π-layer (no bias); see :class:`InfPiLinearReLUFunction`.

    With a ``store`` and grad mode on, backward runs even when nothing upstream
    requires grad (a fresh scalar "trigger" input makes sure of it), so a layer
    records its gradient rows even if the layers before it are frozen.
    ``save_kernels`` (None: :data:`SAVE_KERNELS`) chooses between keeping
    ``F11``/``F02`` for backward and recomputing them.
    """
    trigger = None
    if store is not None and torch.is_grad_enabled():
        trigger = torch.zeros((), device=g.device, requires_grad=True)
    return InfPiLinearReLUFunction.apply(g, A, coef, B, store, layernorm, chunk_rows, trigger, save_kernels)

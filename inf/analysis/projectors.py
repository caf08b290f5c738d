"""Random projections for per-example gradients that need no P × K matrix.

:class:`SparseJLProjector` is a sparse Johnson–Lindenstrauss sketch (CountSketch for
``nnz=1``; the block construction of OSNAP for ``nnz = s > 1``). Each of the P gradient
coordinates is sent to ``s`` of the K output coordinates — one chosen uniformly in each of
``s`` consecutive blocks of about K/s outputs — with an independent random sign, so the
(implicit) K × P matrix ``S`` has ``s`` non-zeros ``±1/√s`` per column and

    E[⟨S x, S y⟩] = ⟨x, y⟩          (the cross terms vanish because the signs are independent),
    Var[⟨S x, S y⟩] = (‖x‖² ‖y‖² + ⟨x, y⟩² − 2 Σ_p x_p² y_p²) / K,

which is at most the variance of a dense Gaussian sketch, ``(‖x‖² ‖y‖² + ⟨x, y⟩²) / K``.
Projecting a batch of B gradients costs O(s·B·P) additions (``index_add_``) and the hashes
take O(s·P) memory, against O(B·P·K) work and a P × K matrix for a dense projection.

The hashes of a coordinate depend only on ``(seed, K, nnz, coordinate)``: they are drawn
per aligned chunk of :data:`HASH_CHUNK` coordinates from a generator seeded by
``(seed, chunk)``. So the sketch of a gradient does not depend on how the caller splits it
into parameter blocks, and the same seed gives the same matrix for any model size — the
projection is fixed by :meth:`SparseJLProjector.layout`.

``project`` follows the convention of TRAK's projectors (``trak.projectors``): the result
is not divided by √K (a TRAK projector's entries are ±1 or N(0, 1)), i.e. it returns
``√K · S x``. With that convention the class is a drop-in ``projector=`` for
``trak.TRAKer`` (it has TRAK's projector interface; importing
:mod:`inf.analysis.traker_tasks` also registers it as a virtual subclass of
``trak.projectors.AbstractProjector``); :meth:`SparseJLProjector.sketch` returns ``S x``
itself. This module does not import ``trak``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

__all__ = ["SparseJLProjector", "HASH_CHUNK"]

HASH_CHUNK = 1 << 13
_MAX_SEED = (1 << 63) - 1


def _chunk_seed(seed: int, chunk: int, proj_dim: int, nnz: int) -> int:
    """A well-mixed 63-bit seed for one chunk of coordinates."""
    words = np.random.SeedSequence(
        [int(seed) & 0xFFFFFFFF, int(seed) >> 32 & 0xFFFFFFFF, int(chunk), int(proj_dim), int(nnz), 0x5EED]
    ).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31 ^ int(words[1])) & _MAX_SEED


class SparseJLProjector:
    """Sparse JL / CountSketch projection of gradients from ``grad_dim`` to ``proj_dim``.

    Args:
        grad_dim: P, the length of the vectors to project.
        proj_dim: K.
        seed: fixes the projection (with ``proj_dim`` and ``nnz``).
        proj_type: accepted for compatibility with TRAK's projectors; must be ``"sparse"``.
        device: where the sketches are computed.
        nnz: non-zeros per column (1: CountSketch). Any ``1 <= nnz <= proj_dim`` gives the
            same variance; a larger ``nnz`` only tightens the tails.
        dtype: dtype of the sketches.
        cache_bytes: memory kept for hashes (``nnz · P · 12`` bytes for all of them);
            beyond it the hashes of further chunks are regenerated on every call.
        model_id: ignored (TRAK regenerates its matrices per checkpoint; this projector is
            the same for every checkpoint, so kernels of different checkpoints can be
            compared).
    """

    def __init__(
        self,
        grad_dim: int,
        proj_dim: int,
        seed: int = 0,
        proj_type: str = "sparse",
        device: str | torch.device = "cpu",
        nnz: int = 1,
        dtype: torch.dtype = torch.float32,
        cache_bytes: int = 512 * 2**20,
        model_id: int = 0,
        *args,
        **kwargs,
    ) -> None:
        for name, v, lo in (("grad_dim", grad_dim, 1), ("proj_dim", proj_dim, 1), ("nnz", nnz, 1)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < lo:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if nnz > proj_dim:
            raise ValueError(f"nnz ({nnz}) cannot exceed proj_dim ({proj_dim})")
        if str(getattr(proj_type, "value", proj_type)) != "sparse":
            raise ValueError(f"SparseJLProjector has proj_type 'sparse', got {proj_type!r}")
        self.grad_dim, self.proj_dim, self.seed = int(grad_dim), int(proj_dim), int(seed)
        self.proj_type = "sparse"
        self.device = torch.device(device)
        self.nnz, self.dtype, self.cache_bytes = int(nnz), dtype, int(cache_bytes)
        self.model_id = model_id
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._cached_bytes = 0
        bounds = [b * self.proj_dim // self.nnz for b in range(self.nnz + 1)]
        self._blocks = list(zip(bounds[:-1], bounds[1:]))

    # ------------------------------------------------------------------ description
    def layout(self) -> dict[str, Any]:
        """What fixes the projection: two sketches are comparable iff their layouts are equal."""
        return {
            "projector": "sparse",
            "proj_dim": self.proj_dim,
            "seed": self.seed,
            "nnz": self.nnz,
            "hash_chunk": HASH_CHUNK,
        }

    def __repr__(self) -> str:
        return (
            f"SparseJLProjector(grad_dim={self.grad_dim}, proj_dim={self.proj_dim}, seed={self.seed}, "
            f"nnz={self.nnz})"
        )

    # ------------------------------------------------------------------ hashes
    def _hashes(self, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Buckets (nnz, HASH_CHUNK) int64 and signs (nnz, HASH_CHUNK) of one chunk of coordinates."""
        hit = self._cache.get(chunk)
        if hit is not None:
            return hit
        g = torch.Generator(device="cpu").manual_seed(_chunk_seed(self.seed, chunk, self.proj_dim, self.nnz))
        buckets = torch.stack([torch.randint(lo, hi, (HASH_CHUNK,), generator=g) for lo, hi in self._blocks])
        signs = torch.randint(0, 2, (self.nnz, HASH_CHUNK), generator=g).mul_(2).sub_(1)
        out = (buckets.to(self.device), signs.to(device=self.device, dtype=self.dtype))
        size = out[0].numel() * 8 + out[1].numel() * out[1].element_size()
        if self._cached_bytes + size <= self.cache_bytes:
            self._cache[chunk] = out
            self._cached_bytes += size
        return out

    # ------------------------------------------------------------------ projection
    def sketch_block(self, x: torch.Tensor, offset: int = 0, out: torch.Tensor | None = None) -> torch.Tensor:
        """Add ``S[:, offset:offset+n] x`` for a batch ``x`` (B × n) of gradient pieces that
        occupy coordinates ``offset … offset+n−1``; returns ``out`` (B × K), created if None."""
        if x.ndim != 2:
            raise ValueError(f"expected a batch of vectors (B × n), got shape {tuple(x.shape)}")
        n = x.shape[1]
        if offset < 0 or offset + n > self.grad_dim:
            raise ValueError(
                f"coordinates {offset}…{offset + n - 1} are outside 0…{self.grad_dim - 1} "
                f"(grad_dim={self.grad_dim})"
            )
        x = x.to(device=self.device, dtype=self.dtype)
        if out is None:
            out = torch.zeros(x.shape[0], self.proj_dim, dtype=self.dtype, device=self.device)
        scale = 1.0 / math.sqrt(self.nnz)
        pos = 0
        while pos < n:
            coord = offset + pos
            chunk, start = divmod(coord, HASH_CHUNK)
            m = min(n - pos, HASH_CHUNK - start)
            buckets, signs = self._hashes(chunk)
            piece = x[:, pos : pos + m]
            for t in range(self.nnz):
                s = signs[t, start : start + m]
                out.index_add_(1, buckets[t, start : start + m], piece * (s * scale if self.nnz > 1 else s))
            pos += m
        return out

    def sketch(self, grads) -> torch.Tensor:
        """``S g`` for a batch of gradients (B × P tensor, or TRAK's dict of per-parameter
        gradients, each B × …, taken in order): E[⟨S g, S g'⟩] = ⟨g, g'⟩."""
        if isinstance(grads, dict):
            parts = [v.reshape(v.shape[0], -1) for v in grads.values()]
        else:
            parts = [grads.reshape(grads.shape[0], -1)]
        total = sum(p.shape[1] for p in parts)
        if total != self.grad_dim:
            raise ValueError(
                f"gradients have {total} coordinates, the projector expects grad_dim={self.grad_dim}"
            )
        out = None
        offset = 0
        for p in parts:
            out = self.sketch_block(p, offset, out)
            offset += p.shape[1]
        return out

    def project(self, grads, model_id: int = 0) -> torch.Tensor:
        """TRAK's convention: ``√K · S g`` (E[⟨·, ·⟩] = K ⟨g, g'⟩), for ``trak.TRAKer``."""
        return self.sketch(grads).mul_(math.sqrt(self.proj_dim))

    def free_memory(self) -> None:
        """Drop the cached hashes (they are regenerated on demand)."""
        self._cache.clear()
        self._cached_bytes = 0

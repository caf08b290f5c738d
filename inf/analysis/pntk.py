"""Projected neural tangent kernels (pNTK) of finite models.

For a model ``f: R^d → R^O`` with trainable parameters ``θ`` (P numbers) the empirical
NTK is the O × O block matrix ``Θ(x, x') = J(x) J(x')ᵀ`` with ``J(x) = ∂f(x)/∂θ``
(O × P). It governs plain gradient descent to first order: one step of size ``η`` on a
loss ``L`` changes the outputs by ``Δf(x') ≈ −η Σ_x Θ(x', x) ∂L/∂f(x)``.

Computing it for many examples is limited by ``J``, which has O·P numbers per example.
This module computes per-example Jacobians with ``torch.func`` (``vmap`` over examples of
``jacrev`` over a ``functional_call``) in chunks of examples and in blocks of parameters,
and never keeps more than one chunk × block of them. Each block is multiplied by a random
matrix ``R`` (P × K, unbiased: ``E[R Rᵀ] = I``), so that the *features* ``φ(x) = J(x) R``
(O × K) satisfy ``E[φ(x) φ(x')ᵀ] = Θ(x, x')`` — the Johnson–Lindenstrauss sketch used by
TRAK. By default ``R`` is the sparse sketch of :class:`inf.analysis.projectors.SparseJLProjector`
(CountSketch: O(P) work per example, no P × K matrix, variance never above a Gaussian
sketch's); ``proj_type="rademacher"`` or ``"normal"`` use the dense projectors of the
``traker`` package (``trak.projectors.BasicProjector`` on any device, its ``CudaProjector``
when a GPU and ``fast_jl`` are present), scaled by ``K^-½``. ``proj_dim=None`` keeps the
exact Jacobian (small models only); :func:`exact_ntk` computes the exact kernel parameter by
parameter for larger ones.

Features are written to a NumPy memory-mapped file when a ``path`` is given, chunk by
chunk, with a completion mask beside them: a run that stops part-way is continued by
calling again with the same arguments, and the result equals a single run's. The file
records what it was computed from (model, data, settings); calling with something else
raises instead of mixing kernels, and :func:`load_features` reads it back without the model
or the data. Kernels are only formed from feature sets made with the same random projection
(:func:`projection_layout`); anything else is refused.

Kernels from features (:func:`ntk_from_features`):

``full``    ``Θ(x, x')``, shape (N, M, O, O).
``trace``   ``Σ_k Θ_kk(x, x') = ⟨J(x), J(x')⟩_F``, shape (N, M) — the scalar kernel that
            governs the sum of squared output changes.
``pseudo``  ``(1/O) Σ_{k,k'} Θ_kk'(x, x') = ⟨∇(Σ_k f_k)(x), ∇(Σ_k f_k)(x')⟩ / O``: the
            kernel of the summed output (the "pseudo-NTK"), O times cheaper to compute
            (``outputs="sum"`` stores only ``∇(Σ_k f_k)/√O``).

Per-parameter learning-rate multipliers ``m_p`` (as in ``inf.utils.pi_param_groups``)
enter as ``Θ = Σ_p m_p J_p J_pᵀ``: the gradient block of parameter p is scaled by ``√m_p``.

**Finite π-nets.** Their π-weights (:class:`inf.parameters.FinPiParameter`: every weight
and bias except the output layer's) are trained with the gradient projected onto
``span(Ω)`` on its output side, ``G ← Q Qᵀ G`` with ``Q`` the layer's orthonormal basis
``omega_basis`` (docs/math.md §6). The tangent kernel of that training rule is ``J P Jᵀ`` with
``P`` the block-diagonal projection; since ``P = P Pᵀ`` and ``Q`` has orthonormal
columns, ``J P Jᵀ = (Qᵀ J)(Qᵀ J)ᵀ``, so with ``pi_project=True`` (the default) the
per-example gradient of such a parameter is replaced by ``Qᵀ G`` (r rows instead of n)
before the random projection. This kernel is the one that converges to the tangent
kernel of the infinite π-net (:func:`inf.analysis.inf_ntk`) as the width grows.

Also here: the top-k most similar training examples of each test example
(:func:`topk_similar`, :func:`save_topk_grid`) and a kernel surrogate — a kernel
logistic or ridge model fitted on the kernel — with its agreement with the network
(:class:`KernelSurrogate`, :func:`surrogate_agreement`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..tensors import FinPiParameter, owner_of

__all__ = [
    "Features",
    "pntk_features",
    "load_features",
    "empirical_ntk",
    "exact_ntk",
    "pntk",
    "ntk_from_features",
    "ntk_over_checkpoints",
    "kernel_diagonal",
    "cosine_normalize",
    "projection_layout",
    "topk_similar",
    "save_topk_grid",
    "KernelSurrogate",
    "surrogate_agreement",
    "misclassification_overlap",
    "resolve_lr_mults",
    "trainable_parameters",
    "make_projector",
    "KINDS",
    "PROJ_TYPES",
]

KINDS = ("full", "trace", "pseudo")
_ROLES = ("first", "first_bias", "hidden", "bias", "last", "last_bias")
_FORMAT_VERSION = 1


# ----------------------------------------------------------------------------- helpers
def trainable_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{name: parameter}`` of the parameters with ``requires_grad`` (shared ones once).

    Raises for a model without trainable parameters, and for an infinite π-net, whose
    rows are not ordinary parameters (use :func:`inf.analysis.inf_ntk` for it).
    """
    from ..layers import InfPiLinearReLU

    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if any(isinstance(m, InfPiLinearReLU) for m in model.modules()):
        raise TypeError(
            "this model contains infinite π-layers (InfPiLinearReLU), whose weights are rows, "
            "not parameters: use inf.analysis.inf_ntk(net, X) for its exact tangent kernel, or "
            "the pNTK of a finite net sampled from it (net.sample(n))"
        )
    params = {}
    seen = set()
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            params[name] = p
    if not params:
        raise ValueError(
            f"{type(model).__name__} has no trainable parameters (none with requires_grad=True): "
            "its tangent kernel is zero"
        )
    return params


def _layer_roles(model: nn.Module) -> dict[int, str]:
    """Role of each parameter of a net with ``.layers`` (input, hidden…, output), keyed by id."""
    layers = list(getattr(model, "layers", []))
    roles = {}
    for i, layer in enumerate(layers):
        first, last = i == 0, i == len(layers) - 1
        for name, p in layer.named_parameters():
            is_bias = name.endswith("bias")
            if first:
                role = "first_bias" if is_bias else "first"
            elif last:
                role = "last_bias" if is_bias else "last"
            else:
                role = "bias" if is_bias else "hidden"
            roles.setdefault(id(p), role)
    return roles


def resolve_lr_mults(model: nn.Module, lr_mults=None, base_lr: float | None = None) -> dict[int, float]:
    """Learning-rate multiplier of each parameter, keyed by ``id(parameter)`` (missing: 1).

    ``lr_mults`` may be

    * None: every multiplier is 1 (plain SGD with one learning rate);
    * a list of param groups (``optimizer.param_groups`` or ``inf.utils.pi_param_groups``):
      each group's ``lr_mult``, or its ``lr / base_lr`` when it has none — the kernel then
      follows exactly what the optimizer does;
    * a dict of roles of a net with ``.layers``: ``first``, ``first_bias``, ``hidden``,
      ``bias``, ``last``, ``last_bias`` (``first_bias`` defaults to ``bias · first`` and
      ``last_bias`` to ``bias · last``, the convention of ``pi_param_groups``' docstring);
    * a dict of parameter names (as in ``model.named_parameters()``).
    """
    if lr_mults is None:
        return {}
    out: dict[int, float] = {}
    if isinstance(lr_mults, dict):
        keys = set(lr_mults)
        if keys and keys <= set(_ROLES):
            m = {r: float(lr_mults.get(r, 1.0)) for r in ("first", "hidden", "bias", "last")}
            m["first_bias"] = float(lr_mults.get("first_bias", m["bias"] * m["first"]))
            m["last_bias"] = float(lr_mults.get("last_bias", m["bias"] * m["last"]))
            roles = _layer_roles(model)
            if not roles:
                raise ValueError(
                    "lr_mults by role needs a net with .layers (input, hidden…, output); "
                    "give a dict of parameter names or the optimizer's param groups instead"
                )
            return {pid: m[role] for pid, role in roles.items()}
        names = dict(model.named_parameters())
        unknown = keys - set(names)
        if unknown:
            raise ValueError(
                f"lr_mults names {sorted(unknown)[:5]} are neither roles {_ROLES} nor parameters "
                f"of the model (e.g. {list(names)[:3]})"
            )
        return {id(names[k]): float(v) for k, v in lr_mults.items()}
    if isinstance(lr_mults, (list, tuple)):
        for g in lr_mults:
            if not isinstance(g, dict) or "params" not in g:
                raise TypeError("lr_mults as a list must hold param groups (dicts with 'params')")
            if "lr_mult" in g:
                mult = float(g["lr_mult"])
            elif base_lr:
                mult = float(g["lr"]) / float(base_lr)
            else:
                raise ValueError(
                    "a param group without 'lr_mult' needs base_lr to turn its lr into a multiplier"
                )
            for p in g["params"]:
                out[id(p)] = mult
        return out
    raise TypeError(f"lr_mults must be None, a dict or a list of param groups, got {type(lr_mults).__name__}")


@contextlib.contextmanager
def _vmap_friendly(model: nn.Module):
    """Eval mode, and the input-finiteness checks of π-layers off (``if`` on a tensor breaks vmap)."""
    was_training = model.training
    switched = []
    for m in model.modules():
        if getattr(m, "check_finite", False) is True:
            m.check_finite = False
            switched.append(m)
    model.eval()
    try:
        yield
    finally:
        for m in switched:
            m.check_finite = True
        model.train(was_training)


def _as_tensor(X, device, dtype) -> torch.Tensor:
    if isinstance(X, torch.Tensor):
        return X.to(device=device, dtype=dtype if X.is_floating_point() else None)
    arr = np.asarray(X)
    t = torch.from_numpy(np.array(arr, copy=True))
    return t.to(device=device, dtype=dtype if t.is_floating_point() else None)


def _fingerprint_tensors(tensors: Iterable[torch.Tensor]) -> str:
    h = hashlib.sha1()
    for t in tensors:
        a = t.detach().cpu().contiguous().reshape(-1)
        h.update(str((tuple(t.shape), str(a.dtype))).encode())
        h.update(a.view(torch.uint8).numpy().tobytes() if a.numel() else b"")
    return h.hexdigest()


def _fingerprint_data(X, chunk: int = 4096) -> str:
    h = hashlib.sha1()
    h.update(str(tuple(X.shape)).encode())
    for lo in range(0, len(X), chunk):
        part = X[lo : lo + chunk]
        a = (
            part.detach().cpu().contiguous().numpy()
            if isinstance(part, torch.Tensor)
            else np.ascontiguousarray(part)
        )
        h.update(a.tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- projectors
def _fast_jl_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("fast_jl") is not None


PROJ_TYPES = ("sparse", "rademacher", "normal")


def _check_proj_type(proj_type: str):
    if proj_type not in PROJ_TYPES:
        raise ValueError(f"proj_type must be one of {PROJ_TYPES}, got {proj_type!r}")


def _projector_plan(grad_dim: int, proj_dim: int, device, dtype, memory_bytes: int) -> tuple[str, int]:
    """``("cuda", 0)`` for TRAK's CudaProjector, else ``("basic", column block size)``."""
    device = torch.device(device)
    if (
        device.type == "cuda"
        and dtype in (torch.float16, torch.float32)
        and proj_dim % 512 == 0
        and _fast_jl_available()
    ):
        return "cuda", 0
    itemsize = torch.empty((), dtype=dtype).element_size()
    return "basic", int(max(1, min(proj_dim, memory_bytes // max(1, grad_dim * itemsize))))


def make_projector(
    grad_dim: int,
    proj_dim: int,
    seed: int,
    proj_type: str = "sparse",
    device="cpu",
    dtype=torch.float32,
    memory_bytes: int = 64 * 2**20,
    nnz: int = 1,
):
    """A projector from ``grad_dim`` to ``proj_dim`` in TRAK's convention (``project``
    returns ``√K`` times a unit-scaled sketch). Returns ``(projector, description)``.

    ``proj_type="sparse"``: :class:`inf.analysis.projectors.SparseJLProjector` (CountSketch
    with ``nnz`` non-zeros per column; no P × K matrix, any device). Otherwise TRAK's
    ``CudaProjector`` when the device is CUDA, ``fast_jl`` is installed, the dtype is
    float16/float32 and ``proj_dim`` is a multiple of 512 (its kernels' requirement), else
    ``BasicProjector``, whose random matrix is generated in column blocks that fit in
    ``memory_bytes`` (one block: generated once and kept). Each block of BasicProjector
    has its own seed, so a different ``memory_bytes`` gives a *different* random matrix
    (other numbers, equally valid): the block size is part of the projection's layout.
    """
    _check_proj_type(proj_type)
    if proj_type == "sparse":
        from .projectors import SparseJLProjector

        proj = SparseJLProjector(grad_dim, proj_dim, seed, device=device, nnz=nnz, dtype=dtype)
        return proj, f"sparse(nnz={nnz})"
    try:
        from trak.projectors import BasicProjector, CudaProjector, ProjectionType
    except ImportError as e:  # pragma: no cover - exercised only without the dependency
        raise ImportError(
            f"proj_type={proj_type!r} needs the 'traker' package (TRAK's projectors): "
            "pip install --no-deps traker, or use proj_type='sparse'"
        ) from e
    kind, block = _projector_plan(grad_dim, proj_dim, device, dtype, memory_bytes)
    if kind == "cuda":
        proj = CudaProjector(
            grad_dim, proj_dim, seed, ProjectionType(proj_type), torch.device(device), max_batch_size=32
        )
        return proj, "cuda"
    proj = BasicProjector(
        grad_dim, proj_dim, seed, proj_type, torch.device(device), block_size=block, dtype=dtype
    )
    return proj, f"basic(block={block})"


# ----------------------------------------------------------------------------- Jacobians
def _plan_blocks(params: dict[str, torch.Tensor], dims: dict[str, int], block_numel: int) -> list[list[str]]:
    """Consecutive parameters grouped so that a block's (transformed) size stays ≤ block_numel
    (a larger single parameter forms its own block)."""
    blocks, cur, size = [], [], 0
    for name in params:
        d = dims[name]
        if cur and size + d > block_numel:
            blocks.append(cur)
            cur, size = [], 0
        cur.append(name)
        size += d
    if cur:
        blocks.append(cur)
    return blocks


class _GradientMap:
    """How each parameter enters the Jacobian: π-projected, and scaled by ``√lr_mult``.

    A finite π-weight ``W`` (n_out × …) with Ω basis ``Q`` (n_out × k) is differentiated
    through the coordinates ``V`` (k × …) of ``W + Q V`` at ``V = 0``: the Jacobian with
    respect to ``V`` is ``Qᵀ ∂f/∂W``, obtained without forming the n_out-row gradient.
    """

    def __init__(self, params: dict[str, torch.Tensor], pi_project: bool, mults: dict[int, float]):
        self.basis: dict[str, torch.Tensor] = {}
        self.scale: dict[str, float] = {}
        self.dims: dict[str, int] = {}
        for name, p in params.items():
            m = mults.get(id(p), 1.0)
            if m < 0:
                raise ValueError(f"learning-rate multiplier of {name} is negative ({m})")
            self.scale[name] = math.sqrt(m)
            owner = owner_of(p) if (pi_project and isinstance(p, FinPiParameter)) else None
            if owner is not None and getattr(owner, "projected", False):
                Q = owner.omega_basis.detach().to(p.dtype)
                if Q.shape[0] != p.shape[0]:
                    raise ValueError(f"{name}: Ω basis has {Q.shape[0]} rows, the parameter {p.shape[0]}")
                self.basis[name] = Q
                self.dims[name] = Q.shape[1] * (p.numel() // p.shape[0])
            else:
                self.dims[name] = p.numel()

    def variable(self, name: str, p: torch.Tensor) -> torch.Tensor:
        """The tensor to differentiate: ``p`` itself, or zero coordinates ``V`` of π-weights."""
        Q = self.basis.get(name)
        if Q is None:
            return p.detach()
        return torch.zeros(Q.shape[1], p.numel() // p.shape[0], dtype=p.dtype, device=p.device)

    def value(self, name: str, p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The parameter value for the forward pass given the variable ``v``."""
        Q = self.basis.get(name)
        if Q is None:
            return v
        return p.detach() + (Q @ v).reshape(p.shape)

    def flatten(self, name: str, jac: torch.Tensor) -> torch.Tensor:
        """``jac`` (B, O, *variable shape) → (B, O, dims[name]), times ``√lr_mult``."""
        jac = jac.reshape(jac.shape[0], jac.shape[1], -1)
        s = self.scale[name]
        return jac if s == 1.0 else jac * s


def _jacobian_fn(
    model: nn.Module,
    outputs: str,
    n_out: int,
    frozen: dict[str, torch.Tensor],
    params: dict[str, torch.Tensor],
    gmap: _GradientMap,
):
    from torch.func import functional_call

    norm = 1.0 / math.sqrt(n_out)

    def f(block: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        values = {n: gmap.value(n, params[n], v) for n, v in block.items()}
        out = functional_call(model, {**frozen, **values}, (x.unsqueeze(0),))
        if isinstance(out, (tuple, list)):
            raise TypeError("the model must return one tensor of outputs (batch × O)")
        out = out.reshape(-1)
        return out.sum(0, keepdim=True) * norm if outputs == "sum" else out

    return f


def _per_example_jacobian(model, names, params, gmap, x, outputs, n_out, state) -> dict[str, torch.Tensor]:
    """``{name: (B, O', *variable shape)}`` per-example Jacobians of the parameters ``names``."""
    from torch.func import jacrev, vmap

    block = {n: gmap.variable(n, params[n]) for n in names}
    # the other parameters enter as constants (no autograd graph through them)
    frozen = {n: p.detach() for n, p in params.items() if n not in block}
    jf = jacrev(_jacobian_fn(model, outputs, n_out, frozen, params, gmap))
    if not state.get("no_vmap"):
        try:
            return vmap(jf, in_dims=(None, 0))(block, x)
        except RuntimeError as e:
            msg = str(e)
            if "vmap" not in msg and "data-dependent" not in msg and "Batching rule" not in msg:
                raise
            state["no_vmap"] = True
            warnings.warn(
                f"{type(model).__name__} does not run under torch.func.vmap ({msg.splitlines()[0][:120]}); "
                "computing per-example gradients one example at a time (slower)",
                RuntimeWarning,
            )
    rows = [jf(block, x[i]) for i in range(x.shape[0])]
    return {n: torch.stack([r[n] for r in rows]) for n in names}


def _model_outputs(model: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad():
        out = model(x[:1])
    if isinstance(out, (tuple, list)):
        raise TypeError("the model must return one tensor of outputs (batch × O)")
    return int(out[0].numel())


# ----------------------------------------------------------------------------- features
@dataclass
class Features:
    """Per-example projected gradients ``φ`` (N × O × K) and what they were computed from.

    ``array`` is a ``numpy.memmap`` when computed with a ``path`` (else an ndarray);
    ``done`` marks the finished example chunks; ``meta`` records the settings.
    """

    array: np.ndarray
    meta: dict
    done: np.ndarray
    path: Path | None = None
    chunk_size: int = 0

    @property
    def complete(self) -> bool:
        return bool(np.all(self.done))

    @property
    def missing_chunks(self) -> int:
        return int((~np.asarray(self.done, dtype=bool)).sum())

    @property
    def outputs(self) -> str:
        return self.meta["outputs"]

    def __len__(self) -> int:
        return self.array.shape[0]

    @property
    def shape(self) -> tuple:
        return tuple(self.array.shape)


def _settings(
    model,
    X,
    params,
    gmap,
    blocks,
    proj_dim,
    proj_type,
    seed,
    outputs,
    n_out,
    dtype,
    K,
    projector_kinds,
    lr_fingerprint,
) -> dict:
    return {
        "format": _FORMAT_VERSION,
        "N": int(len(X)),
        "O": int(1 if outputs == "sum" else n_out),
        "n_outputs": int(n_out),
        "K": int(K),
        "proj_dim": proj_dim,
        "proj_type": proj_type,
        "seed": int(seed),
        "outputs": outputs,
        "dtype": str(dtype).replace("torch.", ""),
        "params": [[n, list(params[n].shape), gmap.dims[n], n in gmap.basis] for n in params],
        "blocks": blocks,
        "projectors": projector_kinds,
        "lr_mults": lr_fingerprint,
        "model": _fingerprint_tensors([*params.values(), *model.buffers()]),
        "data": _fingerprint_data(X),
    }


def pntk_features(
    model: nn.Module,
    X,
    proj_dim: int | None = 1024,
    *,
    path: str | os.PathLike | None = None,
    proj_type: str = "sparse",
    seed: int = 0,
    outputs: str = "all",
    pi_project: bool = True,
    proj_nnz: int = 1,
    lr_mults=None,
    base_lr: float | None = None,
    chunk_size: int | None = None,
    block_numel: int = 2**22,
    memory_bytes: int = 256 * 2**20,
    proj_memory: int = 512 * 2**20,
    max_chunks: int | None = None,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
    progress: bool = False,
) -> Features:
    """Projected per-example gradients ``φ(x) = J(x) R`` of ``model`` on ``X`` (N × O × K).

    Args:
        model: any module mapping a batch ``X[i:j]`` to outputs (batch × O); no batch
            statistics (it runs in eval mode). Infinite π-nets: use ``inf_ntk``.
        X: inputs (tensor or array, e.g. a ``numpy.memmap``), indexed along dim 0.
        proj_dim: K, the projection dimension; None keeps the exact Jacobian (K = P).
        path: a folder for the memory-mapped features (``features.npy``, ``done.npy``,
            ``meta.json``); a second call with the same arguments fills what is missing.
        proj_type: ``"sparse"`` (default: a CountSketch, :class:`inf.analysis.projectors.SparseJLProjector`,
            O(P) work per example and no P × K matrix), or TRAK's dense projections with
            ``"rademacher"`` or ``"normal"`` entries (then scaled by K^-½).
        seed: fixes the random projection. Kernels need both feature sets made with the
            same projection: :func:`ntk_from_features` refuses to combine others.
        proj_nnz: non-zeros per column of the sparse projection (``proj_type="sparse"``).
        outputs: ``"all"`` (O rows per example: full, trace and pseudo kernels) or
            ``"sum"`` (one row, ``∇(Σ_k f_k)/√O``: the pseudo-NTK only).
        pi_project: use ``Qᵀ G`` for finite π-weights (module docstring).
        lr_mults, base_lr: per-parameter learning-rate multipliers (:func:`resolve_lr_mults`).
        chunk_size: examples per chunk (default from ``memory_bytes``).
        block_numel: parameters per Jacobian block (a larger single tensor is its own block).
        memory_bytes: budget for one chunk × block of per-example Jacobians.
        proj_memory: budget for the dense random matrices (P × K numbers in all). Within
            it they are generated once and kept; beyond it each projector regenerates its
            matrix in column blocks for every chunk. TRAK seeds each column block
            separately, so a different ``proj_memory`` (hence block size) gives a
            *different* random matrix — another unbiased estimate, not the same numbers
            (about 6% apart at K = 64) — and features made with different block sizes are
            not combined. The sparse projection does not depend on it.
        max_chunks: compute at most this many missing chunks in this call (then return;
            ``Features.complete`` tells whether everything is there).
        overwrite: discard an existing file computed from something else.
        dtype: storage dtype (default float32; float64 for a float64 model).
    """
    if outputs not in ("all", "sum"):
        raise ValueError(f"outputs must be 'all' or 'sum', got {outputs!r}")
    if proj_dim is not None and (
        not isinstance(proj_dim, (int, np.integer)) or isinstance(proj_dim, bool) or proj_dim <= 0
    ):
        raise ValueError(f"proj_dim (K) must be a positive integer or None (exact), got {proj_dim!r}")
    if len(X) == 0:
        raise ValueError("X is empty")
    params = trainable_parameters(model)
    first = next(iter(params.values()))
    device, pdtype = first.device, first.dtype
    if dtype is None:
        dtype = torch.float64 if pdtype == torch.float64 else torch.float32
    mults = resolve_lr_mults(model, lr_mults, base_lr)
    gmap = _GradientMap(params, pi_project, mults)
    x0 = _as_tensor(X[:1], device, pdtype)
    with _vmap_friendly(model):
        n_out = _model_outputs(model, x0)
    O = 1 if outputs == "sum" else n_out
    blocks = _plan_blocks(params, gmap.dims, block_numel)
    P = sum(gmap.dims.values())
    K = P if proj_dim is None else int(proj_dim)
    itemsize = torch.empty((), dtype=pdtype).element_size()

    _check_proj_type(proj_type)
    # dense: one TRAK projector per block, with its own seed (their stack is one P × K
    # matrix), the memory budget shared in proportion to the block sizes; sparse: one
    # projector over all P coordinates, each block at its offset
    dims = [sum(gmap.dims[n] for n in names) for names in blocks]
    budgets = [max(1, int(proj_memory * d / P)) for d in dims]
    kinds = []
    if proj_dim is not None and proj_type == "sparse":
        from .projectors import SparseJLProjector

        kinds = [SparseJLProjector(P, K, seed, nnz=proj_nnz).layout()]
    elif proj_dim is not None:
        for d, budget in zip(dims, budgets):
            kind, block = _projector_plan(d, K, device, pdtype, budget)
            kinds.append(kind if kind == "cuda" else f"basic(block={block})")
    lr_fp = sorted([n, mults[id(p)]] for n, p in params.items() if id(p) in mults)
    meta = _settings(
        model, X, params, gmap, blocks, proj_dim, proj_type, seed, outputs, n_out, dtype, K, kinds, lr_fp
    )
    if chunk_size is None:
        # vmap materialises the raw gradient of a block (π-weights included) per example and output
        biggest = max(sum(params[n].numel() for n in names) for names in blocks)
        per_example = max(1, 2 * n_out * biggest * itemsize + O * K * itemsize)
        chunk_size = int(max(1, min(len(X), 1024, memory_bytes // per_example)))
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    np_dtype = np.dtype(str(dtype).replace("torch.", ""))
    N = len(X)

    feats = _open_store(path, meta, (N, O, K), np_dtype, chunk_size, overwrite)
    chunk_size = feats.chunk_size
    todo = [i for i in range(len(feats.done)) if not feats.done[i]]
    if max_chunks is not None:
        todo = todo[: max(0, int(max_chunks))]
    if todo:
        projectors = []
        if proj_dim is not None and proj_type == "sparse":
            projectors = [make_projector(P, K, seed, "sparse", device, pdtype, nnz=proj_nnz)[0]]
        elif proj_dim is not None:
            projectors = [
                make_projector(d, K, seed + 10_000_019 * b, proj_type, device, pdtype, budget)[0]
                for b, (d, budget) in enumerate(zip(dims, budgets))
            ]
        bar = _progress(todo, progress, "pNTK features")
        state: dict[str, Any] = {}
        with _vmap_friendly(model):
            for i in bar:
                lo, hi = i * chunk_size, min(N, (i + 1) * chunk_size)
                x = _as_tensor(X[lo:hi], device, pdtype)
                if x.is_floating_point() and not torch.isfinite(x).all():
                    raise ValueError(f"X[{lo}:{hi}] contains NaN or inf")
                phi = _project_chunk(model, params, gmap, blocks, projectors, x, outputs, n_out, K, state)
                feats.array[lo:hi] = phi.detach().to(dtype).cpu().numpy()
                if isinstance(feats.array, np.memmap):
                    feats.array.flush()
                feats.done[i] = True
                if isinstance(feats.done, np.memmap):
                    feats.done.flush()
    return feats


def _project_chunk(model, params, gmap, blocks, projectors, x, outputs, n_out, K, state) -> torch.Tensor:
    from .projectors import SparseJLProjector

    B = x.shape[0]
    O = 1 if outputs == "sum" else n_out
    sparse = len(projectors) == 1 and isinstance(projectors[0], SparseJLProjector)
    pieces = []
    out = None
    offset = 0
    for b, names in enumerate(blocks):
        jac = _per_example_jacobian(model, names, params, gmap, x, outputs, n_out, state)
        flat = torch.cat([gmap.flatten(n, jac[n]) for n in names], dim=2).detach()  # (B, O, P_b)
        del jac
        if not projectors:
            pieces.append(flat)
            continue
        if sparse:  # unit-scaled sketch, accumulated block by block at the block's offset
            out = projectors[0].sketch_block(flat.reshape(B * O, -1), offset, out)
            offset += flat.shape[2]
            continue
        sketch = projectors[b].project(flat.reshape(B * O, -1).contiguous(), model_id=0)
        out = sketch if out is None else out + sketch
    if not projectors:
        return torch.cat(pieces, dim=2)
    return out.reshape(B, O, K) if sparse else out.reshape(B, O, K) / math.sqrt(K)


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, leave=False)


def _open_store(path, meta: dict, shape: tuple, np_dtype, chunk_size: int, overwrite: bool) -> Features:
    n_chunks = -(-shape[0] // chunk_size)
    if path is None:
        return Features(
            np.zeros(shape, dtype=np_dtype), meta, np.zeros(n_chunks, dtype=bool), None, chunk_size
        )
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    meta_file, feat_file, done_file = path / "meta.json", path / "features.npy", path / "done.npy"
    if meta_file.exists() and not overwrite:
        stored = json.loads(meta_file.read_text())
        diff = [k for k in meta if stored.get("settings", {}).get(k) != json.loads(json.dumps(meta[k]))]
        if diff:
            raise ValueError(
                f"{path} holds features computed with different {', '.join(diff)}: "
                "pass overwrite=True or another path"
            )
        chunk_size = int(stored["chunk_size"])
        array = np.load(feat_file, mmap_mode="r+")
        done = np.load(done_file, mmap_mode="r+")
        if array.shape != shape or done.shape != (-(-shape[0] // chunk_size),):
            raise ValueError(
                f"{path}: stored arrays have unexpected shapes {array.shape}, {done.shape}; "
                "the folder is corrupt: pass overwrite=True"
            )
        return Features(array, meta, done, path, chunk_size)
    for f in (meta_file, feat_file, done_file):
        if f.exists():
            f.unlink()
    array = np.lib.format.open_memmap(feat_file, mode="w+", dtype=np_dtype, shape=shape)
    done = np.lib.format.open_memmap(done_file, mode="w+", dtype=bool, shape=(n_chunks,))
    done[:] = False
    done.flush()
    # the meta file is written last: its presence means the arrays exist
    meta_file.write_text(json.dumps({"settings": meta, "chunk_size": chunk_size}, indent=1))
    return Features(array, meta, done, path, chunk_size)


def empirical_ntk(model: nn.Module, X, Y=None, kind: str = "full", **kw) -> torch.Tensor:
    """The exact empirical NTK between ``X`` and ``Y`` (default ``X``) of a small model
    (no projection; ``pi_project``, ``lr_mults`` as in :func:`pntk_features`)."""
    return pntk(model, X, Y, proj_dim=None, kind=kind, **kw)


def exact_ntk(
    model: nn.Module,
    X,
    Y=None,
    kind: str = "trace",
    *,
    pi_project: bool = True,
    lr_mults=None,
    base_lr: float | None = None,
    chunk_size: int = 64,
    memory_bytes: int = 128 * 2**20,
    dtype: torch.dtype = torch.float64,
    progress: bool = False,
) -> torch.Tensor:
    """The exact empirical NTK between ``X`` and ``Y`` (default ``X``), computed parameter by
    parameter (and in coordinate slices of large parameters), so that only one slice of
    the Jacobian — ``(N + M) · O · slice`` numbers, within ``memory_bytes`` — is held:
    ``Θ = Σ_slices J_s(X) J_s(Y)ᵀ``. Slower than ``empirical_ntk`` (a slice's Jacobian is
    recomputed for each slice of its parameter) but it scales to models whose whole
    Jacobian does not fit. ``kind``, ``pi_project``, ``lr_mults`` as in :func:`pntk_features`.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if Y is not None:
        _check_compatible_inputs(X, Y)
    params = trainable_parameters(model)
    first = next(iter(params.values()))
    device, pdtype = first.device, first.dtype
    gmap = _GradientMap(params, pi_project, resolve_lr_mults(model, lr_mults, base_lr))
    sets = [X] if Y is None else [X, Y]
    with _vmap_friendly(model):
        n_out = _model_outputs(model, _as_tensor(X[:1], device, pdtype))
    outputs = "sum" if kind == "pseudo" else "all"
    O = 1 if outputs == "sum" else n_out
    rows = sum(len(S) for S in sets)
    slice_len = max(1, int(memory_bytes // max(1, rows * O * torch.empty((), dtype=dtype).element_size())))
    N, M = len(X), len(sets[-1])
    out = torch.zeros((N, M, O, O) if kind == "full" else (N, M), dtype=dtype)
    work = [(name, lo) for name in params for lo in range(0, gmap.dims[name], slice_len)]
    state: dict[str, Any] = {}
    with _vmap_friendly(model):
        for name, lo in _progress(work, progress, "exact NTK slices"):
            hi = min(gmap.dims[name], lo + slice_len)
            feats = []
            for S in sets:
                F = torch.empty(len(S), O, hi - lo, dtype=dtype)
                for a in range(0, len(S), chunk_size):
                    x = _as_tensor(S[a : a + chunk_size], device, pdtype)
                    jac = _per_example_jacobian(model, [name], params, gmap, x, outputs, n_out, state)
                    F[a : a + x.shape[0]] = (
                        gmap.flatten(name, jac[name])[:, :, lo:hi].detach().to("cpu", dtype)
                    )
                feats.append(F)
            FX, FY = feats[0], feats[-1]
            if kind == "full":
                out += torch.einsum("nak,mbk->nmab", FX, FY)
            else:
                out += _reduce(FX, kind, outputs) @ _reduce(FY, kind, outputs).T
    return out


def pntk(model: nn.Module, X, Y=None, proj_dim: int | None = 1024, kind: str = "trace", **kw) -> torch.Tensor:
    """The projected NTK between ``X`` and ``Y`` (default ``X``) in memory (no file)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if Y is not None:
        _check_compatible_inputs(X, Y)
    kw.setdefault("outputs", "sum" if kind == "pseudo" else "all")
    FX = pntk_features(model, X, proj_dim, **kw)
    FY = FX if Y is None else pntk_features(model, Y, proj_dim, **kw)
    return ntk_from_features(FX, FY, kind=kind)


def _check_compatible_inputs(X, Y):
    if tuple(X.shape[1:]) != tuple(Y.shape[1:]):
        raise ValueError(
            f"the two data sets have different example shapes {tuple(X.shape[1:])} and {tuple(Y.shape[1:])}"
        )


# ----------------------------------------------------------------------------- kernels
# what fixes the random projection (and the meaning of a feature coordinate): features whose
# layouts differ are sketches with different matrices, and their inner products are noise
_LAYOUT_KEYS = (
    "seed",
    "proj_type",
    "proj_dim",
    "K",
    "model_id",
    "projectors",
    "blocks",
    "params",
    "lr_mults",
    "n_outputs",
)


def projection_layout(meta: dict) -> dict:
    """The settings of a feature set that fix its random projection (see :func:`ntk_from_features`)."""
    lay = {k: meta[k] for k in _LAYOUT_KEYS if k in meta and k != "blocks"}
    if meta.get("proj_type") in ("rademacher", "normal"):
        lay["blocks"] = meta.get("blocks")  # one TRAK projector (and seed) per block
    return json.loads(json.dumps(lay))


def load_features(path: str | os.PathLike) -> Features:
    """Stored features (a folder written by :func:`pntk_features` with ``path=``), read-only,
    without the model or the data they were computed from."""
    path = Path(path)
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        raise FileNotFoundError(
            f"{path} holds no stored features (no meta.json): give the folder that "
            "pntk_features(..., path=...) wrote"
        )
    stored = json.loads(meta_file.read_text())
    if "settings" not in stored or "chunk_size" not in stored:
        raise ValueError(f"{meta_file} is not a feature description written by pntk_features")
    array = np.load(path / "features.npy", mmap_mode="r")
    done = np.load(path / "done.npy", mmap_mode="r")
    meta = stored["settings"]
    if array.shape != (meta["N"], meta["O"], meta["K"]):
        raise ValueError(
            f"{path}: features.npy has shape {array.shape}, meta.json says "
            f"{(meta['N'], meta['O'], meta['K'])}; the folder is corrupt"
        )
    return Features(array, meta, done, path, int(stored["chunk_size"]))


def _features_array(F) -> tuple[Any, str | None, dict | None]:
    """``(array N × O × K, outputs or None, meta or None)`` of features, an array or a tensor."""
    if isinstance(F, Features):
        if not F.complete:
            raise ValueError(
                f"the features are incomplete ({F.missing_chunks} chunks missing): call "
                "pntk_features again with the same arguments to finish them"
            )
        return F.array, F.outputs, F.meta
    if isinstance(F, torch.Tensor):
        F = F.detach().cpu().numpy()
    F = np.asarray(F) if not isinstance(F, np.ndarray) else F
    if F.ndim == 2:
        F = F[:, None, :]
    if F.ndim != 3:
        raise ValueError(f"features must be N × O × K (or N × K), got shape {F.shape}")
    return F, None, None


def _check_pair(A, B, oa, ob, ma=None, mb=None):
    if A.shape[1:] != B.shape[1:]:
        raise ValueError(
            f"features of the two data sets do not match: {A.shape[1:]} vs {B.shape[1:]} "
            "(O × K); compute both with the same model, proj_dim, seed and outputs"
        )
    if oa is not None and ob is not None and oa != ob:
        raise ValueError(f"features computed with outputs={oa!r} and outputs={ob!r} cannot be combined")
    if ma is not None and mb is not None and ma is not mb:
        la, lb = projection_layout(ma), projection_layout(mb)
        diff = [k for k in _LAYOUT_KEYS if la.get(k) != lb.get(k)]
        if diff:
            shown = ", ".join(f"{k} {_short(la.get(k))} vs {_short(lb.get(k))}" for k in diff[:2])
            raise ValueError(
                f"cannot combine features made with different random projections ({shown}): their "
                "inner products estimate no kernel; compute both with the same proj_type, seed, "
                "proj_dim, proj_memory and model architecture"
            )


def _short(v) -> str:
    text = json.dumps(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _reduce(block: torch.Tensor, kind: str, outputs: str | None) -> torch.Tensor:
    """(n, O, K) → the per-example matrix whose Gram matrix is the kernel of ``kind``."""
    O = block.shape[1]
    if kind == "pseudo":
        if outputs == "sum" or O == 1:
            return block[:, 0]
        return block.sum(1) / math.sqrt(O)
    if outputs == "sum":
        raise ValueError(
            f"the {kind!r} kernel needs per-output features (outputs='all'); these hold only the "
            "gradient of the summed output (pseudo-NTK)"
        )
    return block.reshape(block.shape[0], -1)


def _pseudo_factor(kind: str, pseudo_scale: str, meta: dict | None, O: int) -> float:
    """C for the pseudo-NTK without its 1/C, else 1."""
    if pseudo_scale not in ("mean", "sum"):
        raise ValueError(
            f"pseudo_scale must be 'mean' (1/C, Mohamadi et al.) or 'sum' (no 1/C), got {pseudo_scale!r}"
        )
    if kind != "pseudo" or pseudo_scale == "mean":
        return 1.0
    C = meta.get("n_outputs") if meta is not None else (O if O > 1 else None)
    if not C:
        raise ValueError(
            "pseudo_scale='sum' needs the number of outputs C: pass Features that record it, or "
            "per-output features, not a bare N × K array"
        )
    return float(C)


LARGE_KERNEL = 2**24  # entries beyond which kernels default to float32 (4096 × 4096 in float64: 128 MiB)


def _kernel_dtype(dtype, numel: int) -> torch.dtype:
    if dtype is not None:
        return dtype
    return torch.float64 if numel <= LARGE_KERNEL else torch.float32


def ntk_from_features(
    FA,
    FB=None,
    kind: str = "trace",
    block_size: int = 2048,
    dtype: torch.dtype | None = None,
    normalize: bool = False,
    pseudo_scale: str = "mean",
) -> torch.Tensor:
    """The kernel between two feature sets (N × O × K and M × O × K), blockwise.

    ``kind``: ``"full"`` (N, M, O, O), ``"trace"`` (N, M) or ``"pseudo"`` (N, M); see the
    module docstring. Accepts :class:`Features`, arrays or tensors; memmaps are read one
    block of rows at a time.

    Args:
        normalize: the cosine kernel ``k(x, x') / √(k(x, x) k(x', x'))`` (trace and pseudo),
            the form the projection-NTK paper uses before every kernel method.
        pseudo_scale: ``"mean"`` — the pseudo-NTK with its 1/C (Mohamadi et al.), or
            ``"sum"`` — ``⟨∇Σ_c f_c, ∇Σ_c f_c⟩`` without it (the fork's pNTK task); C times
            larger, the same after ``normalize``.
        dtype: float64 when the result has at most :data:`LARGE_KERNEL` entries, else
            float32 (a 50k × 50k float64 kernel is 20 GB).

    Feature sets made with different random projections (seed, projector, K, block layout,
    parameter layout, learning-rate multipliers; TRAK checkpoint ids whose projector
    depends on them) are refused: their inner products estimate nothing.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if normalize and kind == "full":
        raise ValueError("normalize=True (cosine kernel) is defined for kind 'trace' or 'pseudo'")
    A, oa, ma = _features_array(FA)
    B, ob, mb = (A, oa, ma) if FB is None else _features_array(FB)
    _check_pair(A, B, oa, ob, ma, mb)
    outputs = oa or ob
    N, M, O = A.shape[0], B.shape[0], A.shape[1]
    factor = _pseudo_factor(kind, pseudo_scale, ma or mb, O)
    if kind == "full":
        if outputs == "sum":
            raise ValueError("the 'full' kernel needs per-output features (outputs='all')")
        dtype = _kernel_dtype(dtype, N * M * O * O)
        out = torch.empty(N, M, O, O, dtype=dtype)
    else:
        dtype = _kernel_dtype(dtype, N * M)
        out = torch.empty(N, M, dtype=dtype)
    for i in range(0, N, block_size):
        a = torch.from_numpy(np.array(A[i : i + block_size])).to(dtype)
        for j in range(0, M, block_size):
            b = a if (FB is None and i == j) else torch.from_numpy(np.array(B[j : j + block_size])).to(dtype)
            if kind == "full":
                out[i : i + a.shape[0], j : j + b.shape[0]] = torch.einsum("nak,mbk->nmab", a, b)
            else:
                out[i : i + a.shape[0], j : j + b.shape[0]] = (
                    _reduce(a, kind, outputs) @ _reduce(b, kind, outputs).T
                )
    if normalize:
        da = kernel_diagonal(FA, kind, dtype=dtype)
        db = da if FB is None else kernel_diagonal(FB, kind, dtype=dtype)
        out /= torch.sqrt(da[:, None].clamp_min(1e-300) * db[None, :].clamp_min(1e-300))
    elif factor != 1.0:
        out *= factor
    return out


def kernel_diagonal(
    F, kind: str = "trace", block_size: int = 4096, dtype=torch.float64, pseudo_scale: str = "mean"
) -> torch.Tensor:
    """``k(x, x)`` for every example of a feature set (``kind`` trace or pseudo)."""
    if kind not in ("trace", "pseudo"):
        raise ValueError(f"kernel_diagonal supports kind 'trace' or 'pseudo', got {kind!r}")
    A, oa, ma = _features_array(F)
    factor = _pseudo_factor(kind, pseudo_scale, ma, A.shape[1])
    parts = []
    for i in range(0, A.shape[0], block_size):
        r = _reduce(torch.from_numpy(np.array(A[i : i + block_size])).to(dtype), kind, oa)
        parts.append((r * r).sum(1))
    d = torch.cat(parts)
    return d * factor if factor != 1.0 else d


def cosine_normalize(
    kernel: torch.Tensor, diag_rows: torch.Tensor, diag_cols: torch.Tensor | None = None
) -> torch.Tensor:
    """``k(x, x') / √(k(x, x) k(x', x'))`` of a precomputed kernel, given its diagonals."""
    diag_cols = diag_rows if diag_cols is None else diag_cols
    k = torch.as_tensor(kernel)
    dr = torch.as_tensor(diag_rows, dtype=k.dtype)
    dc = torch.as_tensor(diag_cols, dtype=k.dtype)
    if k.ndim != 2 or dr.shape != (k.shape[0],) or dc.shape != (k.shape[1],):
        raise ValueError(
            f"kernel {tuple(k.shape)} and diagonals {tuple(dr.shape)}, {tuple(dc.shape)} do not match"
        )
    return k / torch.sqrt(dr[:, None].clamp_min(1e-300) * dc[None, :].clamp_min(1e-300))


def ntk_over_checkpoints(
    FAs: Sequence, FBs: Sequence | None = None, kind: str = "trace", **kw
) -> torch.Tensor:
    """The mean over checkpoints of the kernels of matching feature sets (``FAs[i]`` with
    ``FBs[i]``, each pair made at one checkpoint); keywords as :func:`ntk_from_features`
    (with ``normalize`` each checkpoint's kernel is normalised before averaging)."""
    FAs = list(FAs)
    FBs = [None] * len(FAs) if FBs is None else list(FBs)
    if not FAs or len(FAs) != len(FBs):
        raise ValueError(f"need one feature set per checkpoint on each side, got {len(FAs)} and {len(FBs)}")
    total = None
    for FA, FB in zip(FAs, FBs):
        k = ntk_from_features(FA, FB, kind=kind, **kw)
        total = k if total is None else total.add_(k)
    return total / len(FAs)


def topk_similar(
    F_test,
    F_train=None,
    k: int = 8,
    kind: str = "trace",
    normalize: bool = True,
    kernel: torch.Tensor | None = None,
    block_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each test example, the ``k`` training examples with the largest kernel value.

    Either from features (``F_test``, ``F_train``) or from a precomputed test × train
    ``kernel`` (then give ``F_test=None``). With ``normalize`` the similarity is the
    cosine ``k(x, x') / sqrt(k(x, x) k(x', x'))`` (needs features, or a kernel with the
    diagonals passed as ``(kernel, diag_test, diag_train)``). Returns ``(values,
    indices)``, each (N_test, k), most similar first.
    """
    if not isinstance(k, int) or k <= 0:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if kernel is not None:
        diag_test = diag_train = None
        if isinstance(kernel, (tuple, list)):
            kernel, diag_test, diag_train = kernel
        kernel = torch.as_tensor(kernel, dtype=torch.float64)
        if k > kernel.shape[1]:
            raise ValueError(f"k={k} exceeds the number of training examples {kernel.shape[1]}")
        sim = kernel
        if normalize:
            if diag_test is None:
                raise ValueError("normalize=True with a kernel needs (kernel, diag_test, diag_train)")
            sim = kernel / torch.sqrt(
                torch.as_tensor(diag_test, dtype=torch.float64)[:, None].clamp_min(1e-300)
                * torch.as_tensor(diag_train, dtype=torch.float64)[None, :].clamp_min(1e-300)
            )
        return torch.topk(sim, k, dim=1)
    if F_train is None:
        raise ValueError("topk_similar needs training features (or a kernel)")
    A, oa, ma = _features_array(F_test)
    B, ob, mb = _features_array(F_train)
    _check_pair(A, B, oa, ob, ma, mb)
    if k > B.shape[0]:
        raise ValueError(f"k={k} exceeds the number of training examples {B.shape[0]}")
    dtrain = kernel_diagonal(F_train, kind) if normalize else None
    vals, idxs = [], []
    for i in range(0, A.shape[0], block_size):
        Fa = A[i : i + block_size]
        K = ntk_from_features(Fa, F_train, kind=kind, block_size=block_size)
        if normalize:
            da = kernel_diagonal(Fa, kind)
            K = K / torch.sqrt(da[:, None].clamp_min(1e-300) * dtrain[None, :].clamp_min(1e-300))
        v, ix = torch.topk(K, k, dim=1)
        vals.append(v)
        idxs.append(ix)
    return torch.cat(vals), torch.cat(idxs)


def _to_image(img) -> np.ndarray:
    a = img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
    if a.ndim == 1:
        side = int(round(math.sqrt(a.size)))
        a = a.reshape(side, side) if side * side == a.size else a[None, :]
    if a.ndim == 3 and a.shape[0] in (1, 3):
        a = np.moveaxis(a, 0, -1)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    a = a.astype(np.float64)
    lo, hi = a.min(), a.max()
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def save_topk_grid(
    path,
    test_images,
    train_images,
    indices,
    values=None,
    test_labels=None,
    train_labels=None,
    class_names: Sequence[str] | None = None,
    dpi: int | None = None,
    title: str | None = None,
) -> Path:
    """A PNG grid: one row per test example (first column), then its most similar training
    examples (``indices`` from :func:`topk_similar`), captioned with label and similarity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    indices = torch.as_tensor(indices)
    n, k = indices.shape
    if len(test_images) < n:
        raise ValueError(f"{n} rows of indices but only {len(test_images)} test images")

    def name(y):
        if y is None:
            return ""
        y = int(y)
        return class_names[y] if class_names is not None else str(y)

    fig, axes = plt.subplots(n, k + 1, figsize=(1.5 * (k + 1), 1.7 * n), squeeze=False)
    if dpi is None:  # at least 1200 pixels wide
        dpi = max(60, math.ceil(1200 / (1.5 * (k + 1))))
    for i in range(n):
        ax = axes[i, 0]
        ax.imshow(_to_image(test_images[i]), cmap="gray", interpolation="nearest")
        ax.set_title(f"test {name(None if test_labels is None else test_labels[i])}", fontsize=11, color="C3")
        for j in range(k):
            t = int(indices[i, j])
            ax = axes[i, j + 1]
            ax.imshow(_to_image(train_images[t]), cmap="gray", interpolation="nearest")
            cap = name(None if train_labels is None else train_labels[t])
            if values is not None:
                cap = f"{cap} {float(values[i, j]):.2f}".strip()
            ax.set_title(cap, fontsize=11)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=13)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- surrogate
class KernelSurrogate:
    """A kernel model fitted on a (train × train) kernel, to compare with the network.

    ``method="logistic"``: multinomial logistic regression whose features are the kernel
    rows ``k(x, X_train)`` (scaled by the mean training diagonal), L2 penalty ``reg``.
    ``method="ridge"``: kernel ridge regression on centred one-hot targets,
    ``α = (K + reg·mean(diag K)·I)⁻¹ Y``; probabilities are the softmax of ``k(x, X) α / T``
    with the temperature ``T`` fitted by maximum likelihood on the training set.
    ``method="svm"``: the kernel SVM of the projection-NTK paper (kSVM; scikit-learn's
    ``SVC(kernel="precomputed")``, ``C = 1/reg``, one-vs-rest decision values); its
    probabilities are the softmax of the decision values with a temperature fitted by
    maximum likelihood on the training set (the fork's Platt scaling, ``probability=True``,
    is deprecated in scikit-learn 1.9), and :meth:`predict` is the SVM's own decision.
    ``method="glm"``: its kernel GLM (kGLM): a linear model on the kernel rows with the
    logistic loss, L2 penalty ``alpha = reg`` and balanced class weights, fitted by SGD
    (scikit-learn's ``SGDClassifier(loss="log_loss")``, fixed ``random_state``).

    ``reg=None`` takes each method's default: 1e-3 (logistic, ridge), 1 (svm: C = 1, the
    fork's setting), 1e-4 (glm, the fork's alpha). The paper fits these on the cosine-
    normalised kernel (``ntk_from_features(..., normalize=True)``).
    """

    METHODS = ("logistic", "ridge", "svm", "glm")
    DEFAULT_REG = {"logistic": 1e-3, "ridge": 1e-3, "svm": 1.0, "glm": 1e-4}

    def __init__(
        self, method: str = "logistic", reg: float | None = None, max_iter: int = 2000, seed: int = 0
    ):
        if method not in self.METHODS:
            raise ValueError(f"method must be one of {self.METHODS}, got {method!r}")
        reg = self.DEFAULT_REG[method] if reg is None else reg
        if not reg > 0:
            raise ValueError(f"reg must be positive, got {reg}")
        self.method, self.reg, self.max_iter, self.seed = method, float(reg), max_iter, seed

    def fit(self, K_train: torch.Tensor, y: torch.Tensor, num_classes: int | None = None) -> KernelSurrogate:
        K = torch.as_tensor(K_train, dtype=torch.float64)
        y = torch.as_tensor(y).long()
        if K.ndim != 2 or K.shape[0] != K.shape[1]:
            raise ValueError(f"K_train must be a square train × train kernel, got shape {tuple(K.shape)}")
        if len(y) != K.shape[0]:
            raise ValueError(f"{len(y)} labels for a kernel on {K.shape[0]} examples")
        self.num_classes = int(num_classes or int(y.max()) + 1)
        self.scale = float(K.diagonal().mean().clamp_min(1e-300))
        if self.method == "logistic":
            from sklearn.linear_model import LogisticRegression

            self.model = LogisticRegression(C=1.0 / self.reg, max_iter=self.max_iter)
            self.model.fit((K / self.scale).numpy(), y.numpy())
        elif self.method == "svm":
            from sklearn.svm import SVC

            self.model = SVC(kernel="precomputed", C=1.0 / self.reg, decision_function_shape="ovr")
            self.model.fit((K / self.scale).numpy(), y.numpy())
            self.temperature = self._fit_temperature(self._svm_scores(K), y)
        elif self.method == "glm":
            from sklearn.linear_model import SGDClassifier

            self.model = SGDClassifier(
                loss="log_loss",
                penalty="l2",
                alpha=self.reg,
                class_weight="balanced",
                max_iter=self.max_iter,
                random_state=self.seed,
            )
            self.model.fit((K / self.scale).numpy(), y.numpy())
        else:
            Y = torch.nn.functional.one_hot(y, self.num_classes).double() - 1.0 / self.num_classes
            A = K + self.reg * self.scale * torch.eye(K.shape[0], dtype=K.dtype)
            self.alpha = torch.linalg.solve(A, Y)
            scores = K @ self.alpha
            self.temperature = self._fit_temperature(scores, y)
        return self

    @staticmethod
    def _fit_temperature(scores: torch.Tensor, y: torch.Tensor) -> float:
        from scipy.optimize import minimize_scalar

        def nll(log_t):
            logp = torch.log_softmax(scores / math.exp(log_t), dim=1)
            return float(-logp[torch.arange(len(y)), y].mean())

        res = minimize_scalar(nll, bounds=(-12.0, 6.0), method="bounded")
        return math.exp(res.x)

    def _svm_scores(self, K: torch.Tensor) -> torch.Tensor:
        """One-vs-rest decision values of the SVM, (n, num_classes) (absent classes: −inf)."""
        d = torch.from_numpy(
            np.asarray(self.model.decision_function((K / self.scale).numpy()), dtype=np.float64)
        )
        if d.ndim == 1:  # two classes: one signed margin
            d = torch.stack([-d, d], 1) / 2
        full = torch.full((d.shape[0], self.num_classes), -math.inf, dtype=torch.float64)
        full[:, torch.as_tensor(self.model.classes_)] = d
        return full

    def predict_proba(self, K_test: torch.Tensor) -> torch.Tensor:
        """Class probabilities from the test × train kernel."""
        K = torch.as_tensor(K_test, dtype=torch.float64)
        if self.method == "ridge":
            return torch.softmax(K @ self.alpha / self.temperature, dim=1)
        if self.method == "svm":
            return torch.softmax(self._svm_scores(K) / self.temperature, dim=1)
        p = self.model.predict_proba((K / self.scale).numpy())
        full = np.zeros((p.shape[0], self.num_classes))
        full[:, self.model.classes_] = p
        return torch.from_numpy(full)

    def predict(self, K_test: torch.Tensor) -> torch.Tensor:
        """Predicted classes (for the SVM its own decision, which can differ from the
        argmax of its Platt probabilities)."""
        if self.method == "svm":
            K = torch.as_tensor(K_test, dtype=torch.float64)
            return torch.from_numpy(self.model.predict((K / self.scale).numpy())).long()
        return self.predict_proba(K_test).argmax(1)


def misclassification_overlap(net_pred, surrogate_pred, labels) -> dict:
    """How much the test errors of two classifiers coincide.

    ``overlap``: |both wrong| / |either wrong| (the projection-NTK paper's Γ̂; 1 when the
    errors are the same examples, NaN when neither errs). ``p_value``: the probability of
    at least that many common errors if the surrogate's errors were a random subset of the
    test set of their size (hypergeometric; the fork approximates it by a binomial).
    """
    from scipy.stats import hypergeom

    y = torch.as_tensor(labels).long()
    wa = torch.as_tensor(net_pred).long() != y
    wb = torch.as_tensor(surrogate_pred).long() != y
    both, either = int((wa & wb).sum()), int((wa | wb).sum())
    N, W, V = len(y), int(wa.sum()), int(wb.sum())
    return {
        "net_errors": W,
        "surrogate_errors": V,
        "common_errors": both,
        "overlap": both / either if either else float("nan"),
        "p_value": float(hypergeom.sf(both - 1, N, W, V)) if W and V else float("nan"),
    }


def surrogate_agreement(
    net_logits: torch.Tensor,
    surrogate_proba: torch.Tensor,
    labels: torch.Tensor,
    surrogate_pred: torch.Tensor | None = None,
) -> dict:
    """How well a kernel surrogate matches the network on test data.

    Returns test accuracies of both, the fraction of equal predictions, Spearman and
    Kendall-τ rank correlations between the network's softmax probabilities and the
    surrogate's — over all (example, class) pairs, averaged per example, and of the
    true-class probability — and the overlap of their misclassified examples
    (:func:`misclassification_overlap`). ``surrogate_pred``: the surrogate's own class
    decisions when they are not the argmax of its probabilities (kSVM).
    """
    from scipy.stats import kendalltau, spearmanr

    p_net = torch.softmax(torch.as_tensor(net_logits, dtype=torch.float64), dim=1)
    p_sur = torch.as_tensor(surrogate_proba, dtype=torch.float64)
    y = torch.as_tensor(labels).long()
    if p_net.shape != p_sur.shape or len(y) != p_net.shape[0]:
        raise ValueError(
            f"shapes do not match: network {tuple(p_net.shape)}, surrogate {tuple(p_sur.shape)}, "
            f"labels {tuple(y.shape)}"
        )
    idx = torch.arange(len(y))
    pred_net = p_net.argmax(1)
    pred_sur = p_sur.argmax(1) if surrogate_pred is None else torch.as_tensor(surrogate_pred).long()

    def corr(fn, a: np.ndarray, b: np.ndarray) -> float:
        return float(fn(a, b).statistic) if np.ptp(a) > 0 and np.ptp(b) > 0 else float("nan")

    def per_example(fn) -> float:
        vals = [c for c in (corr(fn, a, b) for a, b in zip(p_net.numpy(), p_sur.numpy())) if not np.isnan(c)]
        return float(np.mean(vals)) if vals else float("nan")

    overlap = misclassification_overlap(pred_net, pred_sur, y)
    return {
        "n_test": int(len(y)),
        "net_accuracy": float((pred_net == y).double().mean()),
        "surrogate_accuracy": float((pred_sur == y).double().mean()),
        "prediction_agreement": float((pred_net == pred_sur).double().mean()),
        "spearman_all": corr(spearmanr, p_net.reshape(-1).numpy(), p_sur.reshape(-1).numpy()),
        "spearman_per_example": per_example(spearmanr),
        "spearman_true_class": corr(spearmanr, p_net[idx, y].numpy(), p_sur[idx, y].numpy()),
        "kendall_all": corr(kendalltau, p_net.reshape(-1).numpy(), p_sur.reshape(-1).numpy()),
        "kendall_per_example": per_example(kendalltau),
        "kendall_true_class": corr(kendalltau, p_net[idx, y].numpy(), p_sur[idx, y].numpy()),
        "misclassified_overlap": overlap["overlap"],
        "misclassified_overlap_p": overlap["p_value"],
        "net_errors": overlap["net_errors"],
        "surrogate_errors": overlap["surrogate_errors"],
        "common_errors": overlap["common_errors"],
    }

"""π-layers: infinite (rows) and finite (matrices sampled from rows).

A π-layer maps a preactivation to the next preactivation; the ReLU is inside
the layer, applied to its input (docs/math.md §3, §6). Alphas of the network (first-
and last-layer) are applied by the network, not the layers; the bias alpha
``β`` is applied inside: ``layer(g) = … + β b``.

=====================  ==========================================  =============================
layer                  infinite                                     finite (width n)
=====================  ==========================================  =============================
input                  ``x A + β b``                                ``W x + β b``, ``W = n^-½ Ω Aᵀ``
hidden                 ``s (F00(ĝ Bᵀ) ⊙ c) A + β b``                ``W φ(h) + β b``
output                 same rows, ``A`` starts at zero               ``W φ(h) + β b`` (not projected)
=====================  ==========================================  =============================
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .functional import BlockPolicy, auto_chunk_rows, inf_pi_linear_relu, pi_features
from .parameters import (
    FinPiParameter,
    attach_owner,
    orthonormal_basis,
    owner_of,
    project_onto_span_,
    projected_norm,
)
from .rows import RowStore

__all__ = [
    "InfPiInputLinearReLU",
    "InfPiLinearReLU",
    "FinPiInputLinearReLU",
    "FinPiLinearReLU",
    "orthonormal_basis",
    "set_gradient_projection",
    "project_gradient_",
]

# default memory budget for the batch × rows intermediates of one infinite layer
DEFAULT_CHUNK_BYTES = 256 * 2**20


def _check_input(x: torch.Tensor, width: int, name: str, what: str):
    if x.dim() < 1 or x.shape[-1] != width:
        raise ValueError(f"{name} expects inputs of shape (batch, {width}) ({what}), got {tuple(x.shape)}")


def _check_finite(x: torch.Tensor, name: str):
    if not torch.isfinite(x).all():
        raise ValueError(
            f"{name} received an input containing NaN or inf; check the data "
            "(and the learning rate, if this is a hidden layer)"
        )


class InfPiInputLinearReLU(nn.Module):
    """Input layer of an infinite π-net: ``g = x A + β b`` with ``A`` (d_in × r_out).

    Initialization: ``A`` Gaussian with unit-norm columns, ``b = 0``.
    """

    def __init__(
        self,
        d_in: int,
        r_out: int,
        bias_alpha: float = 1.0,
        layernorm: bool = False,
        device=None,
        dtype=None,
        check_finite: bool = True,
    ):
        super().__init__()
        self.d_in, self.r_out = d_in, r_out
        self.r = r_out
        self.bias_alpha = float(bias_alpha)
        self.layernorm = layernorm  # acts in the next layer; kept for sampling
        self.check_finite = check_finite
        self.A = nn.Parameter(torch.empty(d_in, r_out, device=device, dtype=dtype))
        if self.bias_alpha:
            self.bias = nn.Parameter(torch.zeros(r_out, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        self.A.normal_()
        self.A.div_(self.A.norm(dim=0, keepdim=True))
        if self.bias is not None:
            self.bias.zero_()

    def forward(self, x):
        _check_input(x, self.d_in, type(self).__name__, "d_in")
        if self.check_finite:
            _check_finite(x, type(self).__name__)
        out = x @ self.A
        if self.bias is not None:
            out = out + self.bias_alpha * self.bias
        return out

    def sample(self, n_in: int, n_out: int, prev_omega=None, generator=None) -> FinPiInputLinearReLU:
        """A finite input layer of width ``n_out`` whose output is ``≈ n^-½ Ω g`` (docs/math.md §6)."""
        return FinPiInputLinearReLU(
            n_in,
            n_out,
            self.r_out,
            bias_alpha=self.bias_alpha,
            layernorm=self.layernorm,
            inf_layer=self,
            generator=generator,
        )

    def extra_repr(self):
        return f"d_in={self.d_in}, r_out={self.r_out}, bias_alpha={self.bias_alpha}"


class InfPiLinearReLU(nn.Module):
    """Hidden or output layer of an infinite π-net, stored as rows ``(A, c, B)``.

    ``forward(g)`` is ``s (F00(ĝ Bᵀ) ⊙ c) A + β b`` (docs/math.md §3); backward records
    the gradient as rows that :class:`inf.optim.InfSGD` appends (docs/math.md §5).

    Args:
        r: input rank. r_out: output rank (the output size for the output layer).
        bias_alpha: β; 0 means no bias.
        output_layer: ``A`` starts at zero, so the network starts at output 0.
        layernorm: use ``s = 1`` and normalise the input (docs/math.md §3).
        chunk_rows: rows per chunk; ``None`` picks it from ``chunk_bytes``.
        chunk_bytes: memory budget of the batch × rows intermediates.
        policy: a :class:`~inf.functional.BlockPolicy` for this layer (None: the current one).
    """

    def __init__(
        self,
        r: int,
        r_out: int | None = None,
        bias_alpha: float = 1.0,
        output_layer: bool = False,
        layernorm: bool = False,
        chunk_rows: int | None = None,
        chunk_bytes: int | None = DEFAULT_CHUNK_BYTES,
        policy: BlockPolicy | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        r_out = r if r_out is None else r_out
        self.policy = policy
        self.r, self.r_out = r, r_out
        self.bias_alpha = float(bias_alpha)
        self.output_layer = output_layer
        self.layernorm = layernorm
        self.chunk_rows = chunk_rows
        self.chunk_bytes = chunk_bytes
        self.rows = RowStore(r, r_out, rows=r, device=device, dtype=dtype)
        if self.bias_alpha:
            self.bias = nn.Parameter(torch.zeros(r_out, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    @property
    def A(self):
        return self.rows.A

    @property
    def coefficients(self):
        return self.rows.coefficients

    @property
    def B(self):
        return self.rows.B

    @property
    def name(self) -> str:
        return self.rows.name

    @name.setter
    def name(self, value: str):
        self.rows.name = value

    @torch.no_grad()
    def reset_parameters(self):
        """``r`` initial rows: ``B`` unit Gaussian rows, ``A`` Gaussian with variance
        ``1/r_out`` (zero for the output layer), coefficients 1, bias 0."""
        A = torch.randn(self.r, self.r_out, device=self.A.device, dtype=torch.float64)
        A = A * (0.0 if self.output_layer else self.r_out**-0.5)
        B = F.normalize(torch.randn(self.r, self.r, device=self.B.device, dtype=torch.float64), dim=1)
        self.rows.set_rows(A, torch.ones(self.r, dtype=torch.float64), B)
        self.rows.discard()
        if self.bias is not None:
            self.bias.zero_()

    def _chunk_rows(self, batch: int, dtype) -> int | None:
        if self.chunk_rows:
            return self.chunk_rows
        return auto_chunk_rows(
            batch, self.rows.num_rows, self.chunk_bytes, itemsize=8 if dtype == torch.float64 else 4
        )

    def forward(self, g, return_hidden: bool = False):
        """``g`` (batch × r) → (batch × r_out); with ``return_hidden`` also ``(s, ĝ)``."""
        _check_input(g, self.r, f"{self.name} ({type(self).__name__})", "r")
        self.rows.check()
        lead = g.shape[:-1]
        g2 = g.reshape(-1, self.r)
        sharded = getattr(self.rows, "sharded", False)  # rows split over processes (inf.distributed)
        if sharded:
            g2 = self.rows.shard_input(g2)  # backward: sum of the partial input gradients
        out = inf_pi_linear_relu(
            g2,
            self.A,
            self.coefficients,
            self.B,
            self.rows.recording(),
            self.layernorm,
            self._chunk_rows(g2.shape[0], g2.dtype),
            self.policy,
        )
        if sharded:
            out = self.rows.shard_output(out)  # sum of the partial outputs, before the bias
        if self.bias is not None:
            out = out + (self.bias_alpha * self.bias).to(out.dtype)
        out = out.reshape(*lead, self.r_out)
        if return_hidden:
            return out, pi_features(g, self.layernorm)
        return out

    def sample(self, n_in: int, n_out: int, prev_omega=None, generator=None) -> FinPiLinearReLU:
        """A finite layer reading width ``n_in`` (docs/math.md §6); ``prev_omega`` is the previous
        layer's Ω (n_in × r), drawn fresh if not given."""
        return FinPiLinearReLU(
            n_in,
            n_out,
            self.r,
            bias_alpha=self.bias_alpha,
            output_layer=self.output_layer,
            layernorm=self.layernorm,
            inf_layer=self,
            prev_omega=prev_omega,
            generator=generator,
        )

    def extra_repr(self):
        kind = "output" if self.output_layer else "hidden"
        return (
            f"r={self.r}, r_out={self.r_out}, rows={self.rows.num_rows}, {kind}, "
            f"bias_alpha={self.bias_alpha}, layernorm={self.layernorm}"
        )


def _project_accumulated_grad(param: torch.Tensor) -> None:
    """Post-accumulate-grad hook of finite π-parameters: project ``.grad`` onto span(Ω), once
    per backward, so optimizers (InfSGD or torch's SGD) and clipping see the projected gradient."""
    layer = owner_of(param)
    if layer is not None and param.grad is not None and layer.projects(param):
        project_onto_span_(param.grad, layer.omega_basis)


class _FinPiLayer(nn.Module):
    """Shared parts of finite π-layers: Ω, its basis, and the gradient projection.

    The gradients of the layer's :class:`~inf.parameters.FinPiParameter` s are projected
    onto ``span(Ω)`` (docs/math.md §6) by a hook right after backward accumulates them.
    ``set_gradient_projection(layer, False)`` turns that off (the μP comparison).
    """

    projected = True

    def _init_omega(self, n: int, r: int, device, dtype, generator):
        omega = torch.randn(n, r, generator=generator, dtype=torch.float64)
        self.register_buffer("omega", omega.to(device=device, dtype=dtype))
        self.register_buffer("omega_basis", orthonormal_basis(omega).to(device=device, dtype=dtype))

    def _attach_pi_params(self):
        handles = getattr(self, "_projection_hooks", {})
        for handle in handles.values():
            handle.remove()
        self._projection_hooks = {}
        if not hasattr(self, "unprojected"):
            self.unprojected: set[str] = set()
        for name in ("weight", "bias"):
            p = self._parameters.get(name)
            if isinstance(p, FinPiParameter):
                attach_owner(p, self)
                self._projection_hooks[name] = p.register_post_accumulate_grad_hook(_project_accumulated_grad)

    def projects(self, param: torch.Tensor) -> bool:
        """Whether ``param``'s gradient is projected (a FinPiParameter of this layer, not switched off)."""
        return any(
            p is param
            for n, p in self._parameters.items()
            if isinstance(p, FinPiParameter) and n not in self.unprojected
        )

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_projection_hooks", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._attach_pi_params()

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._attach_pi_params()
        return self

    @torch.no_grad()
    def project_(self, grad: torch.Tensor) -> torch.Tensor:
        """Project ``grad`` (n × ·, or n) onto ``span(Ω)`` on its output side, in place
        (:func:`inf.parameters.project_onto_span_`)."""
        return project_onto_span_(grad, self.omega_basis)

    @torch.no_grad()
    def projected_norm(self, grad: torch.Tensor) -> torch.Tensor:
        """``|Q Qᵀ G|_F = |Qᵀ G|_F`` without forming the projection."""
        return projected_norm(grad, self.omega_basis)


def set_gradient_projection(module: nn.Module, enabled: bool, params=None) -> None:
    """Switch the gradient projection of finite π-layers in ``module`` on or off
    (``params``: only these parameters). Off turns a finite π-net into the paper's
    "no Gproj" variant."""
    wanted = None if params is None else {id(p) for p in params}
    for layer in module.modules() if isinstance(module, nn.Module) else module:
        if not isinstance(layer, _FinPiLayer):
            continue
        for name, p in layer._parameters.items():
            if isinstance(p, FinPiParameter) and (wanted is None or id(p) in wanted):
                if enabled:
                    layer.unprojected.discard(name)
                else:
                    layer.unprojected.add(name)


@torch.no_grad()
def project_gradient_(param: torch.Tensor, grad: torch.Tensor | None = None) -> torch.Tensor | None:
    """Project ``grad`` (default ``param.grad``) onto its layer's span(Ω), in place, if ``param``
    is a finite π-parameter whose layer projects it; returns the gradient. For gradients that
    backward did not accumulate (``torch.autograd.grad`` in MAML inner loops, per-example
    gradients of projected NTKs): accumulated ``.grad`` s are projected already."""
    grad = param.grad if grad is None else grad
    layer = owner_of(param) if isinstance(param, FinPiParameter) else None
    if grad is not None and isinstance(layer, _FinPiLayer) and layer.projects(param):
        project_onto_span_(grad, layer.omega_basis)
    return grad


class FinPiInputLinearReLU(_FinPiLayer):
    """Finite π input layer: ``h = W x + β b`` with ``W = n^-½ Ω A_0ᵀ``, ``b = n^-½ Ω b_0``."""

    def __init__(
        self,
        d_in: int,
        n_out: int,
        r: int,
        bias_alpha: float = 1.0,
        layernorm: bool = False,
        inf_layer: InfPiInputLinearReLU | None = None,
        device=None,
        dtype=None,
        generator=None,
        check_finite: bool = True,
    ):
        super().__init__()
        if inf_layer is not None:
            device = inf_layer.A.device if device is None else device
            dtype = inf_layer.A.dtype if dtype is None else dtype
        dtype = dtype or torch.get_default_dtype()
        self.d_in, self.n_out, self.r = d_in, n_out, r
        self.n_in = d_in
        self.bias_alpha = float(bias_alpha)
        self.layernorm = layernorm
        self.check_finite = check_finite
        self.weight = FinPiParameter(torch.zeros(n_out, d_in, device=device, dtype=dtype))
        if self.bias_alpha:
            self.bias = FinPiParameter(torch.zeros(n_out, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        self._init_omega(n_out, r, device, dtype, generator)
        self._attach_pi_params()
        self.reset_parameters(inf_layer)

    @torch.no_grad()
    def reset_parameters(self, inf_layer: InfPiInputLinearReLU | None = None):
        """Sample from ``inf_layer`` (a fresh random one if None), keeping this layer's Ω."""
        if inf_layer is None:
            inf_layer = InfPiInputLinearReLU(
                self.d_in, self.r, self.bias_alpha, device=self.omega.device, dtype=torch.float64
            )
        if inf_layer.A.shape != (self.d_in, self.r):
            raise ValueError(
                f"cannot sample a ({self.d_in} → {self.n_out}) finite layer of rank {self.r} "
                f"from an input layer with A of shape {tuple(inf_layer.A.shape)}"
            )
        omega = self.omega.double()
        scale = self.n_out**-0.5
        self.weight.copy_(scale * omega @ inf_layer.A.double().T)
        if self.bias is not None:
            self.bias.copy_(scale * omega @ inf_layer.bias.double())

    def forward(self, x):
        _check_input(x, self.d_in, type(self).__name__, "d_in")
        if self.check_finite:
            _check_finite(x, type(self).__name__)
        bias = None if self.bias is None else self.bias_alpha * self.bias
        return F.linear(x, self.weight, bias)

    def extra_repr(self):
        return f"d_in={self.d_in}, n_out={self.n_out}, r={self.r}, bias_alpha={self.bias_alpha}"


class FinPiLinearReLU(_FinPiLayer):
    """Finite π hidden/output layer: ``W φ(h) + β b`` (``h`` normalised first under layernorm).

    Sampled from an infinite layer ``(A, c, B, b)`` with the previous layer's
    ``Ω_prev`` (docs/math.md §6)::

        hidden: W = (n_in n_out)^-½ Ω (c⊙A)ᵀ φ(Ω_prev Bᵀ)ᵀ,   b = n_out^-½ Ω b_inf
        output: W = n_in^-½ (c⊙A)ᵀ φ(Ω_prev Bᵀ)ᵀ,           b = b_inf (not projected)

    (in a π-MLP n_in = n_out = n, so the hidden scale is docs/math.md §6's ``n^-1``).
    """

    def __init__(
        self,
        n_in: int,
        n_out: int,
        r: int,
        bias_alpha: float = 1.0,
        output_layer: bool = False,
        layernorm: bool = False,
        inf_layer: InfPiLinearReLU | None = None,
        prev_omega=None,
        device=None,
        dtype=None,
        generator=None,
    ):
        super().__init__()
        if inf_layer is not None:
            device = inf_layer.A.device if device is None else device
            dtype = (
                (inf_layer.A.dtype if inf_layer.A.dtype in (torch.float32, torch.float64) else torch.float32)
                if dtype is None
                else dtype
            )
        dtype = dtype or torch.get_default_dtype()
        self.n_in, self.n_out, self.r = n_in, n_out, r
        self.bias_alpha = float(bias_alpha)
        self.output_layer = output_layer
        self.layernorm = layernorm
        self.projected = not output_layer
        param = nn.Parameter if output_layer else FinPiParameter
        self.weight = param(torch.zeros(n_out, n_in, device=device, dtype=dtype))
        if self.bias_alpha:
            self.bias = param(torch.zeros(n_out, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        if prev_omega is None:
            prev_omega = torch.randn(n_in, r, generator=generator, dtype=torch.float64)
        if prev_omega.shape != (n_in, r):
            raise ValueError(f"prev_omega must be (n_in, r) = ({n_in}, {r}), got {tuple(prev_omega.shape)}")
        self.register_buffer("input_omega", prev_omega.to(device=device, dtype=dtype))
        if not output_layer:
            self._init_omega(n_out, r, device, dtype, generator)
        self._attach_pi_params()
        self.reset_parameters(inf_layer)

    @torch.no_grad()
    def reset_parameters(self, inf_layer: InfPiLinearReLU | None = None):
        """Sample from ``inf_layer`` (a fresh random one if None), keeping Ω and Ω_prev."""
        r_out = self.n_out if self.output_layer else self.r
        if inf_layer is None:
            inf_layer = InfPiLinearReLU(
                self.r,
                r_out,
                self.bias_alpha,
                output_layer=self.output_layer,
                device=self.input_omega.device,
                dtype=torch.float64,
            )
        if inf_layer.r != self.r or inf_layer.r_out != r_out:
            raise ValueError(
                f"cannot sample this layer (r={self.r}, r_out={r_out}) from an infinite layer "
                f"with r={inf_layer.r}, r_out={inf_layer.r_out}"
            )
        cA = inf_layer.coefficients.double()[:, None] * inf_layer.A.double()  # M × r_out
        features = torch.relu(self.input_omega.double() @ inf_layer.B.double().T)  # n_in × M
        if self.output_layer:
            self.weight.copy_(self.n_in**-0.5 * cA.T @ features.T)
            if self.bias is not None:
                self.bias.copy_(inf_layer.bias.double())
        else:
            omega = self.omega.double()
            self.weight.copy_((self.n_in * self.n_out) ** -0.5 * (omega @ cA.T) @ features.T)
            if self.bias is not None:
                self.bias.copy_(self.n_out**-0.5 * omega @ inf_layer.bias.double())

    def forward(self, h):
        _check_input(h, self.n_in, type(self).__name__, "n_in")
        if self.layernorm:
            h = h / h.norm(dim=-1, keepdim=True).clamp_min(1e-30)
        bias = None if self.bias is None else self.bias_alpha * self.bias
        return F.linear(torch.relu(h), self.weight, bias)

    def extra_repr(self):
        kind = "output" if self.output_layer else "hidden"
        return (
            f"n_in={self.n_in}, n_out={self.n_out}, r={self.r}, {kind}, "
            f"bias_alpha={self.bias_alpha}, layernorm={self.layernorm}"
        )

"""TrAct: training the first layer as if its activations were the parameters (docs/math.md §7).

TrAct (Petersen, Borgelt & Ermon, NeurIPS 2024) leaves the forward pass and
every gradient except one untouched: the weight gradient of the layer that
reads the raw input. For a linear map with a batch of inputs ``X`` (b × d),
output gradients ``G`` (b × n) and ``λ > 0`` it replaces ``Gᵀ X`` by::

    ∇W = Gᵀ X (XᵀX / b + λ I_d)⁻¹                        (direct, a d × d solve)
       = Gᵀ (X Xᵀ / b + λ I_b)⁻¹ X                       (Woodbury, a b × b solve)

The two lines are the same matrix (push-through identity); the second one is
used when ``b < d``. A convolution is the linear map applied to every patch,
so ``X`` holds the unfolded patches and ``b`` = batch × output positions; with
``groups > 1`` every group is its own linear map with its own ``XᵀX``.

The solve runs in float32 (float64 for float64 layers) whatever the input and
layer dtypes are (autocast, half, bfloat16); the gradient comes back in the
parameter's dtype.

:class:`TrAct` wraps a layer without taking it apart: it holds the very same
Parameter (and buffer) objects under the very same names, so state dicts of
the wrapped and the plain model are interchangeable, and ``unwrap()`` gives
the plain layer back.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TrAct", "tract_weight_grad", "SUPPORTED"]

SUPPORTED = (
    "torch.nn.Linear",
    "torch.nn.Conv1d",
    "torch.nn.Conv2d",
    "torch.nn.Conv3d",
    "inf.layers.InfPiInputLinearReLU",
    "inf.layers.FinPiInputLinearReLU",
)

_BRANCHES = ("auto", "direct", "woodbury")


class _DefaultLambda(float):
    """The default λ = 0.1, distinguishable by identity from a λ that was passed."""


_LAMBDA_DEFAULT = _DefaultLambda(0.1)


def _check_lambda(value) -> float:
    if isinstance(value, bool):
        raise TypeError(f"TrAct's λ must be a real number, got {value!r}")
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise TypeError(f"TrAct's λ must be a scalar, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    try:
        lam = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"TrAct's λ must be a real number, got {value!r}") from None
    if not math.isfinite(lam) or lam <= 0.0:
        raise ValueError(f"TrAct's λ must be finite and > 0, got {value!r}")
    return lam


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _spd_solve(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``A⁻¹ B`` for symmetric positive definite ``A`` (batched): Cholesky, or LU when
    rounding made ``A`` numerically indefinite (inputs of huge magnitude with a tiny λ)."""
    L, info = torch.linalg.cholesky_ex(A)
    if bool((info != 0).any()):
        return torch.linalg.solve(A, B)
    return torch.cholesky_solve(B, L)


def _direct_from_moments(XtX: torch.Tensor, R: torch.Tensor, b: int, lam: float) -> torch.Tensor:
    """``R (XtX/b + λI)⁻¹`` for ``XtX = XᵀX`` (…, d, d) and ``R = GᵀX`` (…, n, d)."""
    M = XtX / b
    M.diagonal(dim1=-2, dim2=-1).add_(lam)
    # R M⁻¹ = (M⁻¹ Rᵀ)ᵀ since M is symmetric
    return _spd_solve(M, R.transpose(-1, -2)).transpose(-1, -2)


def tract_weight_grad(X: torch.Tensor, G: torch.Tensor, lambda_: float, branch: str = "auto") -> torch.Tensor:
    """The TrAct weight gradient ``Gᵀ X (XᵀX/b + λI)⁻¹``.

    Args:
        X: inputs, (…, b, d); leading dims are independent problems (conv groups).
        G: output gradients, (…, b, n).
        lambda_: λ > 0.
        branch: ``"auto"`` (Woodbury when ``b < d``), ``"direct"`` or ``"woodbury"``.

    Returns:
        (…, n, d), in the dtype of ``X`` and ``G`` (which must agree; callers cast).
    """
    lam = _check_lambda(lambda_)
    branch = _resolve_branch(branch, X.shape[-2], X.shape[-1])
    b, d = X.shape[-2], X.shape[-1]
    if b == 0:
        return X.new_zeros(*X.shape[:-2], G.shape[-1], d)
    Xt = X.transpose(-1, -2)
    if branch == "direct":
        return _direct_from_moments(Xt @ X, G.transpose(-1, -2) @ X, b, lam)
    K = (X @ Xt) / b  # b × b
    K.diagonal(dim1=-2, dim2=-1).add_(lam)
    return _spd_solve(K, G).transpose(-1, -2) @ X  # (K⁻¹ G)ᵀ X


def _resolve_branch(branch: str, b: int, d: int) -> str:
    if branch not in _BRANCHES:
        raise ValueError(f"branch must be one of {_BRANCHES}, got {branch!r}")
    if branch == "auto":
        return "woodbury" if b < d else "direct"
    return branch


# --- how each kind of layer turns (input, output gradient) into (X, G) -------------

# elements of the per-chunk (samples × d_g × d_g) and (samples × n_g × d_g) products
# that the direct branch of a convolution sums over samples
_CONV_CHUNK_ELEMENTS = 2**22


class _Plan:
    """What backward needs to know about the layer, fixed at forward time."""

    __slots__ = ("kind", "lam", "branch", "wshape", "wdtype", "conv")

    def __init__(self, kind, lam, branch, weight, conv=None):
        self.kind, self.lam, self.branch = kind, lam, branch
        self.wshape, self.wdtype = weight.shape, weight.dtype
        self.conv = conv  # (nd, kernel, stride, dilation, padding list for F.pad, pad mode, groups)

    def weight_grad(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        cdt = _compute_dtype(self.wdtype)
        if self.kind == "conv":
            return _conv_weight_grad(x.to(cdt), g.to(cdt), self.conv, self.lam, self.branch, self.wshape).to(
                self.wdtype
            )
        if self.kind == "pi_inf":  # A is d × r: transpose
            d, r = self.wshape
            X, G = x.reshape(-1, d).to(cdt), g.reshape(-1, r).to(cdt)
            return tract_weight_grad(X, G, self.lam, self.branch).transpose(0, 1).to(self.wdtype)
        n, d = self.wshape  # linear, pi_fin
        X, G = x.reshape(-1, d).to(cdt), g.reshape(-1, n).to(cdt)
        return tract_weight_grad(X, G, self.lam, self.branch).to(self.wdtype)


def _conv_columns(x: torch.Tensor, spec) -> torch.Tensor:
    """Patches of a batched input as columns: (N, d, L), ``d`` ordered (channel, kernel
    offsets) like ``weight.reshape(n, -1)`` and ``L`` the output positions in row-major
    order, like ``grad_output.reshape(N, n, L)``."""
    nd, kernel, stride, dilation, pad, mode, groups = spec
    N = x.shape[0]
    symmetric_zero = mode == "constant" and all(pad[2 * i] == pad[2 * i + 1] for i in range(nd))
    if nd <= 2:  # torch's im2col, with a 1-D input seen as one row of pixels
        if symmetric_zero:
            padding = tuple(reversed(pad[0::2]))  # F.pad's list runs from the last dim
        else:
            x = F.pad(x, pad, mode=mode)
            padding = (0,) * nd
        if nd == 1:
            x = x.unsqueeze(2)
            kernel, stride, dilation, padding = ((1, *kernel), (1, *stride), (1, *dilation), (0, *padding))
        return F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
    if any(pad):
        x = F.pad(x, pad, mode=mode)
    for i in range(nd):  # sliding windows as a view: (N, C, L_1..L_nd, k_1..k_nd)
        x = x.unfold(2 + i, dilation[i] * (kernel[i] - 1) + 1, stride[i])
        if dilation[i] > 1:
            x = x[..., :: dilation[i]]
    perm = (0, 1, *range(2 + nd, 2 + 2 * nd), *range(2, 2 + nd))
    return x.permute(perm).reshape(N, -1, math.prod(x.shape[2 : 2 + nd]))


def _conv_weight_grad(x, g, spec, lam, branch, wshape):
    nd, groups = spec[0], spec[6]
    if x.dim() == nd + 1:  # unbatched input
        x, g = x.unsqueeze(0), g.unsqueeze(0)
    U = _conv_columns(x, spec)
    N, d, L = U.shape
    n = g.shape[1]
    if g.shape[0] != N or math.prod(g.shape[2:]) != L:  # would be a bug in the padding bookkeeping
        raise RuntimeError(f"TrAct: {L} patches per sample do not match the output {tuple(g.shape)}")
    dg, ng, b = d // groups, n // groups, N * L
    U = U.reshape(N, groups, dg, L)
    Gc = g.reshape(N, groups, ng, L)
    branch = _resolve_branch(branch, b, dg)
    if b == 0:
        return x.new_zeros(wshape)
    if branch == "woodbury":  # b < d: rows (sample, position) are few
        X = U.permute(1, 0, 3, 2).reshape(groups, b, dg)
        G = Gc.permute(1, 0, 3, 2).reshape(groups, b, ng)
        return tract_weight_grad(X, G, lam, "woodbury").reshape(wshape)
    # direct: XᵀX and GᵀX summed over samples in chunks, never laying X out as rows
    chunk = max(1, _CONV_CHUNK_ELEMENTS // max(1, groups * dg * max(dg, ng)))
    XtX = R = None
    for i in range(0, N, chunk):
        Ui, Gi = U[i : i + chunk], Gc[i : i + chunk]
        Uit = Ui.transpose(-1, -2)
        a, r = (Ui @ Uit).sum(0), (Gi @ Uit).sum(0)
        XtX, R = (a, r) if XtX is None else (XtX + a, R + r)
    return _direct_from_moments(XtX, R, b, lam).reshape(wshape)


class _TrActTap(torch.autograd.Function):
    """Identity on the layer's output that also carries the weight's gradient.

    The layer runs with a detached weight, so autograd computes the input and
    bias gradients exactly as for the plain layer and skips ``Gᵀ X``; this node
    sees ``G`` and the saved input and returns the TrAct weight gradient. The
    output is marked dirty rather than viewed, so in-place ops after the layer
    (``ReLU(inplace=True)``) keep working."""

    @staticmethod
    def forward(ctx, out, weight, x, plan):
        ctx.mark_dirty(out)
        ctx.save_for_backward(x)
        ctx.plan = plan
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grad_w = None
        if ctx.needs_input_grad[1]:
            if torch.is_grad_enabled():
                warnings.warn(
                    "TrAct: backward with create_graph=True: the TrAct weight gradient is "
                    "built, but the weight's share of second-order terms (e.g. of an input-"
                    "gradient penalty) is missing",
                    stacklevel=2,
                )
            (x,) = ctx.saved_tensors
            grad_w = ctx.plan.weight_grad(x, grad_out)
        return (grad_out if ctx.needs_input_grad[0] else None), grad_w, None, None


# --- the wrapper ----------------------------------------------------------------------


def _kind_of(module: nn.Module) -> tuple[str, str]:
    """(kind, name of the weight parameter), or TypeError."""
    from . import layers  # lazy: layers may import this module

    if isinstance(module, TrAct):
        raise TypeError("this module is already wrapped in TrAct; change its .lambda_ instead")
    if isinstance(module, layers.InfPiInputLinearReLU):
        return "pi_inf", "A"
    if isinstance(module, layers.FinPiInputLinearReLU) or getattr(module, "tract_linear_input", False):
        # π input layers and other first layers computing weight @ x + (scaled) bias
        return "pi_fin", "weight"
    for base, kind in ((nn.Linear, "linear"), (nn.Conv1d, "conv"), (nn.Conv2d, "conv"), (nn.Conv3d, "conv")):
        if isinstance(module, base):
            if type(module).forward is not base.forward:
                raise TypeError(
                    f"TrAct: {type(module).__name__} overrides {base.__name__}.forward, so the "
                    f"TrAct gradient would not match its computation; supported: "
                    f"{', '.join(SUPPORTED)}"
                )
            return kind, "weight"
    raise TypeError(
        f"TrAct supports {', '.join(SUPPORTED)} (and subclasses that keep their forward); "
        f"got {type(module).__module__}.{type(module).__qualname__}"
    )


def _conv_spec(m: nn.Module):
    nd = len(m.kernel_size)
    mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
    # _reversed_padding_repeated_twice is F.pad's list (last dim first), also for
    # padding="same" (extra element on the right when the total is odd) and "valid"
    pad = list(m._reversed_padding_repeated_twice)
    return (nd, tuple(m.kernel_size), tuple(m.stride), tuple(m.dilation), pad, mode, m.groups)


class TrAct(nn.Module):
    """Wrap the input layer of a network so that its weight is trained with TrAct.

    ``TrAct(layer, lambda_=0.1)`` behaves like ``layer`` in every respect except
    the weight gradient, which becomes ``Gᵀ X (XᵀX/b + λI)⁻¹`` (module docstring).

    Args:
        module: ``nn.Linear``, ``nn.Conv1d/2d/3d`` (any stride, padding incl.
            ``"same"``, padding mode, dilation, groups), ``InfPiInputLinearReLU``
            (whose ``A`` is d_in × r_out, so its gradient is the transpose:
            ``(XᵀX/b + λI)⁻¹ Xᵀ G``) or ``FinPiInputLinearReLU``.
        lambda_: λ > 0 (default 0.1). Large λ gives ``λ · ∇W → Gᵀ X``, plain SGD
            with the learning rate scaled by 1/λ.
        l: the same λ under the official package's name; give one of the two.
        branch: ``"auto"`` (Woodbury when batch rows < input size), ``"direct"``
            or ``"woodbury"``; the results agree up to rounding.

    The wrapper registers the layer's own Parameter and buffer objects under
    their own names (no extra prefix in the state dict) and keeps the layer
    itself out of its submodules; ``unwrap()`` returns it. Attributes it does
    not have itself (``in_features``, ``kernel_size``, ``r``, ``d_in``, …) are
    read from, and plain ones written to, the wrapped layer; ``sample(...)`` of
    an infinite input layer returns the sampled finite layer wrapped with the
    same λ. Forward hooks registered on the inner layer do not run for
    Linear/Conv layers, and ``isinstance(wrapper, nn.Conv2d)`` is False.
    Losses that contain gradients (``create_graph=True``, input-gradient
    penalties) get a warning: the layer runs with a detached weight, so the
    weight's share of the second-order terms is missing.
    """

    def __init__(
        self,
        module: nn.Module,
        lambda_: float = _LAMBDA_DEFAULT,
        l: float | None = None,
        *,
        branch: str = "auto",
    ):
        super().__init__()
        if l is not None:
            if lambda_ is not _LAMBDA_DEFAULT:
                raise TypeError(
                    "TrAct: give λ either as lambda_ or as l (the official package's name), not both"
                )
            lambda_ = l
        lam = _check_lambda(lambda_)
        if not isinstance(module, nn.Module):
            raise TypeError(f"TrAct wraps an nn.Module, got {type(module).__name__}")
        kind, wname = _kind_of(module)
        if branch not in _BRANCHES:
            raise ValueError(f"branch must be one of {_BRANCHES}, got {branch!r}")
        weight = module._parameters.get(wname)
        if weight is None:
            raise ValueError(f"TrAct: {type(module).__name__} has no {wname!r} parameter")
        if isinstance(weight, nn.parameter.UninitializedParameter):
            raise ValueError(
                "TrAct: the layer's parameters are not initialized yet (lazy module); "
                "run one forward pass before wrapping it"
            )
        # Share the parameter/buffer dictionaries themselves: the same objects
        # under the same names, and whatever replaces an entry on one side
        # (load_state_dict(assign=True), .to() with overwriting conversion) is
        # seen by the other.
        object.__setattr__(self, "_tract_module", module)
        object.__setattr__(self, "_parameters", module._parameters)
        object.__setattr__(self, "_buffers", module._buffers)
        object.__setattr__(self, "_non_persistent_buffers_set", module._non_persistent_buffers_set)
        object.__setattr__(self, "_version", getattr(type(module), "_version", 1))
        object.__setattr__(self, "_tract_kind", kind)
        object.__setattr__(self, "_tract_wname", wname)
        object.__setattr__(self, "_lambda", lam)
        object.__setattr__(self, "branch", branch)
        self.training = module.training

    # -- λ ---------------------------------------------------------------------------
    @property
    def lambda_(self) -> float:
        return self._lambda

    @lambda_.setter
    def lambda_(self, value: float):
        object.__setattr__(self, "_lambda", _check_lambda(value))

    @property
    def l(self) -> float:  # noqa: E743 - the official package's name
        return self._lambda

    @l.setter
    def l(self, value: float):  # noqa: E743
        self.lambda_ = value

    # -- the layer -------------------------------------------------------------------
    def unwrap(self) -> nn.Module:
        """The plain layer, holding the same Parameter objects."""
        return self._tract_module

    @property
    def module(self) -> nn.Module:
        return self._tract_module

    def _plan(self, weight):
        conv = _conv_spec(self._tract_module) if self._tract_kind == "conv" else None
        return _Plan(self._tract_kind, self._lambda, self.branch, weight, conv)

    def forward(self, x, *args, **kwargs):
        m = self._tract_module
        kind, wname = self._tract_kind, self._tract_wname
        w = self._parameters[wname]
        track = w is not None and w.requires_grad and torch.is_grad_enabled()
        wd = w.detach() if track else w
        if kind == "linear":
            out = F.linear(x, wd, self._parameters["bias"])
        elif kind == "conv":
            out = m._conv_forward(x, wd, self._parameters["bias"])
        else:  # π layers: their own forward (checks, bias_alpha) with the weight swapped
            params = dict(self._parameters)
            params[wname] = wd
            out = torch.func.functional_call(m, params, (x, *args), kwargs)
        if not track:
            return out
        return _TrActTap.apply(out, w, x, self._plan(w))

    # -- nn.Module plumbing ------------------------------------------------------------
    def _apply(self, fn, recurse=True):
        # the layer converts its own tensors (and runs its own _apply hooks);
        # the dictionaries are shared, so this wrapper sees the result
        self._tract_module._apply(fn, recurse)
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        self._tract_module.train(mode)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self._tract_module._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        self._tract_module._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("__") or name.startswith("_tract"):
                raise
            inner = self.__dict__.get("_tract_module")
            if inner is None:
                raise
        attr = getattr(inner, name)
        if name == "sample" and callable(attr):
            lam, branch = self._lambda, self.branch

            def sample(*args, **kwargs):
                """The inner layer's ``sample``, wrapped in TrAct with the same λ."""
                return TrAct(attr(*args, **kwargs), lam, branch=branch)

            return sample
        return attr

    def __setattr__(self, name: str, value):
        inner = self.__dict__.get("_tract_module")
        if (
            inner is not None
            and name not in self.__dict__
            and name in inner.__dict__
            and not isinstance(value, (torch.Tensor, nn.Module))
            and not isinstance(getattr(type(self), name, None), property)
        ):
            setattr(inner, name, value)  # e.g. bias_alpha, stride: the layer's own settings
        else:
            super().__setattr__(name, value)

    def extra_repr(self) -> str:
        s = f"{self._tract_module!r}, lambda_={self._lambda:g}"
        if self.branch != "auto":
            s += f", branch={self.branch!r}"
        return s

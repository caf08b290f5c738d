"""π-MLPs: the infinite network, finite networks sampled from it, and a μP baseline.

Forward of all three (docs/math.md §3, §6)::

    h_0 = α_1 (input layer)(x)
    h_l = (hidden layer l)(h_{l-1})          l = 1..L
    out = α_L (output layer)(h_L)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .device import resolve_device
from .layers import (
    DEFAULT_CHUNK_BYTES,
    InfPiInputLinearReLU,
    InfPiLinearReLU,
    _check_input,
)

__all__ = ["InfMLP", "FinPiMLPSample", "MuMLP", "PiMLP"]


class PiMLP(nn.Module):
    """Common forward of π-MLPs: ``.layers`` = [input, hidden × L, output].

    The network owns its layout: other code reaches the layers through
    :attr:`input_layer`, :attr:`hidden_layers`, :attr:`output_layer`, the
    penultimate preactivation through :meth:`features` and the role of every
    parameter through :meth:`param_roles`, never by indexing ``layers``.
    """

    first_layer_alpha: float
    last_layer_alpha: float

    @property
    def input_layer(self) -> nn.Module:
        """The first layer (possibly wrapped in TrAct)."""
        return self.layers[0]

    @input_layer.setter
    def input_layer(self, module: nn.Module):
        self.layers[0] = module

    @property
    def hidden_layers(self) -> list[nn.Module]:
        """The ``L`` hidden layers, in order."""
        return list(self.layers[1:-1])

    @property
    def output_layer(self) -> nn.Module:
        """The readout layer (its output is multiplied by ``last_layer_alpha``)."""
        return self.layers[-1]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The preactivation entering the output layer (batch × r, or × n for finite nets)."""
        h = self.first_layer_alpha * self.input_layer(x)
        for layer in self.hidden_layers:
            h = layer(h)
        return h

    def readout(self, h: torch.Tensor) -> torch.Tensor:
        """The network's output from :meth:`features`: ``α_L · output_layer(h)``."""
        return self.last_layer_alpha * self.output_layer(h)

    def forward(self, x, return_hidden: bool = False):
        """``x`` (batch × d_in) → (batch × d_out); with ``return_hidden`` also the
        preactivation entering the output layer (batch × r or × n)."""
        h = self.features(x)
        out = self.readout(h)
        return (out, h) if return_hidden else out

    kind: str = ""

    def architecture(self) -> dict:
        """What a state dict must match to load into this net (saved with it as extra state):
        the kind, sizes, rank and/or width, depth, alphas and layernorm."""
        arch = {"kind": self.kind, "d_in": self.d_in, "d_out": self.d_out, "L": self.L}
        for key in ("r", "n"):
            if hasattr(self, key):
                arch[key] = getattr(self, key)
        for key in ("first_layer_alpha", "last_layer_alpha", "bias_alpha", "last_bias_alpha"):
            arch[key] = float(getattr(self, key))
        arch["layernorm"] = bool(self.layernorm)
        return arch

    def get_extra_state(self):
        return {"architecture": self.architecture()}

    def set_extra_state(self, state):
        saved = (state or {}).get("architecture", {}) if isinstance(state, dict) else {}
        mine = self.architecture()
        for key in sorted(set(saved) | set(mine)):
            if key in saved and key in mine and saved[key] != mine[key]:
                raise ValueError(
                    f"the checkpoint was saved from a {type(self).__name__} with {key}={saved[key]!r}, "
                    f"this one has {key}={mine[key]!r}: build the net with the checkpoint's settings"
                )

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        key = prefix + "_extra_state"
        had = key in state_dict
        try:
            super()._load_from_state_dict(
                state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
            )
        except ValueError as err:
            error_msgs.append(str(err))
        if not had and key in missing_keys:
            missing_keys.remove(key)  # checkpoints of pilimit 0.1 carry no architecture

    def param_roles(self) -> dict[str, str]:
        """``{parameter name: role}`` with roles ``first``, ``first_bias`` (input layer),
        ``hidden``, ``bias`` (hidden layers), ``last``, ``last_bias`` (output layer).

        Rows ``A``/``B`` of infinite layers are listed with their layer's role (they
        do not train by gradient; the optimizer appends them with the coefficients).
        """
        roles = {}
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            kind = "first" if i == 0 else "last" if i == last else "hidden"
            for name, _ in layer.named_parameters():
                is_bias = name.split(".")[-1] == "bias"
                role = ("bias" if kind == "hidden" else f"{kind}_bias") if is_bias else kind
                roles[f"layers.{i}.{name}"] = role
        return roles

    def extra_repr(self):
        return f"first_layer_alpha={self.first_layer_alpha}, last_layer_alpha={self.last_layer_alpha}"


class InfMLP(PiMLP):
    """An infinite-width π-MLP of rank ``r`` with ``L`` hidden layers.

    Args:
        d_in, d_out: input and output sizes. r: rank. L: number of hidden π-layers.
        first_layer_alpha, last_layer_alpha: α_1 and α_L (docs/math.md §1).
        bias_alpha: β of the input and hidden layers (0: no biases).
        last_bias_alpha: β of the output layer (default: ``bias_alpha``).
        layernorm: the layernorm variant (docs/math.md §3).
        tract_lambda: if set, the input layer trains with TrAct (docs/math.md §7).
        chunk_rows / chunk_bytes: row chunking of the infinite layers.
        device, dtype: where and in what precision to build it (float64 for reference checks).
    """

    kind = "infinite"

    def __init__(
        self,
        d_in: int,
        d_out: int,
        r: int,
        L: int = 1,
        first_layer_alpha: float = 1.0,
        last_layer_alpha: float = 1.0,
        bias_alpha: float = 1.0,
        last_bias_alpha: float | None = None,
        layernorm: bool = False,
        tract_lambda: float | None = None,
        chunk_rows: int | None = None,
        chunk_bytes: int | None = DEFAULT_CHUNK_BYTES,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if min(d_in, d_out, r) < 1 or L < 0:
            raise ValueError(
                f"InfMLP needs d_in, d_out, r >= 1 and L >= 0, got d_in={d_in}, d_out={d_out}, r={r}, L={L}"
            )
        device = resolve_device(device)
        self.d_in, self.d_out, self.r, self.L = d_in, d_out, r, L
        self.first_layer_alpha = float(first_layer_alpha)
        self.last_layer_alpha = float(last_layer_alpha)
        self.bias_alpha = float(bias_alpha)
        self.last_bias_alpha = self.bias_alpha if last_bias_alpha is None else float(last_bias_alpha)
        self.layernorm = layernorm
        kw = dict(device=device, dtype=dtype)
        ckw = dict(chunk_rows=chunk_rows, chunk_bytes=chunk_bytes, layernorm=layernorm, **kw)
        layers = [InfPiInputLinearReLU(d_in, r, bias_alpha=self.bias_alpha, layernorm=layernorm, **kw)]
        layers += [InfPiLinearReLU(r, r, bias_alpha=self.bias_alpha, **ckw) for _ in range(L)]
        layers.append(InfPiLinearReLU(r, d_out, bias_alpha=self.last_bias_alpha, output_layer=True, **ckw))
        self.layers = nn.ModuleList(layers)
        for i, layer in enumerate(self.layers[1:], start=1):
            layer.name = f"layers.{i}"
        self.tract_lambda = None
        if tract_lambda:
            from .tract import TrAct

            self.layers[0] = TrAct(self.layers[0], lambda_=tract_lambda)
            self.tract_lambda = float(tract_lambda)

    @property
    def pi_layers(self) -> list[InfPiLinearReLU]:
        """The infinite hidden and output layers (every layer but the input layer)."""
        return list(self.layers[1:])

    def rows_per_layer(self) -> list[int]:
        return [m.rows.num_rows for m in self.pi_layers]

    def sample(self, n: int, generator=None) -> FinPiMLPSample:
        return FinPiMLPSample(self, n, generator=generator)

    def extra_repr(self):
        return (
            f"d_in={self.d_in}, d_out={self.d_out}, r={self.r}, L={self.L}, "
            f"first_layer_alpha={self.first_layer_alpha}, last_layer_alpha={self.last_layer_alpha}, "
            f"bias_alpha={self.bias_alpha}, last_bias_alpha={self.last_bias_alpha}, layernorm={self.layernorm}"
        )


class FinPiMLPSample(PiMLP):
    """A finite π-net of width ``n`` sampled from an infinite π-MLP (docs/math.md §6).

    Works for a freshly initialized and for a trained ``infnet`` alike; the
    outputs agree with ``infnet``'s up to O(n^-½). If the infinite input layer
    trains with TrAct, so does the finite one. Train it with
    :class:`inf.optim.InfSGD` (same lr; gradients are projected onto span(Ω)).
    """

    kind = "finite"

    def __init__(self, infnet: InfMLP, n: int, generator=None, dtype=None):
        super().__init__()
        if n < 1:
            raise ValueError(f"width n must be >= 1, got {n}")
        from .distributed import gathered

        infnet = gathered(infnet)  # rows sharded over processes: sample from all of them (collective)
        self.n = n
        self.d_in, self.d_out, self.r, self.L = infnet.d_in, infnet.d_out, infnet.r, infnet.L
        self.first_layer_alpha = infnet.first_layer_alpha
        self.last_layer_alpha = infnet.last_layer_alpha
        self.bias_alpha, self.last_bias_alpha = infnet.bias_alpha, infnet.last_bias_alpha
        self.layernorm = infnet.layernorm
        first = infnet.input_layer.sample(infnet.d_in, n, generator=generator)
        layers = [first]
        prev_omega = first.omega
        for layer in infnet.hidden_layers:
            fin = layer.sample(n, n, prev_omega=prev_omega, generator=generator)
            layers.append(fin)
            prev_omega = fin.omega
        layers.append(infnet.output_layer.sample(n, infnet.d_out, prev_omega=prev_omega, generator=generator))
        self.layers = nn.ModuleList(layers)
        if dtype is not None:
            self.to(dtype)

    def extra_repr(self):
        return f"n={self.n}, r={self.r}, L={self.L}, " + super().extra_repr()


class _Linear(nn.Module):
    """``W φ(norm?(h)) + β b`` (or ``W x + β b`` for the input layer) with plain parameters."""

    def __init__(self, n_in, n_out, bias_alpha, activate, layernorm, device=None, dtype=None):
        super().__init__()
        self.n_in, self.n_out = n_in, n_out
        self.bias_alpha = float(bias_alpha)
        self.activate, self.layernorm = activate, layernorm
        # an input layer (no activation) is linear in x, so TrAct can wrap it
        self.tract_linear_input = not activate
        self.weight = nn.Parameter(torch.empty(n_out, n_in, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(n_out, device=device, dtype=dtype)) if self.bias_alpha else None

    def forward(self, h):
        _check_input(h, self.n_in, "MuMLP layer", "n_in")
        if self.activate:
            if self.layernorm:
                h = h / h.norm(dim=-1, keepdim=True).clamp_min(1e-30)
            h = torch.relu(h)
        bias = None if self.bias is None else self.bias_alpha * self.bias
        return F.linear(h, self.weight, bias)

    def extra_repr(self):
        return f"n_in={self.n_in}, n_out={self.n_out}, bias_alpha={self.bias_alpha}"


class MuMLP(PiMLP):
    """A finite μP MLP in the π-net's parametrization, Gaussian-initialized, no projection.

    The baseline the π-limit paper compares against (μ-Net). Same forward as a
    finite π-net (preactivations of norm O(1), entries O(n^-½)); init:
    ``W_0 ~ N(0, 1/(n d_in))``, hidden ``W_l ~ N(0, 2/n)`` (He, so ReLU keeps the
    scale), output ``W_out = 0`` (``readout_zero_init``) or ``N(0, 1/n²)``, biases 0.
    Train with ``torch.optim.SGD`` or InfSGD (identical for it); the same lr as
    the π-net transfers across widths (μP).
    """

    kind = "mup"

    def __init__(
        self,
        d_in: int,
        d_out: int,
        width: int,
        L: int = 1,
        first_layer_alpha: float = 1.0,
        last_layer_alpha: float = 1.0,
        bias_alpha: float = 1.0,
        last_bias_alpha: float | None = None,
        layernorm: bool = False,
        readout_zero_init: bool = True,
        tract_lambda: float | None = None,
        device=None,
        dtype=None,
        generator=None,
    ):
        super().__init__()
        device = resolve_device(device)
        self.d_in, self.d_out, self.n, self.L = d_in, d_out, width, L
        self.first_layer_alpha = float(first_layer_alpha)
        self.last_layer_alpha = float(last_layer_alpha)
        self.layernorm = layernorm
        self.readout_zero_init = readout_zero_init
        last_bias_alpha = bias_alpha if last_bias_alpha is None else last_bias_alpha
        self.bias_alpha, self.last_bias_alpha = float(bias_alpha), float(last_bias_alpha)
        kw = dict(device=device, dtype=dtype)
        layers = [_Linear(d_in, width, bias_alpha, False, layernorm, **kw)]
        layers += [_Linear(width, width, bias_alpha, True, layernorm, **kw) for _ in range(L)]
        layers.append(_Linear(width, d_out, last_bias_alpha, True, layernorm, **kw))
        self.layers = nn.ModuleList(layers)
        self.reset_parameters(generator)
        self.tract_lambda = None
        if tract_lambda:
            from .tract import TrAct

            self.layers[0] = TrAct(self.layers[0], lambda_=tract_lambda)
            self.tract_lambda = float(tract_lambda)

    @torch.no_grad()
    def reset_parameters(self, generator=None):
        n = self.n
        stds = [1.0 / math.sqrt(n * self.d_in)] + [math.sqrt(2.0 / n)] * self.L
        stds.append(0.0 if self.readout_zero_init else 1.0 / n)
        for layer, std in zip(self.layers, stds):
            w = torch.randn(tuple(layer.weight.shape), generator=generator, dtype=torch.float64) * std
            layer.weight.copy_(w)
            if layer.bias is not None:
                layer.bias.zero_()

    def extra_repr(self):
        return f"d_in={self.d_in}, d_out={self.d_out}, width={self.n}, L={self.L}, " + super().extra_repr()

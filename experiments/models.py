"""One vocabulary of model kinds and one builder for every experiment program.

==========  ==========================  ===============================================
kind        aliases                     built as
==========  ==========================  ===============================================
infinite    ``inf``                     :class:`inf.networks.InfMLP` of rank ``r``
finite      ``fin``, ``pi``             :class:`inf.networks.FinPiMLPSample` of width
                                        ``width``, sampled (in float64, on the CPU) from a
                                        freshly initialized rank-``r`` InfMLP
mup         ``mu``, ``mu-net``, ``μP``  :class:`inf.networks.MuMLP` of width ``width``
                                        (Gaussian init, no gradient projection)
==========  ==========================  ===============================================

Programs describe their network with a :class:`ModelSpec` (the kind, sizes, alphas, TrAct,
precision, seed) and call :func:`build_model`. Code that needs a net's parts uses its public
layout (``net.input_layer``, ``net.hidden_layers``, ``net.output_layer``, ``net.features(x)``,
``net.param_roles()``), never positions in ``net.layers``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

import torch
from torch import nn

from experiments.cli import ConfigError
from inf.networks import FinPiMLPSample, InfMLP, MuMLP

__all__ = [
    "KINDS",
    "KIND_ALIASES",
    "canonical_kind",
    "kind_of",
    "ModelSpec",
    "build_model",
    "set_rows_dtype",
    "infinite_layers",
    "describe",
]

KINDS = ("infinite", "finite", "mup")
KIND_ALIASES = {
    "infinite": "infinite",
    "inf": "infinite",
    "finite": "finite",
    "fin": "finite",
    "pi": "finite",
    "mup": "mup",
    "mu": "mup",
    "mu-net": "mup",
    "μp": "mup",
    "mu_p": "mup",
}


def canonical_kind(name: str) -> str:
    """``"infinite"``, ``"finite"`` or ``"mup"`` for any accepted spelling (``inf``, ``fin``,
    ``mu``, …); :class:`ConfigError` otherwise."""
    kind = KIND_ALIASES.get(str(name).strip().lower())
    if kind is None:
        raise ConfigError(f"unknown model kind {name!r} — use one of {', '.join(KINDS)}")
    return kind


def kind_of(net: nn.Module) -> str:
    """The kind of a built network."""
    if isinstance(net, InfMLP):
        return "infinite"
    if isinstance(net, FinPiMLPSample):
        return "finite"
    if isinstance(net, MuMLP):
        return "mup"
    raise TypeError(f"expected InfMLP, FinPiMLPSample or MuMLP, got {type(net).__name__}")


@dataclass(frozen=True)
class ModelSpec:
    """Everything that fixes a network at initialization.

    ``width`` is the finite width (ignored for ``infinite``); ``r`` the rank of the π-net (the
    infinite net, and the one a finite π-net is sampled from; ignored for ``mup``). ``depth`` is
    the number L of hidden layers. ``last_bias_alpha=None`` means ``bias_alpha``.
    ``rows_dtype`` stores an infinite net's rows (A, B) in another precision (float16);
    ``readout_zero_init`` matters for ``mup`` only (π-nets always start with a zero readout).
    ``seed`` seeds the initial rows (global torch generator), Ω and μP weights.
    """

    kind: str
    d_in: int
    d_out: int
    r: int = 200
    width: int | None = None
    depth: int = 1
    first_layer_alpha: float = 1.0
    last_layer_alpha: float = 1.0
    bias_alpha: float = 1.0
    last_bias_alpha: float | None = None
    layernorm: bool = False
    tract_lambda: float | None = None
    readout_zero_init: bool = True
    seed: int | None = 0
    dtype: torch.dtype = torch.float32
    rows_dtype: torch.dtype | None = None

    def __post_init__(self):
        object.__setattr__(self, "kind", canonical_kind(self.kind))
        if self.kind != "infinite" and (self.width is None or self.width < 1):
            raise ConfigError(
                f"a {self.kind} net needs a width >= 1 (got {self.width}) — give "
                f"a positive width, or build the infinite net"
            )
        if self.kind != "mup" and self.r < 1:
            raise ConfigError(f"rank r = {self.r} — give r >= 1")
        if self.depth < 0:
            raise ConfigError(f"depth {self.depth} — give a number of hidden layers >= 0")

    def replace(self, **changes) -> ModelSpec:
        return replace(self, **changes)

    def as_dict(self) -> dict:
        """Plain data (dtypes as strings), e.g. for a checkpoint or metrics.json."""
        doc = asdict(self)
        doc["dtype"] = str(self.dtype).replace("torch.", "")
        doc["rows_dtype"] = None if self.rows_dtype is None else str(self.rows_dtype).replace("torch.", "")
        return doc

    @classmethod
    def from_dict(cls, doc: dict) -> ModelSpec:
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in doc.items() if k in names}
        for key in ("dtype", "rows_dtype"):
            if isinstance(values.get(key), str):
                values[key] = getattr(torch, values[key])
        return cls(**values)


def build_model(spec: ModelSpec, device=None) -> nn.Module:
    """The network ``spec`` describes, freshly initialized, on ``device``.

    Randomness: ``torch.manual_seed(spec.seed)`` (unless ``seed`` is None: the caller seeded)
    draws the infinite net's initial rows; a generator seeded with ``seed`` draws Ω of a finite
    π-net and the weights of a μP net.
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    seed = 0 if spec.seed is None else int(spec.seed)
    if spec.seed is not None:
        torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    shape = dict(
        first_layer_alpha=spec.first_layer_alpha,
        last_layer_alpha=spec.last_layer_alpha,
        bias_alpha=spec.bias_alpha,
        last_bias_alpha=spec.last_bias_alpha,
        layernorm=spec.layernorm,
    )
    tract = spec.tract_lambda or None
    if spec.kind == "mup":
        net = MuMLP(
            spec.d_in,
            spec.d_out,
            spec.width,
            L=spec.depth,
            generator=generator,
            readout_zero_init=spec.readout_zero_init,
            tract_lambda=tract,
            dtype=spec.dtype,
            **shape,
        )
        return net.to(device)
    if spec.kind == "infinite":
        net = InfMLP(
            spec.d_in,
            spec.d_out,
            spec.r,
            L=spec.depth,
            tract_lambda=tract,
            device=device,
            dtype=spec.dtype,
            **shape,
        )
        if spec.rows_dtype is not None and spec.rows_dtype != spec.dtype:
            set_rows_dtype(net, spec.rows_dtype)
        return net
    # a finite π-net: sampled (in float64, on the CPU) from a fresh infinite net
    source = InfMLP(
        spec.d_in, spec.d_out, spec.r, L=spec.depth, tract_lambda=tract, dtype=torch.float64, **shape
    )
    net = FinPiMLPSample(source, spec.width, generator=generator, dtype=spec.dtype)
    return net.to(device)


def infinite_layers(net: InfMLP) -> list[nn.Module]:
    """The layers of an infinite net that store rows: the hidden layers and the output layer."""
    return [*net.hidden_layers, net.output_layer]


def set_rows_dtype(net: InfMLP, dtype: torch.dtype) -> InfMLP:
    """Store the rows (A, B) of every infinite layer in ``dtype``; coefficients, the input
    layer, biases and all arithmetic keep their precision."""
    for layer in infinite_layers(net):
        layer.rows.to(dtype)
    return net


def describe(net: nn.Module) -> str:
    """``infinite, r=400, L=2`` / ``finite, width 1024, L=2`` (for log lines)."""
    kind = kind_of(net)
    if kind == "infinite":
        return f"infinite, r={net.r}, L={net.L}"
    return f"{kind}, width {net.n}, L={net.L}"

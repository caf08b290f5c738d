"""The exact tangent kernel of an infinite π-net, at its current state.

Setting (docs/math.md §3, §5). The net computes ``h_0 = α_1 (x A_0 + β_0 b_0)``, then
``h_l = s_{l-1} (F00(ĝ_{l-1} B_lᵀ) ⊙ c_l) A_l + β_l b_l`` for the hidden layers l = 1..L,
and ``f = α_L (s_L (F00(ĝ_L B_outᵀ) ⊙ c_out) A_out + β_out b_out)``, where ``s_l = |h_l|``
(1 under layernorm) and ``ĝ_l = h_l / |h_l|``. Write ``J_l(x) = ∂f(x)/∂h_l(x)`` (O × r)
for the Jacobian of the output with respect to layer l's output (``h_0`` includes α_1).

One step of :class:`inf.optim.InfSGD` with base learning rate η and per-group
multipliers ``m`` on a loss ``L = Σ_x ℓ(f(x))``, with ``e_x = ∂L/∂f(x)``, changes the
outputs, to first order in η, by ``Δf(x') = −η Σ_x Θ(x', x) e_x`` with

    Θ(x', x) = Σ_terms  w_term(x', x) · J_term(x') J_term(x)ᵀ               (O × O)

term                    w(x', x)                                    J
======================  ==========================================  ==========
input weight A_0        m_first     · α_1² (x'·x)                   J_0
input bias b_0          m_firstbias · α_1² β_0²                     J_0
hidden rows (layer l)   m_hidden    · s'_{l-1} s_{l-1} F00(ĝ'·ĝ)     J_l
hidden bias b_l         m_bias      · β_l²                          J_l
output rows             m_last      · α_L² s'_L s_L F00(ĝ'_L·ĝ_L)    I_O
output bias b_out       m_lastbias  · α_L² β_out²                   I_O

Derivation of the row terms. For an example x, backward gives the layer the gradient
``δ_x = ∂L/∂h_l(x) = J_l(x)ᵀ e_x`` and the step appends the row ``(A, c, B) = (δ_x s_x,
−η m, ĝ_x)`` (docs/math.md §5). Nothing else in the layer changes, so at x' the layer's output
changes by exactly ``s_{x'} F00(ĝ_{x'}·ĝ_x) (−η m) δ_x s_x`` — the new row evaluated at x'
— and the output by ``J_l(x')`` times that. For the output layer the role of ``J_l`` is
played by ``α_L I`` (its output is multiplied by α_L, and ``δ_x = α_L e_x``). The row terms
are the infinite-width limit of ``⟨∂f(x')/∂W_l, ∂f(x)/∂W_l⟩`` for the projected gradient:
``φ(h'_{l-1})·φ(h_{l-1}) → s' s F00(ĝ'·ĝ)`` and ``J_fin Q Qᵀ J'_finᵀ → J_l J_l'ᵀ``. The input
weight is ordinary: ``∂h_0/∂A_0 = α_1 x``, hence ``α_1² (x'·x) J_0(x') J_0(x)ᵀ``; biases
enter as ``β`` times themselves.

The Jacobians ``J_l`` are computed with autograd through the layers' closed-form backward
(one backward pass per output coordinate), with the π-layers run in their functional
form with no row store, so computing the kernel leaves no pending gradient rows behind.
A frozen part (``requires_grad=False`` on ``A_0``, a bias, or a layer's coefficients)
contributes nothing. Not included: weight decay and momentum (the first step of momentum
SGD is plain SGD), gradient clipping, and TrAct's preconditioner of the input weight
(with a TrAct-wrapped input layer the kernel is that of plain SGD; a warning says so).

``kind="trace"`` returns ``Σ_k Θ_kk`` (N × M); ``kind="pseudo"`` returns
``(1/O) Σ_{k,k'} Θ_kk'``; ``kind="full"`` the whole (N, M, O, O) array.
"""

from __future__ import annotations

import warnings

import torch

from ..functional import inf_pi_linear_relu, pi_features
from ..layers import InfPiLinearReLU
from ..math import F00
from .pntk import KINDS, resolve_lr_mults

__all__ = ["inf_ntk", "inf_ntk_diagonal", "inf_jacobians"]


def _check_net(net) -> list:
    """``[input layer, π-layers…, output layer]`` from the net's own layout."""
    try:
        layers = [net.input_layer, *net.hidden_layers, net.output_layer]
    except AttributeError:
        layers = []
    if len(layers) < 2 or not all(isinstance(m, InfPiLinearReLU) for m in layers[1:]):
        raise TypeError(
            "inf_ntk needs an infinite π-net with input_layer, hidden_layers and output_layer "
            "(e.g. inf.networks.InfMLP); for finite models use inf.analysis.pntk / empirical_ntk"
        )
    if not layers[-1].output_layer:
        raise TypeError("the net's output_layer must be InfPiLinearReLU(output_layer=True)")
    return layers


def _layer_forward(layer: InfPiLinearReLU, g: torch.Tensor) -> torch.Tensor:
    out = inf_pi_linear_relu(
        g,
        layer.A,
        layer.coefficients.detach(),
        layer.B,
        recording=None,
        layernorm=layer.layernorm,
        chunk_rows=layer._chunk_rows(g.shape[0], g.dtype),
    )
    if layer.bias is not None:
        out = out + (layer.bias_alpha * layer.bias.detach()).to(out.dtype)
    return out


def inf_jacobians(net, X: torch.Tensor) -> dict:
    """Per-example ``J_l`` (N × O × r, l = 0..L), layer inputs ``h_l`` and outputs ``f``.

    Returns ``{"J": [J_0, …, J_L], "h": [h_0, …, h_L], "x": X, "out": f}`` (detached).
    """
    layers = _check_net(net)
    a1, aL = float(net.first_layer_alpha), float(net.last_layer_alpha)
    with torch.enable_grad():
        x = X.detach()
        with torch.no_grad():
            h0 = a1 * layers[0](x)
        h = h0.detach().requires_grad_(True)
        hs = [h]
        for layer in layers[1:-1]:
            h = _layer_forward(layer, h)
            hs.append(h)
        out = aL * _layer_forward(layers[-1], h)
        O = out.shape[1]
        J = [torch.empty(out.shape[0], O, t.shape[1], dtype=t.dtype, device=t.device) for t in hs]
        for k in range(O):
            grads = torch.autograd.grad(out[:, k].sum(), hs, retain_graph=k < O - 1, allow_unused=True)
            for l, g in enumerate(grads):
                J[l][:, k] = 0.0 if g is None else g
    return {"J": J, "h": [t.detach() for t in hs], "x": x, "out": out.detach()}


def _contract(W: torch.Tensor, Ja: torch.Tensor, Jb: torch.Tensor, kind: str) -> torch.Tensor:
    """``W[n, m] · Ja[n] Jb[m]ᵀ`` reduced as ``kind`` asks."""
    if kind == "full":
        return W[:, :, None, None] * torch.einsum("nkr,mjr->nmkj", Ja, Jb)
    if kind == "trace":
        return W * (Ja.reshape(Ja.shape[0], -1) @ Jb.reshape(Jb.shape[0], -1).T)
    O = Ja.shape[1]
    return W * (Ja.sum(1) @ Jb.sum(1).T) / O


def _rows_weight(ha: torch.Tensor, hb: torch.Tensor, layernorm: bool) -> torch.Tensor:
    sa, ga = pi_features(ha, layernorm)
    sb, gb = pi_features(hb, layernorm)
    return sa[:, None] * sb[None, :] * F00(ga @ gb.T)


def inf_ntk(
    net,
    X: torch.Tensor,
    Y: torch.Tensor | None = None,
    lr_mults=None,
    kind: str = "full",
    base_lr: float | None = None,
    chunk_size: int = 512,
    by_term: bool = False,
):
    """The tangent kernel Θ(x, y) of an infinite π-net under InfSGD (module docstring).

    Args:
        net: an infinite π-net (``InfMLP``), in any state of training.
        X, Y: inputs (N × d_in, M × d_in); Y defaults to X.
        lr_mults: per-group learning-rate multipliers — an optimizer's ``param_groups``
            (e.g. from ``inf.utils.pi_param_groups``), a dict of roles (``first``,
            ``first_bias``, ``hidden``, ``bias``, ``last``, ``last_bias``) or None (all 1);
            see :func:`inf.analysis.resolve_lr_mults`. Θ is then the kernel of
            ``Δf ≈ −η Θ ∇_f L`` with η the base learning rate.
        kind: ``"full"`` (N, M, O, O), ``"trace"`` or ``"pseudo"`` (N, M).
        chunk_size: examples per autograd pass.
        by_term: also return the kernel of each term (a dict by parameter name).

    The result is in the net's dtype (use a float64 net for reference checks).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    layers = _check_net(net)
    first = layers[0]
    if hasattr(first, "unwrap"):
        warnings.warn(
            "the input layer trains with TrAct; inf_ntk gives the tangent kernel of plain SGD, "
            "without TrAct's preconditioning of the input weight",
            RuntimeWarning,
        )
    dtype = first.A.dtype if first.A.dtype in (torch.float32, torch.float64) else torch.float32
    device = first.A.device
    X = torch.as_tensor(X).to(device=device, dtype=dtype)
    Y = X if Y is None else torch.as_tensor(Y).to(device=device, dtype=dtype)
    for name, Z in (("X", X), ("Y", Y)):
        if Z.dim() != 2 or Z.shape[1] != net.d_in:
            raise ValueError(f"{name} must be (examples × {net.d_in}) for this net, got {tuple(Z.shape)}")
        if not torch.isfinite(Z).all():
            raise ValueError(f"{name} contains NaN or inf")
    mults = resolve_lr_mults(net, lr_mults, base_lr)

    def m(p) -> float:
        return mults.get(id(p), 1.0)

    def states(Z):
        parts = [inf_jacobians(net, Z[i : i + chunk_size]) for i in range(0, Z.shape[0], chunk_size)]
        return {
            "J": [torch.cat([p["J"][l] for p in parts]) for l in range(len(parts[0]["J"]))],
            "h": [torch.cat([p["h"][l] for p in parts]) for l in range(len(parts[0]["h"]))],
            "x": Z,
        }

    # the π-layers run with no row store: a gradient the caller has pending is left as it was
    sx = states(X)
    sy = sx if Y is X else states(Y)

    a1, aL = float(net.first_layer_alpha), float(net.last_layer_alpha)
    N, M = X.shape[0], Y.shape[0]
    O = layers[-1].r_out
    ident = torch.eye(O, dtype=dtype, device=device)
    # (name, weight matrix N × M, index of J, or None for the output layer's α_L I)
    terms = []
    if first.A.requires_grad:
        terms.append(("layers.0.A", m(first.A) * a1**2 * (sx["x"] @ sy["x"].T), 0))
    if first.bias is not None and first.bias.requires_grad:
        w = m(first.bias) * a1**2 * first.bias_alpha**2
        terms.append(("layers.0.bias", torch.full((N, M), w, dtype=dtype, device=device), 0))
    for i, layer in enumerate(layers[1:], start=1):
        jac = None if layer.output_layer else i
        scale = aL**2 if layer.output_layer else 1.0
        if layer.coefficients.requires_grad:
            W = _rows_weight(sx["h"][i - 1], sy["h"][i - 1], layer.layernorm)
            terms.append((f"layers.{i}.rows", m(layer.coefficients) * scale * W, jac))
        if layer.bias is not None and layer.bias.requires_grad:
            w = m(layer.bias) * scale * layer.bias_alpha**2
            terms.append((f"layers.{i}.bias", torch.full((N, M), w, dtype=dtype, device=device), jac))

    shape = (N, M, O, O) if kind == "full" else (N, M)
    total = torch.zeros(shape, dtype=dtype, device=device)
    per_term = {}
    for name, W, j in terms:
        if j is None:  # output layer: J = α_L I, with α_L² already in W
            Ja, Jb = ident.expand(N, O, O), ident.expand(M, O, O)
        else:
            Ja, Jb = sx["J"][j], sy["J"][j]
        K = _contract(W, Ja, Jb, kind)
        total += K
        if by_term:
            per_term[name] = K
    return (total, per_term) if by_term else total


def inf_ntk_diagonal(
    net,
    X: torch.Tensor,
    lr_mults=None,
    kind: str = "trace",
    base_lr: float | None = None,
    chunk_size: int = 256,
) -> torch.Tensor:
    """``Θ(x, x)`` for every example (``kind`` trace or pseudo), without the N × N matrix."""
    if kind not in ("trace", "pseudo"):
        raise ValueError(f"inf_ntk_diagonal supports kind 'trace' or 'pseudo', got {kind!r}")
    X = torch.as_tensor(X)
    return torch.cat(
        [
            inf_ntk(
                net,
                X[i : i + chunk_size],
                lr_mults=lr_mults,
                kind=kind,
                base_lr=base_lr,
                chunk_size=chunk_size,
            ).diagonal()
            for i in range(0, X.shape[0], chunk_size)
        ]
    )

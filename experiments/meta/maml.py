"""MAML for π-nets (infinite and finite) and μP MLPs, without torchmeta.

The few-shot setting of the π-limit paper: N-way K-shot classification where
the inner loop adapts the network's **readout** (output layer) only, and the
outer loop (meta-optimizer :class:`inf.optim.InfSGD`) trains the rest.

Three model kinds (the vocabulary of :mod:`experiments.models`), all with the forward of
:class:`inf.networks.PiMLP` (``out = α_L · readout(h)``, ``h`` the preactivation entering the
readout):

* ``"infinite"``: :class:`inf.networks.InfMLP`, the infinite-width π-net;
* ``"finite"``: :class:`inf.networks.FinPiMLPSample`, a finite π-net of width n;
* ``"mup"``:  :class:`inf.networks.MuMLP`, the μP baseline (Gaussian init).

Inner step in infinite width (readout only)
-------------------------------------------
One SGD step of size η on the inner loss ``L_in`` (cross-entropy, mean over
the ``N_s`` support examples) changes a finite readout ``W`` by
``ΔW = -η Σ_j δ_j φ(h_j)ᵀ`` with ``δ_j = ∂L_in/∂z_j = α_L e_j``, where
``z = W φ(h) + β_L b`` is the layer's output and ``e_j = ∂L_in/∂out_j =
(softmax(out_j) - onehot(y_j)) / N_s``. A query's output moves by
``Δout_q = α_L ΔW φ(h_q) = -η α_L Σ_j δ_j (φ(h_j)·φ(h_q))``; in the π-limit
``φ(h_j)·φ(h_q) → s_j s_q F00(ĝ_j·ĝ_q) =: K(j, q)``. This is exactly what
appending one row per support example to the infinite readout does (docs/math.md §5):
``A = δ_j s_j``, ``B = ĝ_j``, coefficient ``-η``. An adapted readout bias
adds ``Δb = -η β_L Σ_j δ_j``, i.e. ``β_L Δb`` to ``z``, which is the same as
adding the constant ``β_L²`` to the kernel. After T steps::

    z_q' = z_q - η Σ_j (K(q, j) + β_L²) D_j,      D = Σ_{t<T} δ^(t)   (N_s × N)
    out_q' = α_L z_q'

with ``δ^(t)`` computed from the support outputs after ``t`` steps.

Two implementations of this are provided and agree to rounding:

* :func:`inf_readout_rows_adapted` appends the rows to the readout's
  :class:`~inf.tensors.RowStore` (the layer then answers queries with them
  present, using its own chunked forward) and removes them on exit with
  ``RowStore.truncate``; used for evaluation and first-order training.
* :func:`inf_readout_adapt` computes the same outputs with differentiable
  torch ops (``inf.math.F00``, ``inf.functional.pi_features``); used for
  second-order training. The outer loss then differentiates through the
  support errors ``δ`` and through the kernel between support and query
  features, so the body's infinite layers record gradient rows for the
  support and the query examples alike.

First order detaches ``δ`` and the support features.

Finite nets use ``torch.func.functional_call`` on the readout (or the whole
net) with ``create_graph`` for second order. ``gproj_inner`` projects inner
gradients of finite π-weights onto span(Ω) (the readout is never projected,
docs/math.md §6, so it matters only when more than the readout is adapted);
``gproj_outer`` is InfSGD's ``project`` option for the outer update.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from experiments.cli import ConfigError
from experiments.models import KINDS, ModelSpec, kind_of, set_rows_dtype
from experiments.models import build_model as build_from_spec
from inf.functional import pi_features
from inf.math import F00
from inf.networks import InfMLP
from inf.optim import InfSGD
from inf.parameters import FinPiParameter, owner_of, project_onto_span
from inf.utils import clip_grad_norm_, pi_param_groups

__all__ = [
    "MODEL_KINDS",
    "model_kind",
    "build_model",
    "set_rows_dtype",
    "body_features",
    "cross_entropy_and_error",
    "inf_readout_adapt",
    "inf_readout_rows_adapted",
    "finite_inner_loop",
    "meta_param_groups",
    "make_meta_optimizer",
    "MetaLearner",
    "TaskResult",
    "mean_and_ci95",
]

MODEL_KINDS = KINDS  # "infinite", "finite", "mup" (the old "inf", "fin", "mu" are aliases)


# --------------------------------------------------------------------------- models


def model_kind(net: nn.Module) -> str:
    """``"infinite"``, ``"finite"`` or ``"mup"`` for the three supported networks."""
    try:
        return kind_of(net)
    except TypeError:
        raise TypeError(f"MAML supports InfMLP, FinPiMLPSample and MuMLP, got {type(net).__name__}") from None


def build_model(
    kind: str,
    d_in: int,
    d_out: int,
    *,
    width: int | None = None,
    r: int = 100,
    depth: int = 1,
    first_layer_alpha: float = 1.0,
    last_layer_alpha: float = 1.0,
    bias_alpha: float = 1.0,
    last_bias_alpha: float = 0.0,
    layernorm: bool = False,
    readout_zero_init: bool = True,
    dtype: torch.dtype = torch.float32,
    rows_dtype: torch.dtype | None = None,
    device=None,
    seed: int = 0,
) -> nn.Module:
    """Build one of the three networks, seeded by ``seed`` (:func:`experiments.models.build_model`
    with MAML's defaults: no readout bias, ``r = 100``).

    ``kind``: ``"infinite"``, ``"finite"`` or ``"mup"`` (or the aliases ``"inf"``, ``"fin"``,
    ``"mu"``). ``"finite"`` samples a width-``width`` π-net from a freshly initialized rank-``r``
    infinite net (built in float64, then cast to ``dtype``). ``rows_dtype`` (infinite only)
    stores the infinite layers' rows in another precision (e.g. float16). π-nets always start
    with a zero readout; ``readout_zero_init`` matters for ``"mup"`` only.
    """
    try:
        spec = ModelSpec(
            kind=kind,
            d_in=d_in,
            d_out=d_out,
            r=r,
            width=width,
            depth=depth,
            first_layer_alpha=first_layer_alpha,
            last_layer_alpha=last_layer_alpha,
            bias_alpha=bias_alpha,
            last_bias_alpha=last_bias_alpha,
            layernorm=layernorm,
            readout_zero_init=readout_zero_init,
            seed=seed,
            dtype=dtype,
            rows_dtype=rows_dtype,
        )
    except ConfigError as err:
        raise ValueError(str(err)) from None
    return build_from_spec(spec, device)


def body_features(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The preactivation ``h`` entering the readout (``net.features(x)``), without evaluating
    the readout."""
    return net.features(x)


def _readout_bias_alpha(layer) -> float:
    return float(layer.bias_alpha) if getattr(layer, "bias", None) is not None else 0.0


def _input_dtype(net: nn.Module) -> torch.dtype:
    first = net.input_layer
    first = getattr(first, "module", first)  # a TrAct wrapper keeps the layer in .module
    for p in first.parameters():
        return p.dtype
    return torch.get_default_dtype()


# --------------------------------------------------------------------------- losses


def cross_entropy_and_error(logits: torch.Tensor, targets: torch.Tensor):
    """Mean cross-entropy and its gradient with respect to the logits,
    ``(softmax(logits) - onehot) / N``, computed explicitly (differentiable)."""
    loss = F.cross_entropy(logits, targets)
    onehot = F.one_hot(targets, logits.shape[-1]).to(logits.dtype)
    err = (torch.softmax(logits, dim=-1) - onehot) / logits.shape[0]
    return loss, err


def _accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return float((logits.argmax(-1) == targets).double().mean())


# --------------------------------------------------------------------------- infinite readout


def _kernel(s_a, g_a, s_b, g_b, beta: float):
    """``s_a s_b F00(ĝ_a·ĝ_b) + β²`` (the readout's kernel, bias included)."""
    K = (s_a[:, None] * s_b[None, :]) * F00(g_a @ g_b.T)
    return K + beta * beta if beta else K


def inf_readout_adapt(
    net: InfMLP,
    hs: torch.Tensor,
    ys: torch.Tensor,
    hq: torch.Tensor,
    step_size: float,
    num_steps: int = 1,
    first_order: bool = False,
):
    """Adapt an infinite net's readout on the support set and answer the queries,
    with differentiable torch ops (see the module docstring for the formula).

    Args:
        hs, hq: support and query features from :func:`body_features`.
        ys: support labels.
    Returns:
        ``(query logits, support logits before adaptation, inner losses)``.

    Gradients: the base readout's rows record gradient rows through the layer's
    own backward (if its coefficients require grad); second order also flows
    through the support errors and the support features; first order detaches both.
    """
    layer = net.output_layer
    aL = net.last_layer_alpha
    beta = _readout_bias_alpha(layer)
    ns = hs.shape[0]
    if first_order:
        hs = hs.detach()
        with torch.no_grad():
            zs = layer(hs)
        zq = layer(hq)
    else:
        z = layer(torch.cat([hs, hq]))
        zs, zq = z[:ns], z[ns:]
    s_s, g_s = pi_features(hs, layer.layernorm)
    s_q, g_q = pi_features(hq, layer.layernorm)
    K_ss = _kernel(s_s, g_s, s_s, g_s, beta) if num_steps > 1 else None
    D = None
    inner_losses, logits_before = [], None
    for t in range(num_steps):
        out_s = aL * (zs if D is None else zs - step_size * (K_ss @ D))
        loss, err = cross_entropy_and_error(out_s, ys)
        inner_losses.append(float(loss.detach()))
        if t == 0:
            logits_before = out_s.detach()
        delta = aL * err
        if first_order:
            delta = delta.detach()
        D = delta if D is None else D + delta
    K_qs = _kernel(s_q, g_q, s_s, g_s, beta)
    out_q = aL * (zq - step_size * (K_qs @ D))
    return out_q, logits_before, inner_losses


class _RowsAdapted:
    """The adapted readout while the inner loop's rows are in the RowStore."""

    def __init__(self, net, bias_delta, logits_before, inner_losses, rows_added):
        self.net = net
        self.bias_delta = bias_delta
        self.logits_before = logits_before
        self.inner_losses = inner_losses
        self.rows_added = rows_added

    def logits(self, hq: torch.Tensor) -> torch.Tensor:
        layer = self.net.output_layer
        z = layer(hq)
        if self.bias_delta is not None:
            z = z + _readout_bias_alpha(layer) * self.bias_delta.to(z.dtype)
        return self.net.last_layer_alpha * z


@contextmanager
def inf_readout_rows_adapted(
    net: InfMLP, hs: torch.Tensor, ys: torch.Tensor, step_size: float, num_steps: int = 1
):
    """Inner loop of an infinite net by appending rows to its readout (docs/math.md §5).

    Each step appends one row per support example (``A = δ·s``, ``B = ĝ``,
    coefficient ``-step_size``) to ``net.output_layer.rows``; the readout bias
    change is kept aside and added to the outputs. Yields an object whose
    ``.logits(hq)`` answers queries with the rows present (backward through
    it works while inside the block). On exit the rows are removed with
    ``RowStore.temporary_rows``: the base model never keeps them. First order only:
    the support errors and features are constants.
    """
    layer = net.output_layer
    store = layer.rows
    aL = net.last_layer_alpha
    beta = _readout_bias_alpha(layer)
    with store.temporary_rows():
        M = store.num_rows
        with torch.no_grad():
            hs = hs.detach()
            s, ghat = pi_features(hs, layer.layernorm)
            bias_delta = torch.zeros(layer.r_out, dtype=hs.dtype, device=hs.device) if beta else None
            inner_losses, logits_before = [], None
            for t in range(num_steps):
                z = layer(hs)
                if bias_delta is not None:
                    z = z + beta * bias_delta
                out_s = aL * z
                loss, err = cross_entropy_and_error(out_s, ys)
                inner_losses.append(float(loss.detach()))
                if t == 0:
                    logits_before = out_s
                delta = aL * err
                store.append(delta * s[:, None], ghat, -float(step_size))
                if bias_delta is not None:
                    bias_delta -= step_size * beta * delta.sum(0)
        yield _RowsAdapted(net, bias_delta, logits_before, inner_losses, store.num_rows - M)


# --------------------------------------------------------------------------- finite inner loop


def finite_inner_loop(
    fwd,
    base: dict,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    step_size: float,
    num_steps: int = 1,
    *,
    create_graph: bool = False,
    differentiable: bool = True,
    gproj_inner: bool = True,
):
    """Inner SGD steps of a finite network, functionally (``torch.func.functional_call``).

    Args:
        fwd: ``fwd(params, inputs) -> logits``.
        base: the module's parameters by name (not modified).
        create_graph: second order (the adapted parameters are differentiable
            functions of ``base`` *and* of the data through the inner gradients).
        differentiable: keep the adapted parameters attached to ``base`` (training);
            False detaches them (evaluation).
        gproj_inner: project inner gradients of finite π-weights onto span(Ω)
            (the readout, a plain parameter, is never projected).
    Returns:
        ``(adapted params, logits on ``inputs`` before adaptation, inner losses)``.
    """
    params = {k: (p if p.requires_grad else p.detach().requires_grad_(True)) for k, p in base.items()}
    inner_losses, before = [], None
    for t in range(num_steps):
        with torch.enable_grad():
            out = fwd(params, inputs)
            loss = F.cross_entropy(out.float() if out.dtype == torch.float16 else out, targets)
            grads = torch.autograd.grad(
                loss, list(params.values()), create_graph=create_graph, allow_unused=True
            )
        inner_losses.append(float(loss.detach()))
        if t == 0:
            before = out.detach()
        new = {}
        for (k, p), g in zip(params.items(), grads):
            if g is None:
                new[k] = p
                continue
            owner = owner_of(base[k]) if isinstance(base[k], FinPiParameter) else None
            if gproj_inner and owner is not None and owner.projected:
                g = project_onto_span(g, owner.omega_basis)  # differentiable (second order)
            if differentiable:
                new[k] = p - step_size * g
            else:
                with torch.no_grad():
                    new[k] = (p - step_size * g).requires_grad_(True)
        params = new
    return params, before, inner_losses


# --------------------------------------------------------------------------- meta-learner


@dataclass
class TaskResult:
    """What one task of a batch gave."""

    outer_loss: float
    acc_before: float
    acc_after: float
    inner_losses: list = field(default_factory=list)
    logits: torch.Tensor | None = None  # query logits after adaptation (detached), if asked


def meta_param_groups(
    net: nn.Module,
    meta_lr: float,
    first_layer_lr_mult: float = 1.0,
    last_layer_lr_mult: float = 1.0,
    bias_lr_mult: float = 1.0,
    weight_decay: float = 0.0,
) -> list[dict]:
    """:func:`inf.utils.pi_param_groups`, with every parameter of a group whose learning
    rate multiplier is 0 frozen (``requires_grad=False``): such a layer would otherwise
    record gradient rows (an infinite layer) or gradients that are never used."""
    groups = pi_param_groups(
        net,
        meta_lr,
        weight_decay=weight_decay,
        first_layer_lr_mult=first_layer_lr_mult,
        last_layer_lr_mult=last_layer_lr_mult,
        bias_lr_mult=bias_lr_mult,
    )
    for g in groups:
        if g["lr_mult"] == 0:
            for p in g["params"]:
                p.requires_grad_(False)
    return groups


def make_meta_optimizer(
    net: nn.Module,
    meta_lr: float,
    momentum: float = 0.0,
    first_layer_lr_mult: float = 1.0,
    last_layer_lr_mult: float = 1.0,
    bias_lr_mult: float = 1.0,
    weight_decay: float = 0.0,
    gproj_outer: bool = True,
) -> InfSGD:
    """The outer optimizer: InfSGD over :func:`meta_param_groups` (``project`` =
    ``gproj_outer`` for finite π-weights)."""
    groups = meta_param_groups(
        net, meta_lr, first_layer_lr_mult, last_layer_lr_mult, bias_lr_mult, weight_decay
    )
    return InfSGD(groups, lr=meta_lr, momentum=momentum, project=gproj_outer)


class MetaLearner:
    """MAML on one network.

    Args:
        net: an InfMLP, FinPiMLPSample or MuMLP.
        optimizer, scheduler: the outer optimizer (e.g. :func:`make_meta_optimizer`)
            and an optional lr scheduler stepped once per meta-batch.
        step_size: inner learning rate η. num_steps: inner steps.
        first_order: first-order MAML (the default is second order).
        adapt_readout_only: adapt only the readout (required for infinite nets).
        gproj_inner: project inner gradients of finite π-weights onto span(Ω).
        gproj_outer: finite π-nets: clip the projected outer gradient (must match the
            optimizer's ``project``); otherwise the raw gradient is clipped.
        grad_clip: max norm of the outer gradient (``<= 0``: no clipping), π-aware
            (:func:`inf.utils.clip_grad_norm_`). gclip_per_param: clip each tensor alone.
        rows_path: infinite nets, first order: answer queries with the inner rows
            appended to the readout's RowStore (True) or with torch ops (False).
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer=None,
        scheduler=None,
        *,
        step_size: float = 0.1,
        num_steps: int = 1,
        first_order: bool = False,
        adapt_readout_only: bool = True,
        gproj_inner: bool = True,
        gproj_outer: bool = True,
        grad_clip: float = -1.0,
        gclip_per_param: bool = False,
        rows_path: bool = True,
    ):
        self.net = net
        self.kind = model_kind(net)
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if self.kind == "infinite" and not adapt_readout_only:
            raise NotImplementedError(
                "MAML of an infinite π-net adapts the readout only: pass --adapt-readout-only "
                "(adapting the body layers in the inner loop is implemented for finite nets)"
            )
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.step_size = float(step_size)
        self.num_steps = int(num_steps)
        self.first_order = bool(first_order)
        self.adapt_readout_only = bool(adapt_readout_only)
        self.gproj_inner = bool(gproj_inner)
        self.gproj_outer = bool(gproj_outer)
        self.grad_clip = grad_clip
        self.gclip_per_param = gclip_per_param
        self.rows_path = rows_path

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], -1)
        return x.to(device=self.device, dtype=_input_dtype(self.net))

    # ----------------------------------------------------------------- one task
    def task(
        self, xs, ys, xq, yq, train: bool = False, loss_scale: float = 1.0, keep_logits: bool = False
    ) -> TaskResult:
        """Adapt on the support set ``(xs, ys)`` and evaluate on the queries ``(xq, yq)``.

        With ``train`` the outer loss times ``loss_scale`` is backpropagated
        (gradients accumulate into the net: ``.grad`` and pending rows).
        """
        if train and self.kind == "infinite" and self.first_order and self.rows_path:
            return self._inf_rows_train_task(xs, ys, xq, yq, loss_scale, keep_logits)
        xs, xq = self._prepare(xs), self._prepare(xq)
        ys, yq = ys.to(self.device), yq.to(self.device)
        if self.kind == "infinite":
            logits, before, inner = self._inf_task(xs, ys, xq, train)
        else:
            logits, before, inner = self._finite_task(xs, ys, xq, train)
        loss = F.cross_entropy(logits.float() if logits.dtype == torch.float16 else logits, yq)
        if train:
            (loss * loss_scale).backward()
        return TaskResult(
            float(loss.detach()),
            _accuracy(before, ys),
            _accuracy(logits, yq),
            inner,
            logits.detach() if keep_logits else None,
        )

    def _inf_task(self, xs, ys, xq, train):
        net = self.net
        ns = xs.shape[0]
        if train and self.first_order and self.rows_path:
            # the backward has to run while the inner rows are in the readout
            raise RuntimeError(
                "internal: first-order training on the rows path goes "
                "through MetaLearner._inf_rows_train_task"
            )
        if train and not self.first_order:
            h = body_features(net, torch.cat([xs, xq]))
            return inf_readout_adapt(net, h[:ns], ys, h[ns:], self.step_size, self.num_steps, False)
        if train:  # first order with torch ops
            with torch.no_grad():
                hs = body_features(net, xs)
            hq = body_features(net, xq)
            return inf_readout_adapt(net, hs, ys, hq, self.step_size, self.num_steps, True)
        with torch.no_grad():
            h = body_features(net, torch.cat([xs, xq]))
            if not self.rows_path:
                return inf_readout_adapt(net, h[:ns], ys, h[ns:], self.step_size, self.num_steps, True)
            with inf_readout_rows_adapted(net, h[:ns], ys, self.step_size, self.num_steps) as adapted:
                logits = adapted.logits(h[ns:])
        return logits, adapted.logits_before, adapted.inner_losses

    def _finite_task(self, xs, ys, xq, train):
        net = self.net
        second = train and not self.first_order
        if self.adapt_readout_only:
            module = net.output_layer
            alpha = net.last_layer_alpha
            if second or not train:
                with torch.set_grad_enabled(train):
                    h = body_features(net, torch.cat([xs, xq]))
                in_s, in_q = h[: xs.shape[0]], h[xs.shape[0] :]
            else:  # first order: the support features are constants
                with torch.no_grad():
                    in_s = body_features(net, xs)
                with torch.set_grad_enabled(train):
                    in_q = body_features(net, xq)

            def fwd(params, inp):
                return alpha * functional_call(module, params, (inp,))
        else:
            module = net
            in_s, in_q = xs, xq

            def fwd(params, inp):
                return functional_call(module, params, (inp,))

        params, before, inner_losses = finite_inner_loop(
            fwd,
            dict(module.named_parameters()),
            in_s,
            ys,
            self.step_size,
            self.num_steps,
            create_graph=second,
            differentiable=train,
            gproj_inner=self.gproj_inner,
        )
        with torch.set_grad_enabled(train):
            logits = fwd(params, in_q)
        return logits, before, inner_losses

    # ----------------------------------------------------------------- batches
    def meta_step(self, batch, keep_logits: bool = False) -> dict:
        """One outer update on a batch of tasks ``(xs, ys, xq, yq)`` (leading dim = tasks).

        The meta-gradient is that of the mean outer loss over the tasks. Returns
        the per-task :class:`TaskResult` s, the mean outer loss (before the
        update) and the outer gradient norm (before clipping).
        """
        if self.optimizer is None:
            raise RuntimeError("MetaLearner.meta_step needs an optimizer")
        xs, ys, xq, yq = batch
        B = xs.shape[0]
        self.optimizer.zero_grad()
        results = [
            self.task(xs[b], ys[b], xq[b], yq[b], train=True, loss_scale=1.0 / B, keep_logits=keep_logits)
            for b in range(B)
        ]
        gnorm = self._clip()
        self.optimizer.step()
        self.optimizer.zero_grad()
        if self.scheduler is not None:
            self.scheduler.step()
        return {
            "tasks": results,
            "outer_loss": float(np.mean([r.outer_loss for r in results])),
            "acc_after": float(np.mean([r.acc_after for r in results])),
            "acc_before": float(np.mean([r.acc_before for r in results])),
            "grad_norm": gnorm,
        }

    def _inf_rows_train_task(self, xs, ys, xq, yq, scale, keep_logits) -> TaskResult:
        net = self.net
        xs, xq = self._prepare(xs), self._prepare(xq)
        ys, yq = ys.to(self.device), yq.to(self.device)
        with torch.no_grad():
            hs = body_features(net, xs)
        with inf_readout_rows_adapted(net, hs, ys, self.step_size, self.num_steps) as adapted:
            hq = body_features(net, xq)
            logits = adapted.logits(hq)
            loss = F.cross_entropy(logits, yq)
            (loss * scale).backward()
        return TaskResult(
            float(loss.detach()),
            _accuracy(adapted.logits_before, ys),
            _accuracy(logits, yq),
            adapted.inner_losses,
            logits.detach() if keep_logits else None,
        )

    def _clip(self) -> float:
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.kind == "finite" and not self.gproj_outer:
            # the raw (unprojected) gradient is what the step uses: clip its norm
            with_grad = [p for p in params if p.grad is not None]
            if not with_grad:
                return 0.0
            if self.grad_clip is None or self.grad_clip <= 0:
                return float(
                    torch.linalg.vector_norm(
                        torch.stack([torch.linalg.vector_norm(p.grad.float()) for p in with_grad])
                    )
                )
            if self.gclip_per_param:
                norms = [float(torch.nn.utils.clip_grad_norm_([p], self.grad_clip)) for p in with_grad]
                return math.sqrt(sum(n * n for n in norms))
            return float(torch.nn.utils.clip_grad_norm_(with_grad, self.grad_clip))
        clip = self.grad_clip if self.grad_clip is not None else -1.0
        return float(clip_grad_norm_(params, clip, per_param=self.gclip_per_param))

    @torch.no_grad()
    def evaluate_batch(self, batch, keep_logits: bool = False) -> list[TaskResult]:
        """Adapt and evaluate every task of a batch; the net is not changed."""
        xs, ys, xq, yq = batch
        return [
            self.task(xs[b], ys[b], xq[b], yq[b], train=False, keep_logits=keep_logits)
            for b in range(xs.shape[0])
        ]

    def outer_loss(self, batch) -> float:
        """Mean outer loss over the tasks of a batch (no gradient)."""
        return float(np.mean([r.outer_loss for r in self.evaluate_batch(batch)]))

    def evaluate(self, batches, progress=None) -> dict:
        """Mean outer loss and accuracy over all tasks of ``batches``, with a 95% CI."""
        losses, accs, before = [], [], []
        for batch in batches:
            for r in self.evaluate_batch(batch):
                losses.append(r.outer_loss)
                accs.append(r.acc_after)
                before.append(r.acc_before)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(acc=f"{np.mean(accs):.4f}")
        acc, ci = mean_and_ci95(accs)
        return {
            "mean_outer_loss": float(np.mean(losses)) if losses else float("nan"),
            "median_outer_loss": float(np.median(losses)) if losses else float("nan"),
            "accuracy": acc,
            "accuracy_ci95": ci,
            "accuracy_before": float(np.mean(before)) if before else float("nan"),
            "num_tasks": len(accs),
        }


def mean_and_ci95(values) -> tuple[float, float]:
    """Mean and the half-width of its normal 95% confidence interval, ``1.96 σ / sqrt(n)``."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    if v.size == 1:
        return float(v[0]), float("nan")
    return float(v.mean()), float(1.96 * v.std(ddof=1) / math.sqrt(v.size))

"""A naive infinite π-MLP: the baseline that ``benchmarks/step_time.py`` compares against.

This is the straightforward way to write the π-limit (docs/math.md, "Forward" and
"Backward" of an infinite layer), as the original π-limit code did it: every
step computes the whole ``batch × M`` kernel matrices ``q = ĝ Bᵀ``, ``F00(q)``,
``F11(q)``, ``F02(q)`` in one piece with the textbook formulas, multiplies them
with all rows in single ``torch.mm`` calls, and the optimizer appends the new
rows with ``torch.cat`` (a copy of every row, every step). Nothing is blocked,
cached or done in place. It is kept independent of ``inf/`` (it only reads the
initial rows and weights of an :class:`~inf.networks.InfMLP`), so the benchmark
also checks that both compute the same outputs.
"""

from __future__ import annotations

import math

import torch


def pi_rows(layer):
    """``(A, c, B)`` of an infinite π-layer, whatever the coefficients are called."""
    store = layer.rows
    coef = getattr(store, "coefficients", None)
    if coef is None:
        coef = store.Amult
    return store.A, coef, store.B


def pi_layers(net) -> list:
    """The infinite layers of an InfMLP: hidden layers, then the output layer."""
    return list(net.hidden_layers) + [net.output_layer]


class _NaiveLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, A, c, B):
        s = g.norm(dim=1, keepdim=True)
        ghat = g / s
        q = (ghat @ B.T).clamp(-1.0, 1.0)
        f00 = (torch.sqrt(1 - q * q) + (math.pi - torch.arccos(q)) * q) / (2 * math.pi)
        ctx.save_for_backward(g, ghat, s, q, A, c, B)
        return s * ((f00 * c) @ A)

    @staticmethod
    def backward(ctx, delta):
        g, ghat, s, q, A, c, B = ctx.saved_tensors
        gamma = (delta @ A.T) * c
        f11 = (math.pi - torch.arccos(q)) / (2 * math.pi)
        f02 = torch.sqrt(1 - q * q) / (2 * math.pi)
        grad_g = (gamma * f11) @ B + ghat * (gamma * f02).sum(1, keepdim=True)
        ctx.new_rows = (delta * s, ghat)  # the gradient rows (δ·s, ĝ)
        return grad_g, None, None, None


class NaiveInfMLP:
    """Plain SGD (no momentum, no weight decay) on a copy of ``net``'s weights and rows."""

    def __init__(self, net):
        if getattr(net, "layernorm", False):
            raise ValueError("the naive reference implements the plain (non-layernorm) π-MLP only")
        inp = net.input_layer
        self.a1, self.aL = net.first_layer_alpha, net.last_layer_alpha
        self.A0 = inp.A.detach().clone().requires_grad_(True)
        self.b0 = None if inp.bias is None else inp.bias.detach().clone().requires_grad_(True)
        self.beta0 = inp.bias_alpha
        self.layers = []
        for layer in pi_layers(net):
            A, c, B = pi_rows(layer)
            bias = None if layer.bias is None else layer.bias.detach().clone().requires_grad_(True)
            self.layers.append(
                dict(
                    A=A.detach().clone(),
                    c=c.detach().clone(),
                    B=B.detach().clone(),
                    bias=bias,
                    beta=layer.bias_alpha,
                    ctx=None,
                )
            )

    def forward(self, x):
        h = x @ self.A0
        if self.b0 is not None:
            h = h + self.beta0 * self.b0
        h = self.a1 * h
        for t in self.layers:
            h = _NaiveLayer.apply(h, t["A"], t["c"], t["B"])
            t["node"] = h.grad_fn
            if t["bias"] is not None:
                h = h + t["beta"] * t["bias"]
        return self.aL * h

    __call__ = forward

    def dense_params(self):
        ps = [self.A0, self.b0] + [t["bias"] for t in self.layers]
        return [p for p in ps if p is not None]

    def zero_grad(self):
        for p in self.dense_params():
            p.grad = None

    @torch.no_grad()
    def step(self, lr: float):
        """Append every layer's gradient rows by concatenation, coefficient ``-lr``; SGD on the rest."""
        for t in self.layers:
            A_new, B_new = t["node"].new_rows
            t["A"] = torch.cat([t["A"], A_new.to(t["A"].dtype)])
            t["B"] = torch.cat([t["B"], B_new.to(t["B"].dtype)])
            t["c"] = torch.cat([t["c"], t["c"].new_full((A_new.shape[0],), -lr)])
            t["node"] = None
        for p in self.dense_params():
            if p.grad is not None:
                p.sub_(lr * p.grad)

"""LARS and LAMB, written from their papers' update rules (timm and lightning-flash, which the
authors of the basis-function paper used, cannot be installed here: timm needs torchvision).

LARS — You, Gitman & Ginsburg (2017), "Large Batch Training of Convolutional Networks",
Algorithm 1, in the form of lightning-flash's ``LARS`` (which the authors' ``train.py`` calls):
for every parameter tensor w with gradient g,

    λ = η ‖w‖ / (‖g‖ + β ‖w‖ + ε)     (1 when ‖w‖ or ‖g‖ is 0)   — the local learning rate
    d = λ (g + β w)                                               — β: weight decay, η: trust coefficient
    b ← μ b + d   (b = d on the first step)
    w ← w − γ b                                                   — γ: the (global) learning rate

LAMB — You et al. (2020), "Large Batch Optimization for Deep Learning: Training BERT in
76 minutes", Algorithm 2 (with Adam's bias correction): for every parameter tensor,

    m ← β1 m + (1 − β1) g,   v ← β2 v + (1 − β2) g²
    r = (m / (1 − β1ᵗ)) / (√(v / (1 − β2ᵗ)) + ε) + λ w
    w ← w − γ · (‖w‖ / ‖r‖) · r        (trust ratio 1 when ‖w‖ or ‖r‖ is 0)
"""

from __future__ import annotations

import torch
from torch.optim import Optimizer

__all__ = ["LARS", "LAMB"]


class LARS(Optimizer):
    """Layer-wise adaptive rate scaling on SGD with momentum (module docstring)."""

    def __init__(
        self,
        params,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        eps: float = 1e-8,
        dampening: float = 0.0,
        nesterov: bool = False,
    ):
        if lr < 0 or momentum < 0 or weight_decay < 0 or trust_coefficient <= 0:
            raise ValueError(
                f"LARS: invalid settings lr={lr}, momentum={momentum}, weight_decay={weight_decay}, "
                f"trust_coefficient={trust_coefficient}"
            )
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("LARS: nesterov momentum requires a momentum and zero dampening")
        super().__init__(
            params,
            dict(
                lr=lr,
                momentum=momentum,
                weight_decay=weight_decay,
                trust_coefficient=trust_coefficient,
                eps=eps,
                dampening=dampening,
                nesterov=nesterov,
            ),
        )

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            wd, mom = group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                if float(w_norm) > 0 and float(g_norm) > 0:
                    local = group["trust_coefficient"] * w_norm / (g_norm + wd * w_norm + group["eps"])
                else:
                    local = torch.ones((), dtype=p.dtype, device=p.device)
                d = (d + wd * p if wd else d.clone()) * local
                if mom:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        buf = state["momentum_buffer"] = d.clone()
                    else:
                        buf = state["momentum_buffer"]
                        buf.mul_(mom).add_(d, alpha=1 - group["dampening"])
                    d = d + mom * buf if group["nesterov"] else buf
                p.add_(d, alpha=-group["lr"])
        return loss


class LAMB(Optimizer):
    """Layer-wise adaptive moments (module docstring)."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
    ):
        if lr < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1) or eps < 0 or weight_decay < 0:
            raise ValueError(
                f"LAMB: invalid settings lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}"
            )
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"]
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                r = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + group["eps"])
                if group["weight_decay"]:
                    r = r + group["weight_decay"] * p
                w_norm, r_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(r)
                trust = w_norm / r_norm if float(w_norm) > 0 and float(r_norm) > 0 else 1.0
                p.add_(r * trust, alpha=-group["lr"])
        return loss

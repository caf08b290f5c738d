"""InfSGD: SGD that trains infinite π-layers by appending rows (spec §5).

A drop-in for ``torch.optim.SGD`` (same hyperparameters, per-group values,
``state_dict``, every ``torch.optim.lr_scheduler``). Per parameter kind:

* the coefficients ``Amult`` of an infinite layer: the pending gradient rows
  ``(δ·s, ĝ)`` are appended with coefficient 0, then torch's SGD rule is
  applied to the coefficient vector with gradient 1 on the new rows (times the
  clipping scale) and 0 elsewhere. Weight decay adds ``λc`` on all rows;
  the momentum buffer grows with ``c`` (zero-padded). This is the exact
  infinite-width limit of projected SGD with momentum and weight decay.
* ``A`` and ``B`` of an infinite layer: change only through the append above.
* :class:`~inf.tensors.FinPiParameter` (finite π-weights): the gradient is
  projected onto ``span(Ω)`` (unless the group sets ``project=False``), then SGD.
* anything else: plain SGD.
"""
from __future__ import annotations

import torch
from torch.optim import Optimizer

from .tensors import FinPiParameter, InfPiParameter, RowStore, owner_of

__all__ = ["InfSGD", "PiSGD"]


class InfSGD(Optimizer):
    """Stochastic gradient descent for π-nets, infinite and finite.

    Args:
        params: iterable of parameters or param groups (``net.parameters()`` works).
        lr, momentum, dampening, weight_decay, nesterov: as in ``torch.optim.SGD``.
        project: project finite π-weights' gradients (default True; per group).
    """

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, project: bool = True):
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, project=project)
        super().__init__(params, defaults)

    @staticmethod
    def _sgd_update(p, d_p, state, group):
        """torch's SGD rule on one tensor; ``d_p`` already includes everything but weight decay."""
        wd, mu = group["weight_decay"], group["momentum"]
        if wd:
            d_p = d_p.add(p, alpha=wd)
        if mu:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = d_p.detach().clone()
            else:
                if buf.shape[0] < p.shape[0]:  # rows were appended: the buffer grows with zeros
                    buf = torch.cat([buf, buf.new_zeros((p.shape[0] - buf.shape[0],) + tuple(buf.shape[1:]))])
                buf.mul_(mu).add_(d_p, alpha=1 - group["dampening"])
            state["momentum_buffer"] = buf
            d_p = d_p.add(buf, alpha=mu) if group["nesterov"] else buf
        p.add_(d_p, alpha=-group["lr"])

    @torch.no_grad()
    def _step_rows(self, p, store: RowStore, group) -> bool:
        """Append a layer's pending rows and update its coefficients; True if it had a gradient."""
        rows = store.pending()
        if p.grad is None:
            # zero_grad() ran after backward: the pending rows were discarded with it
            store.clear_pending()
            return False
        if rows is None:
            return False
        A_new, B_new = rows
        if not (torch.isfinite(A_new).all() and torch.isfinite(B_new).all()):
            store.clear_pending()
            raise FloatingPointError(
                f"{store.name}: the gradient contains NaN or inf; refusing to append its rows. "
                "Lower the learning rate, clip gradients (inf.utils.clip_grad_norm_) or check the loss.")
        first = store.append(A_new, B_new, 0.0)
        scale = store.pending_scale
        store.clear_pending()
        if not group["weight_decay"] and not group["momentum"]:
            p[first:] = -group["lr"] * scale  # only the new rows change: O(rows added)
        else:
            grad = torch.zeros_like(p)
            grad[first:] = scale
            self._sgd_update(p, grad, self.state[p], group)
        p.grad = None
        return True

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        stepped = False
        for group in self.param_groups:
            for p in group["params"]:
                if isinstance(p, InfPiParameter):
                    store = owner_of(p)
                    if store is not None and p is store.Amult:
                        stepped |= self._step_rows(p, store, group)
                    continue
                if p.grad is None:
                    continue
                stepped = True
                if p.grad.is_sparse:
                    raise RuntimeError("InfSGD does not support sparse gradients")
                d_p = p.grad
                if isinstance(p, FinPiParameter) and group["project"]:
                    layer = owner_of(p)
                    if layer is None:
                        raise RuntimeError("a FinPiParameter is not attached to a finite π-layer; "
                                           "create it through FinPiInputLinearReLU/FinPiLinearReLU")
                    d_p = layer.project_(d_p)
                self._sgd_update(p, d_p, self.state[p], group)
        if not stepped and closure is None:
            raise RuntimeError("InfSGD.step() found no gradient: call loss.backward() before step() "
                               "(and zero_grad() after it, not before)")
        return loss

    def zero_grad(self, set_to_none: bool = True):
        super().zero_grad(set_to_none)
        for group in self.param_groups:
            for p in group["params"]:
                if isinstance(p, InfPiParameter):
                    store = owner_of(p)
                    if store is not None and p is store.Amult:
                        store.clear_pending()


# The original library's name.
PiSGD = InfSGD

"""InfSGD: SGD that trains infinite π-layers by appending rows (docs/math.md §5).

A drop-in for ``torch.optim.SGD`` (same hyperparameters, per-group values,
``state_dict``, every ``torch.optim.lr_scheduler``). Per parameter kind:

* the coefficients of an infinite layer: the layer's :class:`~inf.rows.RowStore`
  hands over its pending gradient rows ``(δ·s, ĝ)`` (:meth:`~inf.rows.RowStore.consume`),
  appends them with coefficient 0 (:meth:`~inf.rows.RowStore.append_update`), then
  torch's SGD rule is applied to the coefficient vector with gradient 1 on the new
  rows (times the clipping scale) and 0 elsewhere. Weight decay adds ``λc`` on all
  rows; the momentum buffer grows with ``c`` (zero-padded). This is the exact
  infinite-width limit of projected SGD with momentum and weight decay.
* ``A`` and ``B`` of an infinite layer: change only through the append above.
* finite π-weights (:class:`~inf.parameters.FinPiParameter`): their layer has already
  projected the gradient onto ``span(Ω)`` when backward accumulated it; plain SGD.
* anything else: plain SGD.

A step is all or nothing: every gradient (rows included) is checked first, and a
non-finite one raises :class:`FloatingPointError` before anything changes, so the
model and the optimizer state are exactly as before the call.
"""

from __future__ import annotations

import math

import torch
from torch.optim import Optimizer

from .layers import set_gradient_projection
from .parameters import InfPiParameter, owner_of
from .rows import RowStore, rows_of

__all__ = ["InfSGD"]

_HYPER = ("lr", "momentum", "dampening", "weight_decay")


def _check_hyperparameters(group: dict, where: str = "") -> None:
    for key in _HYPER:
        value = group.get(key, 0.0)
        if isinstance(value, torch.Tensor):
            value = float(value)
        if not math.isfinite(value) or value < 0.0:
            raise ValueError(f"InfSGD{where}: {key} must be a finite number >= 0, got {value}")
    if group.get("nesterov") and (group.get("momentum", 0) <= 0 or group.get("dampening", 0) != 0):
        raise ValueError("InfSGD: Nesterov momentum requires a momentum and zero dampening")


def _layout(p: torch.Tensor) -> list:
    """What a parameter must look like for a saved optimizer state to fit it (rows may differ)."""
    store = rows_of(p)
    if store is not None:
        return ["coefficients", store.r, store.r_out]
    if isinstance(p, InfPiParameter):
        return ["rows", *p.shape[1:]]
    return ["tensor", *p.shape]


class InfSGD(Optimizer):
    """Stochastic gradient descent for π-nets, infinite and finite.

    Args:
        params: iterable of parameters or param groups (``net.parameters()`` works).
        lr, momentum, dampening, weight_decay, nesterov: as in ``torch.optim.SGD``;
            every value must be finite and non-negative.
        project: whether finite π-weights train with projected gradients (default
            True). ``False`` switches their layers' projection off
            (:func:`inf.layers.set_gradient_projection`), per group.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        project: bool = True,
    ):
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            project=project,
        )
        _check_hyperparameters(defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_hyperparameters(group, f" (param group {len(self.param_groups) - 1})")
        if not group["project"]:
            set_gradient_projection(_layers_of(group["params"]), False, group["params"])

    # ------------------------------------------------------------------ step
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
                    buf = _grow_momentum(state, buf, p.shape[0])
                buf.mul_(mu).add_(d_p, alpha=1 - group["dampening"])
            state["momentum_buffer"] = buf
            d_p = d_p.add(buf, alpha=mu) if group["nesterov"] else buf
        p.add_(d_p, alpha=-group["lr"])

    def _step_rows(self, p, store: RowStore, group) -> None:
        """Append a layer's pending rows and update its coefficients."""
        rows = store.consume()
        new = store.append_update(rows)
        if not group["weight_decay"] and not group["momentum"]:
            p[new] = -group["lr"] * rows.scale  # only the new rows change: O(rows added)
        else:
            grad = torch.zeros_like(p)
            grad[new] = rows.scale
            self._sgd_update(p, grad, self.state[p], group)

    def _gather(self):
        """``[(group, param, store or None)]`` for everything that has a gradient; raises before
        any change if a hyperparameter or a gradient is not finite."""
        work, bad, checks = [], [], []
        for gi, group in enumerate(self.param_groups):
            _check_hyperparameters(group, f" (param group {gi})")
            for pi, p in enumerate(group["params"]):
                store = rows_of(p)
                if store is not None:
                    rows = store.pending() if store.has_gradient else None
                    if rows is None:
                        continue
                    name = f"{store.name} (its gradient rows)"
                    if not math.isfinite(rows.scale):
                        bad.append(name)
                    checks.append((name, (rows.A, rows.B)))
                    work.append((group, p, store))
                elif isinstance(p, InfPiParameter) or p.grad is None:
                    continue
                else:
                    if p.grad.is_sparse:
                        raise RuntimeError("InfSGD does not support sparse gradients")
                    checks.append((f"parameter {pi} of param group {gi} (shape {tuple(p.shape)})", (p.grad,)))
                    work.append((group, p, None))
        # one check (one device synchronization) for all gradients; names only on failure
        if checks and not _all_finite_many([t for _, ts in checks for t in ts]):
            bad += [name for name, ts in checks if not all(_all_finite(t) for t in ts) and name not in bad]
        if bad:
            raise FloatingPointError(
                "InfSGD.step: the gradient of " + ", ".join(bad) + " contains NaN or inf; nothing was "
                "changed. Lower the learning rate, clip gradients (inf.clip.clip_grad_norm_) or check the "
                "loss, then call zero_grad() and continue."
            )
        return work

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = self._gather()
        if not work and closure is None:
            raise RuntimeError(
                "InfSGD.step() found no gradient: call loss.backward() before step() "
                "(and zero_grad() after it, not before)"
            )
        for group, p, store in work:
            if store is not None:
                self._step_rows(p, store, group)
            else:
                self._sgd_update(p, p.grad, self.state[p], group)
        return loss

    # ------------------------------------------------------------ save / load
    def state_dict(self):
        state = super().state_dict()
        # momentum buffers of coefficients are views of capacity buffers: save M entries only
        packed = {}
        for key, st in state["state"].items():
            st = {k: v for k, v in st.items() if k != _CAPACITY}
            buf = st.get("momentum_buffer")
            if (
                isinstance(buf, torch.Tensor)
                and buf.untyped_storage().nbytes() > buf.numel() * buf.element_size()
            ):
                st["momentum_buffer"] = buf.clone()
            packed[key] = st
        state["state"] = packed
        state["pi_layout"] = [[_layout(p) for p in g["params"]] for g in self.param_groups]
        return state

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        saved = state_dict.pop("pi_layout", None)
        if saved is not None:
            current = [[_layout(p) for p in g["params"]] for g in self.param_groups]
            if len(saved) != len(current):
                raise ValueError(
                    f"optimizer state has {len(saved)} param groups, this optimizer {len(current)}: "
                    "it was saved for another network or another param-group layout"
                )
            for gi, (s_group, c_group) in enumerate(zip(saved, current)):
                if len(s_group) != len(c_group):
                    raise ValueError(
                        f"optimizer state: param group {gi} has {len(s_group)} parameters, "
                        f"this optimizer's has {len(c_group)}: it was saved for another network"
                    )
                for pi, (s, c) in enumerate(zip(s_group, c_group)):
                    if list(s) != list(c):
                        raise ValueError(
                            f"optimizer state: parameter {pi} of param group {gi} was {s}, "
                            f"here it is {c}: the state was saved for another network"
                        )
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            group.setdefault("project", True)
            _check_hyperparameters(group)


_CAPACITY = "_momentum_capacity"


def _all_finite(t: torch.Tensor) -> bool:
    """``isfinite(t).all()`` in one pass when it holds: a sum is finite only if every entry is
    (inf and NaN propagate), and only an overflowing sum needs the entry-wise check."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _all_finite_many(tensors: list[torch.Tensor]) -> bool:
    """Whether every entry of every tensor is finite, with one host synchronization per
    device: the tensors' sums (float32) are added up, and only a non-finite total (a
    non-finite entry, or an overflow) needs the tensor-by-tensor check."""
    by_device: dict = {}
    for t in tensors:
        by_device.setdefault(t.device, []).append(t.sum(dtype=torch.float32))
    for sums in by_device.values():
        if not bool(torch.isfinite(torch.stack(sums).sum())):
            return all(_all_finite(t) for t in tensors)
    return True


def _grow_momentum(state: dict, buf: torch.Tensor, rows: int) -> torch.Tensor:
    """``buf`` zero-padded to ``rows`` entries. The buffer is a view of a capacity buffer
    (``state["_momentum_capacity"]``, left out of :meth:`InfSGD.state_dict`) that doubles
    when full, like the rows (:meth:`inf.rows.RowStore.reserve`): growing writes the new
    entries only, and copies the buffer O(log M) times in all. A buffer replaced by
    other code (compression, loading) is adopted into a new capacity buffer."""
    n = buf.shape[0]
    cap = state.get(_CAPACITY)
    if not (
        cap is not None
        and cap.shape[0] >= rows
        and cap.shape[1:] == buf.shape[1:]
        and cap.dtype == buf.dtype
        and cap.device == buf.device
        and buf.storage_offset() == 0
        and buf.is_contiguous()
        and buf.untyped_storage().data_ptr() == cap.untyped_storage().data_ptr()
    ):
        cap = buf.new_empty((max(rows, 2 * n, 16),) + tuple(buf.shape[1:]))
        cap[:n].copy_(buf)
        state[_CAPACITY] = cap
    cap[n:rows].zero_()
    return cap[:rows]


def _layers_of(params):
    """The finite π-layers owning ``params`` (for switching their projection)."""
    seen, layers = set(), []
    for p in params:
        owner = owner_of(p)
        if owner is not None and not isinstance(owner, RowStore) and id(owner) not in seen:
            seen.add(id(owner))
            layers.append(owner)
    return layers

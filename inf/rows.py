"""The rows of an infinite π-layer and the one protocol for their gradient.

An infinite π-layer is the triple ``(A, c, B)`` of docs/math.md §1: ``M`` rows, each
an output direction ``A_i``, a coefficient ``c_i`` and a unit vector ``B_i``.
:class:`RowStore` owns the three tensors of one layer and is the only place that
knows how rows are laid out in memory, so that a sharded or compressed version
replaces this one class.

Growth is amortized: rows live in capacity buffers that double when full, and the
registered parameters are views of their first ``M`` rows. Appending ``b`` rows
writes ``b`` rows; a reallocation (counted in ``reallocations``) happens
``O(log M)`` times. The parameters are the source of truth: whenever they stop
being views of the buffers (after ``.to()``, ``load_state_dict``, ``deepcopy``)
the store adopts them as they are.

The gradient protocol
---------------------
A layer's gradient is rows too: one ``(δ·s, ĝ)`` per example and per call
(docs/math.md §5). The step reads in one direction, layer → rows → optimizer:

1. forward asks :meth:`RowStore.recording` for a :class:`GradientRecording`; the
   layer's backward *stages* its rows there, and they are :meth:`record`-ed only
   when the backward accumulates gradients into ``.grad`` (``loss.backward()``):
   a hook on the accumulation of a fresh leaf ("trigger") commits them, so
   ``torch.autograd.grad(loss, x)`` (saliency, adversarial examples) records nothing.
2. clipping reads :meth:`pending_norm` and calls :meth:`scale`;
3. the optimizer calls :meth:`consume` and :meth:`append_update`;
4. :meth:`discard` drops them; :meth:`temporary_rows` scopes rows appended for a
   while (MAML's inner loop).

"Has a gradient" is the coefficient parameter's ``.grad``: recording sets it to a
zero tensor that this module alone creates and checks (object and version), so
every documented way of clearing gradients also clears the rows —
``zero_grad()`` with or without ``set_to_none``, ``p.grad = None`` and
``p.grad.zero_()`` by hand. No other module touches pending rows or that state.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
from torch import nn

from .math import F00_F11_F02
from .parameters import InfPiParameter, attach_owner, owner_of

__all__ = ["RowStore", "PendingRows", "GradientRecording", "rows_of"]

_GROWABLE = ("A", "coefficients", "B")
_LEGACY_KEYS = {"coefficients": "Amult"}  # state-dict key of the original library (v0.1 checkpoints)


class PendingRows(NamedTuple):
    """The gradient of one layer since the last step: rows ``A = δ·s`` (b × r_out), ``B = ĝ``
    (b × r), and the clipping ``scale`` that multiplies them."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float


class GradientRecording:
    """The link from one forward call's backward to its store.

    The layer's backward :meth:`stage`-s its rows; :meth:`commit` (a hook on the
    accumulation of the call's trigger leaf) hands them to :meth:`RowStore.record`.
    """

    __slots__ = ("store", "staged")

    def __init__(self, store: RowStore):
        self.store = store
        self.staged = None

    def stage(self, A: torch.Tensor, B: torch.Tensor) -> None:
        self.staged = (A, B)

    def commit(self, _trigger=None) -> None:
        if self.staged is not None:
            A, B = self.staged
            self.staged = None
            self.store.record(A, B)


def rows_of(param: torch.Tensor) -> RowStore | None:
    """The :class:`RowStore` whose coefficients ``param`` is, else None (``A``/``B`` give None)."""
    if not isinstance(param, InfPiParameter):
        return None
    store = owner_of(param)
    return store if isinstance(store, RowStore) and store.coefficients is param else None


class RowStore(nn.Module):
    """The rows ``A`` (M × r_out), ``coefficients`` (M) and ``B`` (M × r) of one infinite layer.

    Args:
        r: width of ``B`` rows (the layer's input rank).
        r_out: width of ``A`` rows (the layer's output rank).
        rows: initial number of rows.
        dtype: storage dtype of ``A`` and ``B``; the coefficients are float32
            unless this is float64.

    Set ``coefficients.requires_grad_(False)`` to freeze the layer (no rows are recorded).
    """

    def __init__(self, r: int, r_out: int, rows: int = 0, device=None, dtype=None):
        super().__init__()
        dtype = dtype or torch.get_default_dtype()
        coef_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.r, self.r_out = r, r_out
        self.A = InfPiParameter(torch.zeros(rows, r_out, device=device, dtype=dtype), requires_grad=False)
        self.coefficients = InfPiParameter(
            torch.ones(rows, device=device, dtype=coef_dtype), requires_grad=True
        )
        self.B = InfPiParameter(torch.zeros(rows, r, device=device, dtype=dtype), requires_grad=False)
        self.reallocations = 0
        self.name = "RowStore"
        self._init_transient()

    # ----------------------------------------------------------------- state
    def _init_transient(self):
        self._capacity = {}  # name -> buffer whose first M rows are the parameter
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._scale = 1.0
        self._marker = None
        self._marker_version = -1
        for name in _GROWABLE:
            attach_owner(self._parameters[name], self)

    def __getstate__(self):
        state = self.__dict__.copy()
        for key in ("_capacity", "_pending", "_scale", "_marker", "_marker_version"):
            state.pop(key, None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._init_transient()

    def _apply(self, fn, recurse=True):
        live = self.has_gradient
        super()._apply(fn, recurse)
        # coefficients stay float32 when A and B go to half precision
        coef = self._parameters["coefficients"]
        if coef.dtype in (torch.float16, torch.bfloat16):
            coef.data = coef.data.float()
            if coef.grad is not None:
                coef.grad = None
        # free capacity buffers the parameters no longer live in
        self._capacity = {k: v for k, v in self._capacity.items() if self._is_view(k)}
        self._pending = [(fn(a), fn(b)) for a, b in self._pending]
        for name in _GROWABLE:
            attach_owner(self._parameters[name], self)
        if live:
            self._mark(force=True)
        return self

    @property
    def num_rows(self) -> int:
        return self._parameters["A"].shape[0]

    def __len__(self) -> int:
        return self.num_rows

    @property
    def trainable(self) -> bool:
        """Whether backward records this layer's gradient (``coefficients.requires_grad``)."""
        return self.coefficients.requires_grad

    @property
    def capacity(self) -> int:
        buf = self._capacity.get("A")
        return self.num_rows if buf is None or not self._is_view("A") else buf.shape[0]

    def check(self):
        """Raise if the row counts of A, coefficients and B disagree."""
        A, c, B = self.A, self.coefficients, self.B
        if not (A.shape[0] == c.shape[0] == B.shape[0]):
            raise ValueError(
                f"{self.name}: A, coefficients and B must have the same number of rows, got "
                f"{A.shape[0]}, {c.shape[0]} and {B.shape[0]}. Rows are added only through "
                "RowStore.append (or the optimizer); do not assign them separately."
            )
        if A.shape[1] != self.r_out or B.shape[1] != self.r:
            raise ValueError(
                f"{self.name}: expected A (M × {self.r_out}) and B (M × {self.r}), "
                f"got {tuple(A.shape)} and {tuple(B.shape)}"
            )

    # ----------------------------------------------------------------- growth
    def _is_view(self, name) -> bool:
        buf = self._capacity.get(name)
        if buf is None:
            return False
        p = self._parameters[name].data
        return (
            p.device == buf.device
            and p.dtype == buf.dtype
            and p.storage_offset() == 0
            and p.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
            and p.shape[1:] == buf.shape[1:]
            and p.stride() == buf.stride()
        )

    def reserve(self, total: int):
        """Make every tensor able to hold ``total`` rows without reallocating."""
        for name in _GROWABLE:
            p = self._parameters[name]
            M = p.shape[0]
            if self._is_view(name) and self._capacity[name].shape[0] >= total:
                continue
            old_cap = self._capacity[name].shape[0] if self._is_view(name) else M
            new_cap = max(total, 2 * old_cap, 16)
            buf = torch.empty((new_cap,) + tuple(p.shape[1:]), dtype=p.dtype, device=p.device)
            buf[:M].copy_(p.data)
            self._capacity[name] = buf
            p.data = buf[:M]
            if name == "A":
                self.reallocations += 1

    @torch.no_grad()
    def append(self, A: torch.Tensor, B: torch.Tensor, coefficients: torch.Tensor | float = 0.0) -> int:
        """Append rows; returns the index of the first new row. Costs O(rows · r)."""
        self.check()
        b = A.shape[0]
        if A.shape != (b, self.r_out) or B.shape != (b, self.r):
            raise ValueError(
                f"{self.name}: cannot append A {tuple(A.shape)} and B {tuple(B.shape)} "
                f"to rows of widths {self.r_out} and {self.r}"
            )
        M = self.num_rows
        self.reserve(M + b)
        for name, rows in (("A", A), ("B", B), ("coefficients", coefficients)):
            buf = self._capacity[name]
            buf[M : M + b] = rows
            self._parameters[name].data = buf[: M + b]
        self._resize_marker()
        return M

    @torch.no_grad()
    def truncate(self, rows: int):
        """Keep the first ``rows`` rows."""
        if not 0 <= rows <= self.num_rows:
            raise ValueError(f"{self.name}: cannot truncate {self.num_rows} rows to {rows}")
        for name in _GROWABLE:
            p = self._parameters[name]
            p.data = p.data[:rows]
        self._resize_marker()

    @torch.no_grad()
    def set_rows(self, A: torch.Tensor, coefficients: torch.Tensor, B: torch.Tensor):
        """Replace every row at once (compression, gathering shards). Pending rows are kept."""
        M = A.shape[0]
        if A.shape != (M, self.r_out) or B.shape != (M, self.r) or coefficients.shape != (M,):
            raise ValueError(
                f"{self.name}: set_rows needs A (M × {self.r_out}), coefficients (M) and "
                f"B (M × {self.r}), got {tuple(A.shape)}, {tuple(coefficients.shape)}, "
                f"{tuple(B.shape)}"
            )
        self._capacity = {}
        for name, rows in (("A", A), ("coefficients", coefficients), ("B", B)):
            p = self._parameters[name]
            p.data = rows.detach().to(device=p.device, dtype=p.dtype).clone()
        self._resize_marker()

    @torch.no_grad()
    def resize_(self, rows: int):
        """Set the number of rows (contents of new rows undefined); used when loading."""
        for name in _GROWABLE:
            p = self._parameters[name]
            p.data = torch.empty((rows,) + tuple(p.shape[1:]), dtype=p.dtype, device=p.device)
        self._capacity = {}
        self._resize_marker()

    @contextlib.contextmanager
    def temporary_rows(self):
        """Rows appended inside the block are removed when it ends (MAML's inner loop)::

        with layer.rows.temporary_rows():
            layer.rows.append(A, B, -lr)   # adapted layer
            loss = f(layer(x_query))
        """
        M = self.num_rows
        try:
            yield self
        finally:
            self.truncate(M)

    # ---------------------------------------------------- the gradient protocol
    def recording(self) -> GradientRecording | None:
        """A recording for one forward call, or None when nothing is to be recorded
        (frozen layer, or grad mode off)."""
        if not self.trainable or not torch.is_grad_enabled():
            return None
        return GradientRecording(self)

    @torch.no_grad()
    def _mark(self, force: bool = False):
        coef = self.coefficients
        grad = coef.grad
        if force or grad is None or grad is not self._marker or grad.shape != coef.shape:
            grad = torch.zeros_like(coef)
            coef.grad = grad
        self._marker = grad
        self._marker_version = grad._version

    def _resize_marker(self):
        """Keep the ``.grad`` state's shape equal to the coefficients' when rows change."""
        marker = self._marker
        if marker is not None and marker.shape != self.coefficients.shape:
            if self.has_gradient:
                self._mark(force=True)
            else:
                self._marker = None

    @property
    def has_gradient(self) -> bool:
        """Whether rows were recorded since the last step and no gradient-clearing call
        (``zero_grad``, ``p.grad = None``, ``p.grad.zero_()``) came after them."""
        marker = self._marker
        return (
            bool(self._pending)
            and marker is not None
            and self.coefficients.grad is marker
            and marker._version == self._marker_version
        )

    def record(self, A: torch.Tensor, B: torch.Tensor) -> None:
        """Record gradient rows of one backward call (``A = δ·s``, ``B = ĝ``). Rows of a
        gradient that was cleared since are dropped first."""
        if not self.has_gradient:
            self._pending = []
            self._scale = 1.0
        self._pending.append((A.detach(), B.detach()))
        self._mark()

    def pending(self) -> PendingRows | None:
        """The gradient rows recorded since the last step, concatenated, or None."""
        if not self.has_gradient:
            if self._pending:
                self._pending, self._scale = [], 1.0
            return None
        if len(self._pending) > 1:
            self._pending = [
                (torch.cat([a for a, _ in self._pending]), torch.cat([b for _, b in self._pending]))
            ]
        A, B = self._pending[0]
        return PendingRows(A, B, self._scale)

    @property
    def num_pending(self) -> int:
        return sum(a.shape[0] for a, _ in self._pending) if self.has_gradient else 0

    def scale(self, factor: float) -> None:
        """Multiply the pending gradient by ``factor`` (gradient clipping)."""
        if self.has_gradient:
            self._scale *= float(factor)

    @torch.no_grad()
    def pending_norm(self) -> torch.Tensor:
        """Frobenius norm of the pending gradient (docs/math.md §5):
        ``sqrt(Σ_ij (A_i·A_j) F00(B_i·B_j))``, times the clipping scale."""
        rows = self.pending()
        if rows is None:
            return torch.zeros((), device=self.A.device)
        cdt = torch.float64 if rows.A.dtype == torch.float64 else torch.float32
        A, B = rows.A.to(cdt), rows.B.to(cdt)
        f00, _, _ = F00_F11_F02(B @ B.T)
        sq = ((A @ A.T) * f00).sum().clamp_min(0.0)
        return torch.sqrt(sq) * abs(rows.scale)

    def discard(self) -> None:
        """Drop the pending gradient (and its ``.grad`` state)."""
        self._pending, self._scale = [], 1.0
        if self._marker is not None and self.coefficients.grad is self._marker:
            self.coefficients.grad = None
        self._marker = None

    def consume(self) -> PendingRows | None:
        """Return the pending gradient and clear it (the optimizer's call)."""
        rows = self.pending()
        self.discard()
        return rows

    def append_update(self, rows: PendingRows) -> slice:
        """Append one step's new rows with coefficient 0; returns the slice of this store's
        rows that are new (all of them here; a sharded store keeps its share only)."""
        first = self.append(rows.A, rows.B, 0.0)
        return slice(first, self.num_rows)

    # ------------------------------------------------------------ save / load
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for name in _GROWABLE:
            p = self._parameters[name]
            # a compact copy: saving the view would save the whole capacity buffer
            destination[prefix + name] = p if keep_vars else p.detach().clone()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        for name, legacy in _LEGACY_KEYS.items():
            if prefix + legacy in state_dict:  # pilimit 0.1 / the original library; never written now
                state_dict[prefix + name] = state_dict.pop(prefix + legacy)
        keys = [prefix + n for n in _GROWABLE]
        if all(k in state_dict for k in keys):
            counts = {state_dict[k].shape[0] for k in keys}
            if len(counts) != 1:
                error_msgs.append(
                    f"{prefix}: A, coefficients and B in the checkpoint have different row "
                    f"counts {sorted(counts)}; the checkpoint is corrupt"
                )
                return
            A_in, c_in, B_in = (state_dict[k] for k in keys)
            if A_in.dim() != 2 or B_in.dim() != 2 or A_in.shape[1] != self.r_out or B_in.shape[1] != self.r:
                error_msgs.append(
                    f"{prefix}: checkpoint rows have widths A {tuple(A_in.shape[1:])}, "
                    f"B {tuple(B_in.shape[1:])} but this layer has r_out={self.r_out}, r={self.r}: "
                    "the checkpoint is from another architecture (check r, d_in, d_out)"
                )
                return
            for key, t in zip(keys, (A_in, c_in, B_in)):
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    error_msgs.append(
                        f"{key}: the checkpoint's rows contain NaN or inf; it was saved "
                        "from a diverged run or is corrupt"
                    )
                    return
            self.resize_(counts.pop())
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        self.discard()

    def extra_repr(self) -> str:
        return (
            f"rows={self.num_rows}, r={self.r}, r_out={self.r_out}, "
            f"dtype={self.A.dtype}, coef_dtype={self.coefficients.dtype}"
        )

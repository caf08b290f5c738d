"""Parameters of π-layers and the row storage of infinite layers.

An infinite π-layer is the triple ``(A, c, B)`` of spec §1: ``M`` rows, each an
output direction ``A_i``, a coefficient ``c_i`` (``Amult``) and a unit vector
``B_i``. Training appends rows (spec §5). :class:`RowStore` owns the three
tensors of one layer and is the only place that knows how rows are laid out in
memory, so that a distributed version can shard or all-gather rows by
replacing this one class.

Growth is amortized: rows live in capacity buffers that double when full, and
the registered parameters are views of their first ``M`` rows. Appending ``b``
rows writes ``b`` rows; a reallocation (counted in ``reallocations``) happens
``O(log M)`` times. The parameters are the source of truth: whenever they stop
being views of the buffers (after ``.to()``, ``load_state_dict``, ``deepcopy``)
the store adopts them as they are.

Gradients of an infinite layer are rows too: backward records
``(δ·s, ĝ)`` per example as *pending rows*; the optimizer commits them.

A finite π-layer's weight is an ordinary matrix whose gradient is projected
onto ``span(Ω)`` on its output side before the step (spec §6); such weights
are :class:`FinPiParameter`.
"""
from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["InfPiParameter", "FinPiParameter", "RowStore", "owner_of"]

# parameter -> weakref(owner): the RowStore of an InfPiParameter, the layer of a
# FinPiParameter. Kept outside the parameter so pickling/deepcopy never see it;
# owners re-register themselves on construction, unpickling and .to().
_OWNERS = WeakIdKeyDictionary()


def _register_owner(param: torch.Tensor, owner) -> None:
    _OWNERS[param] = weakref.ref(owner)


def owner_of(param: torch.Tensor):
    """The RowStore (infinite) or layer (finite) a π-parameter belongs to, or None."""
    ref = _OWNERS.get(param)
    return None if ref is None else ref()


class InfPiParameter(nn.Parameter):
    """A tensor of an infinite π-layer whose rows grow: ``A``, ``B`` or the coefficients ``Amult``.

    Only the coefficients are trained in the optimizer's sense (spec §5); ``A``
    and ``B`` change only by appending rows, which the optimizer does when it
    steps the coefficients.
    """


class FinPiParameter(nn.Parameter):
    """A finite π-net weight or bias whose gradient is projected onto ``span(Ω)``."""


_GROWABLE = ("A", "Amult", "B")


class RowStore(nn.Module):
    """The rows ``A`` (M × r_out), ``Amult`` (M) and ``B`` (M × r) of one infinite π-layer.

    Args:
        r: width of ``B`` rows (the layer's input rank).
        r_out: width of ``A`` rows (the layer's output rank).
        rows: initial number of rows.
        dtype: storage dtype of ``A`` and ``B``; the coefficients are float32
            unless this is float64.
    """

    def __init__(self, r: int, r_out: int, rows: int = 0, device=None, dtype=None):
        super().__init__()
        dtype = dtype or torch.get_default_dtype()
        coef_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.r, self.r_out = r, r_out
        self.A = InfPiParameter(torch.zeros(rows, r_out, device=device, dtype=dtype), requires_grad=False)
        # requires_grad: the layer trains (set False to freeze it); backward leaves
        # a zero .grad here as the marker of pending rows (see inf.functional)
        self.Amult = InfPiParameter(torch.ones(rows, device=device, dtype=coef_dtype), requires_grad=True)
        self.B = InfPiParameter(torch.zeros(rows, r, device=device, dtype=dtype), requires_grad=False)
        self.reallocations = 0
        self.name = "RowStore"
        self._init_transient()

    # ----------------------------------------------------------------- state
    def _init_transient(self):
        self._capacity = {}  # name -> buffer whose first M rows are the parameter
        self.clear_pending()
        for name in _GROWABLE:
            _register_owner(self._parameters[name], self)

    def __getstate__(self):
        state = self.__dict__.copy()
        for key in ("_capacity", "_pending_A", "_pending_B", "_pending_scale"):
            state.pop(key, None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._init_transient()

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # coefficients stay float32 when A and B go to half precision
        coef = self._parameters["Amult"]
        if coef.dtype in (torch.float16, torch.bfloat16):
            coef.data = coef.data.float()
        # free capacity buffers the parameters no longer live in
        self._capacity = {k: v for k, v in self._capacity.items() if self._is_view(k)}
        self._pending_A = [fn(a) for a in self._pending_A]
        self._pending_B = [fn(b) for b in self._pending_B]
        for name in _GROWABLE:
            _register_owner(self._parameters[name], self)
        return self

    @property
    def num_rows(self) -> int:
        return self._parameters["A"].shape[0]

    def __len__(self) -> int:
        return self.num_rows

    @property
    def capacity(self) -> int:
        buf = self._capacity.get("A")
        return self.num_rows if buf is None or not self._is_view("A") else buf.shape[0]

    def check(self):
        """Raise if the row counts of A, Amult and B disagree."""
        A, c, B = self.A, self.Amult, self.B
        if not (A.shape[0] == c.shape[0] == B.shape[0]):
            raise ValueError(
                f"{self.name}: A, Amult and B must have the same number of rows, got "
                f"{A.shape[0]}, {c.shape[0]} and {B.shape[0]}. Rows are added only through "
                "RowStore.append (or the optimizer); do not assign them separately.")
        if A.shape[1] != self.r_out or B.shape[1] != self.r:
            raise ValueError(f"{self.name}: expected A (M × {self.r_out}) and B (M × {self.r}), "
                             f"got {tuple(A.shape)} and {tuple(B.shape)}")

    # ----------------------------------------------------------------- growth
    def _is_view(self, name) -> bool:
        buf = self._capacity.get(name)
        if buf is None:
            return False
        p = self._parameters[name].data
        return (p.device == buf.device and p.dtype == buf.dtype and p.storage_offset() == 0
                and p.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
                and p.shape[1:] == buf.shape[1:] and p.stride() == buf.stride())

    def _reserve(self, total: int):
        """Make every column able to hold ``total`` rows without reallocating."""
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
    def append(self, A: torch.Tensor, B: torch.Tensor, Amult: torch.Tensor | float = 0.0) -> int:
        """Append rows; returns the index of the first new row. Costs O(rows · r)."""
        self.check()
        b = A.shape[0]
        if A.shape != (b, self.r_out) or B.shape != (b, self.r):
            raise ValueError(f"{self.name}: cannot append A {tuple(A.shape)} and B {tuple(B.shape)} "
                             f"to rows of widths {self.r_out} and {self.r}")
        M = self.num_rows
        self._reserve(M + b)
        for name, rows in (("A", A), ("B", B), ("Amult", Amult)):
            buf = self._capacity[name]
            buf[M:M + b] = rows
            self._parameters[name].data = buf[:M + b]
        return M

    @torch.no_grad()
    def truncate(self, rows: int):
        """Keep the first ``rows`` rows (used to drop temporary rows, e.g. in MAML)."""
        if not 0 <= rows <= self.num_rows:
            raise ValueError(f"{self.name}: cannot truncate {self.num_rows} rows to {rows}")
        for name in _GROWABLE:
            p = self._parameters[name]
            p.data = p.data[:rows]

    @torch.no_grad()
    def resize_(self, rows: int):
        """Set the number of rows (contents of new rows undefined); used when loading."""
        for name in _GROWABLE:
            p = self._parameters[name]
            p.data = torch.empty((rows,) + tuple(p.shape[1:]), dtype=p.dtype, device=p.device)
        self._capacity = {}

    # ---------------------------------------------------- gradient (pending rows)
    def clear_pending(self):
        self._pending_A: list[torch.Tensor] = []
        self._pending_B: list[torch.Tensor] = []
        self._pending_scale = 1.0

    def add_pending(self, A: torch.Tensor, B: torch.Tensor):
        """Record gradient rows of one backward call (``A = δ·s``, ``B = ĝ``)."""
        self._pending_A.append(A.detach())
        self._pending_B.append(B.detach())

    @property
    def num_pending(self) -> int:
        return sum(a.shape[0] for a in self._pending_A)

    def pending(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The gradient rows recorded since the last step, concatenated, or None."""
        if not self._pending_A:
            return None
        if len(self._pending_A) > 1:
            self._pending_A = [torch.cat(self._pending_A)]
            self._pending_B = [torch.cat(self._pending_B)]
        return self._pending_A[0], self._pending_B[0]

    def scale_pending_(self, factor: float):
        """Scale the pending gradient (gradient clipping)."""
        self._pending_scale *= float(factor)

    @property
    def pending_scale(self) -> float:
        return self._pending_scale

    def pending_grad_norm(self) -> torch.Tensor:
        """Frobenius norm of the pending gradient (spec §5):
        ``sqrt(Σ_ij (A_i·A_j) F00(B_i·B_j))``, times the clipping scale."""
        from .math import F00_F11_F02

        rows = self.pending()
        if rows is None:
            return torch.zeros((), device=self.A.device)
        A, B = rows
        cdt = torch.float64 if A.dtype == torch.float64 else torch.float32
        A, B = A.to(cdt), B.to(cdt)
        f00, _, _ = F00_F11_F02(B @ B.T)
        sq = ((A @ A.T) * f00).sum().clamp_min(0.0)
        return torch.sqrt(sq) * abs(self._pending_scale)

    # ------------------------------------------------------------ save / load
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for name in _GROWABLE:
            p = self._parameters[name]
            # a compact copy: saving the view would save the whole capacity buffer
            destination[prefix + name] = p if keep_vars else p.detach().clone()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        keys = [prefix + n for n in _GROWABLE]
        if all(k in state_dict for k in keys):
            counts = {state_dict[k].shape[0] for k in keys}
            if len(counts) != 1:
                error_msgs.append(f"{prefix}: A, Amult and B in the checkpoint have different row "
                                  f"counts {sorted(counts)}; the checkpoint is corrupt")
                return
            A_in, B_in = state_dict[keys[0]], state_dict[keys[2]]
            if A_in.dim() != 2 or B_in.dim() != 2 or A_in.shape[1] != self.r_out or B_in.shape[1] != self.r:
                error_msgs.append(
                    f"{prefix}: checkpoint rows have widths A {tuple(A_in.shape[1:])}, "
                    f"B {tuple(B_in.shape[1:])} but this layer has r_out={self.r_out}, r={self.r}: "
                    "the checkpoint is from another architecture (check r, d_in, d_out)")
                return
            self.resize_(counts.pop())
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        self.clear_pending()

    def extra_repr(self) -> str:
        return (f"rows={self.num_rows}, r={self.r}, r_out={self.r_out}, "
                f"dtype={self.A.dtype}, coef_dtype={self.Amult.dtype}")

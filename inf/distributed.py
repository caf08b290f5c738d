"""Distributed π-nets on ``torch.distributed``: rows sharded across processes, optional data parallelism.

Row sharding (model parallelism, the main mode; docs/distributed.md)
--------------------------------------------------------------------
Every infinite layer's rows are split between the ``P`` processes of a group:
global row ``i`` lives on the process of rank ``i mod P`` (so every process holds
``⌈M/P⌉`` or ``⌊M/P⌋`` rows; the next row always goes to the process with the
fewest rows, the lowest rank on ties). Everything else — the input layer, the
biases, the batch, the loss — is replicated. A layer's output is a sum over its
rows (docs/math.md §3), so

* forward: each process computes ``s Σ_{i own} c_i F00(ĝ·B_i) A_i`` for the
  whole batch, and one all-reduce (sum) of batch × r_out completes it;
* backward: ``∂L/∂g`` is a sum over rows too (docs/math.md §4): each process
  computes its part, and one all-reduce of batch × r completes it;
* the gradient rows ``(δ·s, ĝ)`` (docs/math.md §5) are then the same on every
  process, so clipping norms agree everywhere, and :meth:`DistributedRowStore.append`
  keeps the new rows whose global index falls to this process, with no
  communication; momentum and weight decay act on the local coefficients.

:class:`DistributedRowStore` is a :class:`~inf.rows.RowStore` that does all this
behind the row store's interface, so InfMLP, InfSGD, clipping, TrAct on the
input layer, layernorm, MAML's temporary rows and evaluation run unchanged.
Convert a net with :func:`shard_` (each process keeps its share of the rows it
has) and back with :func:`gather_`.

Data parallelism (optional second axis)
---------------------------------------
:func:`data_parallel_` makes every process of a group train on its own slice of
the batch: the gradient rows of all processes are all-gathered in rank order,
and ordinary parameters all-reduce their gradients, both averaged over the
processes like :class:`torch.nn.parallel.DistributedDataParallel`; with equal
slices and a mean loss the result equals one process on the whole batch. Both
axes combine on a grid (:func:`process_grid`).

Checkpoints
-----------
:func:`save_checkpoint` writes one file per shard and a ``manifest.json`` into a
folder, atomically; :func:`load_checkpoint` loads it into any number of shards
(one process included), resharding rows and per-row optimizer state.

Launch with ``torchrun``; :func:`init_from_env` joins the job it started.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
import weakref
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .rows import RowStore, rows_of

__all__ = [
    "DistributedRowStore",
    "shard_",
    "gather_",
    "gathered",
    "data_parallel_",
    "process_grid",
    "full_state_dict",
    "full_optimizer_state_dict",
    "load_full_optimizer_state_dict",
    "is_sharded",
    "global_rows_per_layer",
    "rows_report",
    "save_checkpoint",
    "load_checkpoint",
    "read_manifest",
    "init_from_env",
    "is_main_process",
    "rank",
    "world_size",
    "owned_indices",
    "CheckpointError",
    "MANIFEST",
]

MANIFEST = "manifest.json"
_FORMAT = "pilimit-sharded-checkpoint"
_VERSION = 1
_SHARD_KEY = "shard"  # state-dict entry of a sharded store: (shard, shards, global rows)


class CheckpointError(RuntimeError):
    """A sharded checkpoint is missing, incomplete, or does not fit the net."""


# --------------------------------------------------------------------------- process groups
def _check_initialized(what: str):
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"{what} needs torch.distributed: launch with torchrun and call "
            "inf.distributed.init_from_env() (or dist.init_process_group) first"
        )


def rank(group=None) -> int:
    """This process's rank in ``group`` (0 without torch.distributed)."""
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def world_size(group=None) -> int:
    """The number of processes in ``group`` (1 without torch.distributed)."""
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """True on global rank 0, and in a program that is not distributed: the process that
    writes metrics, plots, progress bars and logs."""
    return rank() == 0


def init_from_env(backend: str | None = None, timeout_s: float = 600.0) -> tuple[int, int]:
    """Join the process group that ``torchrun`` describes in the environment.

    Returns ``(rank, world size)``; ``(0, 1)`` when the program was not started by
    torchrun (or with one process), in which case nothing is initialized. The backend
    is NCCL when CUDA is available, else gloo; on CUDA each process takes the GPU of
    its ``LOCAL_RANK``. ``timeout_s`` bounds how long a collective waits for a rank
    that stopped answering.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return 0, 1
    if not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def process_grid(shards: int) -> tuple:
    """Split the world into a grid of ``shards`` × (world / shards) processes.

    Returns ``(shard_group, data_group)`` for this process: global rank
    ``d · shards + s`` shards rows with the ranks of the same ``d`` and shares
    data-parallel work with the ranks of the same ``s``. Use as
    ``shard_(net, shard_group); data_parallel_(net, data_group)``. Every process
    must call it (group creation is collective).
    """
    _check_initialized("process_grid")
    world = dist.get_world_size()
    if shards < 1 or world % shards:
        raise ValueError(f"process_grid: {shards} shards do not divide the world of {world} processes")
    me = dist.get_rank()
    shard_group = data_group = None
    for d in range(world // shards):
        g = dist.new_group(list(range(d * shards, (d + 1) * shards)))
        if me // shards == d:
            shard_group = g
    for s in range(shards):
        g = dist.new_group(list(range(s, world, shards)))
        if me % shards == s:
            data_group = g
    return shard_group, data_group


# Process groups cannot be pickled or deep-copied; stores keep a key into this table.
_GROUPS: dict[int, object] = {}


def _group_key(group) -> int | None:
    if group is None or group is dist.group.WORLD:
        return None
    _GROUPS[id(group)] = group
    return id(group)


def _group(key: int | None):
    if key is None:
        return None
    try:
        return _GROUPS[key]
    except KeyError:
        raise RuntimeError(
            "this sharded net was copied from another process: its process group is "
            "unknown here; build the net in this process and load a checkpoint "
            "(inf.distributed.load_checkpoint) instead"
        ) from None


# --------------------------------------------------------------------------- autograd pieces
class _SumForward(torch.autograd.Function):
    """All-reduce (sum) of the partial outputs in forward; the gradient passes unchanged
    (every process already holds the gradient of the summed output)."""

    @staticmethod
    def forward(ctx, x, group):
        y = x.contiguous().clone()
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _SumBackward(torch.autograd.Function):
    """Identity in forward; all-reduce (sum) of the partial input gradients in backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def owned_indices(first: int, count: int, shard: int, shards: int) -> torch.Tensor:
    """Positions ``j`` in ``range(count)`` of rows with global index ``first + j`` owned by
    ``shard`` (global index ≡ shard mod shards)."""
    return torch.arange((shard - first) % shards, count, shards)


def _rows_on(shard: int, shards: int, total: int) -> int:
    """How many of ``total`` global rows shard ``shard`` holds."""
    return max(0, (total - shard + shards - 1) // shards)


def _all_gather_rows(t: torch.Tensor, group, size: int) -> list[torch.Tensor]:
    """All-gather tensors whose first dimension differs between processes."""
    n = torch.tensor([t.shape[0]], dtype=torch.int64, device=t.device)
    counts = [torch.zeros_like(n) for _ in range(size)]
    dist.all_gather(counts, n, group=group)
    counts = [int(c) for c in counts]
    top = max(counts)
    padded = t.new_zeros((top,) + tuple(t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return [p[:c] for p, c in zip(parts, counts)]


# --------------------------------------------------------------------------- the store
class DistributedRowStore(RowStore):
    """A :class:`~inf.rows.RowStore` whose rows are sharded over a process group and/or whose
    gradient rows are gathered over a data-parallel group.

    Rows: this process holds the global rows ``i ≡ shard (mod shards)`` in order;
    :attr:`num_rows` counts them, :attr:`global_rows` counts all. :meth:`append`,
    :meth:`set_rows` and ``load_state_dict`` of a single-process state take *global*
    rows (the same on every process) and keep this process's share;
    :meth:`truncate` and the gradient protocol work on the local rows.

    Not built directly: :func:`shard_` and :func:`data_parallel_` convert a net's stores.
    """

    sharded = False

    def _init_distributed(
        self,
        shard_group=None,
        shards: int = 1,
        shard: int = 0,
        global_rows: int = 0,
        data_group=None,
        data_size: int = 1,
    ):
        self._shard_key = _group_key(shard_group)
        self.shards, self.shard = shards, shard
        self.sharded = shards > 1
        self.global_rows = global_rows
        self._data_key = _group_key(data_group)
        self.data_size = data_size

    @property
    def shard_group(self):
        return _group(self._shard_key)

    @property
    def data_group(self):
        return _group(self._data_key)

    # ------------------------------------------------------------ the layer's two all-reduces
    def shard_input(self, g: torch.Tensor) -> torch.Tensor:
        """The layer's input, marked so that its gradient is summed over the shards."""
        if not self.sharded or not torch.is_grad_enabled() or not g.requires_grad:
            return g
        return _SumBackward.apply(g, self.shard_group)

    def shard_output(self, out: torch.Tensor) -> torch.Tensor:
        """The sum over the shards of the partial outputs (before the bias is added)."""
        if not self.sharded:
            return out
        return _SumForward.apply(out, self.shard_group)

    # ------------------------------------------------------------ rows
    @torch.no_grad()
    def append(self, A: torch.Tensor, B: torch.Tensor, coefficients: torch.Tensor | float = 0.0) -> int:
        """Append global rows (identical on every process); keeps this process's share.
        Returns the local index of the first row kept."""
        b = A.shape[0]
        if B.shape[0] != b:
            raise ValueError(f"{self.name}: cannot append {b} rows of A and {B.shape[0]} rows of B")
        if not self.sharded:
            first = super().append(A, B, coefficients)
            self.global_rows += b
            return first
        keep = owned_indices(self.global_rows, b, self.shard, self.shards).to(A.device)
        if isinstance(coefficients, torch.Tensor) and coefficients.dim() > 0:
            coefficients = coefficients[keep.to(coefficients.device)]
        first = super().append(A[keep], B[keep.to(B.device)], coefficients)
        self.global_rows += b
        return first

    @torch.no_grad()
    def truncate(self, rows: int):
        """Keep the first ``rows`` local rows (a state this store had before: every process
        truncates to its own count at the same point, e.g. MAML's inner loop); collective."""
        super().truncate(rows)
        if self.sharded:
            n = torch.tensor([rows], dtype=torch.int64, device=self.A.device)  # NCCL: on the GPU
            dist.all_reduce(n, group=self.shard_group)
            self.global_rows = int(n)
        else:
            self.global_rows = rows

    @contextlib.contextmanager
    def temporary_rows(self):
        """Rows appended inside the block (global rows, each process keeping its share) are
        removed when it ends; no communication."""
        M, G = self.num_rows, self.global_rows
        try:
            yield self
        finally:
            RowStore.truncate(self, M)  # no collective: both counts are known
            self.global_rows = G

    @torch.no_grad()
    def set_rows(self, A: torch.Tensor, coefficients: torch.Tensor, B: torch.Tensor):
        """Replace every row by the global rows given (the same on every process)."""
        keep = owned_indices(0, A.shape[0], self.shard, self.shards).to(A.device)
        super().set_rows(A[keep], coefficients[keep.to(coefficients.device)], B[keep.to(B.device)])
        self.global_rows = A.shape[0]

    def set_local_rows(self, A, coefficients, B, global_rows: int):
        """Replace this process's rows by its share ``(A, coefficients, B)`` of ``global_rows``
        rows (global indices ≡ shard mod shards, in order); no communication."""
        if A.shape[0] != _rows_on(self.shard, self.shards, global_rows):
            raise ValueError(
                f"{self.name}: shard {self.shard} of {self.shards} holds "
                f"{_rows_on(self.shard, self.shards, global_rows)} of {global_rows} rows, "
                f"got {A.shape[0]}"
            )
        RowStore.set_rows(self, A, coefficients, B)
        self.global_rows = global_rows

    @torch.no_grad()
    def gather_per_row(self, t: torch.Tensor) -> torch.Tensor:
        """A tensor with one entry per local row (rows, or per-row optimizer state such as
        momentum; a shorter one is zero-padded) → the same for all rows in global order, on
        every process (collective)."""
        t = t.detach()
        if t.shape[0] < self.num_rows:
            t = torch.cat([t, t.new_zeros((self.num_rows - t.shape[0],) + tuple(t.shape[1:]))])
        if not self.sharded:
            return t.clone()
        parts = _all_gather_rows(t.contiguous(), self.shard_group, self.shards)
        full = t.new_empty((self.global_rows,) + tuple(t.shape[1:]))
        for s, part in enumerate(parts):
            full[s :: self.shards] = part
        return full

    def gather_rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All rows ``(A, coefficients, B)`` in global order, on every process (collective)."""
        return tuple(self.gather_per_row(t) for t in (self.A, self.coefficients, self.B))

    def share_of(self, t: torch.Tensor) -> torch.Tensor:
        """This process's entries of a per-row tensor over all rows (zero-padded if shorter)."""
        if t.shape[0] < self.global_rows:
            t = torch.cat([t, t.new_zeros((self.global_rows - t.shape[0],) + tuple(t.shape[1:]))])
        return t[self.shard :: self.shards].clone()

    # ------------------------------------------------------------ gradient: data parallel
    def record(self, A: torch.Tensor, B: torch.Tensor) -> None:
        """Record gradient rows; with a data-parallel group, those of every process (in rank
        order), averaged over the processes as DistributedDataParallel averages gradients."""
        if self.data_size > 1:
            A, B = A.detach(), B.detach()
            cdt = torch.promote_types(A.dtype, B.dtype)
            both = torch.cat(
                _all_gather_rows(torch.cat([A.to(cdt), B.to(cdt)], 1), self.data_group, self.data_size)
            )
            A = (both[:, : A.shape[1]] / self.data_size).to(A.dtype)
            B = both[:, A.shape[1] :].to(B.dtype)
        super().record(A, B)

    # ------------------------------------------------------------ save / load
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + _SHARD_KEY] = torch.tensor([self.shard, self.shards, self.global_rows])

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        info = state_dict.get(prefix + _SHARD_KEY)
        own = {k: v for k, v in state_dict.items() if k.startswith(prefix) and k != prefix + _SHARD_KEY}
        if info is not None:
            shard, shards, total = (int(v) for v in info)
            if (shard, shards) != (self.shard, self.shards):
                error_msgs.append(
                    f"{prefix}: this state holds shard {shard} of {shards} but this process holds "
                    f"shard {self.shard} of {self.shards}; load it with inf.distributed.load_checkpoint, "
                    "which reshards"
                )
                return
        else:
            # a single-process state: global rows, keep this process's share
            keys = [prefix + n for n in ("A", "coefficients", "B")]
            legacy = prefix + "Amult"
            if legacy in own and keys[1] not in own:
                own[keys[1]] = own.pop(legacy)
            if not all(k in own for k in keys):
                total = self.global_rows
            else:
                total = own[keys[0]].shape[0]
                for k in keys:
                    if own[k].shape[0] == total:
                        own[k] = own[k][self.shard :: self.shards]
        super()._load_from_state_dict(
            own, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        self.global_rows = total

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if self.sharded:
            text += f", shard={self.shard}/{self.shards}, global_rows={self.global_rows}"
        if self.data_size > 1:
            text += f", data_parallel={self.data_size}"
        return text


# --------------------------------------------------------------------------- nets
def _stores(net: nn.Module) -> list[tuple[str, RowStore]]:
    return [(name, m) for name, m in net.named_modules() if isinstance(m, RowStore)]


def is_sharded(net: nn.Module) -> bool:
    """Whether any infinite layer of ``net`` has its rows sharded over processes."""
    return any(getattr(m, "sharded", False) for _, m in _stores(net))


def _make_distributed(store: RowStore):
    if isinstance(store, DistributedRowStore):
        return store
    if type(store) is not RowStore:
        raise TypeError(
            f"{store.name}: cannot distribute a {type(store).__name__}; only plain RowStore "
            "rows can be sharded or gathered over processes"
        )
    store.__class__ = DistributedRowStore
    store._init_distributed(global_rows=store.num_rows)
    return store


def shard_(net: nn.Module, group=None) -> nn.Module:
    """Shard the rows of every infinite layer of ``net`` over ``group`` (default: all processes).

    Every process calls it with the same net (same seed or same checkpoint); process
    ``k`` of ``P`` keeps the rows ``k, k + P, k + 2P, …``, so the sharded net computes
    the same function. Build the optimizer afterwards. Returns ``net``; without an
    initialized process group (a program started without torchrun) or with one process,
    ``net`` is returned unchanged, so the same script runs with and without torchrun.
    """
    if world_size(group) <= 1:
        return net
    shards, shard = dist.get_world_size(group), dist.get_rank(group)
    for _, store in _stores(net):
        if getattr(store, "sharded", False):
            raise RuntimeError(f"{store.name}: its rows are sharded already")
        store.discard()
        A, c, B = (t.detach() for t in (store.A, store.coefficients, store.B))
        total = A.shape[0]
        store = _make_distributed(store)
        store._init_distributed(group, shards, shard, total, store.data_group, store.data_size)
        store.set_local_rows(
            A[shard::shards].clone(), c[shard::shards].clone(), B[shard::shards].clone(), total
        )
    return net


def gather_(net: nn.Module) -> nn.Module:
    """Undo :func:`shard_`: every process gets all rows, in the single-process order (collective)."""
    for _, store in _stores(net):
        if not getattr(store, "sharded", False):
            continue
        store.discard()
        A, c, B = store.gather_rows()
        total = store.global_rows
        store._init_distributed(None, 1, 0, total, store.data_group, store.data_size)
        store.set_local_rows(A, c, B, total)
        if store.data_size == 1:
            store.__class__ = RowStore
    return net


def gathered(net: nn.Module) -> nn.Module:
    """``net`` itself if no layer is sharded, else a copy holding all rows (collective)."""
    if not is_sharded(net):
        return net
    import copy

    return gather_(copy.deepcopy(net))


def full_state_dict(net: nn.Module) -> dict:
    """``net.state_dict()`` as one process holding every row would return it (rows in the
    single-process order), on every process; collective when rows are sharded. Save it
    with ``torch.save`` on one process: it loads into any number of processes with
    ``load_state_dict`` (each keeps its share)."""
    state = net.state_dict()
    for name, store in _stores(net):
        prefix = f"{name}." if name else ""
        if isinstance(store, DistributedRowStore):
            state.pop(prefix + _SHARD_KEY, None)
            if store.sharded:
                for key, full in zip(("A", "coefficients", "B"), store.gather_rows()):
                    state[prefix + key] = full
    return state


def full_optimizer_state_dict(net: nn.Module, optimizer) -> dict:
    """``optimizer.state_dict()`` with per-row state (momentum of the coefficients) over all
    rows in the single-process order; collective when rows are sharded. Restore it with
    :func:`load_full_optimizer_state_dict`."""
    state = optimizer.state_dict()
    stores = dict(_stores(net))
    entries = dict(state["state"])
    for idx, name in _coefficient_indices(net, optimizer).items():
        store = stores[name]
        if not getattr(store, "sharded", False) or idx not in entries:
            continue
        entry = dict(entries[idx])
        for key, value in entry.items():
            if isinstance(value, torch.Tensor) and value.dim() >= 1:
                entry[key] = store.gather_per_row(value)
        entries[idx] = entry
    return {**state, "state": entries}


def load_full_optimizer_state_dict(net: nn.Module, optimizer, state: dict) -> None:
    """Load a single-process optimizer state (or one from :func:`full_optimizer_state_dict`)
    into the optimizer of a sharded net: per-row state keeps this process's share."""
    stores = dict(_stores(net))
    entries = dict(state["state"])
    for idx, name in _coefficient_indices(net, optimizer).items():
        store = stores[name]
        if not getattr(store, "sharded", False) or idx not in entries:
            continue
        entry = dict(entries[idx])
        for key, value in entry.items():
            if isinstance(value, torch.Tensor) and value.dim() >= 1:
                entry[key] = store.share_of(value)
        entries[idx] = entry
    optimizer.load_state_dict({**state, "state": entries})


def global_rows_per_layer(net: nn.Module) -> list[int]:
    """Rows per infinite layer of the whole (unsharded) net."""
    return [getattr(m, "global_rows", m.num_rows) for _, m in _stores(net)]


def rows_report(net: nn.Module) -> dict:
    """``{"world_size": W, "layers": {name: {"rows_total": M, "rows_per_process": [...]}}}``
    (the counts follow from the total; no communication)."""
    layers = {}
    for name, m in _stores(net):
        shards = getattr(m, "shards", 1)
        total = getattr(m, "global_rows", m.num_rows)
        layers[m.name if m.name != "RowStore" else name] = {
            "rows_total": total,
            "rows_per_process": [_rows_on(s, shards, total) for s in range(shards)],
        }
    return {"world_size": world_size(), "layers": layers}


# --------------------------------------------------------------------------- data parallel
_DP_HOOKS = weakref.WeakKeyDictionary()


def data_parallel_(net: nn.Module, group=None) -> nn.Module:
    """Data parallelism over ``group`` (default: all processes): each process trains on its
    own slice of every batch.

    Parameters and rows are first broadcast from the group's first process; then the
    gradient rows of the infinite layers are all-gathered and the gradients of all
    other parameters all-reduced, both averaged over the group (as
    DistributedDataParallel does). With equal slices and a mean loss, a step equals one
    process's step on the whole batch. TrAct is refused: its preconditioner needs
    the whole batch. Returns ``net`` (unchanged without a process group or with one process).
    """
    from .tract import TrAct

    if world_size(group) <= 1:
        return net
    if any(isinstance(m, TrAct) for m in net.modules()):
        raise ValueError(
            "data_parallel_: TrAct preconditions with the whole batch's inputs, which "
            "data parallelism splits; use row sharding (inf.distributed.shard_) instead"
        )
    if net in _DP_HOOKS:
        raise RuntimeError("data_parallel_ was applied to this net already")
    size = dist.get_world_size(group)
    src = dist.get_global_rank(group, 0) if group is not None else 0
    with torch.no_grad():
        for _, t in net.state_dict(keep_vars=True).items():
            if isinstance(t, torch.Tensor) and t.numel():
                dist.broadcast(t.data if isinstance(t, nn.Parameter) else t, src=src, group=group)
    handles = []
    for _, store in _stores(net):
        store = _make_distributed(store)
        store._init_distributed(store.shard_group, store.shards, store.shard, store.global_rows, group, size)
    for p in net.parameters():
        if not p.requires_grad or rows_of(p) is not None:
            continue

        def hook(param, group=group, size=size):
            dist.all_reduce(param.grad, group=group)
            param.grad.div_(size)

        handles.append(p.register_post_accumulate_grad_hook(hook))
    _DP_HOOKS[net] = handles
    return net


# --------------------------------------------------------------------------- checkpoints
def _shard_layout(net: nn.Module) -> tuple[int, int, int, bool]:
    """``(shard, shards, data rank, collective)`` of this process for ``net``."""
    for _, m in _stores(net):
        if isinstance(m, DistributedRowStore) and (m.sharded or m.data_size > 1):
            data_rank = dist.get_rank(m.data_group) if m.data_size > 1 else 0
            return m.shard, m.shards, data_rank, True
    return 0, 1, 0, False


def _shard_file(shard: int, shards: int) -> str:
    return f"shard{shard:05d}-of-{shards:05d}.pt"


def read_manifest(path) -> dict:
    """The manifest of a sharded checkpoint folder (raises CheckpointError if there is none)."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"{path} is not a sharded checkpoint (no {MANIFEST}); it is written by "
            "inf.distributed.save_checkpoint"
        ) from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path / MANIFEST} is corrupt ({err})") from None
    if manifest.get("format") != _FORMAT:
        raise CheckpointError(f"{path / MANIFEST} is not a pilimit sharded checkpoint manifest")
    if manifest.get("version", 0) > _VERSION:
        raise CheckpointError(
            f"{path} was written by a newer pilimit (checkpoint version "
            f"{manifest['version']}); update pilimit to load it"
        )
    return manifest


def save_checkpoint(path, net: nn.Module, optimizer=None, extra: dict | None = None) -> Path:
    """Write ``net`` (and ``optimizer``, ``extra``) to the folder ``path``, atomically.

    One file per shard (``shard00000-of-00002.pt`` …) holds that shard's rows, the
    replicated parameters and the optimizer state; ``manifest.json`` describes the
    layout. The folder is written under a temporary name and renamed when complete,
    so ``path`` always holds a whole checkpoint (the previous one until then).

    Collective when ``net`` is distributed (every process calls it; with several
    machines ``path`` must be on a file system they share); a net that is not is
    saved by the process that calls it. ``extra`` (epoch, RNG states, …) must hold
    only tensors, numbers, strings and containers of them; process 0's is saved.
    """
    path = Path(path)
    shard, shards, data_rank, collective = _shard_layout(net)
    me = dist.get_rank() if collective else 0
    name = [f".{path.name}.tmp-{uuid.uuid4().hex[:12]}"]
    if collective:
        dist.broadcast_object_list(name, src=0)
    tmp = path.parent / name[0]
    if me == 0:
        tmp.mkdir(parents=True)
    if collective:
        dist.barrier()
    error = None
    try:
        if data_rank == 0:
            state = {
                "model": net.state_dict(),
                "optimizer": optimizer.state_dict() if optimizer is not None else None,
            }
            torch.save(state, tmp / _shard_file(shard, shards))
        if me == 0:
            torch.save({"extra": extra}, tmp / "extra.pt")
    except Exception as err:  # reported on every process below, so no process waits forever
        error = f"process {me}: {type(err).__name__}: {err}"
    errors = [error]
    if collective:
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
    errors = [e for e in errors if e]
    if errors:
        if me == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"saving {path} failed: " + "; ".join(errors))
    if me == 0:
        missing = [f for f in (_shard_file(s, shards) for s in range(shards)) if not (tmp / f).exists()]
        if missing:
            shutil.rmtree(tmp, ignore_errors=True)
            error = (
                f"saving {path}: {', '.join(missing)} did not appear in {tmp}; with several machines "
                "the checkpoint folder must be on a file system all of them share"
            )
        else:
            layers = {}
            for sname, m in _stores(net):
                total = getattr(m, "global_rows", m.num_rows)
                layers[sname] = {
                    "rows_total": total,
                    "rows_per_shard": [_rows_on(s, shards, total) for s in range(shards)],
                }
            manifest = {
                "format": _FORMAT,
                "version": _VERSION,
                "world_size": world_size() if collective else 1,
                "shards": shards,
                "files": [_shard_file(s, shards) for s in range(shards)],
                "layers": layers,
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
            old = None
            if path.exists():
                old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:12]}"
                os.replace(path, old)
            os.replace(tmp, path)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
    if collective:
        flag = [error]
        dist.broadcast_object_list(flag, src=0)
        error = flag[0]
    if error:
        raise CheckpointError(error)
    return path


def _coefficient_indices(net: nn.Module, optimizer) -> dict[int, str]:
    """Optimizer state index → store name, for the coefficients of infinite layers."""
    names = {id(m): n for n, m in _stores(net)}
    out, i = {}, 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            store = rows_of(p)
            if store is not None and id(store) in names:
                out[i] = names[id(store)]
            i += 1
    return out


def _reshard(parts: list[torch.Tensor], totals: int, shard: int, shards: int) -> torch.Tensor:
    """This shard's rows (global index ≡ shard mod shards) from the rows of every old shard."""
    old = len(parts)
    want = torch.arange(shard, totals, shards)
    sample = parts[0]
    out = sample.new_zeros((want.numel(),) + tuple(sample.shape[1:]))
    for p, part in enumerate(parts):
        mask = want % old == p
        local = want[mask] // old
        if local.numel():
            out[mask] = part[local]
    return out


def load_checkpoint(path, net: nn.Module, optimizer=None, map_location="cpu") -> dict | None:
    """Load a folder written by :func:`save_checkpoint` into ``net`` (and ``optimizer``);
    returns the saved ``extra``.

    The checkpoint may come from any number of shards: when it differs from ``net``'s,
    each process assembles its own share of the rows (and of per-row optimizer state
    such as momentum) from all the files, so ``P`` processes load a checkpoint of ``Q``
    (``Q = 1`` included) and compute what one process would. Files are read with
    ``torch.load(weights_only=True)`` (memory-mapped). Not collective.
    """
    path = Path(path)
    manifest = read_manifest(path)
    shard, shards, _, _ = _shard_layout(net)
    old = int(manifest["shards"])
    files = [path / f for f in manifest["files"]]
    for f in files:
        if not f.exists():
            raise CheckpointError(f"{path} is incomplete: {f.name} is missing")

    def load(f):
        return torch.load(f, map_location=map_location, weights_only=True, mmap=True)

    extra_file = path / "extra.pt"
    extra = load(extra_file)["extra"] if extra_file.exists() else None
    stores = dict(_stores(net))
    if old == shards:
        state = load(files[shard])
        model, opt_state = state["model"], state["optimizer"]
        if not getattr(next(iter(stores.values()), None), "sharded", False):
            model = {k: v for k, v in model.items() if not k.endswith("." + _SHARD_KEY)}
    else:
        states = [load(f) for f in files]
        model = dict(states[0]["model"])
        for name, store in stores.items():
            prefix = f"{name}." if name else ""
            total = int(manifest["layers"][name]["rows_total"]) if name in manifest["layers"] else None
            if total is None:
                raise CheckpointError(
                    f"{path} has no rows for layer {name!r}: it is from another architecture"
                )
            for key in ("A", "coefficients", "B"):
                k = prefix + key
                parts = [s["model"][k] for s in states]
                model[k] = _reshard(parts, total, shard, shards)
            model.pop(prefix + _SHARD_KEY, None)
            if getattr(store, "sharded", False):
                model[prefix + _SHARD_KEY] = torch.tensor([shard, shards, total])
        opt_state = states[0]["optimizer"]
        if optimizer is not None and opt_state is not None:
            opt_state = {"state": dict(opt_state["state"]), "param_groups": opt_state["param_groups"]}
            for idx, name in _coefficient_indices(net, optimizer).items():
                if idx not in opt_state["state"]:
                    continue
                total = int(manifest["layers"][name]["rows_total"])
                per = manifest["layers"][name]["rows_per_shard"]
                entry = dict(opt_state["state"][idx])
                for key, value in entry.items():
                    if isinstance(value, torch.Tensor) and value.dim() >= 1:
                        parts = []
                        for p, s in enumerate(states):
                            v = s["optimizer"]["state"][idx][key]
                            if v.shape[0] < per[p]:  # a per-row buffer shorter than its rows: zeros
                                v = torch.cat([v, v.new_zeros((per[p] - v.shape[0],) + tuple(v.shape[1:]))])
                            parts.append(v)
                        entry[key] = _reshard(parts, total, shard, shards)
                opt_state["state"][idx] = entry
    missing, unexpected = net.load_state_dict(model, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not fit this net (missing {missing}, unexpected {unexpected}); "
            "build the net with the checkpoint's architecture"
        )
    if optimizer is not None:
        if opt_state is None:
            raise CheckpointError(f"{path} holds no optimizer state")
        # own copies: the optimizer keeps the tensors it is given, and these map the file
        opt_state = {
            **opt_state,
            "state": {
                i: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in entry.items()}
                for i, entry in opt_state["state"].items()
            },
        }
        optimizer.load_state_dict(opt_state)
    return extra

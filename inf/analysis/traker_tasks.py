"""Projected NTKs through TRAK's own machinery (``trak.TRAKer``), as the projection-NTK
paper's code does it (pnnl/projection_ntk, a fork of MadryLab/trak).

Two model-output tasks (:class:`trak.modelout_functions.AbstractModelOutput` subclasses):

* :class:`PNTKModelOutput` — the summed logits, ``Σ_c f_c(x)`` (divided by √C with
  ``average=True``, the default): its per-example gradients give the pseudo-NTK;
* :class:`TrNTKModelOutput` — one logit ``f_c(x)`` per (example, class) row: the C
  gradients of an example give the trace-NTK ``Σ_c ⟨∇f_c(x), ∇f_c(x')⟩`` (and the full one).

Importing this module registers them in TRAK's task table under ``"pNTK"`` and ``"trNTK"``,
so ``TRAKer(model, task="pNTK", …)`` works as in the fork. TRAKer wants one scalar output
per stored row; for the trace-NTK each example therefore takes C rows (``train_set_size =
N·C``, see :meth:`TrNTKModelOutput.rows`), which :func:`featurize_loader` arranges.

:func:`featurize_loader` runs ``load_checkpoint`` + ``featurize`` over a DataLoader for one
or several checkpoints and writes ``pntk_layout.json`` beside TRAK's files;
:func:`load_traker_features` reads the stored gradients back — without the model or the
data — as :class:`inf.analysis.pntk.Features` in this library's scale (E[φ φ'ᵀ] = Θ), ready
for :func:`~inf.analysis.pntk.ntk_from_features`. TRAK's stock projectors draw a different
matrix for every checkpoint id; such features are tagged with their id, and combining two
ids (or two seeds, projector types or block sizes) is refused.

Use ``use_half_precision=False`` (TRAKer's default stores float16: ~1e-3 relative noise on
every kernel entry) and, on the CPU, ``projector=SparseJLProjector(P, K, seed)`` (TRAK's
CPU ``BasicProjector`` regenerates its P × K matrix for every batch).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from ..fileio import atomic_write
from .pntk import Features, _vmap_friendly
from .projectors import SparseJLProjector

try:
    from trak.modelout_functions import TASK_TO_MODELOUT, AbstractModelOutput
    from trak.projectors import AbstractProjector
except ImportError as e:  # pragma: no cover - traker is a dependency of the analysis extra
    raise ImportError(
        "inf.analysis.traker_tasks needs the 'traker' package: pip install --no-deps traker"
    ) from e

__all__ = [
    "PNTKModelOutput",
    "TrNTKModelOutput",
    "featurize_loader",
    "load_traker_features",
    "write_traker_layout",
    "LAYOUT_FILE",
]

LAYOUT_FILE = "pntk_layout.json"


def _call(model, weights, buffers, x: torch.Tensor) -> torch.Tensor:
    out = torch.func.functional_call(model, (weights, buffers), (x.unsqueeze(0),))
    if isinstance(out, (tuple, list)):
        raise TypeError("the model must return one tensor of outputs (batch × C)")
    return out.reshape(-1)


class PNTKModelOutput(AbstractModelOutput):
    """TRAK task whose output is the summed logits: per-example gradients give the pseudo-NTK.

    ``average=True`` (default): ``Σ_c f_c / √C``, so ⟨∇, ∇'⟩ is the pseudo-NTK with its
    1/C (Mohamadi et al.); ``average=False``: ``Σ_c f_c``, the fork's pNTK task (C times
    larger; the same after cosine normalisation). Labels in the batch are ignored.
    """

    kernel = "pseudo"

    def __init__(self, average: bool = True) -> None:
        super().__init__()
        self.average = bool(average)

    def get_output(self, model, weights, buffers, x, *rest) -> torch.Tensor:
        out = _call(model, weights, buffers, x)
        total = out.sum()
        return total / math.sqrt(out.numel()) if self.average else total

    def get_out_to_loss_grad(self, model, weights, buffers, batch) -> torch.Tensor:
        """No loss reweighting for a kernel: ones (TRAKer stores them as ``out_to_loss``)."""
        return torch.ones(batch[0].shape[0], 1, device=batch[0].device)

    def prepare(self, batch) -> tuple:
        return tuple(batch)

    def rows(self, n_examples: int) -> int:
        """Rows TRAKer stores for ``n_examples`` examples (its ``train_set_size``)."""
        return int(n_examples)

    def describe(self) -> dict:
        return {"task": "pNTK", "average": self.average}


class TrNTKModelOutput(AbstractModelOutput):
    """TRAK task with one row per (example, class): its output is the logit ``f_c(x)``.

    The stored rows of an example are ``∇f_1(x) … ∇f_C(x)``: their inner products summed
    over c give the trace-NTK. Batches must be expanded with :meth:`expand` (TRAKer's
    ``train_set_size`` is :meth:`rows` ``(N)`` = N·C); a plain ``(x, y)`` batch is refused,
    because its labels would be taken for class indices.
    """

    kernel = "trace"

    def __init__(self, num_classes: int | None = None) -> None:
        super().__init__()
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        self.num_classes = num_classes

    def _classes(self) -> int:
        if self.num_classes is None:
            raise ValueError(
                "TrNTKModelOutput needs num_classes (TrNTKModelOutput(num_classes=C)), or let "
                "featurize_loader find it from the model's output"
            )
        return self.num_classes

    def expand(self, batch) -> tuple:
        """``(x, y, …)`` of B examples → ``(x repeated, class index, tag)`` of B·C rows, example-major."""
        C = self._classes()
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        B = x.shape[0]
        cls = torch.arange(C, device=x.device).repeat(B)
        return x.repeat_interleave(C, dim=0), cls, torch.ones(B * C, dtype=torch.bool, device=x.device)

    prepare = expand

    def get_output(self, model, weights, buffers, x, *rest) -> torch.Tensor:
        if len(rest) != 2 or rest[1].dtype != torch.bool:
            raise TypeError(
                "the trNTK task needs expanded batches: traker.featurize(task.expand(batch), "
                "num_samples=task.rows(len(batch[0]))), or use featurize_loader"
            )
        out = _call(model, weights, buffers, x)
        onehot = (torch.arange(out.numel(), device=out.device) == rest[0]).to(out.dtype)
        return (out * onehot).sum()

    def get_out_to_loss_grad(self, model, weights, buffers, batch) -> torch.Tensor:
        return torch.ones(batch[0].shape[0], 1, device=batch[0].device)

    def rows(self, n_examples: int) -> int:
        return int(n_examples) * self._classes()

    def describe(self) -> dict:
        return {"task": "trNTK", "num_classes": self.num_classes}


AbstractProjector.register(SparseJLProjector)
TASK_TO_MODELOUT.setdefault("pNTK", PNTKModelOutput)
TASK_TO_MODELOUT.setdefault("trNTK", TrNTKModelOutput)


# ----------------------------------------------------------------------------- layout
def _projector_layout(proj) -> tuple[dict, bool]:
    """``(description, depends on the checkpoint id)`` of a TRAK-style projector."""
    if isinstance(proj, SparseJLProjector):
        return proj.layout(), False
    name = type(proj).__name__
    desc = {
        "projector": f"trak.{name}",
        "seed": int(getattr(proj, "seed", -1)),
        "proj_type": str(
            getattr(getattr(proj, "proj_type", None), "value", getattr(proj, "proj_type", None))
        ),
        "proj_dim": int(getattr(proj, "proj_dim", 0)),
    }
    if hasattr(proj, "block_size"):
        desc["block_size"] = int(proj.block_size)  # BasicProjector: one seed per column block
    if name == "NoOpProjector":
        return desc, False
    return desc, True  # TRAK's projectors reseed with the model id


def write_traker_layout(traker, num_examples: int | None = None, num_classes: int | None = None) -> Path:
    """Write ``pntk_layout.json`` (task, projector, gradient size) into the TRAKer's save_dir,
    so that :func:`load_traker_features` can read the features without model or data."""
    task = traker.task
    if not isinstance(task, (PNTKModelOutput, TrNTKModelOutput)):
        raise TypeError(
            f"the TRAKer's task is {type(task).__name__}, not PNTKModelOutput or TrNTKModelOutput"
        )
    layout, per_id = _projector_layout(traker.projector)
    info = {
        "format": 1,
        **task.describe(),
        "grad_dim": int(
            traker.num_params_for_grad if hasattr(traker, "num_params_for_grad") else traker.num_params
        ),
        "proj_dim": int(traker.proj_dim),
        "rows": int(traker.train_set_size),
        "projector": layout,
        "projector_per_model_id": per_id,
        "normalize_factor": float(traker.normalize_factor),
        "dtype": str(traker.dtype).replace("torch.", ""),
    }
    wrt = getattr(traker, "grad_wrt", None)
    info["params"] = [
        [n, list(q.shape), int(q.numel()), False]
        for n, q in traker.model.named_parameters()
        if wrt is None or n in wrt
    ]
    if num_examples is not None:
        info["num_examples"] = int(num_examples)
    C = num_classes or getattr(task, "num_classes", None)
    if C is not None:
        info["num_classes"] = int(C)
    path = Path(traker.save_dir) / LAYOUT_FILE
    text = json.dumps(info, indent=1)
    atomic_write(path, lambda fh: fh.write(text.encode()))
    return path


# ----------------------------------------------------------------------------- featurize
def _as_batch(batch, device) -> tuple:
    if isinstance(batch, torch.Tensor):
        batch = (batch,)
    if isinstance(batch, dict):
        raise TypeError("featurize_loader expects batches (x,) or (x, y, …), not dicts")
    return tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in batch)


def featurize_loader(
    traker,
    loader: Iterable,
    checkpoints: Sequence[dict] | None = None,
    model_ids: Sequence[int] | None = None,
    progress: bool = False,
) -> list[int]:
    """``traker.load_checkpoint`` + ``traker.featurize`` over every batch of ``loader``
    (in order, so row i is example i), for each checkpoint (state dicts; None: the model
    as it is, model id 0). A partly featurized checkpoint resumes where it stopped. As in
    TRAK, each checkpoint is loaded into ``traker.model``, which ends holding the last one.
    Writes ``pntk_layout.json``; returns the model ids."""
    task = traker.task
    if not isinstance(task, (PNTKModelOutput, TrNTKModelOutput)):
        raise TypeError(
            f"featurize_loader needs a TRAKer with task PNTKModelOutput or TrNTKModelOutput (or "
            f"'pNTK'/'trNTK'), got {type(task).__name__}"
        )
    ckpts = [None] if checkpoints is None else list(checkpoints)
    ids = list(range(len(ckpts))) if model_ids is None else [int(i) for i in model_ids]
    if len(ids) != len(ckpts):
        raise ValueError(f"{len(ckpts)} checkpoints but {len(ids)} model ids")
    from tqdm.auto import tqdm

    n_examples = num_classes = None
    for ckpt, mid in zip(ckpts, ids):
        state = (
            {k: v.detach().clone() for k, v in traker.model.state_dict().items()} if ckpt is None else ckpt
        )
        traker.load_checkpoint(state, model_id=mid)
        n = done_rows = 0
        with _vmap_friendly(traker.model):
            for batch in tqdm(loader, desc=f"featurize checkpoint {mid}", disable=not progress, leave=False):
                batch = _as_batch(batch, traker.device)
                if num_classes is None:
                    with torch.no_grad():
                        num_classes = int(traker.model(batch[0][:1]).reshape(-1).numel())
                    if isinstance(task, TrNTKModelOutput) and task.num_classes is None:
                        task.num_classes = num_classes
                rows = task.rows(batch[0].shape[0])
                if done_rows + rows > traker.train_set_size:
                    raise ValueError(
                        f"the loader holds more than the {traker.train_set_size} rows the TRAKer was "
                        "made for: use train_set_size=task.rows(len(dataset))"
                    )
                traker.featurize(task.prepare(batch), num_samples=rows)
                n += batch[0].shape[0]
                done_rows += rows
        if done_rows != traker.train_set_size:
            raise ValueError(
                f"the loader gave {n} examples = {done_rows} rows, but the TRAKer stores "
                f"train_set_size={traker.train_set_size}: make it with train_set_size=task.rows({n})"
            )
        n_examples = n
    write_traker_layout(traker, n_examples, num_classes)
    return ids


# ----------------------------------------------------------------------------- loading
class _ScaledRows:
    """A read-only view of TRAK's (rows × K) memmap as (N × O × K), times a constant,
    read a slice at a time (what :func:`ntk_from_features` needs)."""

    def __init__(self, grads: np.ndarray, O: int, scale: float):
        self.grads, self.O, self.scale = grads, O, scale
        self.shape = (grads.shape[0] // O, O, grads.shape[1])
        self.ndim = 3
        self.dtype = np.dtype(np.float32)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, item) -> np.ndarray:
        if not isinstance(item, slice):
            raise TypeError("read TRAK features by slices of examples")
        lo, hi, step = item.indices(self.shape[0])
        if step != 1:
            raise TypeError("read TRAK features by contiguous slices")
        part = np.asarray(self.grads[lo * self.O : hi * self.O], dtype=np.float32) * np.float32(self.scale)
        return part.reshape(-1, self.O, self.shape[2])

    def __array__(self, dtype=None, copy=None):
        return self[0 : self.shape[0]].astype(dtype or np.float32)


def load_traker_features(save_dir: str | os.PathLike, model_id: int | None = None):
    """Features stored by a TRAKer with a pNTK/trNTK task (``featurize_loader``), without
    the model or the data: one :class:`Features` for ``model_id``, or ``{id: Features}``
    for every checkpoint when ``model_id`` is None. Scaled so that E[φ(x) φ(x')ᵀ] = Θ:
    pseudo-NTK features hold ``∇(Σ_c f_c)/√C`` (outputs ``"sum"``), trace-NTK features
    the C gradients (outputs ``"all"``)."""
    save_dir = Path(save_dir)
    lay_file = save_dir / LAYOUT_FILE
    if not lay_file.is_file():
        raise FileNotFoundError(
            f"{save_dir} has no {LAYOUT_FILE}: featurize with inf.analysis.traker_tasks."
            "featurize_loader, or call write_traker_layout(traker) after featurizing"
        )
    info = json.loads(lay_file.read_text())
    if model_id is None:
        ids = sorted(
            int(p.name)
            for p in save_dir.iterdir()
            if p.is_dir() and p.name.isdigit() and (p / "grads.mmap").exists()
        )
        if not ids:
            raise FileNotFoundError(f"{save_dir} holds no featurized checkpoints (no <id>/grads.mmap)")
        return {i: load_traker_features(save_dir, i) for i in ids}
    folder = save_dir / str(int(model_id))
    if not (folder / "grads.mmap").exists():
        raise FileNotFoundError(f"{folder} has no grads.mmap: checkpoint {model_id} was not featurized here")
    grads = np.load(folder / "grads.mmap", mmap_mode="r")
    done = np.load(folder / "_is_featurized.mmap", mmap_mode="r").reshape(-1).astype(bool)
    rows, K, P = info["rows"], info["proj_dim"], info["grad_dim"]
    if grads.shape != (rows, K):
        raise ValueError(f"{folder}/grads.mmap has shape {grads.shape}, {LAYOUT_FILE} says {(rows, K)}")
    C = info.get("num_classes")
    scale = math.sqrt(P / K)  # TRAKer stores √K·S g / √P
    if info["task"] == "trNTK":
        O, outputs = int(C), "all"
    else:
        O, outputs = 1, "sum"
        if not info.get("average", True):  # the fork's Σ_c f_c: back to this library's Σ_c f_c / √C
            if not C:
                raise ValueError(
                    f"{lay_file} does not record the number of classes, needed to rescale the "
                    "pNTK task with average=False: write_traker_layout(traker, num_classes=C)"
                )
            scale /= math.sqrt(C)
    N = rows // O
    done_chunks = done.reshape(N, O).all(1)
    meta = {
        "format": 1,
        "source": "traker",
        "N": N,
        "O": O,
        "K": K,
        "n_outputs": C,
        "outputs": outputs,
        "proj_dim": K,
        "proj_type": info["projector"].get("proj_type", info["projector"]["projector"]),
        "seed": info["projector"].get("seed"),
        "projectors": [info["projector"]],
        "params": info.get("params") or [["traker", P]],
        "lr_mults": [],
        "task": info["task"],
        "save_dir": str(save_dir),
    }
    if info.get("projector_per_model_id", True):
        meta["model_id"] = int(model_id)
    return Features(_ScaledRows(grads, O, scale), meta, done_chunks, folder, 1)

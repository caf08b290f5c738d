"""Reader for downsampled ImageNet 32×32 (Chrabaszcz, Loshchilov & Hutter, 2017).

Expected files (nothing is downloaded; get them from https://image-net.org, "Downsampled
ImageNet 32x32", and unpack them), either directly in ``root`` or in one of its immediate
sub-folders (e.g. ``Imagenet32_train_npz/`` and ``Imagenet32_val_npz/``)::

    train_data_batch_1.npz … train_data_batch_10.npz   val_data.npz        (npz layout)
    train_data_batch_1     … train_data_batch_10       val_data            (pickle layout)

* npz layout: ``numpy.savez`` archives with ``data`` (N × 3072 uint8) and ``labels``
  (N integers, 1 … 1000); training files also hold ``mean`` (ignored).
* pickle layout (the older release): each file is a pickled dict with the same keys
  (``labels`` may be a list; Python 2 and Python 3 pickles are both read).  Only dicts,
  lists, numbers, strings and numpy arrays are unpickled; anything else is refused.

Each row of ``data`` is channel-major like CIFAR: 1024 red, then 1024 green, then 1024 blue
values, each image row by row; it becomes a ``3 × 32 × 32`` image.  Labels are shifted to
``0 … 999``.  Where both layouts are present the npz file wins (``fmt="auto"``).

Memory: the full training set is 1 281 167 × 3072 bytes ≈ 3.9 GB of uint8.  The reader is
lazy: :meth:`ImageNet32.iter_batches` reads one file at a time (≈ 0.4 GB), and the optional
class subset and random ``subset`` are applied per file, so :meth:`ImageNet32.load` peaks at
about the selected data plus one file.  The labels-only pass that ``subset``/``classes``/
``len()`` need is cheap for npz (only the ``labels`` member is read) but reads whole files
for the pickle layout.

Missing files raise :class:`DatasetNotFoundError`; unreadable or malformed ones raise
:class:`CorruptDatasetError` (both from :mod:`experiments.data.cifar`) naming the file and
the layout expected.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from experiments.data.cifar import CorruptDatasetError, DatasetNotFoundError

__all__ = [
    "ImageNet32",
    "load_imagenet32",
    "NUM_CLASSES",
    "NUM_TRAIN_BATCHES",
    "train_file_stem",
    "VAL_FILE_STEM",
]

NUM_CLASSES = 1000
NUM_TRAIN_BATCHES = 10
VAL_FILE_STEM = "val_data"
_TRAIN_RE = re.compile(r"^train_data_batch_(\d+)(\.npz)?$")
_SOURCE = (
    "downsampled ImageNet is not downloaded by this program: get 'Imagenet32' "
    "(npz or the older pickle version) from https://image-net.org and unpack it"
)


def train_file_stem(k: int) -> str:
    """File name (without ``.npz``) of training batch ``k`` (1-based)."""
    return f"train_data_batch_{k}"


def _layout_text(image_size: int) -> str:
    return (
        f"expected a dict / npz with 'data' (N × {3 * image_size * image_size} uint8, "
        f"channel-major) and 'labels' (N integers in 1..{NUM_CLASSES})"
    )


# --------------------------------------------------------------------------- file discovery


def _search_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        raise DatasetNotFoundError(
            f"ImageNet32 folder {root} does not exist (or is not a folder). It should hold "
            f"train_data_batch_1[.npz] … train_data_batch_{NUM_TRAIN_BATCHES}[.npz] and "
            f"val_data[.npz], directly or in a sub-folder; {_SOURCE}."
        )
    return [root] + sorted(p for p in root.iterdir() if p.is_dir())


def _candidates(stem: str, fmt: str) -> list[tuple[str, str]]:
    if fmt == "npz":
        return [(stem + ".npz", "npz")]
    if fmt == "pickle":
        return [(stem, "pickle")]
    return [(stem + ".npz", "npz"), (stem, "pickle")]


def _find(dirs: list[Path], stem: str, fmt: str) -> tuple[Path, str] | None:
    for name, layout in _candidates(stem, fmt):
        for d in dirs:
            p = d / name
            if p.is_file():
                return p, layout
    return None


def _missing(root: Path, stem: str, fmt: str) -> DatasetNotFoundError:
    names = " or ".join(n for n, _ in _candidates(stem, fmt))
    return DatasetNotFoundError(
        f"ImageNet32 file {names} not found in {root} or its immediate sub-folders "
        f"(format {fmt!r}); {_SOURCE}."
    )


def _discover_train_batches(dirs: list[Path], fmt: str) -> list[int]:
    found = set()
    allowed = {"npz": {".npz"}, "pickle": {None}, "auto": {".npz", None}}[fmt]
    for d in dirs:
        for p in d.iterdir():
            m = _TRAIN_RE.match(p.name)
            if m and p.is_file() and m.group(2) in allowed and int(m.group(1)) >= 1:
                found.add(int(m.group(1)))
    return sorted(found)


# --------------------------------------------------------------------------- parsing


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles containers, numbers, strings and numpy arrays; refuses every other global."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = "numpy._core." + module[len("numpy.core.") :]  # numpy ≥ 2 spelling
        return super().find_class(module, name)


def _read_raw(path: Path, layout: str, want_data: bool, image_size: int):
    """``(data or None, labels)`` as stored in the file; raises CorruptDatasetError."""
    where = f"ImageNet32 {layout} file {path}"
    try:
        if layout == "npz":
            with np.load(path, allow_pickle=False) as f:
                keys = set(f.files)
                if not {"data", "labels"} <= keys:
                    raise CorruptDatasetError(
                        f"{where} has members {sorted(keys)}, not 'data' and 'labels'; "
                        f"{_layout_text(image_size)}."
                    )
                labels = f["labels"]
                data = f["data"] if want_data else None
            return data, labels
        with open(path, "rb") as fh:
            obj = _NumpyOnlyUnpickler(fh, encoding="latin1").load()
    except CorruptDatasetError:
        raise
    except Exception as err:  # a damaged zip or pickle fails in many ways; all mean "corrupt"
        raise CorruptDatasetError(
            f"{where} cannot be read ({type(err).__name__}: {err}); "
            f"{_layout_text(image_size)}. Re-download or re-extract it."
        ) from err
    if not isinstance(obj, dict):
        raise CorruptDatasetError(
            f"{where} holds a {type(obj).__name__}, not a dict; {_layout_text(image_size)}."
        )
    obj = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}
    if "data" not in obj or "labels" not in obj:
        raise CorruptDatasetError(
            f"{where} has keys {sorted(map(str, obj))}, not 'data' and 'labels'; {_layout_text(image_size)}."
        )
    return (obj["data"] if want_data else None), obj["labels"]


def _check_labels(labels, path: Path, image_size: int) -> np.ndarray:
    try:
        lab = np.asarray(labels)
    except Exception as err:  # ragged lists and the like
        raise CorruptDatasetError(f"labels of {path} are not a list of integers ({err})") from err
    if lab.ndim != 1 or (lab.size and not np.issubdtype(lab.dtype, np.integer)):
        raise CorruptDatasetError(
            f"labels of {path} have shape {lab.shape} and dtype {lab.dtype}; {_layout_text(image_size)}."
        )
    lab = lab.astype(np.int64)
    if lab.size and (lab.min() < 1 or lab.max() > NUM_CLASSES):
        raise CorruptDatasetError(
            f"labels of {path} range over {lab.min()}..{lab.max()}; the released files use "
            f"1..{NUM_CLASSES}. {_layout_text(image_size)}."
        )
    return lab - 1


def _check_data(data, n_labels: int, path: Path, image_size: int) -> np.ndarray:
    arr = np.asarray(data)
    width = 3 * image_size * image_size
    if arr.ndim != 2 or arr.shape[1] != width or arr.dtype != np.uint8:
        raise CorruptDatasetError(
            f"data of {path} has shape {arr.shape} and dtype {arr.dtype}; {_layout_text(image_size)}."
        )
    if arr.shape[0] != n_labels:
        raise CorruptDatasetError(
            f"{path} holds {arr.shape[0]} images but {n_labels} labels (truncated file?)"
        )
    return arr


# --------------------------------------------------------------------------- the dataset


class ImageNet32:
    """Lazily read split of downsampled ImageNet (see the module docstring for the files).

    Args:
        root: folder holding the files (or sub-folders holding them).
        train: training batches if True, ``val_data`` otherwise.
        classes: optional class subset (0-based class indices); other images are skipped.
        relabel: with ``classes``, map the labels to their position in ``classes``
            (``0 … len(classes)-1``); otherwise keep the 0…999 ImageNet labels.
        subset: optional number of images, drawn uniformly without replacement (``seed``)
            from the selected classes; kept in file order.
        batches: training batch numbers to read (1-based).  ``None``: every
            ``train_data_batch_k`` present; an error if there is a gap, a warning if
            fewer than the released ten are present.
        fmt: ``"auto"`` (npz preferred, else pickle), ``"npz"`` or ``"pickle"``.
        image_size: 32 for ImageNet32 (64 or 16 read the 64×64 / 16×16 releases).

    The file list is resolved on construction, so missing files fail early.
    """

    def __init__(
        self,
        root,
        train: bool = True,
        *,
        classes: Iterable[int] | None = None,
        relabel: bool = True,
        subset: int | None = None,
        seed: int = 0,
        batches: Iterable[int] | None = None,
        fmt: str = "auto",
        image_size: int = 32,
    ):
        if fmt not in ("auto", "npz", "pickle"):
            raise ValueError(f"fmt must be 'auto', 'npz' or 'pickle', got {fmt!r}")
        if subset is not None and subset < 0:
            raise ValueError(f"subset must be non-negative, got {subset}")
        self.root = Path(os.fspath(root))
        self.train = train
        self.fmt = fmt
        self.image_size = image_size
        self.subset = subset
        self.seed = seed
        self.relabel = relabel
        self.classes = None if classes is None else [int(c) for c in classes]
        if self.classes is not None:
            bad = [c for c in self.classes if not 0 <= c < NUM_CLASSES]
            if bad:
                raise ValueError(f"classes must lie in 0..{NUM_CLASSES - 1}, got {bad[:5]}")
            if len(set(self.classes)) != len(self.classes):
                raise ValueError("classes contains duplicates")
        dirs = _search_dirs(self.root)
        if train:
            if batches is None:
                present = _discover_train_batches(dirs, fmt)
                if not present:
                    raise _missing(self.root, train_file_stem(1), fmt)
                gaps = sorted(set(range(1, present[-1] + 1)) - set(present))
                if gaps:
                    raise _missing(self.root, train_file_stem(gaps[0]), fmt)
                if len(present) < NUM_TRAIN_BATCHES:
                    warnings.warn(
                        f"only {len(present)} of the {NUM_TRAIN_BATCHES} ImageNet32 "
                        f"training batches found in {self.root}",
                        stacklevel=2,
                    )
                batches = present
            stems = [train_file_stem(int(k)) for k in batches]
        else:
            stems = [VAL_FILE_STEM]
        self.files: list[tuple[Path, str]] = []
        for stem in stems:
            hit = _find(dirs, stem, fmt)
            if hit is None:
                raise _missing(self.root, stem, fmt)
            self.files.append(hit)
        self._selection: list[np.ndarray | None] | None = None
        if self.classes is not None:
            self._class_map = np.full(NUM_CLASSES, -1, dtype=np.int64)
            self._class_map[self.classes] = np.arange(len(self.classes))

    # -- selection (labels-only pass) ------------------------------------------------------
    def _needs_selection(self) -> bool:
        return self.classes is not None or self.subset is not None

    def _labels_of(self, path: Path, layout: str) -> np.ndarray:
        _, labels = _read_raw(path, layout, want_data=False, image_size=self.image_size)
        return _check_labels(labels, path, self.image_size)

    def _compute_selection(self) -> list[np.ndarray | None]:
        """Per file: sorted row indices to keep (``None`` = all rows)."""
        if self._selection is not None:
            return self._selection
        per_file = []
        for path, layout in self.files:
            lab = self._labels_of(path, layout)
            if self.classes is not None:
                per_file.append(np.flatnonzero(self._class_map[lab] >= 0))
            else:
                per_file.append(np.arange(lab.shape[0]))
        counts = [len(ix) for ix in per_file]
        total = sum(counts)
        if self.subset is not None and self.subset < total:
            gen = torch.Generator().manual_seed(self.seed)
            keep = np.sort(torch.randperm(total, generator=gen)[: self.subset].numpy())
            offsets = np.cumsum([0] + counts)
            per_file = [
                ix[keep[(keep >= lo) & (keep < hi)] - lo]
                for ix, lo, hi in zip(per_file, offsets[:-1], offsets[1:])
            ]
        self._selection = per_file
        return per_file

    def __len__(self) -> int:
        """Number of selected images (reads the labels of every file once)."""
        if self._needs_selection():
            return int(sum(len(ix) for ix in self._compute_selection()))
        return int(sum(self._labels_of(p, lay).shape[0] for p, lay in self.files))

    # -- reading ----------------------------------------------------------------------------
    def iter_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(images, labels)`` per file: uint8 ``n × 3 × s × s`` and int64 labels.

        Only one file is in memory at a time; files with no selected image are not read.
        """
        selection = self._compute_selection() if self._needs_selection() else None
        s = self.image_size
        for i, (path, layout) in enumerate(self.files):
            rows = None if selection is None else selection[i]
            if rows is not None and len(rows) == 0:
                continue
            data, labels = _read_raw(path, layout, want_data=True, image_size=s)
            lab = _check_labels(labels, path, s)
            data = _check_data(data, lab.shape[0], path, s)
            if rows is not None:
                data, lab = data[rows], lab[rows]
            if self.classes is not None and self.relabel:
                lab = self._class_map[lab]
            images = torch.from_numpy(np.ascontiguousarray(data)).reshape(-1, 3, s, s)
            yield images, torch.from_numpy(np.ascontiguousarray(lab, dtype=np.int64))

    def load(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All selected images and labels, concatenated in file order."""
        parts = list(self.iter_batches())
        n = sum(len(lab) for _, lab in parts)
        s = self.image_size
        images = torch.empty(n, 3, s, s, dtype=torch.uint8)
        labels = torch.empty(n, dtype=torch.int64)
        pos = 0
        for i in range(len(parts)):
            img, lab = parts[i]
            parts[i] = None  # free each part once copied: peak ≈ result + one part
            images[pos : pos + len(lab)] = img
            labels[pos : pos + len(lab)] = lab
            pos += len(lab)
            del img, lab
        return images, labels


def load_imagenet32(
    root,
    train: bool = True,
    *,
    classes: Sequence[int] | None = None,
    relabel: bool = True,
    subset: int | None = None,
    seed: int = 0,
    batches: Iterable[int] | None = None,
    fmt: str = "auto",
    image_size: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(uint8 N × 3 × 32 × 32 images, int64 labels in 0..999)``; see :class:`ImageNet32`."""
    return ImageNet32(
        root,
        train,
        classes=classes,
        relabel=relabel,
        subset=subset,
        seed=seed,
        batches=batches,
        fmt=fmt,
        image_size=image_size,
    ).load()

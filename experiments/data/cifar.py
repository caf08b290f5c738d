"""CIFAR-10 / CIFAR-100 readers for the "python version" files, and batch transforms in torch.

Formats (https://www.cs.toronto.edu/~kriz/cifar.html, "CIFAR-10 python version" and
"CIFAR-100 python version"): each file is a Python 2 pickle of a dict whose ``data`` entry is an
``N × 3072`` uint8 array (1024 red, then 1024 green, then 1024 blue values of a 32×32 image, row
major) and whose labels are a list of ``N`` ints.

==========  ======================================  =====================  ====================
dataset     files                                   labels key             class names (meta)
==========  ======================================  =====================  ====================
CIFAR-10    ``cifar-10-batches-py/data_batch_1..5``  ``labels``             ``batches.meta``:
            ``cifar-10-batches-py/test_batch``                             ``label_names``
CIFAR-100   ``cifar-100-python/train``, ``test``     ``fine_labels``        ``meta``:
                                                                           ``fine_label_names``
==========  ======================================  =====================  ====================

``root`` may be that folder itself, the folder that contains it (torchvision's ``./data``
layout), or the downloaded archive (``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``),
or a folder holding the archive. An archive is read in one streaming pass, never extracted to
disk. Nothing is downloaded: a missing file raises :class:`DatasetNotFoundError` saying which
file, what it should hold and where to get it; an unreadable one raises
:class:`CorruptDatasetError`.

The pickles are read with a restricted unpickler that only rebuilds numpy arrays, so a file
that is not a CIFAR file cannot run code on load.

Transforms work on whole batches of uint8 images (``B × 3 × 32 × 32``) on any device:
:func:`random_crop_flip` (zero padding, then a random crop and a random horizontal flip; the
usual CIFAR augmentation), driven by an explicit CPU ``torch.Generator`` so that it is
reproducible and its state can be checkpointed, and :func:`normalize` (per-channel mean/std).
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "DatasetError",
    "DatasetNotFoundError",
    "CorruptDatasetError",
    "load_cifar10",
    "load_cifar100",
    "cifar10_classes",
    "cifar100_classes",
    "normalize",
    "random_crop_flip",
]

# Per-channel statistics on the 0..1 scale. The CIFAR-10 values are the ones the official
# TrAct script (and most CIFAR code) uses; its std is the mean of the per-image stds, which is
# a little smaller than the pixel std (0.247, 0.243, 0.261). The CIFAR-100 values are the
# pixel mean/std of its training set.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

IMAGE_SHAPE = (3, 32, 32)
_PIXELS = 3 * 32 * 32
_HOMEPAGE = "https://www.cs.toronto.edu/~kriz/cifar.html"


class DatasetError(Exception):
    """A dataset could not be read; the message says which file and what to do."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """An expected dataset file or folder does not exist."""


class CorruptDatasetError(DatasetError, ValueError):
    """A dataset file exists but does not hold what the format says it should."""


@dataclass(frozen=True)
class _Layout:
    name: str
    folder: str
    archive: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    labels_key: str
    names_key: str
    num_classes: int

    @property
    def version_title(self) -> str:
        return f"{self.name} python version"

    def how_to_get(self) -> str:
        return (
            f'Get the "{self.version_title}" ({self.archive}) from {_HOMEPAGE} and pass '
            f"the archive, the {self.folder}/ folder unpacked from it, or the folder that "
            f"holds either (nothing is downloaded automatically)."
        )


CIFAR10 = _Layout(
    name="CIFAR-10",
    folder="cifar-10-batches-py",
    archive="cifar-10-python.tar.gz",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test_files=("test_batch",),
    meta_file="batches.meta",
    labels_key="labels",
    names_key="label_names",
    num_classes=10,
)
CIFAR100 = _Layout(
    name="CIFAR-100",
    folder="cifar-100-python",
    archive="cifar-100-python.tar.gz",
    train_files=("train",),
    test_files=("test",),
    meta_file="meta",
    labels_key="fine_labels",
    names_key="fine_label_names",
    num_classes=100,
)


# --------------------------------------------------------------------------- locating files


@dataclass(frozen=True)
class _Source:
    """Where a dataset's files live: a folder, or a tar.gz archive holding ``layout.folder``."""

    path: Path
    is_archive: bool


def _locate(layout: _Layout, root: str | os.PathLike) -> _Source:
    root = Path(root).expanduser()
    if root.is_file():
        return _Source(root, is_archive=True)
    if root.is_dir():
        if (root / layout.folder).is_dir():
            return _Source(root / layout.folder, is_archive=False)
        if (root / layout.archive).is_file():
            return _Source(root / layout.archive, is_archive=True)
        expected = layout.train_files + layout.test_files + (layout.meta_file,)
        if root.name == layout.folder or any((root / f).is_file() for f in expected):
            return _Source(root, is_archive=False)
        raise DatasetNotFoundError(
            f"{layout.name} not found under {root}: looked for the folder "
            f"{root / layout.folder}, the archive {root / layout.archive}, and the files "
            f"{', '.join(expected)} directly in {root}. {layout.how_to_get()}"
        )
    raise DatasetNotFoundError(f"{layout.name} data path {root} does not exist. {layout.how_to_get()}")


def _read_files(layout: _Layout, source: _Source, names: tuple[str, ...]) -> dict[str, bytes]:
    """The raw bytes of ``names`` (file names inside the dataset folder)."""
    if not source.is_archive:
        raw = {}
        for name in names:
            path = source.path / name
            if not path.is_file():
                raise DatasetNotFoundError(
                    f"{layout.name} file {path} is missing (the {layout.folder}/ folder should "
                    f"hold {', '.join(layout.train_files + layout.test_files)} and "
                    f"{layout.meta_file}). {layout.how_to_get()}"
                )
            raw[name] = path.read_bytes()
        return raw

    wanted = {f"{layout.folder}/{name}": name for name in names}
    raw = {}
    try:
        # streaming mode: one sequential pass over the gzip stream, nothing written to disk
        with tarfile.open(source.path, mode="r|*") as archive:
            for member in archive:
                key = wanted.get(member.name.removeprefix("./"))
                if key is None or not member.isfile():
                    continue
                handle = archive.extractfile(member)
                raw[key] = handle.read()
                if len(raw) == len(wanted):
                    break
    except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
        raise CorruptDatasetError(
            f"{source.path} is not a readable tar(.gz) archive ({err}); expected the "
            f"{layout.archive} of the {layout.version_title}. {layout.how_to_get()}"
        ) from err
    missing = [member for member, name in wanted.items() if name not in raw]
    if missing:
        raise CorruptDatasetError(
            f"archive {source.path} lacks {', '.join(missing)}; expected the {layout.archive} "
            f"of the {layout.version_title}. {layout.how_to_get()}"
        )
    return raw


# --------------------------------------------------------------------------- parsing


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Rebuilds dicts, lists, strings, numbers and numpy arrays, and refuses anything else."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 writes bytes under pickle protocol 2
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of a CIFAR file")
        if module.startswith("numpy.core") and hasattr(np, "_core"):
            # numpy 2 renamed numpy.core to numpy._core; the original files use the old name
            module = "numpy._core" + module.removeprefix("numpy.core")
        return super().find_class(module, name)


def _unpickle(raw: bytes, where: str, layout: _Layout) -> dict:
    try:
        # The files were written by Python 2: its str objects come back as bytes.
        obj = _ArrayOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as err:  # a damaged pickle can fail in many ways; all mean "corrupt"
        raise CorruptDatasetError(
            f"{where} is not a readable {layout.name} pickle ({type(err).__name__}: {err}). "
            f"Re-download or re-extract it. {layout.how_to_get()}"
        ) from err
    if not isinstance(obj, dict):
        raise CorruptDatasetError(
            f"{where} holds a {type(obj).__name__}, expected the dict of a {layout.name} "
            f"file. {layout.how_to_get()}"
        )
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _parse_batch(entry: dict, where: str, layout: _Layout) -> tuple[np.ndarray, np.ndarray]:
    for key in ("data", layout.labels_key):
        if key not in entry:
            raise CorruptDatasetError(
                f"{where} has no '{key}' entry (found {sorted(entry)}); expected a "
                f"{layout.name} data file with 'data' and '{layout.labels_key}'."
            )
    data = entry["data"]
    if not (
        isinstance(data, np.ndarray)
        and data.dtype == np.uint8
        and data.ndim == 2
        and data.shape[1] == _PIXELS
    ):
        desc = (
            f"an array of shape {data.shape} and dtype {data.dtype}"
            if isinstance(data, np.ndarray)
            else f"a {type(data).__name__}"
        )
        raise CorruptDatasetError(
            f"{where}: 'data' is {desc}, expected a uint8 array of shape (N, {_PIXELS})."
        )
    labels = _integer_labels(entry[layout.labels_key], where, layout)
    if labels.shape != (data.shape[0],):
        raise CorruptDatasetError(
            f"{where}: {labels.size} labels for {data.shape[0]} images; expected one each."
        )
    if labels.size and (labels.min() < 0 or labels.max() >= layout.num_classes):
        raise CorruptDatasetError(
            f"{where}: labels range over [{labels.min()}, {labels.max()}], expected "
            f"0..{layout.num_classes - 1} for {layout.name}."
        )
    return data, labels


def _integer_labels(raw, where: str, layout: _Layout) -> np.ndarray:
    """The labels as int64, refusing anything that is not an integer (2.7, True, "3", NaN):
    a cast would silently truncate 2.7 to 2."""
    key = layout.labels_key
    try:
        values = np.asarray(raw)
    except (TypeError, ValueError) as err:
        raise CorruptDatasetError(f"{where}: '{key}' is not a list of ints ({err}).") from err
    if values.dtype.kind in "iu":
        return values.astype(np.int64)
    if values.dtype.kind == "f" and values.size:
        bad = ~np.isfinite(values) | (values != np.round(values))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise CorruptDatasetError(
                f"{where}: label {i} of '{key}' is {float(values.flat[i])!r}, not an integer "
                f"({int(bad.sum())} such labels); expected integer class indices "
                f"0..{layout.num_classes - 1}. Re-download the {layout.archive}."
            )
        return values.astype(np.int64)
    if values.dtype.kind == "f":  # empty
        return values.astype(np.int64)
    raise CorruptDatasetError(
        f"{where}: '{key}' holds {values.dtype} values, not ints; expected integer class "
        f"indices 0..{layout.num_classes - 1}. Re-download the {layout.archive}."
    )


def _where(source: _Source, layout: _Layout, name: str) -> str:
    if source.is_archive:
        return f"{source.path}:{layout.folder}/{name}"
    return str(source.path / name)


def _load(layout: _Layout, root, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    source = _locate(layout, root)
    names = layout.train_files if train else layout.test_files
    raw = _read_files(layout, source, names)
    images, labels = [], []
    for name in names:
        where = _where(source, layout, name)
        data, lab = _parse_batch(_unpickle(raw[name], where, layout), where, layout)
        images.append(data)
        labels.append(lab)
    data = np.ascontiguousarray(np.concatenate(images)).reshape(-1, *IMAGE_SHAPE)
    return torch.from_numpy(data), torch.from_numpy(np.concatenate(labels))


def _classes(layout: _Layout, root) -> list[str]:
    source = _locate(layout, root)
    where = _where(source, layout, layout.meta_file)
    meta = _unpickle(_read_files(layout, source, (layout.meta_file,))[layout.meta_file], where, layout)
    names = meta.get(layout.names_key)
    if not isinstance(names, list) or len(names) != layout.num_classes:
        raise CorruptDatasetError(
            f"{where}: expected '{layout.names_key}', a list of {layout.num_classes} class "
            f"names; found {type(names).__name__}."
        )
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]


def load_cifar10(root, train: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 images (uint8, ``N × 3 × 32 × 32``) and labels (int64, ``N``).

    ``train=True`` reads ``data_batch_1`` … ``data_batch_5`` (50 000 images in the real set),
    ``train=False`` reads ``test_batch`` (10 000). See the module docstring for ``root``.
    """
    return _load(CIFAR10, root, train)


def load_cifar100(root, train: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-100 images (uint8, ``N × 3 × 32 × 32``) and fine labels (int64, 0..99).

    ``train=True`` reads ``train`` (50 000 images), ``train=False`` reads ``test`` (10 000).
    """
    return _load(CIFAR100, root, train)


def cifar10_classes(root) -> list[str]:
    """The 10 class names, from ``batches.meta``."""
    return _classes(CIFAR10, root)


def cifar100_classes(root) -> list[str]:
    """The 100 fine class names, from ``meta``."""
    return _classes(CIFAR100, root)


# --------------------------------------------------------------------------- transforms


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """``(images / 255 - mean) / std`` per channel: float32 for uint8 input, else input's dtype.

    ``images`` is ``B × C × H × W``: uint8 pixels (scaled by 1/255 first) or floats already on
    the 0..1 scale.
    """
    x = images.float().div_(255.0) if images.dtype == torch.uint8 else images
    mean_t = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean_t) / std_t


def random_crop_flip(
    images: torch.Tensor, generator: torch.Generator, padding: int = 4, flip: bool = True
) -> torch.Tensor:
    """Pad each image with ``padding`` zero pixels per side, crop back to the original size at
    a random offset, and mirror it left-right with probability 1/2.

    Works on a whole batch ``B × C × H × W`` of any dtype and device (apply it to the uint8
    pixels before :func:`normalize`, so that the padding is black, as in the usual pipeline).
    The random draws come from ``generator`` (a CPU generator) only: first the ``B × 2`` crop
    offsets, then ``B`` flip decisions, so the result is a function of the generator's state.
    """
    if images.dim() != 4:
        raise ValueError(f"expected a batch B × C × H × W, got shape {tuple(images.shape)}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    b, c, h, w = images.shape
    offsets = torch.randint(0, 2 * padding + 1, (b, 2), generator=generator)
    mirror = torch.randint(0, 2, (b,), generator=generator).bool() if flip else None
    rows = offsets[:, :1] + torch.arange(h)
    cols = offsets[:, 1:] + torch.arange(w)
    if mirror is not None:
        cols = torch.where(mirror[:, None], cols.flip(1), cols)
    device = images.device
    padded = F.pad(images, (padding, padding, padding, padding)) if padding else images
    batch_index = torch.arange(b, device=device).view(b, 1, 1, 1)
    channel_index = torch.arange(c, device=device).view(1, c, 1, 1)
    return padded[
        batch_index, channel_index, rows.to(device).view(b, 1, h, 1), cols.to(device).view(b, 1, 1, w)
    ]

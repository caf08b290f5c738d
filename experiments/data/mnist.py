"""MNIST from its standard idx files (LeCun's format), gzip-compressed or not; and a writer
of files in the same format, for tests.

Files (in ``root``, or in ``root/MNIST/raw`` as torchvision lays them out)::

    train-images-idx3-ubyte[.gz]   train-labels-idx1-ubyte[.gz]   (60 000 images)
    t10k-images-idx3-ubyte[.gz]    t10k-labels-idx1-ubyte[.gz]    (10 000 images)

An idx file is a big-endian header — two zero bytes, a type code (0x08: unsigned byte), the
number of dimensions d — then d big-endian uint32 sizes, then the data in C order.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch

from inf.fileio import atomic_write

__all__ = ["load_mnist", "read_idx", "write_idx", "write_synthetic_mnist", "MnistNotFoundError"]

FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_TYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class MnistNotFoundError(FileNotFoundError):
    """An idx file is missing (the message says which and where it was looked for)."""


def read_idx(path) -> np.ndarray:
    """The array stored in an idx file (``.gz`` is decompressed)."""
    path = Path(path)
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _TYPES:
        raise ValueError(f"{path}: not an idx file (bad magic number {raw[:4].hex()})")
    dtype, ndim = np.dtype(_TYPES[raw[2]]), raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = raw[4 + 4 * ndim :]
    if len(data) != int(np.prod(shape)) * dtype.itemsize:
        raise ValueError(
            f"{path}: header says shape {shape} ({int(np.prod(shape)) * dtype.itemsize} bytes) "
            f"but {len(data)} bytes follow: truncated or corrupt"
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path, array: np.ndarray, compress: bool | None = None) -> Path:
    """Write ``array`` (uint8) as an idx file, gzip-compressed when ``compress`` (default: when
    the name ends in ``.gz``); atomically (temporary file, then rename)."""
    path = Path(path)
    array = np.ascontiguousarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"write_idx writes uint8 arrays, got {array.dtype}")
    raw = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    if compress if compress is not None else path.suffix == ".gz":
        raw = gzip.compress(raw, mtime=0)
    atomic_write(path, lambda fh: fh.write(raw))
    return path


def _find(root: Path, name: str) -> Path:
    for folder in (root, root / "MNIST" / "raw", root / "raw"):
        for candidate in (folder / name, folder / (name + ".gz")):
            if candidate.is_file():
                return candidate
    raise MnistNotFoundError(
        f"MNIST file {name}[.gz] not found in {root} (nor in {root}/MNIST/raw): put the four idx files there"
    )


def load_mnist(root, train: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (uint8, ``N × 1 × 28 × 28``) and labels (int64, ``N``) of the training or test split."""
    root = Path(root)
    if not root.exists():
        raise MnistNotFoundError(f"MNIST folder {root} does not exist")
    img_name, lab_name = FILES[train]
    images, labels = read_idx(_find(root, img_name)), read_idx(_find(root, lab_name))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(
            f"MNIST in {root}: images {images.shape} and labels {labels.shape} do not match "
            "(expected N × H × W and N)"
        )
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def write_synthetic_mnist(
    directory, n_train: int = 60, n_test: int = 20, seed: int = 0, compress: bool = True, size: int = 28
) -> Path:
    """Tiny MNIST-format files (noise plus a fixed template per class) in ``directory``; returns it."""
    rng = np.random.default_rng(seed)
    templates = rng.integers(0, 256, size=(10, size, size))
    directory = Path(directory)
    for train, n in ((True, n_train), (False, n_test)):
        labels = rng.permutation(np.arange(n) % 10).astype(np.uint8)
        images = ((rng.integers(0, 256, size=(n, size, size)) + templates[labels]) // 2).astype(np.uint8)
        suffix = ".gz" if compress else ""
        write_idx(directory / (FILES[train][0] + suffix), images)
        write_idx(directory / (FILES[train][1] + suffix), labels)
    return directory

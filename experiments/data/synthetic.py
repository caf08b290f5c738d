"""Tiny synthetic CIFAR-10 / CIFAR-100 files in exactly the on-disk format of the real ones.

For tests: the files have the real names, folder and archive layout, dict keys and value types,
and are pickled the way the originals were (Python 2 pickles, protocol 2, whose strings are
Python 2 ``str`` objects and whose arrays reference ``numpy.core.multiarray._reconstruct``),
so a reader that handles these handles the downloaded files. Only the sizes differ.

Images are ``noise / 2 + template[label] / 2`` with one fixed random template per class, so a
model can learn them a little. Labels cycle through every class (then are shuffled).
"""

from __future__ import annotations

import io
import struct
import tarfile
from pathlib import Path

import numpy as np

from experiments.data.cifar import CIFAR10, CIFAR100, _Layout

__all__ = ["write_synthetic_cifar10", "write_synthetic_cifar100", "py2_pickle"]

CIFAR10_CLASS_NAMES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)


# --------------------------------------------------------------------------- Python 2 pickles


def py2_pickle(obj) -> bytes:
    """``obj`` pickled as Python 2's cPickle (protocol 2) would have written it.

    Supports dict, list, tuple, str/bytes (both become a Python 2 ``str``), bool, int, None
    and C-contiguous uint8 numpy arrays: the types that occur in the CIFAR files.
    """
    out = bytearray(b"\x80\x02")  # PROTO 2
    _emit(obj, out)
    out += b"."  # STOP
    return bytes(out)


def _emit_global(module: str, name: str, out: bytearray) -> None:
    out += b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _emit(obj, out: bytearray) -> None:
    if isinstance(obj, dict):
        out += b"}"
        if obj:
            out += b"("
            for key, value in obj.items():
                _emit(key, out)
                _emit(value, out)
            out += b"u"
    elif isinstance(obj, (list, tuple)):
        if isinstance(obj, list):
            out += b"]"
            if obj:
                out += b"("
                for item in obj:
                    _emit(item, out)
                out += b"e"
        elif len(obj) == 0:
            out += b")"
        elif len(obj) <= 3:
            for item in obj:
                _emit(item, out)
            out += (b"\x85", b"\x86", b"\x87")[len(obj) - 1]
        else:
            out += b"("
            for item in obj:
                _emit(item, out)
            out += b"t"
    elif isinstance(obj, (str, bytes)):
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            out += b"U" + bytes([len(data)]) + data  # SHORT_BINSTRING
        else:
            out += b"T" + struct.pack("<i", len(data)) + data  # BINSTRING
    elif obj is None:
        out += b"N"
    elif isinstance(obj, bool):
        out += b"\x88" if obj else b"\x89"
    elif isinstance(obj, (int, np.integer)):
        value = int(obj)
        if 0 <= value < 256:
            out += b"K" + bytes([value])
        elif 0 <= value < 65536:
            out += b"M" + struct.pack("<H", value)
        else:
            out += b"J" + struct.pack("<i", value)
    elif isinstance(obj, np.ndarray):
        if obj.dtype != np.uint8 or not obj.flags.c_contiguous:
            raise TypeError("py2_pickle writes C-contiguous uint8 arrays only")
        # ndarray.__reduce__ of numpy 1.x: _reconstruct(ndarray, (0,), 'b'), then
        # __setstate__((1, shape, dtype, is_fortran, raw_bytes))
        _emit_global("numpy.core.multiarray", "_reconstruct", out)
        _emit_global("numpy", "ndarray", out)
        _emit((0,), out)
        _emit("b", out)
        out += b"\x87R"  # TUPLE3, REDUCE
        out += b"("
        _emit(1, out)
        _emit(tuple(obj.shape), out)
        _emit_global("numpy", "dtype", out)
        _emit(("u1", 0, 1), out)
        out += b"R"
        _emit((3, "|", None, None, None, -1, -1, 0), out)
        out += b"b"  # BUILD (dtype state)
        _emit(False, out)
        _emit(obj.tobytes(), out)
        out += b"tb"  # TUPLE, BUILD (array state)
    else:
        raise TypeError(f"py2_pickle cannot write {type(obj).__name__}")


# --------------------------------------------------------------------------- datasets


def _make_split(rng: np.random.Generator, templates: np.ndarray, n: int):
    num_classes = templates.shape[0]
    labels = rng.permutation(np.arange(n) % num_classes)
    noise = rng.integers(0, 256, size=(n, templates.shape[1]), dtype=np.uint8)
    data = (noise // 2 + templates[labels] // 2).astype(np.uint8)
    return np.ascontiguousarray(data), labels


def _write(layout: _Layout, files: dict[str, bytes], directory, archive: bool) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if not archive:
        folder = directory / layout.folder
        folder.mkdir(exist_ok=True)
        for name, data in files.items():
            (folder / name).write_bytes(data)
        return folder
    path = directory / layout.archive
    with tarfile.open(path, "w:gz") as tar:
        entry = tarfile.TarInfo(layout.folder)
        entry.type = tarfile.DIRTYPE
        entry.mode = 0o755
        tar.addfile(entry)
        for name, data in files.items():
            info = tarfile.TarInfo(f"{layout.folder}/{name}")
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return path


def _filenames(labels, names, rng) -> list[str]:
    return [f"{names[k]}_s_{int(rng.integers(0, 10**6)):06d}.png" for k in labels]


def write_synthetic_cifar10(
    directory, n_train: int = 50, n_test: int = 20, seed: int = 0, archive: bool = False
) -> Path:
    """Write a tiny CIFAR-10 "python version" and return what to pass as ``root``.

    ``archive=False``: ``directory/cifar-10-batches-py/`` with ``data_batch_1`` …
    ``data_batch_5`` (the ``n_train`` images split as evenly as possible), ``test_batch``,
    ``batches.meta`` and ``readme.html``; returns that folder.
    ``archive=True``: the same files inside ``directory/cifar-10-python.tar.gz``; returns it.
    """
    rng = np.random.default_rng(seed)
    templates = rng.integers(0, 256, size=(CIFAR10.num_classes, 3072), dtype=np.uint8)
    train_data, train_labels = _make_split(rng, templates, n_train)
    test_data, test_labels = _make_split(rng, templates, n_test)
    files = {}
    chunks = np.array_split(np.arange(n_train), len(CIFAR10.train_files))
    for i, (name, rows) in enumerate(zip(CIFAR10.train_files, chunks), start=1):
        files[name] = py2_pickle(
            {
                "batch_label": f"training batch {i} of 5",
                "labels": [int(k) for k in train_labels[rows]],
                "data": np.ascontiguousarray(train_data[rows]),
                "filenames": _filenames(train_labels[rows], CIFAR10_CLASS_NAMES, rng),
            }
        )
    files["test_batch"] = py2_pickle(
        {
            "batch_label": "testing batch 1 of 1",
            "labels": [int(k) for k in test_labels],
            "data": test_data,
            "filenames": _filenames(test_labels, CIFAR10_CLASS_NAMES, rng),
        }
    )
    files["batches.meta"] = py2_pickle(
        {
            "num_cases_per_batch": 10000,
            "label_names": list(CIFAR10_CLASS_NAMES),
            "num_vis": 3072,
        }
    )
    files["readme.html"] = (
        b'<meta HTTP-EQUIV="REFRESH" content="0; url=https://www.cs.toronto.edu/~kriz/cifar.html">\n'
    )
    return _write(CIFAR10, files, directory, archive)


def write_synthetic_cifar100(
    directory, n_train: int = 200, n_test: int = 100, seed: int = 0, archive: bool = False
) -> Path:
    """Write a tiny CIFAR-100 "python version" and return what to pass as ``root``.

    ``archive=False``: ``directory/cifar-100-python/`` with ``train``, ``test`` and ``meta``
    (fine and coarse labels and names); returns that folder. ``archive=True``: the same files in
    ``directory/cifar-100-python.tar.gz``; returns it. Class names are placeholders
    (``fine_000`` …, ``coarse_00`` …); coarse label = fine label // 5.
    """
    rng = np.random.default_rng(seed)
    templates = rng.integers(0, 256, size=(CIFAR100.num_classes, 3072), dtype=np.uint8)
    fine_names = [f"fine_{k:03d}" for k in range(100)]
    coarse_names = [f"coarse_{k:02d}" for k in range(20)]
    files = {}
    for name, n in (("train", n_train), ("test", n_test)):
        data, labels = _make_split(rng, templates, n)
        files[name] = py2_pickle(
            {
                "filenames": _filenames(labels, fine_names, rng),
                "batch_label": f"{'training' if name == 'train' else 'testing'} batch 1 of 1",
                "fine_labels": [int(k) for k in labels],
                "coarse_labels": [int(k) // 5 for k in labels],
                "data": data,
            }
        )
    files["meta"] = py2_pickle({"fine_label_names": fine_names, "coarse_label_names": coarse_names})
    return _write(CIFAR100, files, directory, archive)

"""Tiny synthetic downsampled-ImageNet files in the on-disk layouts of the real release.

For tests of :mod:`experiments.data.imagenet32`: the files have the real names
(``train_data_batch_k[.npz]``, ``val_data[.npz]``), the real keys (``data`` as
N × 3·s² uint8 channel-major rows, ``labels`` as 1-based integers, ``mean`` in training
files) and the real container (``numpy.savez`` archive, or a pickled dict).  Only the sizes
differ.  Images are ``noise / 2 + template[class] / 2`` with one random template per class,
so they can be learnt a little.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from experiments.data.imagenet32 import NUM_CLASSES, VAL_FILE_STEM, train_file_stem

__all__ = ["write_synthetic_imagenet32"]

_FORMATS = ("npz", "pickle", "pickle-py2")


def _split(rng: np.random.Generator, templates: np.ndarray, n: int, num_classes: int):
    labels = np.arange(n) % num_classes  # every class appears before any repeats
    rng.shuffle(labels)
    noise = rng.integers(0, 256, size=(n, templates.shape[1]), dtype=np.uint16)
    data = ((noise + templates[labels].astype(np.uint16)) // 2).astype(np.uint8)
    return np.ascontiguousarray(data), labels.astype(np.int64) + 1  # stored 1-based


def _write(path: Path, entry: dict, fmt: str) -> None:
    if fmt == "npz":
        with open(path, "wb") as fh:  # an open handle keeps numpy from appending ".npz"
            np.savez(fh, **entry)
    elif fmt == "pickle":
        with open(path, "wb") as fh:
            pickle.dump({**entry, "labels": [int(v) for v in entry["labels"]]}, fh, protocol=4)
    else:  # a Python 2 pickle (protocol 2, str keys), as the oldest release was written
        from experiments.data.synthetic import py2_pickle

        entry = {"data": entry["data"], "labels": [int(v) for v in entry["labels"]]}
        path.write_bytes(py2_pickle(entry))


def write_synthetic_imagenet32(
    directory,
    n_per_batch: int = 32,
    n_batches: int = 2,
    fmt: str = "npz",
    seed: int = 0,
    *,
    n_val: int | None = None,
    num_classes: int = NUM_CLASSES,
    image_size: int = 32,
) -> Path:
    """Write ``n_batches`` training files and one validation file into ``directory``.

    ``fmt``: ``"npz"`` (``train_data_batch_k.npz`` …), ``"pickle"`` (extension-less
    Python 3 pickles of dicts, labels as a list) or ``"pickle-py2"`` (the same as Python 2
    would have pickled them; no ``mean``).  Labels are stored 1-based and use only classes
    ``1 … num_classes``.  ``n_val`` defaults to ``n_per_batch``.  Returns ``directory``.
    """
    if fmt not in _FORMATS:
        raise ValueError(f"fmt must be one of {_FORMATS}, got {fmt!r}")
    if not 1 <= num_classes <= NUM_CLASSES:
        raise ValueError(f"num_classes must be in 1..{NUM_CLASSES}, got {num_classes}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    width = 3 * image_size * image_size
    templates = rng.integers(0, 256, size=(num_classes, width), dtype=np.uint8)
    suffix = ".npz" if fmt == "npz" else ""
    train = [_split(rng, templates, n_per_batch, num_classes) for _ in range(n_batches)]
    mean = (
        np.concatenate([d for d, _ in train]).astype(np.float64).mean(0)
        if n_batches and n_per_batch
        else np.zeros(width)
    )
    for k, (data, labels) in enumerate(train, start=1):
        _write(directory / (train_file_stem(k) + suffix), {"data": data, "labels": labels, "mean": mean}, fmt)
    data, labels = _split(rng, templates, n_per_batch if n_val is None else n_val, num_classes)
    _write(directory / (VAL_FILE_STEM + suffix), {"data": data, "labels": labels}, fmt)
    return directory

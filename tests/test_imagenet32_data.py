"""Tests of the downsampled-ImageNet reader on synthetic files in the released layouts."""

from __future__ import annotations

import pickle
import shutil

import numpy as np
import pytest
import torch

from experiments.data.cifar import CorruptDatasetError, DatasetNotFoundError
from experiments.data.imagenet32 import ImageNet32, load_imagenet32
from experiments.data.synthetic_imagenet import write_synthetic_imagenet32


def _raw(path, fmt):
    """Stored (data, labels) of one synthetic file, read independently of the reader."""
    if fmt == "npz":
        with np.load(path) as f:
            return f["data"], np.asarray(f["labels"])
    with open(path, "rb") as fh:
        obj = pickle.load(fh, encoding="latin1")
    return obj["data"], np.asarray(obj["labels"])


@pytest.mark.parametrize("fmt", ["npz", "pickle", "pickle-py2"])
def test_both_layouts_shapes_and_label_shift(tmp_path, fmt):
    root = write_synthetic_imagenet32(tmp_path, n_per_batch=12, n_batches=3, fmt=fmt, seed=1, n_val=7)
    suffix = ".npz" if fmt == "npz" else ""
    raw_fmt = "npz" if fmt == "npz" else "pickle"
    with pytest.warns(UserWarning, match="only 3 of the 10"):
        ds = ImageNet32(root, train=True)
    x, y = ds.load()
    assert x.shape == (36, 3, 32, 32) and x.dtype == torch.uint8
    assert y.shape == (36,) and y.dtype == torch.int64
    data = np.concatenate([_raw(root / f"train_data_batch_{k}{suffix}", raw_fmt)[0] for k in (1, 2, 3)])
    labels = np.concatenate([_raw(root / f"train_data_batch_{k}{suffix}", raw_fmt)[1] for k in (1, 2, 3)])
    assert labels.min() >= 1
    assert torch.equal(y, torch.from_numpy(labels - 1))  # 1..1000 → 0..999
    # channel-major rows: first 1024 values are the red plane, row by row
    assert torch.equal(x[5, 0].reshape(-1), torch.from_numpy(data[5, :1024]))
    assert torch.equal(x[5, 2, 3, 4], torch.tensor(data[5, 2048 + 3 * 32 + 4]))
    xv, yv = load_imagenet32(root, train=False)
    assert xv.shape == (7, 3, 32, 32) and yv.shape == (7,)
    # iteration is per file
    sizes = [len(lab) for _, lab in ImageNet32(root, batches=[2, 3]).iter_batches()]
    assert sizes == [12, 12]


def test_class_subset_random_subset_and_laziness(tmp_path):
    root = write_synthetic_imagenet32(tmp_path, n_per_batch=40, n_batches=2, num_classes=10, seed=2)
    full_x, full_y = load_imagenet32(root, batches=[1, 2])
    cls = [7, 2, 5]
    x, y = load_imagenet32(root, batches=[1, 2], classes=cls)
    mask = torch.isin(full_y, torch.tensor(cls))
    assert torch.equal(x, full_x[mask])
    assert torch.equal(torch.tensor(cls)[y], full_y[mask])  # relabelled by position in `classes`
    _, y_orig = load_imagenet32(root, batches=[1, 2], classes=cls, relabel=False)
    assert torch.equal(y_orig, full_y[mask])
    ds = ImageNet32(root, batches=[1, 2], classes=cls, subset=10, seed=4)
    assert len(ds) == 10
    xs, ys = ds.load()
    assert xs.shape[0] == 10 and set(ys.tolist()) <= {0, 1, 2}
    # a subset is rows of the class-filtered set, in file order, reproducible from the seed
    flat_full = full_x[mask].reshape(int(mask.sum()), -1)
    idx = [int(torch.nonzero((flat_full == r).all(1))[0]) for r in xs.reshape(10, -1)]
    assert idx == sorted(idx)
    assert torch.equal(load_imagenet32(root, batches=[1, 2], classes=cls, subset=10, seed=4)[0], xs)
    assert not torch.equal(load_imagenet32(root, batches=[1, 2], classes=cls, subset=10, seed=5)[0], xs)
    assert len(load_imagenet32(root, batches=[1, 2], subset=1000)[1]) == 80
    # an empty selection still has the image shape
    x1, _ = load_imagenet32(root, batches=[1, 2], subset=0)
    assert x1.shape == (0, 3, 32, 32)


def test_npz_preferred_and_subfolders(tmp_path):
    write_synthetic_imagenet32(
        tmp_path / "Imagenet32_train_npz", n_per_batch=5, n_batches=10, fmt="npz", seed=0
    )
    write_synthetic_imagenet32(
        tmp_path / "Imagenet32_train", n_per_batch=3, n_batches=10, fmt="pickle", seed=0
    )
    x, _ = load_imagenet32(tmp_path)  # all ten batches: no warning; npz wins
    assert x.shape[0] == 50
    x, _ = load_imagenet32(tmp_path, fmt="pickle")
    assert x.shape[0] == 30


def test_missing_files_raise_clear_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="does not exist.*not downloaded"):
        load_imagenet32(tmp_path / "nowhere")
    with pytest.raises(DatasetNotFoundError, match=r"train_data_batch_1\.npz or train_data_batch_1 "):
        load_imagenet32(tmp_path)
    root = write_synthetic_imagenet32(tmp_path / "d", n_per_batch=4, n_batches=3, fmt="npz")
    (root / "train_data_batch_2.npz").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"train_data_batch_2\.npz"):
        load_imagenet32(root)
    with pytest.raises(DatasetNotFoundError, match=r"train_data_batch_7"):
        ImageNet32(root, batches=[1, 7])
    (root / "val_data.npz").unlink()
    with pytest.raises(DatasetNotFoundError, match="val_data"):
        load_imagenet32(root, train=False)
    with pytest.raises(DatasetNotFoundError, match=r"format 'pickle'"):
        load_imagenet32(root, batches=[1], fmt="pickle")
    assert isinstance(DatasetNotFoundError("x"), FileNotFoundError)


@pytest.mark.parametrize("fmt", ["npz", "pickle"])
def test_corrupt_files_raise_clear_errors(tmp_path, fmt):
    root = write_synthetic_imagenet32(tmp_path, n_per_batch=6, n_batches=1, fmt=fmt)
    name = "val_data.npz" if fmt == "npz" else "val_data"
    path = root / name
    good = path.read_bytes()

    def expect(pattern):
        with pytest.raises(CorruptDatasetError, match=pattern) as info:
            load_imagenet32(root, train=False)
        assert name in str(info.value)

    path.write_bytes(good[: len(good) // 2])  # truncated
    expect("cannot be read|truncated")
    path.write_bytes(b"")
    expect("cannot be read")

    def rewrite(entry):
        if fmt == "npz":
            with open(path, "wb") as fh:
                np.savez(fh, **entry)
        else:
            with open(path, "wb") as fh:
                pickle.dump(entry, fh)

    data = np.zeros((6, 3072), np.uint8)
    rewrite({"images": data, "labels": np.ones(6, np.int64)})
    expect("'data' and 'labels'")
    rewrite({"data": data, "labels": np.zeros(6, np.int64)})  # 0-based labels: not the release
    expect(r"range over 0\.\.0.*1\.\.1000")
    rewrite({"data": data, "labels": np.full(6, 1001, np.int64)})
    expect("1001")
    rewrite({"data": np.zeros((6, 1024), np.uint8), "labels": np.ones(6, np.int64)})
    expect(r"shape \(6, 1024\).*N × 3072 uint8")
    rewrite({"data": data.astype(np.float32), "labels": np.ones(6, np.int64)})
    expect("float32")
    rewrite({"data": data[:5], "labels": np.ones(6, np.int64)})
    expect("5 images but 6 labels")
    if fmt == "pickle":
        with open(path, "wb") as fh:
            pickle.dump([data], fh)
        expect("holds a list, not a dict")
        with open(path, "wb") as fh:
            pickle.dump({"data": data, "labels": [1] * 6, "x": shutil.copy}, fh)
        expect("refusing to unpickle shutil.copy")
    assert isinstance(CorruptDatasetError("x"), ValueError)


def test_argument_validation(tmp_path):
    root = write_synthetic_imagenet32(tmp_path, n_per_batch=4, n_batches=1)
    with pytest.raises(ValueError, match="fmt"):
        ImageNet32(root, fmt="tar")
    with pytest.raises(ValueError, match="0..999"):
        ImageNet32(root, batches=[1], classes=[1000])
    with pytest.raises(ValueError, match="duplicates"):
        ImageNet32(root, batches=[1], classes=[3, 3])
    with pytest.raises(ValueError, match="fmt"):
        write_synthetic_imagenet32(tmp_path / "x", fmt="zip")

"""CIFAR readers (experiments/data/cifar.py) on tiny files in the real on-disk formats."""

from __future__ import annotations

import io
import pickle
import tarfile

import numpy as np
import pytest
import torch

import experiments.data.cifar as cifar
from experiments.data.cifar import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CorruptDatasetError,
    DatasetError,
    DatasetNotFoundError,
    cifar10_classes,
    cifar100_classes,
    load_cifar10,
    load_cifar100,
    normalize,
    random_crop_flip,
)
from experiments.data.synthetic import (
    py2_pickle,
    write_synthetic_cifar10,
    write_synthetic_cifar100,
)


def _reference(folder, names, labels_key):
    """Images and labels decoded independently of the reader, with plain pickle + numpy."""
    data, labels = [], []
    for name in names:
        with open(folder / name, "rb") as f:
            entry = pickle.load(f, encoding="bytes")
        data.append(entry[b"data"].reshape(-1, 3, 32, 32))
        labels.extend(entry[labels_key])
    return np.concatenate(data), np.asarray(labels)


@pytest.fixture(scope="module")
def cifar10_dir(tmp_path_factory):
    return write_synthetic_cifar10(tmp_path_factory.mktemp("c10"), n_train=23, n_test=7, seed=1)


@pytest.fixture(scope="module")
def cifar100_dir(tmp_path_factory):
    return write_synthetic_cifar100(tmp_path_factory.mktemp("c100"), n_train=130, n_test=9, seed=2)


# --------------------------------------------------------------------------- round trips


def test_cifar10_folder_round_trip(cifar10_dir):
    train_files = [f"data_batch_{i}" for i in range(1, 6)]
    for train, names, n in ((True, train_files, 23), (False, ["test_batch"], 7)):
        images, labels = load_cifar10(cifar10_dir, train=train)
        assert images.shape == (n, 3, 32, 32) and images.dtype == torch.uint8
        assert labels.shape == (n,) and labels.dtype == torch.int64
        ref_images, ref_labels = _reference(cifar10_dir, names, b"labels")
        assert np.array_equal(images.numpy(), ref_images)
        assert np.array_equal(labels.numpy(), ref_labels)
    assert cifar10_classes(cifar10_dir) == [
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
    ]


def test_cifar10_root_forms_agree(cifar10_dir, tmp_path):
    archive = write_synthetic_cifar10(tmp_path, n_train=23, n_test=7, seed=1, archive=True)
    assert archive.name == "cifar-10-python.tar.gz"
    expected = load_cifar10(cifar10_dir)
    # the folder, its parent, the archive, the archive's folder
    for root in (cifar10_dir, cifar10_dir.parent, archive, tmp_path, str(archive)):
        images, labels = load_cifar10(root)
        assert torch.equal(images, expected[0]) and torch.equal(labels, expected[1])
    test_images, _ = load_cifar10(archive, train=False)
    assert test_images.shape == (7, 3, 32, 32)
    assert cifar10_classes(archive)[0] == "airplane"


def test_cifar100_folder_and_archive(cifar100_dir, tmp_path):
    images, labels = load_cifar100(cifar100_dir)
    ref_images, ref_labels = _reference(cifar100_dir, ["train"], b"fine_labels")
    assert images.shape == (130, 3, 32, 32)
    assert np.array_equal(images.numpy(), ref_images)
    assert np.array_equal(labels.numpy(), ref_labels)
    assert labels.max() == 99 and labels.min() == 0  # fine labels, not the 20 coarse ones
    archive = write_synthetic_cifar100(tmp_path, n_train=130, n_test=9, seed=2, archive=True)
    for root in (archive, tmp_path, cifar100_dir.parent):
        a_images, a_labels = load_cifar100(root)
        assert torch.equal(a_images, images) and torch.equal(a_labels, labels)
    assert load_cifar100(archive, train=False)[0].shape == (9, 3, 32, 32)
    names = cifar100_classes(archive)
    assert len(names) == 100 and names[7] == "fine_007"


def test_synthetic_files_are_python2_pickles(cifar10_dir):
    """Like the originals: str keys come back as bytes under encoding='bytes', and the array
    is rebuilt through numpy.core.multiarray._reconstruct."""
    raw = (cifar10_dir / "data_batch_1").read_bytes()
    assert raw[:2] == b"\x80\x02"
    assert b"cnumpy.core.multiarray\n_reconstruct\n" in raw
    entry = pickle.loads(raw, encoding="bytes")
    assert set(entry) == {b"batch_label", b"labels", b"data", b"filenames"}
    assert entry[b"data"].dtype == np.uint8 and entry[b"data"].shape[1] == 3072


def test_python3_written_pickles_are_read_too(tmp_path):
    """Files re-saved by Python 3 (str keys, newer protocol) load the same way."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        entry = {"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), "labels": [i, 9]}
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(entry, protocol=4))
    images, labels = load_cifar10(folder)
    assert images.shape == (10, 3, 32, 32)
    assert labels.tolist() == [1, 9, 2, 9, 3, 9, 4, 9, 5, 9]


def test_image_layout_is_channel_planes():
    """Row r of the 3072 values is R plane, then G, then B, each 32×32 row-major."""
    data = np.zeros((1, 3072), dtype=np.uint8)
    data[0, 1024 + 32 * 5 + 7] = 200  # green channel, row 5, column 7
    entry = {"data": data, "labels": [3]}
    blob = py2_pickle(entry)
    parsed = cifar._unpickle(blob, "mem", cifar.CIFAR10)
    arr, lab = cifar._parse_batch(parsed, "mem", cifar.CIFAR10)
    image = torch.from_numpy(arr.reshape(-1, 3, 32, 32))[0]
    assert image[1, 5, 7] == 200 and image.sum() == 200 and lab.tolist() == [3]


# --------------------------------------------------------------------------- errors


def test_missing_root_says_what_and_where(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        load_cifar10(tmp_path / "nowhere")
    message = str(err.value)
    assert "nowhere" in message and "cifar-10-python.tar.gz" in message
    assert "cs.toronto.edu" in message
    with pytest.raises(DatasetNotFoundError, match="cifar-100-python"):
        load_cifar100(tmp_path)  # exists but holds nothing


def test_missing_batch_file_is_named(tmp_path):
    folder = write_synthetic_cifar10(tmp_path, n_train=10, n_test=2)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DatasetNotFoundError, match="data_batch_3"):
        load_cifar10(tmp_path)
    assert load_cifar10(tmp_path, train=False)[0].shape == (2, 3, 32, 32)  # test split intact


@pytest.mark.parametrize(
    "damage", ["truncated", "garbage", "wrong_shape", "bad_labels", "not_a_dict", "missing_key"]
)
def test_corrupt_file_is_named(tmp_path, damage):
    folder = write_synthetic_cifar10(tmp_path, n_train=10, n_test=2)
    target = folder / "data_batch_2"
    raw = target.read_bytes()
    blobs = {
        "truncated": raw[: len(raw) // 2],
        "garbage": b"this is not a pickle at all",
        "wrong_shape": py2_pickle({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]}),
        "bad_labels": py2_pickle({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 10]}),
        "not_a_dict": py2_pickle([1, 2, 3]),
        "missing_key": py2_pickle({"data": np.zeros((2, 3072), np.uint8)}),
    }
    target.write_bytes(blobs[damage])
    with pytest.raises(CorruptDatasetError) as err:
        load_cifar10(folder)
    assert "data_batch_2" in str(err.value)
    assert isinstance(err.value, DatasetError)


@pytest.mark.parametrize(
    "labels,what",
    [
        ([0, 2.7], "2.7"),  # used to be truncated to 2
        ([0.0, float("nan")], "nan"),
        ([1, -1], "range"),
        ([0, 10], "range"),
        (np.array([0.0, 12.0]), "range"),  # integral floats are range-checked too
        (["0", "1"], "not ints"),
    ],
)
def test_non_integer_or_out_of_range_labels_are_refused(tmp_path, labels, what):
    """Issue 14, item 9: a label of 2.7 was silently cast to 2. Every label must be an integer
    class index 0..9; the one-line error names the file."""
    folder = write_synthetic_cifar10(tmp_path, n_train=10, n_test=2)
    target = folder / "data_batch_4"
    target.write_bytes(pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": labels}, protocol=2))
    with pytest.raises(CorruptDatasetError) as err:
        load_cifar10(folder)
    message = str(err.value)
    assert "data_batch_4" in message and what in message and "\n" not in message


def test_integral_float_labels_are_accepted(tmp_path):
    """Labels stored as whole-number floats (3.0) are the same classes: accepted as ints."""
    folder = write_synthetic_cifar10(tmp_path, n_train=10, n_test=2)
    (folder / "test_batch").write_bytes(
        pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [3.0, 9.0]}, protocol=2)
    )
    _, labels = load_cifar10(folder, train=False)
    assert labels.tolist() == [3, 9] and labels.dtype == torch.int64


def test_pickle_cannot_run_code(tmp_path):
    folder = write_synthetic_cifar10(tmp_path, n_train=10, n_test=2)
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (folder / "test_batch").write_bytes(pickle.dumps(Exploit(), protocol=2))
    with pytest.raises(CorruptDatasetError, match="refusing"):
        load_cifar10(folder, train=False)
    assert not marker.exists()


def test_corrupt_or_incomplete_archive(tmp_path):
    bad = tmp_path / "cifar-10-python.tar.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00 definitely not gzip")
    with pytest.raises(CorruptDatasetError, match="cifar-10-python.tar.gz"):
        load_cifar10(bad)
    # a valid archive without the test batch
    partial = tmp_path / "partial.tar.gz"
    with tarfile.open(partial, "w:gz") as tar:
        blob = py2_pickle({"data": np.zeros((1, 3072), np.uint8), "labels": [0]})
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        info.size = len(blob)
        tar.addfile(info, io.BytesIO(blob))
    with pytest.raises(CorruptDatasetError, match="test_batch"):
        load_cifar10(partial, train=False)


# --------------------------------------------------------------------------- transforms


def _batch(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)


def test_augmentation_shape_dtype_and_determinism():
    images = _batch()
    out1 = random_crop_flip(images, torch.Generator().manual_seed(5))
    out2 = random_crop_flip(images, torch.Generator().manual_seed(5))
    out3 = random_crop_flip(images, torch.Generator().manual_seed(6))
    assert out1.shape == images.shape and out1.dtype == torch.uint8
    assert torch.equal(out1, out2)
    assert not torch.equal(out1, out3)
    g = torch.Generator().manual_seed(5)
    first = random_crop_flip(images, g)
    second = random_crop_flip(images, g)  # the generator advanced: new draws
    assert torch.equal(first, out1) and not torch.equal(first, second)


def test_augmentation_is_a_padded_crop_or_its_mirror():
    images = _batch(n=20, seed=3)
    out = random_crop_flip(images, torch.Generator().manual_seed(0), padding=4)
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    flipped_some = False
    for i in range(len(images)):
        windows = [padded[i, :, r : r + 32, c : c + 32] for r in range(9) for c in range(9)]
        plain = any(torch.equal(out[i], w) for w in windows)
        mirrored = any(torch.equal(out[i], w.flip(-1)) for w in windows)
        assert plain or mirrored
        flipped_some |= mirrored and not plain
    assert flipped_some
    # no padding, no flip: the identity
    same = random_crop_flip(images, torch.Generator().manual_seed(0), padding=0, flip=False)
    assert torch.equal(same, images)


def test_normalize():
    images = _batch(n=4)
    x = normalize(images, CIFAR10_MEAN, CIFAR10_STD)
    assert x.dtype == torch.float32 and x.shape == images.shape
    expected = (images[:, 1].float() / 255 - CIFAR10_MEAN[1]) / CIFAR10_STD[1]
    assert torch.allclose(x[:, 1], expected, atol=1e-6)
    zero = normalize(torch.zeros(1, 3, 2, 2, dtype=torch.uint8), (0.5,) * 3, (0.25,) * 3)
    assert torch.allclose(zero, torch.full_like(zero, -2.0))

"""Tests of the Omniglot reader, character split and task sampler (synthetic data only)."""

import zipfile

import numpy as np
import pytest
import torch

from experiments.data.omniglot import (
    DEFAULT_SPLIT_SIZES,
    SPLIT_NAMES,
    OmniglotCorruptError,
    OmniglotNotFoundError,
    OmniglotSplit,
    OmniglotSplitError,
    load_omniglot,
    omniglot_splits,
    proportional_split_sizes,
    split_characters,
)
from experiments.meta.sampler import TaskSampler, omniglot_task_sampler
from experiments.meta.synthetic import synthetic_num_characters, write_synthetic_omniglot

# 2 sets x 3 alphabets x 4 characters = 24 characters, 7 drawings each.
N_ALPHA, N_CHARS, N_DRAW = 3, 4, 7
N_TOTAL = synthetic_num_characters(N_ALPHA, N_CHARS)
SIZES = (14, 4, 6)


@pytest.fixture(scope="module")
def folder_root(tmp_path_factory):
    return write_synthetic_omniglot(tmp_path_factory.mktemp("folder"), N_ALPHA, N_CHARS, N_DRAW)


@pytest.fixture(scope="module")
def zip_root(tmp_path_factory):
    return write_synthetic_omniglot(tmp_path_factory.mktemp("zip"), N_ALPHA, N_CHARS, N_DRAW, as_zip=True)


@pytest.fixture(scope="module")
def splits(folder_root):
    return omniglot_splits(folder_root, split_sizes=SIZES)


# ----------------------------------------------------------------------------- reader


def test_synthetic_layout(folder_root, zip_root):
    pngs = sorted((folder_root / "images_background").rglob("*.png"))
    assert len(pngs) == N_ALPHA * N_CHARS * N_DRAW
    rel = pngs[0].relative_to(folder_root).parts
    assert rel[0] == "images_background" and rel[2] == "character01" and len(rel) == 4
    with zipfile.ZipFile(zip_root / "images_evaluation.zip") as zf:
        names = [n for n in zf.namelist() if n.endswith(".png")]
    assert len(names) == N_ALPHA * N_CHARS * N_DRAW
    assert all(n.startswith("images_evaluation/") and n.count("/") == 3 for n in names)
    assert not (zip_root / "images_background").exists()


@pytest.mark.parametrize("form", ["folder", "zip"])
def test_reader_shapes_and_range(form, folder_root, zip_root):
    root = folder_root if form == "folder" else zip_root
    data = load_omniglot(root, memory_cache=False)
    assert len(data) == N_TOTAL
    assert data.set_counts == {"images_background": N_TOTAL // 2, "images_evaluation": N_TOTAL // 2}
    assert data.images.shape == (N_TOTAL * N_DRAW, 28, 28) and data.images.dtype == np.uint8
    assert (data.counts == N_DRAW).all()
    x = data.character_images(5)
    assert x.shape == (N_DRAW, 1, 28, 28) and x.dtype == torch.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    # inverted: background (most pixels) is 0, strokes are bright
    assert x.mean() < 0.4 and x.max() > 0.9


def test_folder_and_zip_agree(folder_root, zip_root):
    a, b = load_omniglot(folder_root), load_omniglot(zip_root)
    assert [(c.set_name, c.alphabet, c.character) for c in a.characters] == [
        (c.set_name, c.alphabet, c.character) for c in b.characters
    ]
    np.testing.assert_array_equal(a.images, b.images)


def test_invert_flag(folder_root):
    inv = load_omniglot(folder_root).character_images(0)
    raw = load_omniglot(folder_root, invert=False).character_images(0)
    torch.testing.assert_close(inv, 1.0 - raw)
    assert raw.mean() > 0.6  # white background when not inverted


def test_box_filter_and_size(folder_root):
    data = load_omniglot(folder_root, image_size=20, resample="box")
    assert data.character_images(0).shape == (N_DRAW, 1, 20, 20)
    with pytest.raises(ValueError, match="resample"):
        load_omniglot(folder_root, resample="nearest")


def test_character_order(folder_root):
    chars = load_omniglot(folder_root).characters
    keys = [(c.set_index, c.alphabet, c.character) for c in chars]
    assert keys == sorted(keys)
    assert chars[0].set_name == "images_background"
    assert chars[-1].set_name == "images_evaluation"
    assert len(set(keys)) == len(keys)


def test_cache_file(tmp_path):
    root = write_synthetic_omniglot(tmp_path / "d", 1, 2, 3, size=40)
    first = load_omniglot(root, cache_file=True, memory_cache=False)
    cache = root / "omniglot_cache_28px_lanczos.npz"
    assert cache.is_file()
    stamp = cache.stat().st_mtime_ns
    again = load_omniglot(root, cache_file=True, memory_cache=False)
    assert cache.stat().st_mtime_ns == stamp  # reused, not rewritten
    np.testing.assert_array_equal(first.images, again.images)
    assert first.characters == again.characters
    # a changed file list invalidates the cache
    victim = sorted((root / "images_background").rglob("*.png"))[-1]
    victim.unlink()
    fewer = load_omniglot(root, cache_file=True, memory_cache=False)
    assert len(fewer.images) == len(first.images) - 1


def test_cache_file_from_memory_and_unreadable(tmp_path):
    root = write_synthetic_omniglot(tmp_path / "d", 1, 2, 3, size=40, as_zip=True)
    cache = tmp_path / "my_cache.npz"
    first = load_omniglot(root)  # kept in memory only
    assert not cache.exists()
    load_omniglot(root, cache_file=cache)  # memory hit still writes the requested file
    assert cache.is_file()
    cache.write_bytes(b"not an npz")
    with pytest.warns(UserWarning, match="unreadable Omniglot cache"):
        again = load_omniglot(root, cache_file=cache, memory_cache=False)
    np.testing.assert_array_equal(first.images, again.images)


# ----------------------------------------------------------------------------- errors


def test_missing_root(tmp_path):
    missing = tmp_path / "no_such_dir"
    with pytest.raises(OmniglotNotFoundError) as info:
        load_omniglot(missing)
    msg = str(info.value)
    assert str(missing) in msg and "images_background" in msg and "Nothing is downloaded" in msg
    assert isinstance(info.value, FileNotFoundError)


def test_missing_set(tmp_path):
    root = write_synthetic_omniglot(tmp_path, 1, 1, 2, size=20, as_zip=True)
    (root / "images_evaluation.zip").unlink()
    with pytest.raises(OmniglotNotFoundError) as info:
        load_omniglot(root)
    msg = str(info.value)
    assert str(root / "images_evaluation") in msg and str(root / "images_evaluation.zip") in msg


def test_empty_set_folder(tmp_path):
    write_synthetic_omniglot(tmp_path, 1, 1, 2, size=20)
    for p in (tmp_path / "images_evaluation").rglob("*.png"):
        p.unlink()
    with pytest.raises(OmniglotNotFoundError, match="No drawings found"):
        load_omniglot(tmp_path)


def test_corrupt_png(tmp_path):
    root = write_synthetic_omniglot(tmp_path, 1, 2, 2, size=20)
    bad = sorted((root / "images_evaluation").rglob("*.png"))[1]
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    with pytest.raises(OmniglotCorruptError) as info:
        load_omniglot(root, memory_cache=False)
    assert str(bad) in str(info.value)


def test_corrupt_zip(tmp_path):
    root = write_synthetic_omniglot(tmp_path, 1, 1, 2, size=20, as_zip=True)
    (root / "images_background.zip").write_bytes(b"PK but garbage")
    with pytest.raises(OmniglotCorruptError) as info:
        load_omniglot(root, memory_cache=False)
    assert str(root / "images_background.zip") in str(info.value)


def test_corrupt_png_inside_zip(tmp_path):
    root = write_synthetic_omniglot(tmp_path, 1, 1, 2, size=20, as_zip=True)
    with zipfile.ZipFile(root / "images_evaluation.zip", "a") as zf:
        zf.writestr("images_evaluation/Synthetic_ev_00/character02/0002_01.png", b"garbage")
    with pytest.raises(OmniglotCorruptError) as info:
        load_omniglot(root, memory_cache=False)
    assert "0002_01.png" in str(info.value) and "images_evaluation.zip" in str(info.value)


# ----------------------------------------------------------------------------- split


def test_default_split_arithmetic():
    blocks = split_characters(1623)
    assert tuple(len(blocks[n]) for n in SPLIT_NAMES) == DEFAULT_SPLIT_SIZES == (1028, 172, 423)
    assert blocks["train"].start == 0 and blocks["test"].stop == 1623
    # with 964 background characters first, val and test are evaluation-only
    assert blocks["val"].start >= 964
    assert proportional_split_sizes(1623) == DEFAULT_SPLIT_SIZES


@pytest.mark.parametrize("n", [3, 7, 24, 100, 1000])
def test_proportional_split(n):
    sizes = proportional_split_sizes(n)
    assert sum(sizes) == n and min(sizes) >= 1
    assert sizes[0] >= sizes[2] >= sizes[1] or n < 10


def test_split_too_large_error(folder_root):
    data = load_omniglot(folder_root)
    with pytest.raises(OmniglotSplitError) as info:
        OmniglotSplit(data, "train")  # default sizes need 1623 characters
    msg = str(info.value)
    assert "1623" in msg and f"only {N_TOTAL} characters" in msg and str(folder_root) in msg
    with pytest.raises(ValueError):
        omniglot_splits(folder_root, split_sizes=(20, 3, 2))


def test_split_sizes_and_disjoint(splits):
    assert [splits[n].num_characters for n in SPLIT_NAMES] == list(SIZES)
    assert [splits[n].num_classes for n in SPLIT_NAMES] == [4 * s for s in SIZES]
    char_sets = {n: set(splits[n].characters) for n in SPLIT_NAMES}
    assert not char_sets["train"] & char_sets["val"]
    assert not char_sets["train"] & char_sets["test"]
    assert not char_sets["val"] & char_sets["test"]
    for n in SPLIT_NAMES:
        sp = splits[n]
        classes = np.arange(sp.num_classes)
        owners = sp.class_character(classes)
        assert set(owners.tolist()) == set(sp.char_indices.tolist())
        # every character of the split appears with all four rotations in it
        for ch in sp.char_indices:
            assert sorted(sp.class_rotation(classes[owners == ch]).tolist()) == [0, 1, 2, 3]


def test_proportional_splits_cover_everything(folder_root):
    sp = omniglot_splits(folder_root, split_sizes="proportional")
    assert sum(s.num_characters for s in sp.values()) == N_TOTAL


def test_rotated_classes(splits):
    sp = splits["val"]
    base = sp.class_images(4)  # character 1, no rotation
    assert sp.class_rotation(4) == 0
    for k in (1, 2, 3):
        torch.testing.assert_close(sp.class_images(4 + k), torch.rot90(base, k, dims=(-2, -1)))


# ----------------------------------------------------------------------------- sampler


def test_sampler_shapes_and_labels(splits):
    N, K, Q, B = 5, 2, 3, 4
    sampler = TaskSampler(splits["train"], N, K, Q, B, num_batches=3, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 3
    sx, sy, qx, qy = batches[0]
    assert sx.shape == (B, N * K, 1, 28, 28) and qx.shape == (B, N * Q, 1, 28, 28)
    assert sy.shape == (B, N * K) and qy.shape == (B, N * Q)
    assert sy.dtype == qy.dtype == torch.int64 and sx.dtype == torch.float32
    assert 0.0 <= sx.min() and sx.max() <= 1.0
    for b in range(B):
        assert sorted(sy[b].tolist()) == sorted(list(range(N)) * K)
        assert sorted(qy[b].tolist()) == sorted(list(range(N)) * Q)


def test_sampler_flatten(splits):
    batch = TaskSampler(splits["test"], 3, 1, 2, 2, seed=0, flatten=True).sample_batch(0)
    assert batch.support_inputs.shape == (2, 3, 784)
    assert batch.query_inputs.shape == (2, 6, 784)


def test_sampler_content_and_disjoint_drawings(splits):
    N, K, Q, B = 4, 3, 4, 6
    sp = splits["train"]
    sampler = TaskSampler(sp, N, K, Q, B, seed=3)
    idx = sampler.sample_indices(0)
    assert idx.classes.shape == (B, N) and idx.drawings.shape == (B, N, K + Q)
    for b in range(B):
        assert len(set(idx.classes[b].tolist())) == N  # distinct classes per task
        for n in range(N):
            d = idx.drawings[b, n]
            assert len(set(d.tolist())) == K + Q  # support and query drawings disjoint
            assert d.min() >= 0 and d.max() < N_DRAW
    # the inputs are the images those indices name, label n <-> classes[:, n]
    batch = sampler.sample_batch(0)
    b, n = 2, 1
    expect = torch.stack([sp.class_images(int(idx.classes[b, n]))[int(i)] for i in idx.drawings[b, n]])
    got_support = batch.support_inputs[b][batch.support_targets[b] == n]
    got_query = batch.query_inputs[b][batch.query_targets[b] == n]
    torch.testing.assert_close(torch.cat([got_support, got_query]), expect)


def test_labels_random_order(splits):
    # the same class gets different labels across tasks: labels are a random permutation
    sampler = TaskSampler(splits["train"], 5, 1, 1, 64, seed=0)
    classes = sampler.sample_indices(0).classes
    assert not (np.diff(classes, axis=1) > 0).all()


def test_sampler_determinism(splits):
    sp = splits["train"]
    a = list(TaskSampler(sp, 5, 1, 2, 3, num_batches=4, seed=7))
    b = TaskSampler(sp, 5, 1, 2, 3, num_batches=4, seed=7)
    # batch i does not depend on what was drawn before it
    for i in (3, 0, 2):
        other = b.sample_batch(i)
        for x, y in zip(a[i], other):
            assert torch.equal(x, y)
    c = TaskSampler(sp, 5, 1, 2, 3, num_batches=4, seed=8).sample_batch(0)
    assert not torch.equal(a[0].support_inputs, c.support_inputs)
    assert not torch.equal(a[0].support_inputs, a[1].support_inputs)


def test_sampler_validation(splits):
    with pytest.raises(ValueError, match="distinct drawings"):
        TaskSampler(splits["train"], 5, 4, 4, 2)  # 8 > 7 drawings
    with pytest.raises(ValueError, match="classes"):
        TaskSampler(splits["val"], 17, 1, 1, 2)  # val has 16 classes


def test_omniglot_task_sampler_zip(zip_root):
    sampler = omniglot_task_sampler(
        zip_root,
        "val",
        num_ways=3,
        num_shots=1,
        num_shots_test=5,
        batch_size=2,
        num_batches=2,
        split_sizes=SIZES,
        flatten=True,
    )
    sx, sy, qx, qy = next(iter(sampler))
    assert sx.shape == (2, 3, 784) and qx.shape == (2, 15, 784)
    assert int(qy.max()) == 2


def test_character_folder_without_pngs_is_refused(tmp_path):
    """Issue 14, item 9: a character folder without drawings was dropped silently, which shifted
    the character order and turned ``--split-sizes auto`` away from the standard split. Now
    the reader refuses, naming the folder (and says how to proceed)."""
    root = write_synthetic_omniglot(tmp_path, 1, 3, 2, size=20)
    empty = sorted((root / "images_evaluation").glob("*/character02"))[0]
    for p in empty.glob("*.png"):
        p.unlink()
    with pytest.raises(OmniglotCorruptError) as info:
        load_omniglot(root, memory_cache=False)
    message = str(info.value)
    assert str(empty) in message and "no PNG" in message and "\n" not in message


def test_zip_character_folder_without_pngs_is_refused(tmp_path):
    root = write_synthetic_omniglot(tmp_path, 1, 2, 2, size=20, as_zip=True)
    with zipfile.ZipFile(root / "images_background.zip", "a") as zf:
        alphabet = sorted(n.split("/")[1] for n in zf.namelist() if n.endswith(".png"))[0]
        zf.writestr(f"images_background/{alphabet}/character99/", b"")
        zf.writestr(f"images_background/{alphabet}/character98/notes.txt", b"no drawings here")
    with pytest.raises(OmniglotCorruptError, match="character98/ holds no PNG drawings .2 such"):
        load_omniglot(root, memory_cache=False)


def test_split_sizes_auto_says_when_it_leaves_the_standard_split(folder_root, capsys):
    """``--split-sizes auto`` on data with fewer than 1623 characters falls back to the
    proportional split, and says so on stderr (issue 14, item 9)."""
    from experiments.meta.train import load_splits

    _, sizes = load_splits(folder_root, "auto", cache_file=False)
    assert sum(sizes) == N_TOTAL
    err = capsys.readouterr().err
    assert "fewer than the 1623" in err and str(tuple(sizes)) in err
    load_splits(folder_root, ",".join(map(str, SIZES)), cache_file=False)
    assert capsys.readouterr().err == ""  # explicit sizes: nothing to report

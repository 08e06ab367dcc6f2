"""Datasets: digits splits and preprocessing, CIFAR-10 pickles and MNIST IDX files written
to tmp_path in their exact on-disk formats, synthetic Gaussian data, subsampling."""

import gzip
import pickle
import struct

import numpy as np
import pytest

from hessspec.nn import data as hd
from hessspec.nn import data_files as hdf

# --------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------


def test_dataset_validates_and_batches():
    x = np.zeros((4, 3))
    ds = hd.Dataset(x=x, y=np.array([0, 1, 2, 1]), num_classes=3, name="t")
    assert ds.y.dtype == np.int32
    assert set(ds.batch) == {"x", "y"} and ds.batch["x"] is ds.x
    assert len(ds) == 4 and ds.input_shape == (3,) and ds.is_classification
    with pytest.raises(ValueError, match="shape"):
        hd.Dataset(x=x, y=np.zeros(3, int), num_classes=3, name="t")
    with pytest.raises(ValueError, match="labels must lie"):
        hd.Dataset(x=x, y=np.array([0, 1, 3, 1]), num_classes=3, name="t")
    with pytest.raises(ValueError, match="integers"):
        hd.Dataset(x=x, y=np.zeros(4), num_classes=3, name="t")
    reg = hd.Dataset(x=x, y=np.zeros(4), num_classes=0, name="r")
    assert not reg.is_classification and reg.y.dtype == np.float64


# --------------------------------------------------------------------------------------
# Digits
# --------------------------------------------------------------------------------------


def test_digits_split_sizes_disjoint_and_stratified():
    train = hd.load_digits("train")
    test = hd.load_digits("test")
    full = hd.load_digits("all")
    assert full.x.shape == (1797, 8, 8, 1) and full.num_classes == 10
    assert train.num_examples + test.num_examples == 1797
    assert test.num_examples == 360  # ceil(0.2 * 1797)
    ti, si = train.info["indices"], test.info["indices"]
    assert np.intersect1d(ti, si).size == 0
    assert np.array_equal(np.union1d(ti, si), np.arange(1797))
    counts = np.bincount(full.y, minlength=10)
    test_counts = np.bincount(test.y, minlength=10)
    assert np.all(np.abs(test_counts - 0.2 * counts) <= 1)
    # labels and images follow the original indices
    assert np.array_equal(test.y, full.y[si])
    assert np.array_equal(test.x, full.x[si])
    # deterministic, seed-dependent
    assert np.array_equal(hd.load_digits("test").info["indices"], si)
    assert not np.array_equal(hd.load_digits("test", seed=1).info["indices"], si)
    assert hd.load_digits("train", test_fraction=0.5).num_examples == 898
    with pytest.raises(ValueError, match="split"):
        hd.load_digits("val")
    with pytest.raises(ValueError, match="preprocessing"):
        hd.load_digits(preprocessing="whiten")


def test_digits_preprocessing_statistics():
    raw = hd.load_digits("all", preprocessing="raw", dtype=np.float64)
    assert raw.x.min() == 0 and raw.x.max() == 16
    assert np.array_equal(raw.x, np.round(raw.x))
    unit = hd.load_digits("train", dtype=np.float64)
    assert unit.x.dtype == np.float64 and unit.x.min() >= 0 and unit.x.max() == 1.0
    flat = hd.load_digits("train", flatten=True)
    assert flat.x.shape == (1437, 64) and flat.x.dtype == np.float32

    cen = hd.load_digits("train", preprocessing="center", dtype=np.float64)
    np.testing.assert_allclose(cen.x.mean(axis=0), 0.0, atol=1e-14)

    std_train = hd.load_digits("train", preprocessing="standardize", dtype=np.float64)
    sd = std_train.x.std(axis=0)
    constant = unit.x.std(axis=0) == 0
    assert constant.any()  # the digits have always-blank border pixels
    np.testing.assert_allclose(std_train.x.mean(axis=0), 0.0, atol=1e-13)
    np.testing.assert_allclose(sd[~constant], 1.0, rtol=1e-12)
    np.testing.assert_array_equal(sd[constant], 0.0)
    # the test split is transformed with the TRAIN statistics
    std_test = hd.load_digits("test", preprocessing="standardize", dtype=np.float64)
    unit_test = hd.load_digits("test", dtype=np.float64)
    expected = (unit_test.x - std_train.info["mean"]) / std_train.info["std"]
    np.testing.assert_allclose(std_test.x, expected, rtol=1e-13, atol=1e-13)
    assert abs(std_test.x.mean()) > 1e-6  # not re-standardized on its own statistics


def test_load_train_test_and_errors():
    train, test = hd.load_train_test("digits", preprocessing="center", flatten=True)
    assert train.x.shape[1:] == (64,) and test.name == "digits/test"
    with pytest.raises(ValueError, match="unknown dataset"):
        hd.load_train_test("imagenet")
    with pytest.raises(ValueError, match="no path"):
        hd.load_train_test("digits", path="somewhere")


# --------------------------------------------------------------------------------------
# Synthetic Gaussian
# --------------------------------------------------------------------------------------


def test_synthetic_gaussian_statistics_and_teacher():
    ds = hd.synthetic_gaussian(4000, 5, mean=2.0, variance=0.25, seed=3, dtype=np.float64)
    assert ds.x.shape == (4000, 5) and ds.y.shape == (4000,) and ds.num_classes == 0
    np.testing.assert_allclose(ds.x.mean(), 2.0, atol=0.02)
    np.testing.assert_allclose(ds.x.var(), 0.25, rtol=0.05)
    np.testing.assert_allclose(ds.y, ds.x @ ds.info["teacher"], rtol=1e-12)
    noisy = hd.synthetic_gaussian(50, 5, seed=3, noise_std=0.1, dtype=np.float64)
    assert not np.allclose(noisy.y, noisy.x @ noisy.info["teacher"])
    zeros = hd.synthetic_gaussian(10, 3, targets="zeros")
    assert np.all(zeros.y == 0) and zeros.info["teacher"] is None
    same = hd.synthetic_gaussian(4000, 5, mean=2.0, variance=0.25, seed=3, dtype=np.float64)
    assert np.array_equal(same.x, ds.x)
    with pytest.raises(ValueError, match="variance"):
        hd.synthetic_gaussian(10, 3, variance=0.0)
    train, test = hd.load_train_test("gaussian", num_samples=40, num_test=10, num_features=3)
    assert (train.num_examples, test.num_examples) == (40, 10)
    np.testing.assert_array_equal(train.info["teacher"], test.info["teacher"])
    assert not np.array_equal(train.x[:10], test.x)


# --------------------------------------------------------------------------------------
# CIFAR-10: pickled dicts with bytes keys, uint8 (n, 3072) rows in CHW order
# --------------------------------------------------------------------------------------


def _write_cifar(folder, rng, per_batch=2, n_test=3, str_keys=False):
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = n_test if name == "test_batch" else per_batch
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n)]
        d = {"data": data, "labels": labels} if str_keys else {b"data": data, b"labels": labels}
        with open(folder / name, "wb") as f:
            pickle.dump(d, f)
        written[name] = (data, labels)
    return written


def test_cifar10_round_trip(tmp_path, rng):
    written = _write_cifar(tmp_path / "cifar-10-batches-py", rng)
    for path in (tmp_path, tmp_path / "cifar-10-batches-py"):  # parent or the folder itself
        train = hd.load_cifar10(path, "train", dtype=np.float64)
        assert train.x.shape == (10, 32, 32, 3) and train.y.dtype == np.int32
    data = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    labels = sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    np.testing.assert_array_equal(train.y, labels)
    # x[i, h, w, c] = data[i, c*1024 + h*32 + w] / 255
    i, h, w, c = 7, 5, 30, 2
    assert train.x[i, h, w, c] == data[i, c * 1024 + h * 32 + w] / 255.0
    expected = data.reshape(10, 3, 32, 32).transpose(0, 2, 3, 1) / 255.0
    np.testing.assert_array_equal(train.x, expected)
    test = hd.load_cifar10(tmp_path, "test")
    assert test.x.shape == (3, 32, 32, 3) and test.x.dtype == np.float32
    np.testing.assert_array_equal(test.y, written["test_batch"][1])
    assert hd.load_cifar10(tmp_path, "all").num_examples == 13
    flat = hd.load_cifar10(tmp_path, "test", flatten=True)
    assert flat.x.shape == (3, 3072)


def test_cifar10_standardize_uses_train_channel_stats(tmp_path, rng):
    _write_cifar(tmp_path, rng)
    train = hd.load_cifar10(tmp_path, "train", standardize=True, dtype=np.float64)
    np.testing.assert_allclose(train.x.mean(axis=(0, 1, 2)), 0.0, atol=1e-12)
    np.testing.assert_allclose(train.x.std(axis=(0, 1, 2)), 1.0, rtol=1e-12)
    test = hd.load_cifar10(tmp_path, "test", standardize=True, dtype=np.float64)
    raw = hd.load_cifar10(tmp_path, "test", dtype=np.float64)
    np.testing.assert_allclose(
        test.x, (raw.x - train.info["mean"]) / train.info["std"], rtol=1e-13, atol=1e-13
    )


def test_cifar10_str_keys_accepted(tmp_path, rng):
    written = _write_cifar(tmp_path, rng, str_keys=True)
    test = hd.load_cifar10(tmp_path, "test")
    np.testing.assert_array_equal(test.y, written["test_batch"][1])


def test_cifar10_missing_and_corrupt(tmp_path, rng):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as e:
        hd.load_cifar10(missing, "train")
    msg = str(e.value)
    assert str(missing) in msg and "data_batch_1" in msg and "path=" in msg
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="looked in"):
        hd.load_cifar10(empty, "test")
    _write_cifar(tmp_path / "c", rng)
    (tmp_path / "c" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        hd.load_cifar10(tmp_path / "c", "train")
    (tmp_path / "c" / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="test_batch"):
        hd.load_cifar10(tmp_path / "c", "test")
    with open(tmp_path / "c" / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(ValueError, match="3072"):
        hd.load_cifar10(tmp_path / "c", "test")


# --------------------------------------------------------------------------------------
# MNIST: IDX files (big-endian magic, dims, uint8 data), plain and gzipped
# --------------------------------------------------------------------------------------


def _idx_bytes(array: np.ndarray) -> bytes:
    magic = 0x0800 | array.ndim  # unsigned byte, ndim dimensions: 2051 or 2049
    return (
        struct.pack(">i", magic)
        + struct.pack(f">{array.ndim}i", *array.shape)
        + (array.astype(np.uint8).tobytes())
    )


def _write_mnist(folder, rng, n_train=6, n_test=4, gz_test=True, shape=(7, 5)):
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n, gz in (("train", n_train, False), ("t10k", n_test, gz_test)):
        images = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        for stem, arr in (
            (f"{split}-images-idx3-ubyte", images),
            (f"{split}-labels-idx1-ubyte", labels),
        ):
            raw = _idx_bytes(arr)
            if gz:
                with gzip.open(folder / (stem + ".gz"), "wb") as f:
                    f.write(raw)
            else:
                (folder / stem).write_bytes(raw)
        out[split] = (images, labels)
    return out


def test_idx_magic_numbers():
    assert struct.unpack(">i", _idx_bytes(np.zeros((1, 2, 2)))[:4])[0] == 2051
    assert struct.unpack(">i", _idx_bytes(np.zeros(3))[:4])[0] == 2049


def test_mnist_round_trip_plain_and_gz(tmp_path, rng):
    written = _write_mnist(tmp_path, rng)
    train = hd.load_mnist(tmp_path, "train", dtype=np.float64)
    assert train.x.shape == (6, 7, 5, 1) and train.y.dtype == np.int32
    np.testing.assert_array_equal(train.x[..., 0], written["train"][0] / 255.0)
    np.testing.assert_array_equal(train.y, written["train"][1])
    test = hd.load_mnist(tmp_path, "test")  # gzipped
    np.testing.assert_array_equal(test.y, written["t10k"][1])
    np.testing.assert_allclose(test.x[..., 0], written["t10k"][0] / 255.0, rtol=1e-6)
    both = hd.load_mnist(tmp_path, "all", flatten=True)
    assert both.x.shape == (10, 35)
    std = hd.load_mnist(tmp_path, "train", standardize=True, dtype=np.float64)
    np.testing.assert_allclose([std.x.mean(), std.x.std()], [0.0, 1.0], atol=1e-12)
    std_test = hd.load_mnist(tmp_path, "test", standardize=True, dtype=np.float64)
    np.testing.assert_allclose(
        std_test.x, (written["t10k"][0][..., None] / 255.0 - std.info["mean"]) / std.info["std"]
    )
    # torchvision-like layout: MNIST/raw/
    _write_mnist(tmp_path / "tv" / "MNIST" / "raw", rng)
    assert hd.load_mnist(tmp_path / "tv", "test").num_examples == 4
    train2, test2 = hd.load_train_test("mnist", path=tmp_path)
    assert (train2.num_examples, test2.num_examples) == (6, 4)


def test_mnist_missing_and_corrupt(tmp_path, rng):
    with pytest.raises(FileNotFoundError) as e:
        hd.load_mnist(tmp_path / "nope", "train")
    assert str(tmp_path / "nope") in str(e.value) and "train-images-idx3-ubyte" in str(e.value)
    written = _write_mnist(tmp_path, rng, gz_test=False)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError) as e:
        hd.load_mnist(tmp_path, "test")
    msg = str(e.value)
    assert "t10k-labels-idx1-ubyte" in msg and "looked in" in msg and "path=" in msg
    # bad magic: labels header in the images file
    labels_raw = _idx_bytes(written["train"][1])
    (tmp_path / "train-images-idx3-ubyte").write_bytes(labels_raw)
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.*magic"):
        hd.load_mnist(tmp_path, "train")
    # truncated data
    raw = _idx_bytes(written["train"][0])
    (tmp_path / "train-images-idx3-ubyte").write_bytes(raw[:-3])
    with pytest.raises(ValueError, match="train-images-idx3-ubyte"):
        hd.load_mnist(tmp_path, "train")
    (tmp_path / "train-images-idx3-ubyte").write_bytes(raw[:6])
    with pytest.raises(ValueError, match="header"):
        hd.load_mnist(tmp_path, "train")
    # images and labels disagree in count
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx_bytes(written["train"][0][:5]))
    with pytest.raises(ValueError, match="5 images"):
        hd.load_mnist(tmp_path, "train")


# --------------------------------------------------------------------------------------
# Subsampling and batches
# --------------------------------------------------------------------------------------


def test_subsample_fixed_and_stratified():
    full = hd.load_digits("train")
    sub = hd.subsample(full, 100, seed=1)
    again = hd.subsample(full, 100, seed=1)
    assert sub.num_examples == 100 and np.array_equal(sub.info["indices"], again.info["indices"])
    assert np.array_equal(sub.x, full.x[sub.info["indices"]])
    assert np.all(np.diff(sub.info["indices"]) > 0)
    assert not np.array_equal(hd.subsample(full, 100, seed=2).info["indices"], sub.info["indices"])
    strat = hd.subsample(full, 200, seed=0, stratify=True)
    np.testing.assert_allclose(np.bincount(strat.y), 20, atol=1)
    assert hd.subsample(full, full.num_examples).num_examples == full.num_examples
    with pytest.raises(ValueError, match="n must lie"):
        hd.subsample(full, 0)
    with pytest.raises(ValueError, match="classification"):
        hd.subsample(hd.synthetic_gaussian(20, 2), 5, stratify=True)


def test_batches_cover_epoch():
    ds = hd.synthetic_gaussian(10, 2, dtype=np.float64)
    sizes = [b["x"].shape[0] for b in hd.batches(ds, 4)]
    assert sizes == [4, 4, 2]
    assert [b["x"].shape[0] for b in hd.batches(ds, 4, drop_remainder=True)] == [4, 4]
    xs = np.concatenate([b["x"] for b in hd.batches(ds, 3, seed=0)])
    assert sorted(map(tuple, xs)) == sorted(map(tuple, ds.x))


def test_cifar10_corrupt_pickles_are_named_never_escaped(tmp_path, rng):
    """Random corruptions of a batch's pickle header (a byte of the first 200 changed, one
    to four times, 300 tries) and pickles naming other globals all end in one ValueError
    naming the file: none escapes as AttributeError, ModuleNotFoundError, TypeError,
    MemoryError or OverflowError, and nothing but numpy's array reconstruction is imported
    or called."""
    import os
    import random

    good = pickle.dumps(
        {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 3]},
        protocol=2,
    )
    (tmp_path / "test_batch").write_bytes(good)
    assert hdf._read_cifar_batch(tmp_path / "test_batch")[0].shape == (4, 32, 32, 3)
    chooser = random.Random(0)
    for _ in range(300):
        corrupt = bytearray(good)
        for _ in range(chooser.randint(1, 4)):
            corrupt[chooser.randrange(200)] = chooser.randrange(256)
        (tmp_path / "test_batch").write_bytes(bytes(corrupt))
        try:
            hdf._read_cifar_batch(tmp_path / "test_batch")
        except ValueError as e:
            assert "test_batch" in str(e)
    for hostile in (pickle.dumps(os.system), pickle.dumps({b"data": os.getcwd})):
        (tmp_path / "test_batch").write_bytes(hostile)
        with pytest.raises(ValueError, match=r"names posix\.(system|getcwd), which a CIFAR-10"):
            hdf._read_cifar_batch(tmp_path / "test_batch")
    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": [2**80], b"labels": [2**70]}))
    with pytest.raises(ValueError, match="test_batch"):
        hdf._read_cifar_batch(tmp_path / "test_batch")


def test_stratified_subsets_at_the_edges():
    """A stratified subset needs one example per class (a clear error below that); one
    that leaves out fewer examples than there are classes still works (random drop)."""
    digits = hd.load_digits("train")
    n = digits.num_examples
    with pytest.raises(ValueError, match="one example of each of the 10 classes; take at least"):
        hd.subsample(digits, 5, stratify=True)
    assert np.unique(hd.subsample(digits, 10, stratify=True).y).size == 10
    almost = hd.subsample(digits, n - 3, seed=1, stratify=True)
    assert almost.num_examples == n - 3 and np.unique(almost.info["indices"]).size == n - 3

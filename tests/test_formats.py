"""Tests of raymeta.data.formats against tiny datasets written in the real on-disk formats."""

from __future__ import annotations

import gzip
import pickle

import numpy as np
import pytest
from PIL import Image

from raymeta.data.formats import (
    ArraySplits, Clothing1M, decode_images, load_cifar, load_clothing1m, load_mnist, read_idx,
)
from raymeta.errors import DataError, DatasetNotFoundError

try:
    import fixtures_formats as fx
except ImportError:  # tests/ imported as a package
    from tests import fixtures_formats as fx


# ----------------------------------------------------------------------------- IDX

@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trips_every_dtype(tmp_path, dtype, gz):
    arr = (np.arange(2 * 3 * 4) - 7).reshape(2, 3, 4).astype(dtype) * (3 if dtype != np.int8 else 1)
    if np.issubdtype(dtype, np.floating):
        arr = arr / 7
    path = fx.write_idx(tmp_path / "a-idx3", arr, gz=gz)  # gzip detected by magic bytes, not by the suffix
    out = read_idx(path)
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative and out.shape == arr.shape
    np.testing.assert_array_equal(out, arr)


def test_read_idx_truncated_plain_and_gzip(tmp_path):
    arr = np.arange(5 * 28 * 28, dtype=np.uint8).reshape(5, 28, 28)
    plain = fx.write_idx(tmp_path / "train-images-idx3-ubyte", arr)
    plain.write_bytes(plain.read_bytes()[:-100])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.*truncated or corrupt; delete it and download again"):
        read_idx(plain)
    gz = fx.write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", arr, gz=True)
    gz.write_bytes(gz.read_bytes()[: len(gz.read_bytes()) // 2])
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz.*truncated or corrupt"):
        read_idx(gz)


def test_read_idx_bad_magic_and_missing(tmp_path):
    bad = tmp_path / "bad-idx1-ubyte"
    bad.write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 20)
    with pytest.raises(DataError, match="bad-idx1-ubyte.*bad magic"):
        read_idx(bad)
    with pytest.raises(DatasetNotFoundError, match="nothere"):
        read_idx(tmp_path / "nothere")


# ----------------------------------------------------------------------------- MNIST

def _check_mnist(splits: ArraySplits, arrays) -> None:
    train_x, train_y, test_x, test_y = arrays
    assert splits.train_x.shape == (20, 1, 28, 28) and splits.train_x.dtype == np.uint8
    assert splits.test_x.shape == (10, 1, 28, 28)
    assert splits.train_y.dtype == np.int64 and splits.test_y.dtype == np.int64
    np.testing.assert_array_equal(splits.train_x[:, 0], train_x)
    np.testing.assert_array_equal(splits.test_x[:, 0], test_x)
    np.testing.assert_array_equal(splits.train_y, train_y)
    np.testing.assert_array_equal(splits.test_y, test_y)
    assert splits.num_classes == 10


@pytest.mark.parametrize("gz", [False, True])
def test_load_mnist_flat_folder(tmp_path, gz):
    arrays = fx.mnist_arrays()
    fx.write_mnist(tmp_path, arrays, gz=gz)
    splits = load_mnist(tmp_path)
    _check_mnist(splits, arrays)
    assert splits.class_names == [str(d) for d in range(10)]


def test_load_mnist_torchvision_layout(tmp_path):
    arrays = fx.mnist_arrays()
    fx.write_mnist(tmp_path / "MNIST" / "raw", arrays, gz=True)
    _check_mnist(load_mnist(tmp_path, "mnist"), arrays)
    with pytest.raises(DatasetNotFoundError):  # the MNIST folder is not Fashion-MNIST's
        load_mnist(tmp_path, "fashion_mnist")


def test_load_fashion_mnist_torchvision_layout(tmp_path):
    arrays = fx.mnist_arrays(seed=3)
    fx.write_mnist(tmp_path / "FashionMNIST" / "raw", arrays)
    splits = load_mnist(tmp_path, variant="fashion_mnist")
    _check_mnist(splits, arrays)
    assert splits.class_names == ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                                  "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def test_load_mnist_count_mismatch(tmp_path):
    train_x, train_y, test_x, test_y = fx.mnist_arrays()
    fx.write_mnist(tmp_path, (train_x, train_y[:-1], test_x, test_y))
    with pytest.raises(DataError, match="train-images-idx3-ubyte has 20 images but .*train-labels-idx1-ubyte has 19"):
        load_mnist(tmp_path)


def test_load_mnist_truncated_file_named(tmp_path):
    fx.write_mnist(tmp_path, fx.mnist_arrays(), gz=True)
    labels = tmp_path / "t10k-labels-idx1-ubyte.gz"
    labels.write_bytes(labels.read_bytes()[:-6])  # cut the gzip trailer
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz.*delete it and download again"):
        load_mnist(tmp_path)


def test_load_mnist_missing(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        load_mnist(tmp_path / "m")
    msg = str(e.value)
    for name in fx.MNIST_NAMES:
        assert name in msg
    assert "MNIST/raw" in msg and "download: true" in msg


# ----------------------------------------------------------------------------- CIFAR

def _check_cifar(splits: ArraySplits, expected: dict, num_classes: int) -> None:
    assert splits.train_x.dtype == np.uint8 and splits.train_x.shape[1:] == (3, 32, 32)
    np.testing.assert_array_equal(splits.train_x, expected["train_x"])
    np.testing.assert_array_equal(splits.test_x, expected["test_x"])
    np.testing.assert_array_equal(splits.train_y, expected["train_y"])
    np.testing.assert_array_equal(splits.test_y, expected["test_y"])
    assert splits.train_y.dtype == np.int64
    assert splits.num_classes == num_classes and splits.class_names == expected["class_names"]


def test_cifar_channel_layout_fixture_is_independent():
    # pixel (i, c, r, col) sits at flat[i, c*1024 + r*32 + col]: checks the fixture, not the reader
    x = fx.cifar_images(2, 0).astype(np.uint8)
    flat = fx.cifar_flat(x)
    assert flat[1, 2 * 1024 + 5 * 32 + 9] == x[1, 2, 5, 9] == (41 + 202 + 35 + 27) % 256
    assert not np.array_equal(flat.reshape(2, 32, 32, 3).transpose(0, 3, 1, 2), x)


def test_load_cifar10_tarball(tmp_path):
    _, expected = fx.write_cifar_tarball(tmp_path, 10)
    splits = load_cifar(tmp_path, 10)
    assert splits.train_x.shape == (15, 3, 32, 32) and splits.test_x.shape == (4, 3, 32, 32)
    _check_cifar(splits, expected, 10)
    assert not (tmp_path / "cifar-10-batches-py").exists()  # read in place, not extracted


def test_load_cifar10_extracted_folder(tmp_path):
    _, expected = fx.write_cifar_folder(tmp_path, 10)
    _check_cifar(load_cifar(tmp_path), expected, 10)


def test_load_cifar100_tarball_and_folder(tmp_path):
    _, expected = fx.write_cifar_tarball(tmp_path / "t", 100)
    splits = load_cifar(tmp_path / "t", num_classes=100)
    assert splits.train_x.shape == (15, 3, 32, 32) and int(splits.train_y.max()) > 9
    _check_cifar(splits, expected, 100)
    _, expected = fx.write_cifar_folder(tmp_path / "f", 100)
    _check_cifar(load_cifar(tmp_path / "f", num_classes=100), expected, 100)


@pytest.mark.parametrize("keep", [0.5, -4])  # cut in the middle, or only the gzip trailer (CRC and length)
def test_load_cifar_truncated_tarball(tmp_path, keep):
    path, _ = fx.write_cifar_tarball(tmp_path, 10)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep) if keep > 0 else keep])
    with pytest.raises(DataError, match="cifar-10-python.tar.gz.*truncated or corrupt; delete it and download again"):
        load_cifar(tmp_path)


def test_load_cifar_not_a_tarball(tmp_path):
    (tmp_path / "cifar-100-python.tar.gz").write_bytes(b"<html>not found</html>" * 50)
    with pytest.raises(DataError, match="cifar-100-python.tar.gz.*truncated or corrupt"):
        load_cifar(tmp_path, 100)


def test_load_cifar_missing_member_named(tmp_path):
    members, _ = fx.cifar_members(10)
    del members["data_batch_3"]
    import io
    import tarfile

    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    with pytest.raises(DataError, match="cifar-10-python.tar.gz has no member cifar-10-batches-py/data_batch_3"):
        load_cifar(tmp_path)


def test_load_cifar_corrupt_pickle_in_folder(tmp_path):
    folder, _ = fx.write_cifar_folder(tmp_path, 10)
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)})[:-10])
    with pytest.raises(DataError, match="test_batch.*truncated or corrupt"):
        load_cifar(tmp_path)


def test_load_cifar_missing(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        load_cifar(tmp_path / "c10")
    msg = str(e.value)
    assert "cifar-10-python.tar.gz" in msg and "cifar-10-batches-py" in msg and "data_batch_5" in msg
    assert "test_batch" in msg and "download: true" in msg
    with pytest.raises(DatasetNotFoundError, match="cifar-100-python.tar.gz.*cifar-100-python/"):
        load_cifar(tmp_path, 100)


# ----------------------------------------------------------------------------- Clothing1M

def test_load_clothing1m_splits_and_labels(tmp_path):
    root = fx.write_clothing1m(tmp_path)
    ds = load_clothing1m(root)
    assert isinstance(ds, Clothing1M) and ds.num_classes == 14
    assert ds.class_names[0] == "T-Shirt" and ds.class_names[-1] == "Underwear" and len(ds.class_names) == 14
    assert ds.train.paths == fx.C1M_TRAIN and ds.val.paths == fx.C1M_VAL and ds.test.paths == fx.C1M_TEST
    assert ds.train.root == root
    np.testing.assert_array_equal(ds.train.labels, [3, 0, 13, 5])
    np.testing.assert_array_equal(ds.train.clean_labels, [-1, 7, -1, -1])
    np.testing.assert_array_equal(ds.val.labels, [1, 11])
    np.testing.assert_array_equal(ds.val.clean_labels, ds.val.labels)
    np.testing.assert_array_equal(ds.test.labels, [2, 9])
    np.testing.assert_array_equal(ds.test.clean_labels, ds.test.labels)
    for split in (ds.train, ds.val, ds.test):
        assert split.labels.dtype == np.int64 and split.clean_labels.dtype == np.int64


def test_load_clothing1m_is_lazy_and_reads_names(tmp_path):
    root = fx.write_clothing1m(tmp_path, names=True)
    for key in fx.C1M_TRAIN:
        (root / key).unlink()  # images are not opened at load time
    ds = load_clothing1m(root)
    assert ds.class_names == [f"Cat{k}" for k in range(14)]
    with pytest.raises(DataError, match="001.jpg"):
        decode_images(root, ds.train.paths[:1], 16)


def test_decode_images_shape_and_colour(tmp_path):
    root = fx.write_clothing1m(tmp_path)
    ds = load_clothing1m(root)
    x = decode_images(root, ds.val.paths, 16)
    assert x.shape == (2, 3, 16, 16) and x.dtype == np.uint8
    for img, key in zip(x, ds.val.paths):
        colour = np.array(fx.c1m_color(key))
        assert np.abs(img.reshape(3, -1).mean(1) - colour).max() < 6  # JPEG is lossy


def test_decode_images_center_crop(tmp_path):
    rng = np.random.default_rng(1)
    land = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)  # 40 wide x 30 high
    Image.fromarray(land).save(tmp_path / "land.png")
    port = rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)  # 30 wide x 40 high
    Image.fromarray(port).save(tmp_path / "port.png")
    x = decode_images(tmp_path, ["land.png", "port.png"], 30)  # shorter side already 30: a pure center crop
    np.testing.assert_array_equal(x[0], land[:, 5:35].transpose(2, 0, 1))
    np.testing.assert_array_equal(x[1], port[5:35, :].transpose(2, 0, 1))
    # resize then crop: left/right (or top/bottom) bands outside the center square are cut away
    band = np.full((30, 40, 3), 255, np.uint8)
    band[:, :3] = band[:, 37:] = 0  # 40x30 -> 20x15 -> crop columns 2..16, which the dark bands do not reach
    Image.fromarray(band).convert("L").save(tmp_path / "band.png")  # greyscale input is converted to RGB
    y = decode_images(tmp_path, ["band.png"], 15)
    assert y.shape == (1, 3, 15, 15) and y.min() == 255
    Image.fromarray(band.transpose(1, 0, 2)).save(tmp_path / "band_t.png")  # the same, portrait: rows cut
    assert decode_images(tmp_path, ["band_t.png"], 15).min() == 255


def test_decode_images_corrupt(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(DataError, match="bad.jpg"):
        decode_images(tmp_path, ["bad.jpg"], 8)


def test_load_clothing1m_key_missing_from_kv(tmp_path):
    root = fx.write_clothing1m(tmp_path)
    extra = ["images/5/05/100.jpg", "images/5/05/101.jpg", "images/5/05/102.jpg", "images/5/05/103.jpg"]
    with open(root / "clean_test_key_list.txt", "a") as f:
        f.write("".join(k + "\n" for k in extra))
    with pytest.raises(DataError) as e:
        load_clothing1m(root)
    msg = str(e.value)
    assert "4 key(s)" in msg and "clean_test_key_list.txt" in msg and "clean_label_kv.txt" in msg
    assert all(k in msg for k in extra[:3]) and extra[3] not in msg


@pytest.mark.parametrize("key", ["../../etc/passwd", "/etc/passwd", "images/../../secret.jpg"])
def test_load_clothing1m_key_outside_the_root(tmp_path, key):
    """A key list may only name images under the dataset root."""
    root = fx.write_clothing1m(tmp_path)
    with open(root / "clean_test_key_list.txt", "a") as f:
        f.write(key + "\n")
    with open(root / "clean_label_kv.txt", "a") as f:
        f.write(key + " 3\n")
    with pytest.raises(DataError, match="1 key\\(s\\) in .*clean_test_key_list.txt point outside "
                                        "the dataset folder"):
        load_clothing1m(root)


def test_load_clothing1m_bad_kv_line(tmp_path):
    root = fx.write_clothing1m(tmp_path)
    with open(root / "noisy_label_kv.txt", "a") as f:
        f.write("images/7/07/777.jpg fourteen\n")
    with pytest.raises(DataError, match="noisy_label_kv.txt line 6"):
        load_clothing1m(root)


def test_load_clothing1m_missing_list(tmp_path):
    root = fx.write_clothing1m(tmp_path)
    (root / "clean_val_key_list.txt").unlink()
    with pytest.raises(DatasetNotFoundError) as e:
        load_clothing1m(root)
    msg = str(e.value)
    assert msg.startswith("clothing1m: missing clean_val_key_list.txt under")
    for name in ("noisy_train_key_list.txt", "clean_test_key_list.txt", "noisy_label_kv.txt", "clean_label_kv.txt"):
        assert name in msg


def test_gzip_magic_not_suffix(tmp_path):
    # a gzip file without .gz suffix, and a plain file named .gz, both read correctly
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4)
    (tmp_path / "plain.gz").write_bytes(fx.idx_bytes(arr))
    (tmp_path / "zipped").write_bytes(gzip.compress(fx.idx_bytes(arr)))
    np.testing.assert_array_equal(read_idx(tmp_path / "plain.gz"), arr)
    np.testing.assert_array_equal(read_idx(tmp_path / "zipped"), arr)


# ----------------------------------------------------------------------------- download=True (torchvision faked)

def _fake_torchvision(monkeypatch, **classes):
    """Install a stand-in torchvision.datasets with the given classes (the real one is slow to import and downloads)."""
    import sys
    import types

    datasets = types.ModuleType("torchvision.datasets")
    for name, cls in classes.items():
        setattr(datasets, name, cls)
    tv = types.ModuleType("torchvision")
    tv.datasets = datasets
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", datasets)


def test_download_mnist_uses_torchvision_layout(tmp_path, monkeypatch):
    arrays, calls = fx.mnist_arrays(), []

    class FashionMNIST:  # torchvision writes <root>/FashionMNIST/raw/*-ubyte(.gz)
        def __init__(self, root, train=True, download=False):
            calls.append((root, train, download))
            fx.write_mnist(tmp_path / "FashionMNIST" / "raw", arrays, gz=True)

    _fake_torchvision(monkeypatch, FashionMNIST=FashionMNIST)
    _check_mnist(load_mnist(tmp_path, "fashion_mnist", download=True), arrays)
    assert calls == [(str(tmp_path), True, True)]
    load_mnist(tmp_path, "fashion_mnist", download=True)  # present now: no second download
    assert len(calls) == 1


def test_download_cifar_and_failure(tmp_path, monkeypatch):
    expected = {}

    class CIFAR100:
        def __init__(self, root, train=True, download=False):
            _, exp = fx.write_cifar_tarball(tmp_path, 100)
            expected.update(exp)

    class CIFAR10:
        def __init__(self, root, train=True, download=False):
            raise RuntimeError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    _fake_torchvision(monkeypatch, CIFAR10=CIFAR10, CIFAR100=CIFAR100)
    _check_cifar(load_cifar(tmp_path, 100, download=True), expected, 100)
    with pytest.raises(DatasetNotFoundError, match="cifar10: downloading into .* failed .*name resolution"):
        load_cifar(tmp_path / "empty", 10, download=True)

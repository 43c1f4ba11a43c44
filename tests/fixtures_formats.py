"""Writers for tiny datasets in the real on-disk formats: IDX (MNIST), CIFAR python pickles, Clothing1M."""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

_IDX_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(np.int16): 0x0B,
              np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D, np.dtype(np.float64): 0x0E}
MNIST_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def idx_bytes(arr: np.ndarray) -> bytes:
    """Encode an array as an IDX file: 0x0000, dtype code, ndim, big-endian uint32 dims, big-endian data."""
    header = bytes([0, 0, _IDX_CODES[arr.dtype], arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, arr: np.ndarray, gz: bool = False) -> Path:
    data = idx_bytes(arr)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def mnist_arrays(n_train: int = 20, n_test: int = 10, seed: int = 0):
    """Images whose pixels are known (seeded random uint8) and labels i % 10."""
    rng = np.random.default_rng(seed)
    train_x = rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8)
    test_x = rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8)
    return train_x, np.arange(n_train, dtype=np.uint8) % 10, test_x, (np.arange(n_test, dtype=np.uint8) * 3) % 10


def write_mnist(folder: Path, arrays, gz: bool = False) -> Path:
    """Write the four MNIST IDX files into folder (optionally gzipped, with .gz names)."""
    for name, arr in zip(MNIST_NAMES, arrays):
        write_idx(folder / (name + (".gz" if gz else "")), arr, gz)
    return folder


def cifar_images(n: int, offset: int) -> np.ndarray:
    """(n, 3, 32, 32) uint8 whose value encodes image, channel, row and column (distinct weights per axis)."""
    i, c, r, col = np.indices((n, 3, 32, 32))
    return ((i + offset) * 41 + c * 101 + r * 7 + col * 3) % 256


def cifar_flat(images: np.ndarray) -> np.ndarray:
    """The official row layout: 1024 red values, then green, then blue, each row-major (built by explicit indexing)."""
    n = images.shape[0]
    flat = np.empty((n, 3072), dtype=np.uint8)
    for c in range(3):
        for r in range(32):
            flat[:, c * 1024 + r * 32: c * 1024 + r * 32 + 32] = images[:, c, r, :]
    return flat


def cifar_members(num_classes: int, per_batch: int = 3, n_test: int = 4) -> tuple[dict[str, bytes], dict]:
    """Pickled members of a tiny official-layout CIFAR release, and the expected arrays."""
    label_key = b"labels" if num_classes == 10 else b"fine_labels"
    train_names = [f"data_batch_{i}" for i in range(1, 6)] if num_classes == 10 else ["train"]
    n_per = per_batch if num_classes == 10 else per_batch * 5
    members, xs, ys, offset = {}, [], [], 0
    for name in [*train_names, "test_batch" if num_classes == 10 else "test"]:
        n = n_test if name.startswith("test") else n_per
        x = cifar_images(n, offset).astype(np.uint8)
        y = [(offset + k) * 7 % num_classes for k in range(n)]
        offset += n
        d = {b"batch_label": name.encode(), label_key: y, b"data": cifar_flat(x),
             b"filenames": [f"img_{offset + k}.png".encode() for k in range(n)]}
        if num_classes == 100:
            d[b"coarse_labels"] = [v // 5 for v in y]
        members[name] = pickle.dumps(d, protocol=2)
        xs.append(x)
        ys.append(y)
    names = [f"class_{k}".encode() for k in range(num_classes)]
    if num_classes == 10:
        members["batches.meta"] = pickle.dumps({b"label_names": names, b"num_cases_per_batch": per_batch}, protocol=2)
    else:
        members["meta"] = pickle.dumps({b"fine_label_names": names,
                                        b"coarse_label_names": [f"super_{k}".encode() for k in range(20)]}, protocol=2)
    expected = {"train_x": np.concatenate(xs[:-1]), "train_y": np.concatenate(ys[:-1]).astype(np.int64),
                "test_x": xs[-1], "test_y": np.array(ys[-1], dtype=np.int64),
                "class_names": [n.decode() for n in names]}
    return members, expected


def cifar_folder(num_classes: int) -> str:
    return "cifar-10-batches-py" if num_classes == 10 else "cifar-100-python"


def write_cifar_tarball(root: Path, num_classes: int = 10, **kw) -> tuple[Path, dict]:
    """Pack the members into cifar-10-python.tar.gz / cifar-100-python.tar.gz under their official folder."""
    members, expected = cifar_members(num_classes, **kw)
    path = root / ("cifar-10-python.tar.gz" if num_classes == 10 else "cifar-100-python.tar.gz")
    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tf:
        folder = tarfile.TarInfo(cifar_folder(num_classes))
        folder.type = tarfile.DIRTYPE
        tf.addfile(folder)
        for name, data in members.items():
            info = tarfile.TarInfo(f"{cifar_folder(num_classes)}/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path, expected


def write_cifar_folder(root: Path, num_classes: int = 10, **kw) -> tuple[Path, dict]:
    """Write the extracted-release folder (cifar-10-batches-py/ or cifar-100-python/)."""
    members, expected = cifar_members(num_classes, **kw)
    folder = root / cifar_folder(num_classes)
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in members.items():
        (folder / name).write_bytes(data)
    return folder, expected


# Clothing1M: key -> (noisy label or None, clean label or None) and the split lists.
C1M_TRAIN = ["images/0/00/001.jpg", "images/0/00/002.jpg", "images/1/01/003.jpg", "images/1/01/004.jpg"]
C1M_VAL = ["images/2/02/005.jpg", "images/2/02/006.jpg"]
C1M_TEST = ["images/3/03/007.jpg", "images/3/03/008.jpg"]
C1M_NOISY = {"images/0/00/001.jpg": 3, "images/0/00/002.jpg": 0, "images/1/01/003.jpg": 13,
             "images/1/01/004.jpg": 5, "images/9/09/999.jpg": 1}  # last: a noisy key not in any list
C1M_CLEAN = {"images/0/00/002.jpg": 7, "images/2/02/005.jpg": 1, "images/2/02/006.jpg": 11,
             "images/3/03/007.jpg": 2, "images/3/03/008.jpg": 9}


def c1m_color(key: str) -> tuple[int, int, int]:
    k = int(key[-7:-4])
    return (k * 30 % 256, 255 - k * 20, 60 + k * 10)


def write_clothing1m(root: Path, names: bool = False) -> Path:
    """A tiny Clothing1M release: 40x30 single-colour JPEGs, the three key lists and the two kv files."""
    for key in C1M_TRAIN + C1M_VAL + C1M_TEST:
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 30), c1m_color(key)).save(root / key, quality=95)
    for fname, keys in [("noisy_train_key_list.txt", C1M_TRAIN), ("clean_val_key_list.txt", C1M_VAL),
                        ("clean_test_key_list.txt", C1M_TEST)]:
        (root / fname).write_text("".join(k + "\n" for k in keys))
    (root / "noisy_label_kv.txt").write_text("".join(f"{k} {v}\n" for k, v in C1M_NOISY.items()))
    (root / "clean_label_kv.txt").write_text("".join(f"{k} {v}\n" for k, v in C1M_CLEAN.items()))
    if names:
        (root / "category_names_eng.txt").write_text("".join(f"Cat{k}\n" for k in range(14)))
    return root


def write_imagefolder(root: Path, classes=("cat", "dog", "emu"), per_class=None, size: int = 12,
                      grey: bool = False, val: bool = False) -> Path:
    """root/train/<class>/*, root/test/<class>/* (and root/val/): each class's images are one
    colour (class c: value 40 + 60 c) with noise, every other one PNG, the rest JPEG at q95.
    `per_class`: {split: images per class} (default train 12, test 4, val 3)."""
    per_class = per_class or {"train": 12, "test": 4, **({"val": 3} if val else {})}
    rng = np.random.default_rng(0)
    for split, n in per_class.items():
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                shape = (size, size) if grey else (size, size, 3)
                pixels = np.clip(40 + 60 * c + rng.normal(0, 8, shape), 0, 255).astype(np.uint8)
                image = Image.fromarray(pixels)
                if i % 2:
                    image.save(folder / f"{i:04d}.png")
                else:
                    image.save(folder / f"{i:04d}.jpg", quality=95)
    return root

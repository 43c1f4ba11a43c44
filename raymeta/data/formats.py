"""Readers for the on-disk formats of the datasets raymeta trains on.

MNIST / Fashion-MNIST (IDX files), CIFAR-10/100 (the official python-version
pickles, as a tarball or extracted) and Clothing1M (the official key lists and
label files; images decoded lazily). Every failure raises a `DataError` (or its
subclass `DatasetNotFoundError`) whose message names the file and the fix.
"""

from __future__ import annotations

import gzip
import pickle
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from raymeta.errors import ConfigError, DataError, DatasetNotFoundError

_REDOWNLOAD = "truncated or corrupt; delete it and download again"
_DOWNLOAD_HINT = "Put the files there, or set dataset.download: true to fetch them with torchvision (needs internet)."


@dataclass(frozen=True)
class ArraySplits:
    """An in-memory image dataset: uint8 images (N, C, H, W) and int64 labels (N,)."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    num_classes: int
    class_names: list[str]


# ----------------------------------------------------------------------------- IDX / MNIST

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_MNIST = {  # variant -> (torchvision class name, class names)
    "mnist": ("MNIST", [str(d) for d in range(10)]),
    "fashion_mnist": ("FashionMNIST", ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                                       "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]),
}


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (the MNIST format), plain or gzip-compressed, into a native-endian array."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except FileNotFoundError:
        raise DatasetNotFoundError(f"IDX file {path} does not exist. Put the file there or fix the path.") from None
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"IDX file {path} is {_REDOWNLOAD} (gzip error: {e}).") from None
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in _IDX_DTYPES:
        raise DataError(f"IDX file {path} has no valid IDX header (bad magic); it is {_REDOWNLOAD}.")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    start = 4 + 4 * ndim
    if len(raw) < start:
        raise DataError(f"IDX file {path} ends inside its header; it is {_REDOWNLOAD}.")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, 4))
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - start != expected:
        raise DataError(f"IDX file {path} holds {len(raw) - start} data bytes but its header {dims} says "
                        f"{expected}; it is {_REDOWNLOAD}.")
    return np.frombuffer(raw, dtype, expected // dtype.itemsize, start).reshape(dims).astype(dtype.newbyteorder("="))


def _find_mnist_files(dirs: list[Path]) -> dict[str, Path] | None:
    """The four MNIST files from the first directory holding all of them (plain preferred over .gz)."""
    for d in dirs:
        found = {}
        for name in _MNIST_FILES:
            for candidate in (d / name, d / f"{name}.gz"):
                if candidate.is_file():
                    found[name] = candidate
                    break
        if len(found) == len(_MNIST_FILES):
            return found
    return None


def load_mnist(root: str | Path, variant: str = "mnist", download: bool = False) -> ArraySplits:
    """Load MNIST or Fashion-MNIST from the four IDX files in root or in torchvision's root/<Class>/raw."""
    if variant not in _MNIST:
        raise ConfigError(f"unknown MNIST variant {variant!r}; use one of {sorted(_MNIST)}.")
    return load_idx(root, variant, *_MNIST[variant], download=download)


def load_idx(root: str | Path, variant: str, tv_name: str, class_names: Sequence[str],
             download: bool = False) -> ArraySplits:
    """A dataset in MNIST's layout (the four IDX files of MNIST's names, plain or gzipped) from
    root or from torchvision's root/<tv_name>/raw; `download` fetches it with torchvision's
    class `tv_name`. `variant`: the dataset's name in messages."""
    root = Path(root)
    dirs = [root, root / tv_name / "raw"]
    files = _find_mnist_files(dirs)
    if files is None and download:
        import torchvision.datasets as tvd

        _torchvision_download(variant, root, lambda: getattr(tvd, tv_name)(str(root), train=True, download=True))
        files = _find_mnist_files(dirs)
    if files is None:
        raise DatasetNotFoundError(
            f"{variant}: no data found under {root}. Expected the IDX files {', '.join(_MNIST_FILES)} "
            f"(each optionally gzipped, with .gz) in {root}/ or in torchvision's layout {dirs[1]}/. {_DOWNLOAD_HINT}")
    splits = []
    for prefix in ("train", "t10k"):
        x_path, y_path = files[f"{prefix}-images-idx3-ubyte"], files[f"{prefix}-labels-idx1-ubyte"]
        x, y = read_idx(x_path), read_idx(y_path)
        if x.ndim != 3 or x.dtype != np.uint8 or y.ndim != 1:
            raise DataError(f"{variant}: {x_path} / {y_path} are not (N, rows, cols) uint8 images and (N,) labels; "
                            f"they are {_REDOWNLOAD}.")
        if len(x) != len(y):
            raise DataError(f"{variant}: {x_path} has {len(x)} images but {y_path} has {len(y)} labels; "
                            f"one of them is {_REDOWNLOAD}.")
        if len(y) and int(y.max()) >= len(class_names):
            raise DataError(f"{variant}: {y_path} has label {int(y.max())} >= {len(class_names)}; it is {_REDOWNLOAD}.")
        splits += [x[:, None], y.astype(np.int64)]
    return ArraySplits(*splits, num_classes=len(class_names), class_names=list(class_names))


def _torchvision_download(name: str, root: Path, fetch) -> None:
    """Run a torchvision download, turning its failure into a DatasetNotFoundError."""
    try:
        fetch()
    except Exception as e:  # network errors, checksum failures, ... come in many types
        raise DatasetNotFoundError(f"{name}: downloading into {root} with torchvision failed ({e}). "
                                   f"Check the internet connection, or put the files there by hand.") from e


# ----------------------------------------------------------------------------- CIFAR

_CIFAR = {  # num_classes -> (tarball, folder, train members, test member, meta member, label key, names key)
    10: ("cifar-10-python.tar.gz", "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)],
         "test_batch", "batches.meta", b"labels", b"label_names"),
    100: ("cifar-100-python.tar.gz", "cifar-100-python", ["train"], "test", "meta",
          b"fine_labels", b"fine_label_names"),
}


def _read_cifar_members(root: Path, tarball: str, folder: str, members: list[str]) -> tuple[dict[str, bytes], Path]:
    """Raw bytes of each member: from the extracted folder if complete, else from the tarball (one pass, in memory)."""
    if all((root / folder / m).is_file() for m in members):
        return {m: (root / folder / m).read_bytes() for m in members}, root / folder
    tar_path = root / tarball
    wanted = {f"{folder}/{m}": m for m in members}
    out: dict[str, bytes] = {}
    at = "its start"
    try:
        with tarfile.open(tar_path, "r:*") as tf:
            for info in tf:
                at = f"member {info.name}"
                m = wanted.get(info.name.removeprefix("./"))
                if m is not None and info.isfile():
                    out[m] = tf.extractfile(info).read()
            while tf.fileobj.read(1 << 20):  # read to the end so that gzip checks its CRC and length trailer
                pass
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DataError(f"{tar_path} is {_REDOWNLOAD} (reading failed at or after {at}: "
                        f"{type(e).__name__}: {e}).") from None
    missing = [f"{folder}/{m}" for m in members if m not in out]
    if missing:
        raise DataError(f"{tar_path} has no member {', '.join(missing)}; the tarball is {_REDOWNLOAD} "
                        f"(it must be the official python-version release).")
    return out, tar_path


def load_cifar(root: str | Path, num_classes: int = 10, download: bool = False) -> ArraySplits:
    """Load CIFAR-10/100 from the official python-version tarball or its extracted folder in root."""
    if num_classes not in _CIFAR:
        raise ConfigError(f"CIFAR has 10 or 100 classes, not {num_classes!r}.")
    root, name = Path(root), f"cifar{num_classes}"
    tarball, folder, train_m, test_m, meta_m, label_key, names_key = _CIFAR[num_classes]
    members = [*train_m, test_m, meta_m]

    def present() -> bool:
        return (root / tarball).is_file() or all((root / folder / m).is_file() for m in members)

    if not present() and download:
        import torchvision.datasets as tvd

        cls = tvd.CIFAR10 if num_classes == 10 else tvd.CIFAR100
        _torchvision_download(name, root, lambda: cls(str(root), train=True, download=True))
    if not present():
        raise DatasetNotFoundError(
            f"{name}: no data found under {root}. Expected one of: {root / tarball} (the official python-version "
            f"tarball) or the extracted folder {root / folder}/ with {', '.join(members)}. {_DOWNLOAD_HINT}")
    raw, source = _read_cifar_members(root, tarball, folder, members)

    def unpickle(member: str) -> dict:
        try:
            obj = pickle.loads(raw[member], encoding="bytes")
        except Exception as e:  # unpickling garbage raises many exception types
            raise DataError(f"{name}: member {member} of {source} is {_REDOWNLOAD} ({e}).") from None
        if not isinstance(obj, dict):
            raise DataError(f"{name}: member {member} of {source} is not a dict; it is {_REDOWNLOAD}.")
        return obj

    def batch(member: str) -> tuple[np.ndarray, np.ndarray]:
        d = unpickle(member)
        try:
            x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            y = np.asarray(d[label_key], dtype=np.int64)
        except (KeyError, ValueError) as e:
            raise DataError(f"{name}: member {member} of {source} lacks b'data' (N, 3072) or {label_key!r} ({e}); "
                            f"it is {_REDOWNLOAD}.") from None
        if len(x) != len(y) or (len(y) and (y.min() < 0 or y.max() >= num_classes)):
            raise DataError(f"{name}: member {member} of {source} has {len(x)} images but {len(y)} labels "
                            f"(or labels outside 0..{num_classes - 1}); it is {_REDOWNLOAD}.")
        return x, y

    parts = [batch(m) for m in train_m]
    test_x, test_y = batch(test_m)
    names = unpickle(meta_m).get(names_key)
    if names is None or len(names) != num_classes:
        raise DataError(f"{name}: member {meta_m} of {source} lacks {num_classes} {names_key!r}; it is {_REDOWNLOAD}.")
    class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    return ArraySplits(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                       test_x, test_y, num_classes, class_names)


# ----------------------------------------------------------------------------- Clothing1M

CLOTHING1M_CLASSES = ["T-Shirt", "Shirt", "Knitwear", "Chiffon", "Sweater", "Hoodie", "Windbreaker",
                      "Jacket", "Downcoat", "Suit", "Shawl", "Dress", "Vest", "Underwear"]
_C1M_FILES = ("noisy_train_key_list.txt", "clean_val_key_list.txt", "clean_test_key_list.txt",
              "noisy_label_kv.txt", "clean_label_kv.txt")


@dataclass(frozen=True)
class FileSplit:
    """A split of image files under root, decoded lazily; clean_labels is -1 where unknown."""

    root: Path
    paths: list[str]
    labels: np.ndarray
    clean_labels: np.ndarray


@dataclass(frozen=True)
class Clothing1M:
    """The three Clothing1M splits: noisy train, clean val, clean test."""

    train: FileSplit
    val: FileSplit
    test: FileSplit
    num_classes: int = 14
    class_names: list[str] = field(default_factory=lambda: list(CLOTHING1M_CLASSES))


def _read_lines(path: Path) -> list[str]:
    """Non-empty stripped lines of a text file."""
    return [s for s in (line.strip() for line in path.read_text(encoding="utf-8").splitlines()) if s]


def _read_kv(path: Path) -> dict[str, int]:
    """Read a Clothing1M label file: lines 'relative/path.jpg label'."""
    kv = {}
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or not (parts[1].isascii() and parts[1].isdigit()) or int(parts[1]) >= 14:
            raise DataError(f"clothing1m: {path} line {i} is {line!r}, expected 'image/path.jpg label' with a label "
                            f"in 0..13; the file is {_REDOWNLOAD}.")
        kv[parts[0]] = int(parts[1])
    return kv


def _check_inside(keys: list[str], list_path: Path) -> None:
    """Key lists name images relative to the dataset root; a key that is absolute or climbs
    out of it (`../`) would read files elsewhere, so it is refused."""
    bad = [k for k in keys if k.startswith(("/", "\\")) or ".." in Path(k).parts or ":" in k]
    if bad:
        raise DataError(f"clothing1m: {len(bad)} key(s) in {list_path} point outside the dataset "
                        f"folder, e.g. {', '.join(map(repr, bad[:3]))}; keys are image paths "
                        f"relative to the root (images/0/xx.jpg). The file is {_REDOWNLOAD}.")


def _labels_for(keys: list[str], kv: dict[str, int], list_path: Path, kv_path: Path) -> np.ndarray:
    """Look up every key of a list in a kv file; a missing key is an error."""
    missing = [k for k in keys if k not in kv]
    if missing:
        raise DataError(f"clothing1m: {len(missing)} key(s) listed in {list_path} have no label in {kv_path}, "
                        f"e.g. {', '.join(missing[:3])}. The annotation files are inconsistent; download them again.")
    return np.array([kv[k] for k in keys], dtype=np.int64)


def load_clothing1m(root: str | Path) -> Clothing1M:
    """Load the Clothing1M key lists and label files of the official release in root (images are not opened)."""
    root = Path(root)
    missing = [f for f in _C1M_FILES if not (root / f).is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"clothing1m: missing {', '.join(missing)} under {root}. Expected the official release layout: "
            f"{', '.join(str(root / f) for f in _C1M_FILES)} (optional category_names_eng.txt) "
            f"and the images/ folder. "
            f"Clothing1M cannot be downloaded automatically; request it from its authors and extract it there.")
    noisy_kv_path, clean_kv_path = root / "noisy_label_kv.txt", root / "clean_label_kv.txt"
    noisy_kv, clean_kv = _read_kv(noisy_kv_path), _read_kv(clean_kv_path)

    def split(list_name: str, kv: dict[str, int], kv_path: Path) -> FileSplit:
        keys = _read_lines(root / list_name)
        _check_inside(keys, root / list_name)
        labels = _labels_for(keys, kv, root / list_name, kv_path)
        clean = np.array([clean_kv.get(k, -1) for k in keys], dtype=np.int64)
        return FileSplit(root, keys, labels, clean)

    names_path = root / "category_names_eng.txt"
    class_names = _read_lines(names_path) if names_path.is_file() else list(CLOTHING1M_CLASSES)
    if len(class_names) != 14:
        raise DataError(f"clothing1m: {names_path} has {len(class_names)} names, expected 14 (one per line). "
                        f"Fix or delete it (the standard English names are then used).")
    return Clothing1M(split("noisy_train_key_list.txt", noisy_kv, noisy_kv_path),
                      split("clean_val_key_list.txt", clean_kv, clean_kv_path),
                      split("clean_test_key_list.txt", clean_kv, clean_kv_path), 14, class_names)


def resize_center_crop(im, size: int):
    """A PIL image with its shorter side resized to `size` (bilinear), center-cropped to size x size."""
    from PIL import Image

    w, h = im.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.BILINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2
    return im.crop((left, top, left + size, top + size))


def decode_images(root: Path, paths: Sequence[str], size: int) -> np.ndarray:
    """Decode image files (any PIL format) to RGB, shorter side resized to size, center-cropped: (n, 3, size, size)."""
    from PIL import Image

    out = np.empty((len(paths), 3, size, size), dtype=np.uint8)
    for i, rel in enumerate(paths):
        path = Path(root) / rel
        try:
            with Image.open(path) as im:
                im.draft("RGB", (size, size))  # JPEG: decode at a reduced scale that is still >= size
                out[i] = np.asarray(resize_center_crop(im.convert("RGB"), size)).transpose(2, 0, 1)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise DataError(f"cannot read image {path} ({e}): it is missing, truncated or corrupt. "
                            f"Restore it from the dataset archive (extract the archive again).") from None
    return out

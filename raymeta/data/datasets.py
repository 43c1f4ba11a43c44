"""Datasets by name, as arrays in memory (or image files decoded lazily).

`load_raw` returns the clean training and test splits of a dataset; noise and the meta split
are applied on top by `raymeta.data.bundle`. Each built-in dataset is a module of
`raymeta.data.sets`; digits and synthetic need no files, the others read the official release
formats through `raymeta.data.formats`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from raymeta import plugins
from raymeta.config import DATASETS, DatasetConfig
from raymeta.data import formats, sets
from raymeta.errors import ConfigError, DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageFiles:
    """Image paths under a root, indexed like an array and decoded on demand."""

    def __init__(self, root: Path, paths: np.ndarray, size: int):
        self.root, self.paths, self.size = Path(root), np.asarray(paths, dtype=object), size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, idx) -> ImageFiles:
        return ImageFiles(self.root, self.paths[idx], self.size)

    def decode(self) -> np.ndarray:
        return formats.decode_images(self.root, list(self.paths), self.size)


@dataclass
class RawData:
    train_x: np.ndarray | ImageFiles
    train_y: np.ndarray
    """clean training labels; -1 where unknown (clothing1m)"""
    test_x: np.ndarray | ImageFiles
    test_y: np.ndarray
    num_classes: int
    class_names: list[str]
    train_given: np.ndarray | None = None
    """noisy labels that ship with the dataset (clothing1m), used by noise.type real"""
    val_x: np.ndarray | ImageFiles | None = None
    val_y: np.ndarray | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_arrays(cls, arrays: formats.ArraySplits) -> RawData:
        """A dataset read from its official release files (raymeta.data.formats)."""
        return cls(arrays.train_x, arrays.train_y.astype(np.int64), arrays.test_x,
                   arrays.test_y.astype(np.int64), arrays.num_classes, list(arrays.class_names))


def load_raw(cfg: DatasetConfig) -> RawData:
    raw = _load(cfg)
    return raw if cfg.classes is None else keep_classes(raw, cfg.classes, cfg.name)


def _load(cfg: DatasetConfig) -> RawData:
    return sets.load(cfg) if cfg.name in DATASETS else _plugin_dataset(cfg)


def _plugin_dataset(cfg: DatasetConfig) -> RawData:
    """A plugin's RawData, checked: what the rest of raymeta takes for granted of a dataset."""
    raw = plugins.load_dataset(cfg.name)(cfg.root, **cfg.options)
    what = f"dataset '{cfg.name}'"
    if not isinstance(raw, RawData):
        raise DataError(f"{what} returned {type(raw).__name__}; it must return a "
                        f"raymeta.data.datasets.RawData")
    k = raw.num_classes
    if len(raw.class_names) != k:
        raise DataError(f"{what}: {len(raw.class_names)} class names for {k} classes")
    for split, x, y in (("train", raw.train_x, raw.train_y), ("test", raw.test_x, raw.test_y)):
        y = np.asarray(y)
        if not isinstance(x, (np.ndarray, ImageFiles)) or (isinstance(x, np.ndarray) and x.ndim != 4):
            raise DataError(f"{what}: {split}_x must be an array of shape (N, C, H, W) (uint8 "
                            f"0..255 or float), got {getattr(x, 'shape', type(x).__name__)}")
        if len(x) != len(y) or y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"{what}: {split}_y must hold one integer label per {split}_x "
                            f"sample ({len(x)}), got shape {y.shape} and dtype {y.dtype}")
        if len(y) and (y.min() < (-1 if split == "train" else 0) or y.max() >= k):
            raise DataError(f"{what}: {split}_y has labels outside 0..{k - 1}")
    return raw


def keep_classes(raw: RawData, classes: list[int], name: str) -> RawData:
    """Only the samples of `classes` in every split, relabelled 0, 1, ... in their order."""
    if max(classes) >= raw.num_classes:
        raise ConfigError(f"dataset.classes {classes} names class {max(classes)}, but {name} has "
                          f"{raw.num_classes} classes (0..{raw.num_classes - 1})")
    if raw.train_given is not None:
        raise ConfigError(f"dataset.classes cannot subset {name}: its noisy labels may name "
                          f"classes outside the subset")
    relabel = np.full(raw.num_classes, -1, dtype=np.int64)
    relabel[classes] = np.arange(len(classes))

    def subset(x, y):
        keep = np.flatnonzero(relabel[y] >= 0)
        return x[keep], relabel[y[keep]]

    train_x, train_y = subset(raw.train_x, raw.train_y)
    test_x, test_y = subset(raw.test_x, raw.test_y)
    val_x, val_y = subset(raw.val_x, raw.val_y) if raw.val_y is not None else (None, None)
    return RawData(train_x, train_y, test_x, test_y, len(classes),
                   [raw.class_names[c] for c in classes], val_x=val_x, val_y=val_y,
                   mean=raw.mean, std=raw.std, extra=raw.extra)


def fixed_split(y: np.ndarray, test_fraction: float):
    """A stratified train/test split that is the same for every seed."""
    from sklearn.model_selection import train_test_split

    return train_test_split(np.arange(len(y)), test_size=test_fraction, stratify=y, random_state=0)


def read_only(raw: RawData) -> RawData:
    """A RawData that is cached and shared by the runs of a process (a chain of cells, a test
    session) must not be changed by one of them: its arrays refuse writes."""
    for array in (raw.train_x, raw.train_y, raw.test_x, raw.test_y):
        array.flags.writeable = False
    return raw


def read_label_file(path: str, key: str | None, expected: int, num_classes: int) -> np.ndarray:
    """Noisy labels from a file: .npy, .txt/.csv (one label per line, or `path label`), or a
    CIFAR-N style .pt holding a dict of label arrays (pick one with `key`). Every label must be
    a class index 0..num_classes-1: -1 means "unlabeled" inside raymeta, so a file may not say it."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"noise.file {file} does not exist; point noise.file at the label file")
    try:
        if file.suffix == ".npy":
            labels = np.load(file)
        elif file.suffix == ".pt":
            from raymeta.safeload import safe_load

            content = safe_load(str(file), numpy=True)
            if isinstance(content, dict):
                label_keys = sorted(k for k in content if "label" in str(k)) or sorted(content)
                if key is None:
                    raise DataError(f"noise.file {file} holds several label sets; set noise.key "
                                    f"to one of: {', '.join(map(str, label_keys))}")
                if key not in content:
                    raise DataError(f"noise.key '{key}' is not in {file}; choose one of: "
                                    f"{', '.join(map(str, label_keys))}")
                content = content[key]
            labels = np.asarray(content)
        else:
            rows = [line.replace(",", " ").split() for line in file.read_text().splitlines()]
            labels = np.array([int(r[-1]) for r in rows if r])
    except DataError:
        raise
    except Exception as err:
        raise DataError(f"could not read noisy labels from {file}: {err}") from None
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    if len(labels) != expected:
        raise DataError(f"noise.file {file} has {len(labels)} labels but the training split has "
                        f"{expected} samples; use the label file made for this dataset")
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        first = bad[0]
        raise DataError(f"noise.file {file} has {len(bad)} label(s) outside 0..{num_classes - 1}, "
                        f"the dataset's classes (first: {labels[first]} at index {first}); use the "
                        f"label file made for this dataset (for unlabeled samples use "
                        f"dataset.unlabeled_fraction, not -1)")
    return labels

"""From a config to the three splits a trial trains on: noisy train, clean meta, clean test.

Order: load the clean dataset -> carve the class-stratified meta set (seeded) -> corrupt the
remaining training labels (seeded). Carving first means the realized noise rate is exactly
the one the training set has, and the meta set always keeps its true labels.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from raymeta.config import ExperimentConfig, MetaSetConfig
from raymeta.data import sets
from raymeta.data.datasets import ImageFiles, load_raw, read_label_file
from raymeta.data.noise import (
    NoisyLabels,
    clean_model_probs,
    exact_count,
    make_noisy_labels,
)
from raymeta.errors import ConfigError, DataError


@dataclass
class Split:
    x: np.ndarray | ImageFiles
    """uint8 images (N, C, H, W), float features, or lazily decoded image files"""
    y: np.ndarray
    """the labels training sees: noisy for the training split, clean for meta and test"""
    y_clean: np.ndarray
    """true labels (-1 where unknown)"""
    origin: np.ndarray
    """positions in the dataset split these samples come from (train, test or val)"""

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class DataBundle:
    train: Split
    meta: Split
    test: Split
    num_classes: int
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: str
    noise: NoisyLabels
    meta_sha: str

    @property
    def input_shape(self) -> tuple[int, int, int]:
        x = self.train.x
        if isinstance(x, ImageFiles):
            return (3, x.size, x.size)
        return tuple(x.shape[1:])

    def summary(self) -> dict:
        """Facts about the data for the results row."""
        return {"num_classes": self.num_classes, "train_size": len(self.train),
                "meta_size": len(self.meta), "test_size": len(self.test),
                "realized_noise_rate": self.noise.realized_rate,
                "noisy_labels_sha": self.noise.sha, "meta_split_sha": self.meta_sha}


def seeded_rng(seed: int, stream: str, *more: int) -> np.random.Generator:
    """An independent generator per purpose (and per `more` numbers, e.g. epoch and rank), so
    e.g. changing the meta size keeps the split seed."""
    code = int.from_bytes(stream.encode()[:8].ljust(8, b"\0"), "little")
    return np.random.default_rng([seed, code, *more])


def stratified_pick(labels: np.ndarray, num_classes: int, cfg: MetaSetConfig,
                    rng: np.random.Generator, where: str) -> np.ndarray:
    """Indices of a class-stratified subset (per_class each, or `size` spread evenly)."""
    if cfg.per_class is not None:
        want = np.full(num_classes, cfg.per_class)
    else:
        if cfg.size < num_classes:
            raise ConfigError(f"meta_set.size {cfg.size} is smaller than the number of classes "
                              f"({num_classes}); use at least {num_classes}")
        want = np.full(num_classes, cfg.size // num_classes)
        want[rng.permutation(num_classes)[: cfg.size % num_classes]] += 1
    picked = []
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        if want[c] >= len(members):
            field = "per_class" if cfg.per_class is not None else "size"
            raise ConfigError(f"meta_set.{field} asks for {want[c]} samples of class {c}, but the "
                              f"{where} split has only {len(members)} (and must keep at least one); "
                              f"use meta_set.per_class of at most {max(len(members) - 1, 0)}")
        picked.append(rng.permutation(members)[: want[c]])
    return np.sort(np.concatenate(picked))


def check_data(cfg: ExperimentConfig) -> None:
    """What build_data checks about files, formats and sizes (dataset files, the meta split's
    feasibility, label and probability files), without making the noisy labels: a sweep runs
    it once per distinct data setting before Ray starts, so a wrong path fails in seconds."""
    raw = load_raw(cfg.dataset)
    _, keep, _, _ = _meta_split(raw, cfg)
    _noise_inputs(raw, cfg, keep, compute_probs=False)


def _meta_split(raw, cfg: ExperimentConfig):
    """(meta split, kept training positions, kept test positions, meta positions)."""
    k = raw.num_classes
    train_x, train_y, test_x, test_y = raw.train_x, raw.train_y, raw.test_x, raw.test_y
    keep = np.arange(len(train_y))  # positions of the training split that stay in train
    test_keep = np.arange(len(test_y))
    split_rng = seeded_rng(cfg.seed, "meta")
    source = cfg.meta_set.source
    if source == "train":
        known = np.flatnonzero(train_y >= 0)
        meta_idx = known[stratified_pick(train_y[known], k, cfg.meta_set, split_rng, "training")]
        meta = Split(train_x[meta_idx], train_y[meta_idx], train_y[meta_idx], meta_idx)
        keep = np.setdiff1d(keep, meta_idx)
    elif source == "test":
        meta_idx = stratified_pick(test_y, k, cfg.meta_set, split_rng, "test")
        meta = Split(test_x[meta_idx], test_y[meta_idx], test_y[meta_idx], meta_idx)
        test_keep = np.setdiff1d(test_keep, meta_idx)
    elif source == "pseudo":  # chosen each epoch by the trainer from the training samples
        meta_idx = np.zeros(0, dtype=np.int64)
        meta = Split(train_x[meta_idx], train_y[meta_idx], train_y[meta_idx], meta_idx)
    else:
        if raw.val_y is None:
            raise ConfigError(f"meta_set.source val needs a dataset with a clean validation split "
                              f"(clothing1m); '{cfg.dataset.name}' has none: use train or test")
        meta_idx = stratified_pick(raw.val_y, k, cfg.meta_set, split_rng, "validation")
        meta = Split(raw.val_x[meta_idx], raw.val_y[meta_idx], raw.val_y[meta_idx], meta_idx)
    if cfg.dataset.imbalance > 1:  # after the meta split: the meta set stays balanced
        keep = long_tailed(keep, train_y, k, cfg.dataset.imbalance, seeded_rng(cfg.seed, "imbalnc"))
    if cfg.dataset.class_fractions is not None:
        keep = class_sized(keep, train_y, k, cfg.dataset.class_fractions, cfg.dataset.train_size,
                           seeded_rng(cfg.seed, "classfr"))
    return meta, keep, test_keep, meta_idx


def class_sized(keep: np.ndarray, labels: np.ndarray, num_classes: int, fractions: list[float],
                size: int, rng: np.random.Generator) -> np.ndarray:
    """A seeded subset of the training positions `keep` with `size` samples, class c taking
    round(size * fractions[c]) of them (at least 1; L2R's class-imbalance experiment)."""
    if len(fractions) != num_classes:
        raise ConfigError(f"dataset.class_fractions has {len(fractions)} entries, but the data "
                          f"has {num_classes} classes; give one per class (or set dataset.classes)")
    y = labels[keep]
    counts = np.maximum(1, np.round(np.asarray(fractions) * size).astype(int))
    counts[np.argmax(counts)] += size - counts.sum()  # rounding goes to the largest class
    kept = []
    for c, n_c in enumerate(counts):
        members = keep[y == c]
        if n_c > len(members):
            raise ConfigError(f"dataset.train_size {size} with class_fractions {fractions} asks "
                              f"for {n_c} training samples of class {c}, but only "
                              f"{len(members)} remain after the meta split; lower train_size")
        kept.append(rng.permutation(members)[:n_c])
    return np.sort(np.concatenate(kept))


def long_tailed(keep: np.ndarray, labels: np.ndarray, num_classes: int, factor: float,
                rng: np.random.Generator) -> np.ndarray:
    """A seeded subset of the training positions `keep` in which class c keeps
    n_max * factor^(-c / (K - 1)) samples (FaMUS Table 8; n_max: the largest class)."""
    y = labels[keep]
    n_max = max(int((y == c).sum()) for c in range(num_classes))
    kept = []
    for c in range(num_classes):
        members = keep[y == c]
        n_c = max(1, int(n_max * factor ** (-c / max(num_classes - 1, 1))))
        kept.append(rng.permutation(members)[:n_c])
    return np.sort(np.concatenate(kept))


def _noise_inputs(raw, cfg: ExperimentConfig, keep: np.ndarray, compute_probs: bool = True):
    """The given labels (noise real) and the clean model's probabilities (feature_dependent)
    of the kept training samples."""
    train_x, train_y, k = raw.train_x, raw.train_y, raw.num_classes
    clean = train_y[keep]
    given = probs = None
    if cfg.noise.type == "real":
        if cfg.noise.file is not None:
            given = read_label_file(cfg.noise.file, cfg.noise.key, len(train_y), k)[keep]
        elif raw.train_given is not None:
            given = raw.train_given[keep]
    elif (clean < 0).any():
        raise ConfigError(f"dataset '{cfg.dataset.name}' ships noisy training labels and no clean "
                          f"ones; use noise.type real")
    if cfg.noise.type == "feature_dependent":
        if cfg.noise.probs_file is not None:
            probs = np.load(cfg.noise.probs_file)
            if len(probs) != len(train_y):
                raise DataError(f"noise.probs_file {cfg.noise.probs_file} has {len(probs)} rows "
                                f"but the training split has {len(train_y)} samples")
            probs = probs[keep]
        elif compute_probs:
            probs = clean_model_probs(np.asarray(train_x[keep]), clean, k, cfg.seed)
    return given, probs


def build_data(cfg: ExperimentConfig) -> DataBundle:
    raw = load_raw(cfg.dataset)
    k = raw.num_classes
    train_x, train_y, test_x, test_y = raw.train_x, raw.train_y, raw.test_x, raw.test_y
    meta, keep, test_keep, meta_idx = _meta_split(raw, cfg)
    clean = train_y[keep]
    noise_rng = seeded_rng(cfg.seed, "noise")
    given, probs = _noise_inputs(raw, cfg, keep)
    noise = make_noisy_labels(clean, k, cfg.noise.type, cfg.noise.rate, noise_rng,
                              given=given, probs=probs, mapping=cfg.noise.mapping,
                              options=cfg.noise.options)
    given_labels = noise.labels.copy()
    if cfg.dataset.unlabeled_fraction > 0:  # hidden labels are -1; methods skip or learn them
        hidden = seeded_rng(cfg.seed, "unlabeled").permutation(len(keep))
        given_labels[hidden[: exact_count(len(keep), cfg.dataset.unlabeled_fraction)]] = -1
    train = Split(train_x[keep], given_labels, clean, keep)
    test = Split(test_x[test_keep], test_y[test_keep], test_y[test_keep], test_keep)

    if raw.mean is not None:
        mean, std = raw.mean, raw.std
    else:  # per-channel statistics of the training inputs, on the [0, 1] scale for images
        x = train.x.astype(np.float64) / (255.0 if train.x.dtype == np.uint8 else 1.0)
        axes = (0, 2, 3)
        mean = tuple(float(v) for v in x.mean(axis=axes))
        std = tuple(float(max(v, 1e-6)) for v in x.std(axis=axes))
    augment = cfg.dataset.augment
    if augment == "auto" and cfg.dataset.name == "imagefolder":  # by what the images are
        channels, side = train.x.shape[1], train.x.shape[-1]
        augment = "none" if channels == 1 else "crop_flip" if side <= 64 else "flip"
    elif augment == "auto":
        entry = sets.built_ins().get(cfg.dataset.name)  # a plugin dataset: none
        augment = entry.augment if entry else "none"
    meta_sha = hashlib.sha256(np.ascontiguousarray(meta_idx, dtype=np.int64)).hexdigest()[:16]
    return DataBundle(train, meta, test, k, raw.class_names, mean, std, augment, noise, meta_sha)

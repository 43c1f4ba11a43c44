"""Seeded Gaussian blobs, one per class (dataset.synthetic_*), fixed by a constant seed: the
trial's seed picks the noise, not the data."""

from __future__ import annotations

import functools

import numpy as np

from raymeta.data.datasets import RawData, fixed_split, read_only

NAMES = ("synthetic",)
READS = ("test_fraction", "synthetic_samples", "synthetic_classes", "synthetic_features")
NEEDS_ROOT = False


def load(cfg, root) -> RawData:
    return _synthetic(cfg.synthetic_classes, cfg.synthetic_features, cfg.synthetic_samples,
                      cfg.test_fraction)


@functools.lru_cache(maxsize=4)
def _synthetic(k: int, d: int, n: int, test_fraction: float) -> RawData:
    rng = np.random.default_rng(1234)
    centers = rng.normal(0.0, 2.0, size=(k, d))
    y = np.arange(n) % k
    x = (centers[y] + rng.normal(size=(n, d))).astype(np.float32)[:, :, None, None]  # (N, F, 1, 1)
    train, test = fixed_split(y, test_fraction)
    return read_only(RawData(x[train], y[train], x[test], y[test], k, [f"class{c}" for c in range(k)]))

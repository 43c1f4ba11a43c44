"""scikit-learn's bundled 8x8 handwritten digits (1,797 images), split into train and test by a
fixed stratified split (dataset.test_fraction)."""

from __future__ import annotations

import functools

import numpy as np

from raymeta.data.datasets import RawData, fixed_split, read_only

NAMES = ("digits",)
READS = ("test_fraction",)
NEEDS_ROOT = False


def load(cfg, root) -> RawData:
    return _digits(cfg.test_fraction)


# a function of its settings alone: loaded once per process (its parsing and stratified split
# cost more than a short cell trains)
@functools.lru_cache(maxsize=4)
def _digits(test_fraction: float) -> RawData:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # 8x8 images with 17 grey levels (0..16) -> uint8 0..255, shaped (N, 1, 8, 8)
    x = np.round(digits.images * (255 / 16)).astype(np.uint8)[:, None]
    y = digits.target.astype(np.int64)
    train, test = fixed_split(y, test_fraction)
    return read_only(RawData(x[train], y[train], x[test], y[test], 10, [str(d) for d in range(10)]))

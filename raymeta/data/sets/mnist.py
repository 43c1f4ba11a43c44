"""MNIST and Fashion-MNIST: the official IDX files, gzipped or not."""

from __future__ import annotations

from raymeta.data import formats
from raymeta.data.datasets import RawData

NAMES = ("mnist", "fashion_mnist")


def load(cfg, root) -> RawData:
    return RawData.from_arrays(formats.load_mnist(root, variant=cfg.name, download=cfg.download))

"""Kuzushiji-MNIST (Clanuwat et al., 2018): 70,000 28x28 images of ten cursive Japanese
characters, in MNIST's IDX layout and file names (a harder drop-in for MNIST)."""

from __future__ import annotations

from raymeta.data import formats
from raymeta.data.datasets import RawData

NAMES = ("kmnist",)
CLASSES = ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo")
"""romanised, in label order (torchvision's KMNIST.classes)"""


def load(cfg, root) -> RawData:
    return RawData.from_arrays(formats.load_idx(root, cfg.name, "KMNIST", CLASSES,
                                                download=cfg.download))

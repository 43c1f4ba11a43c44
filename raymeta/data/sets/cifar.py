"""CIFAR-10 and CIFAR-100: the official python tarball, or the folder it unpacks to."""

from __future__ import annotations

from raymeta.data import formats
from raymeta.data.datasets import RawData

NAMES = ("cifar10", "cifar100")
AUGMENT = "crop_flip"


def load(cfg, root) -> RawData:
    return RawData.from_arrays(formats.load_cifar(root, num_classes=int(cfg.name[5:]),
                                                  download=cfg.download))

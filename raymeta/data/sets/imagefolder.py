"""Your own images: root/train/<class>/*, root/test/<class>/* and optionally root/val/<class>/*
(raymeta.data.imagefolder reads and caches them). `augment: auto` picks by what the images are
(raymeta.data.bundle)."""

from __future__ import annotations

from raymeta.data.datasets import RawData
from raymeta.data.imagefolder import load_imagefolder

NAMES = ("imagefolder",)


def load(cfg, root) -> RawData:
    return load_imagefolder(root, cfg.image_size, cfg.cache)

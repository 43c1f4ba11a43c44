"""Clothing1M: the official key lists and label files; its images are decoded lazily, at
dataset.image_size (224 unless set). Its own noisy labels are noise.type real."""

from __future__ import annotations

import numpy as np

from raymeta.data import formats
from raymeta.data.datasets import IMAGENET_MEAN, IMAGENET_STD, ImageFiles, RawData

NAMES = ("clothing1m",)
AUGMENT = "flip"


def load(cfg, root) -> RawData:
    data = formats.load_clothing1m(root)
    size = cfg.image_size or 224

    def files(split):
        return ImageFiles(split.root, np.asarray(split.paths, dtype=object), size)

    return RawData(files(data.train), data.train.clean_labels.astype(np.int64),
                   files(data.test), data.test.labels.astype(np.int64), data.num_classes,
                   list(data.class_names), train_given=data.train.labels.astype(np.int64),
                   val_x=files(data.val), val_y=data.val.labels.astype(np.int64),
                   mean=IMAGENET_MEAN, std=IMAGENET_STD)

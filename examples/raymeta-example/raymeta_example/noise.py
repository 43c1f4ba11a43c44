"""A noise model of the plugin's own: confusions within groups of similar classes.

Each label, with probability `rate`, becomes another class of its group (classes 0..block-1,
block..2*block-1, ...), as CIFAR-100's labels are confused within a superclass more than across.
A noise model is a function of the clean labels, the number of classes, the rate and the
seeded NumPy generator (its only randomness, so a seed fixes the labels); its options are its
keyword-only parameters: `noise: {type: within_block, rate: 0.4, options: {block: 5}}`.
raymeta checks what it returns and measures the realized transition matrix and noise rate.
"""

from __future__ import annotations

import numpy as np

from raymeta.errors import ConfigError


def within_block(clean: np.ndarray, num_classes: int, rate: float, rng: np.random.Generator, *,
                 block: int = 2) -> np.ndarray:
    if not (isinstance(block, int) and 2 <= block <= num_classes):
        raise ConfigError(f"within_block option 'block' must be an integer in 2..{num_classes}, "
                          f"got {block!r}")  # a ConfigError: the user's to fix, no traceback
    noisy = clean.copy()
    for i in np.flatnonzero(rng.random(len(clean)) < rate):
        start = clean[i] // block * block
        group = np.arange(start, min(start + block, num_classes))
        others = group[group != clean[i]]
        if len(others):  # a last group of one class keeps its label
            noisy[i] = rng.choice(others)
    return noisy

"""A dataset of the plugin's own: your arrays in one NumPy file.

`root/<file>` (default `data.npz`) holds `x_train` and `x_test`, images of shape (N, C, H, W)
or (N, H, W) (uint8 0..255, or floats), and `y_train` and `y_test`, their clean labels 0..K-1.
A dataset is a function of `dataset.root` whose options are its keyword-only parameters:
`dataset: {name: npz_arrays, root: /data/mine, options: {file: faces.npz}}`. It returns the
clean splits; raymeta carves the meta set, makes the noise and normalises on top, as for
the built-in datasets.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from raymeta.data.datasets import RawData
from raymeta.errors import DataError


def npz_arrays(root: str | None, *, file: str = "data.npz") -> RawData:
    path = Path(root or ".").expanduser() / file
    if not path.is_file():
        raise DataError(f"npz_arrays: {path} does not exist; set dataset.root to its folder "
                        f"(and dataset.options.file to its name)")
    with np.load(path, allow_pickle=False) as arrays:  # no pickles: a data file runs no code
        missing = {"x_train", "y_train", "x_test", "y_test"} - set(arrays.files)
        if missing:
            raise DataError(f"npz_arrays: {path} lacks {', '.join(sorted(missing))}")
        x_train, x_test = (arrays[k] if arrays[k].ndim == 4 else arrays[k][:, None]
                           for k in ("x_train", "x_test"))
        y_train, y_test = arrays["y_train"].astype(np.int64), arrays["y_test"].astype(np.int64)
    k = int(max(y_train.max(), y_test.max())) + 1
    return RawData(x_train, y_train, x_test, y_test, k, [str(c) for c in range(k)])

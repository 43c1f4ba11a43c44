"""Reading .pt files without running code: a checkpoint or label file from a shared store or
a download is untrusted input, and torch.load with weights_only=False unpickles arbitrary
objects (a file can run any code when it is read). Here only tensors, plain containers and
numbers load (and numpy arrays where asked); anything else is refused with the reason."""

from __future__ import annotations

import io
import pickle
import re

from raymeta.errors import DataError


def _numpy_globals() -> list:
    import numpy as np

    return [np._core.multiarray._reconstruct, np.ndarray, np.dtype,
            *(getattr(np.dtypes, name) for name in np.dtypes.__all__)]


def safe_load(source, *, map_location="cpu", mmap: bool = False, numpy: bool = False):
    """torch.load(weights_only=True) of a path or bytes; DataError if the file holds code or
    objects other than tensors and plain data."""
    import torch

    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    allowed = _numpy_globals() if numpy else []
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(source, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        name = source if isinstance(source, str) else "the file"
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        what = f"it refers to {found.group(1)}" if found else "it holds objects other than tensors and plain data"
        raise DataError(f"refused to load {name}: {what}, which could run code when read. "
                        f"Delete the file if you did not write it; raymeta writes only tensors "
                        f"and plain data") from None

"""The built-in datasets, one module each. A module of this package that says

    NAMES = ("mnist", "fashion_mnist")   # what dataset.name calls it
    AUGMENT = "crop_flip"                # optional: what `augment: auto` picks (default none)
    READS = ("test_fraction",)           # optional: dataset settings only such datasets read
    NEEDS_ROOT = False                   # optional: it reads no files (default True)

    def load(cfg, root) -> RawData: ...  # cfg: the DatasetConfig; root: the resolved
                                         # dataset.root (None where NEEDS_ROOT is False)

is a dataset: adding one touches its own file only. They are found by reading this package's
source (`ast`), not by importing it, so a config's dataset name and settings are checked
without importing numpy or the readers; a module is imported when its dataset is loaded. A
dataset from another package is named by an entry point of the group ``raymeta.datasets`` or
by its import path (`raymeta.plugins`).
"""

from __future__ import annotations

import ast
import functools
import importlib
from pathlib import Path
from typing import NamedTuple

from raymeta.errors import ConfigError


class BuiltInDataset(NamedTuple):
    module: str
    """e.g. raymeta.data.sets.mnist"""
    augment: str
    reads: tuple[str, ...]
    needs_root: bool


_FIELDS = {"NAMES": (), "AUGMENT": "none", "READS": (), "NEEDS_ROOT": True}


@functools.cache
def built_ins() -> dict[str, BuiltInDataset]:
    """Every built-in dataset by name, in alphabetical order."""
    found: dict[str, BuiltInDataset] = {}
    for path in sorted(Path(__file__).parent.glob("*.py")):
        said = dict(_FIELDS)
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if (isinstance(node, ast.Assign) and len(node.targets) == 1
                    and isinstance(node.targets[0], ast.Name) and node.targets[0].id in _FIELDS):
                said[node.targets[0].id] = ast.literal_eval(node.value)
        for name in said["NAMES"]:
            if name in found:
                raise RuntimeError(f"two built-in datasets are named {name!r}: {found[name].module} "
                                   f"and {__name__}.{path.stem}")
            found[name] = BuiltInDataset(f"{__name__}.{path.stem}", said["AUGMENT"],
                                         tuple(said["READS"]), said["NEEDS_ROOT"])
    return dict(sorted(found.items()))


def load(cfg):
    """The RawData of the built-in dataset `cfg.name` (a DatasetConfig)."""
    entry = built_ins()[cfg.name]
    root = None
    if entry.needs_root:
        if cfg.root is None and not cfg.download:
            raise ConfigError(f"dataset.root is required for dataset '{cfg.name}': set it to the "
                              f"folder that holds the files (or set dataset.download: true)")
        root = Path(cfg.root or ".").expanduser().resolve()
    return importlib.import_module(entry.module).load(cfg, root)

"""Checks that run before any Ray work starts or any result is written, so a wrong path, an
impossible meta split or an unwritable store fails in seconds with the fix, not an hour into a
sweep on rented GPUs."""

from __future__ import annotations

import json
import os
import sys
import uuid
from pathlib import Path

from raymeta.config import ExperimentConfig, ResourcesConfig
from raymeta.data.bundle import check_data
from raymeta.errors import ConfigError
from raymeta.orchestrate.runtime import check_capacity
from raymeta.results.store import display_store, filesystem, redact, resolve_store, unwritten_rows


def check_all_data(cfgs: list[ExperimentConfig]) -> None:
    """check_data once per distinct data setting (the seed and the noise rate do not change
    which files are read or whether the meta split is possible)."""
    seen = set()
    for cfg in cfgs:
        noise = cfg.noise.model_dump(exclude={"rate"})
        key = json.dumps([cfg.dataset.model_dump(), cfg.meta_set.model_dump(), noise],
                         sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            check_data(cfg)


def check_store(store: str, create: bool = True) -> None:
    """The store can be written: create it and write (and remove) a probe object. Without
    `create` (raymeta validate) a local store that does not exist yet is not made: the
    nearest folder that exists must be writable."""
    store = resolve_store(store)
    if not create and "://" not in store and not Path(store).exists():
        parent = next(p for p in Path(store).parents if p.exists())
        if not (parent.is_dir() and os.access(parent, os.W_OK | os.X_OK)):
            raise ConfigError(f"results store {store} cannot be created ({parent} is not a "
                              f"writable folder); choose a folder you can write to, or a URI "
                              f"with credentials (--store)")
        return
    try:
        fs, base = filesystem(store)
        fs.create_dir(base, recursive=True)
        probe = f"{base.rstrip('/')}/.raymeta-probe-{uuid.uuid4().hex}"
        with fs.open_output_stream(probe) as out:
            out.write(b"ok")
        fs.delete_file(probe)
    except (OSError, ValueError) as err:
        raise ConfigError(f"results store {display_store(store)} cannot be written "
                          f"({redact(str(err), store)}); choose a folder you can write to, or a "
                          f"URI with credentials (--store)") from None


def report_unwritten(store: str) -> None:
    """Trials that failed earlier on this machine and whose failed rows the store refused
    (the local record, `store.record_unwritten`): said again until they have rows."""
    for entry in unwritten_rows(store):
        print(f"note: trial {entry['trial_id']} (sweep '{entry['sweep']}') failed and its row "
              f"could not be written to {entry['store']}: {entry['error']} (at {entry['at']})",
              file=sys.stderr)


def preflight(cfgs: list[ExperimentConfig], store: str, resources: ResourcesConfig | None,
              address: str | None, what: str, create_store: bool = True) -> None:
    """Every check `raymeta run`, `sweep` and `validate` make before Ray starts."""
    if resources is not None and not address:
        check_capacity(resources, what)
    if resources is not None:
        for cfg in cfgs:
            resources.check_elastic_batches(cfg.train.batch_size, cfg.train.meta_batch_size)
    check_all_data(cfgs)
    check_store(store, create=create_store)  # last: it creates the store's folder
    report_unwritten(store)

"""The results store: one Parquet file per trial under trials/ and curves/, partitioned by sweep.

    <store>/trials/sweep=<name>/<trial_id>.parquet   one row: config, outcomes, costs, provenance
    <store>/curves/sweep=<name>/<trial_id>.parquet   one row per epoch

A file is keyed by its trial id, so a retried trial replaces its rows and never duplicates
them. Local files are written to a temporary name and renamed (atomic on POSIX); object stores
(s3://, gs://) make an object visible only once its upload completes.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

TABLES = ("trials", "curves")
FINISHED = ("completed", "collapsed")
"""statuses of a run that trained to its end: a sweep does not train it again"""


def resolve_store(store: str | os.PathLike) -> str:
    """A URI stays as it is; a local path becomes absolute (Ray needs absolute paths)."""
    text = str(store)
    if "://" in text:
        return text
    return str(Path(text).expanduser().resolve())


def store_join(store: str, *parts: str) -> str:
    """A path or URI under the store; a URI's query (e.g. ?endpoint_override=host:port for
    an S3-compatible server) stays at the end, where Ray and pyarrow read it."""
    store = resolve_store(store)
    location, query = store.split("?", 1) if "?" in store else (store, "")
    joined = "/".join([location.rstrip("/"), *parts])
    return f"{joined}?{query}" if query else joined


def filesystem(store: str) -> tuple[pafs.FileSystem, str]:
    """pyarrow filesystem and base path for a store (local path or URI)."""
    store = resolve_store(store)
    if "://" not in store:
        return pafs.LocalFileSystem(), store
    return pafs.FileSystem.from_uri(store)


def list_folder(fs: pafs.FileSystem, path: str) -> list[pafs.FileInfo]:
    """What a folder holds; nothing if it does not exist. pyarrow reports a folder that
    appears while it lists (a trial's first write) as an error: it fails to list, then finds
    the folder exists; a second listing sees it."""
    selector = pafs.FileSelector(path, allow_not_found=True)
    for _ in range(2):
        try:
            return fs.get_file_info(selector)
        except FileNotFoundError:
            continue
    return fs.get_file_info(selector)


def table_dir(store: str, table: str, sweep: str) -> str:
    _, base = filesystem(store)
    return f"{base.rstrip('/')}/{table}/sweep={sweep}"


def _scalar(value: Any, lists: bool = False) -> Any:
    """Dicts (and, unless `lists`, lists) become JSON text, so every trial file has a flat,
    stable schema; with `lists`, lists of numbers stay Parquet lists (curves: MLC's T, the
    per-class accuracies), so they can be read without parsing."""
    if lists and isinstance(value, (list, tuple)) and _numeric_list(value):
        return list(value)
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, sort_keys=True)
    return value


def _numeric_list(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return bool(value) and all(_numeric_list(v) for v in value)
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def write_parquet(fs: pafs.FileSystem, path: str, data: pa.Table) -> None:
    """Write `data` to `path` so that no reader ever sees a partial file: locally under a
    temporary name in a `.tmp` folder beside the file's folder, then renamed into place (so a
    listing of the folder never meets a file that vanishes as it is read); object stores make
    an object visible only once its upload completes."""
    folder, name = path.rsplit("/", 1)
    fs.create_dir(folder, recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        staging = f"{folder.rsplit('/', 1)[0]}/.tmp"
        fs.create_dir(staging, recursive=True)
        tmp = f"{staging}/{name}.{uuid.uuid4().hex}"
        pq.write_table(data, tmp)
        os.replace(tmp, path)
    else:
        with fs.open_output_stream(path) as out:
            pq.write_table(data, out)


def write_rows(store: str, table: str, sweep: str, trial_id: str, rows: list[dict]) -> str:
    """Write the rows of one trial for one table; replaces a previous file of that trial."""
    fs, _ = filesystem(store)
    final = f"{table_dir(store, table, sweep)}/{trial_id}.parquet"
    lists = table == "curves"
    write_parquet(fs, final, pa.Table.from_pylist([{k: _scalar(v, lists) for k, v in row.items()}
                                                   for row in rows]))
    return final


def write_trial(store: str, sweep: str, trial_id: str, row: dict, curves: list[dict]) -> None:
    """Curves first, then the trial row: a trial row always has its curves."""
    tagged = [{"trial_id": trial_id, **c} for c in curves]
    if tagged:
        write_rows(store, "curves", sweep, trial_id, tagged)
    write_rows(store, "trials", sweep, trial_id, [{"trial_id": trial_id, **row}])


def completed_digest(store: str, sweep: str, trial_id: str) -> str | None:
    """The config digest of a trial's finished row (completed or collapsed), or None (no row,
    failed, unreadable)."""
    fs, _ = filesystem(store)
    path = f"{table_dir(store, 'trials', sweep)}/{trial_id}.parquet"
    try:
        row = pq.read_table(path, filesystem=fs, columns=["status", "config_digest"]).to_pylist()
    except (OSError, ValueError, KeyError, pa.ArrowInvalid):
        return None
    return row[0]["config_digest"] if row and row[0]["status"] in FINISHED else None

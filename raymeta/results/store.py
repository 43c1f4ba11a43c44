"""The results store: one Parquet file per trial under trials/ and curves/, partitioned by sweep.

    <store>/trials/sweep=<name>/<trial_id>.parquet   one row: config, outcomes, costs, provenance
    <store>/curves/sweep=<name>/<trial_id>.parquet   one row per epoch

A file is keyed by its trial id, so a retried trial replaces its rows and never duplicates
them. Local files are written to a temporary name and renamed (atomic on POSIX); for object
stores (s3://, gs://) a file is made whole in memory first and then uploaded in one piece, so
an error while it is made never reaches the store (an upload stream publishes what it holds
when it is closed, even after an error).

A store URI may carry credentials (`s3://KEY:SECRET@bucket/path`, `?secret_key=...`):
`display_store` is the form every message, log line and row shows.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import sys
import uuid
from urllib.parse import unquote
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raymeta.errors import StorageError, is_storage_failure

TABLES = ("trials", "curves")
FINISHED = ("completed", "collapsed")
"""statuses of a run that trained to its end: a sweep does not train it again"""
ENDED = (*FINISHED, "stopped")
"""statuses of a run that ended without an error (stopped: early stopping ended it)"""


def resolve_store(store: str | os.PathLike) -> str:
    """A URI stays as it is; a local path becomes absolute (Ray needs absolute paths)."""
    text = str(store)
    if "://" in text:
        return text
    return str(Path(text).expanduser().resolve())


_SECRET_PARAM = re.compile(r"key|secret|token|passw|credential|signature|auth", re.IGNORECASE)
"""query parameters of a store URI whose values are secrets (access_key, secret_key,
session_token, ...)"""


def _split_uri(text: str) -> tuple[str, str, str, list[str]] | None:
    """scheme, user-info, rest of the location, query parameters; None for a local path."""
    if "://" not in text:
        return None
    scheme, rest = text.split("://", 1)
    location, _, query = rest.partition("?")
    authority, slash, path = location.partition("/")
    userinfo, at, host = authority.rpartition("@")
    return scheme, userinfo if at else "", host + slash + path, query.split("&") if query else []


def display_store(store: str | os.PathLike) -> str:
    """The store as messages, logs and rows show it: without the user-info of a URI
    (`s3://KEY:SECRET@bucket/path` -> `s3://bucket/path`) and with the values of secret
    query parameters (access_key, secret_key, session_token, ...) replaced by `***`."""
    text = str(store)
    parts = _split_uri(text)
    if parts is None:
        return text
    scheme, _, location, params = parts
    shown = []
    for param in params:
        name, eq, value = param.partition("=")
        shown.append(f"{name}=***" if eq and value and _SECRET_PARAM.search(unquote(name)) else param)
    return f"{scheme}://{location}" + (f"?{'&'.join(shown)}" if shown else "")


def redact(text: str, store: str | os.PathLike) -> str:
    """`text` (e.g. an error message that may quote the URI) without the secrets of `store`."""
    text = text.replace(str(store), display_store(store))
    parts = _split_uri(str(store))
    if parts is None:
        return text
    secrets = [parts[1]] if parts[1] else []
    secrets += parts[1].split(":", 1) if parts[1] else []
    secrets += [value for name, _, value in (p.partition("=") for p in parts[3])
                if value and _SECRET_PARAM.search(unquote(name))]
    for secret in sorted({v for s in secrets for v in (s, unquote(s)) if len(v) >= 4},
                         key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


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
    """Write `data` to `path` all or nothing, so that no reader ever sees a partial file and a
    failed write leaves the previous file as it was: locally under a temporary name in a
    `.tmp` folder beside the file's folder, then renamed into place (so a listing of the
    folder never meets a file that vanishes as it is read); for object stores the file is
    made whole in memory, then uploaded (`write_bytes`)."""
    if isinstance(fs, pafs.LocalFileSystem):
        folder, name = path.rsplit("/", 1)
        fs.create_dir(folder, recursive=True)
        tmp = _staging_name(fs, folder, name)
        try:
            pq.write_table(data, tmp)
            os.replace(tmp, path)
        except BaseException:
            _remove_quietly(tmp)
            raise
        return
    sink = pa.BufferOutputStream()
    pq.write_table(data, sink)  # an error here leaves the store untouched
    write_bytes(fs, path, sink.getvalue())


def write_bytes(fs: pafs.FileSystem, path: str, payload: bytes | pa.Buffer) -> None:
    """Put a whole file at `path`, all or nothing (a result file, a checkpoint). Locally: a
    temporary name, renamed into place. Object stores: pyarrow's output stream completes its
    upload when it is closed, even after an error mid-write, and cannot be aborted; so the
    stream is opened only once every byte is made, takes them in one write (a payload under
    the part size is only buffered, then put as one object at close) and is closed."""
    folder, name = path.rsplit("/", 1)
    fs.create_dir(folder, recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = _staging_name(fs, folder, name)
        try:
            with open(tmp, "wb") as out:
                out.write(payload)
            os.replace(tmp, path)
        except BaseException:
            _remove_quietly(tmp)
            raise
        return
    out = fs.open_output_stream(path, compression=None)
    out.write(payload)
    out.close()


def _staging_name(fs: pafs.FileSystem, folder: str, name: str) -> str:
    staging = f"{folder.rsplit('/', 1)[0]}/.tmp"
    fs.create_dir(staging, recursive=True)
    return f"{staging}/{name}.{uuid.uuid4().hex}"


def _remove_quietly(path: str) -> None:
    """A failed write's temporary file (on a full disk it holds space the next write needs)."""
    try:
        os.remove(path)
    except OSError:
        pass


def storage_error(err: BaseException, store: str, what: str) -> StorageError | None:
    """The StorageError for a write to `store` that failed for a reason no retry fixes
    (errors.is_storage_failure), naming the store in its display form; None otherwise."""
    if isinstance(err, StorageError) or not is_storage_failure(err):
        return None
    shown = display_store(store)
    return StorageError(f"cannot write {what} to the results store {shown}: "
                        f"{redact(str(err), store)}", store=shown)


def write_rows(store: str, table: str, sweep: str, trial_id: str, rows: list[dict]) -> str:
    """Write the rows of one trial for one table; replaces a previous file of that trial."""
    fs, _ = filesystem(store)
    final = f"{table_dir(store, table, sweep)}/{trial_id}.parquet"
    lists = table == "curves"
    # every key of every row: pyarrow would take the columns from the first row alone, and drop
    # a metric that starts later (MetaLabelNet's soft-label agreement after its warm-up)
    columns = dict.fromkeys(key for row in rows for key in row)
    try:
        write_parquet(fs, final, pa.Table.from_pylist([{k: _scalar(row.get(k), lists) for k in columns}
                                                       for row in rows]))
    except OSError as err:  # a full disk, a quota, no permission: StorageError, not retried
        if (failure := storage_error(err, store, f"the {table} of trial {trial_id}")) is not None:
            raise failure from err
        raise
    return final


def write_trial(store: str, sweep: str, trial_id: str, row: dict, curves: list[dict]) -> None:
    """Curves first, then the trial row: a trial row always has its curves."""
    tagged = [{"trial_id": trial_id, **c} for c in curves]
    if tagged:
        write_rows(store, "curves", sweep, trial_id, tagged)
    write_rows(store, "trials", sweep, trial_id, [{"trial_id": trial_id, **row}])


def write_json(path: str, data: Any) -> None:
    """A small JSON file at a store path (a folder or an object store), its folder made."""
    fs, where = filesystem(path)
    fs.create_dir(where.rpartition("/")[0], recursive=True)
    write_bytes(fs, where, json.dumps(data).encode())


def read_json(path: str) -> Any:
    """The JSON file at a store path; None when it is missing or not JSON."""
    fs, where = filesystem(path)
    try:
        with fs.open_input_stream(where) as stream:
            return json.loads(stream.read())
    except (OSError, ValueError):
        return None


def read_run(store: str, table: str, sweep: str, trial_id: str) -> list[dict]:
    """One trial's rows of `table` (its trial row, or its curves); none when it has no file
    or the file cannot be read."""
    fs, _ = filesystem(store)
    try:
        return pq.read_table(f"{table_dir(store, table, sweep)}/{trial_id}.parquet",
                             filesystem=fs).to_pylist()
    except (OSError, ValueError, pa.ArrowInvalid):
        return []


def completed_digest(store: str, sweep: str, trial_id: str) -> str | None:
    """The config digest of a trial's finished row (completed or collapsed), or None (no row,
    failed, unreadable)."""
    return completed_digests(store, sweep, [trial_id])[trial_id]


def completed_digests(store: str, sweep: str, trial_ids: list[str]) -> dict[str, str | None]:
    """completed_digest of several trials, with one look at the store for which have a row
    (a chain of cells checks its cells at once; most have none yet)."""
    fs, _ = filesystem(store)
    folder = table_dir(store, "trials", sweep)
    found = dict.fromkeys(trial_ids)
    infos = fs.get_file_info([f"{folder}/{trial_id}.parquet" for trial_id in trial_ids])
    for trial_id, info in zip(trial_ids, infos):
        if info.type != pafs.FileType.File:
            continue
        try:
            row = pq.read_table(info.path, filesystem=fs, columns=["status", "config_digest"]).to_pylist()
        except (OSError, ValueError, KeyError, pa.ArrowInvalid):
            continue
        if row and row[0]["status"] in FINISHED:
            found[trial_id] = row[0]["config_digest"]
    return found


UNWRITTEN_FILE = "unwritten-rows.jsonl"
"""the local record of failed trials whose row could not be written to their store"""


def state_dir() -> Path:
    """Where raymeta keeps local state: $RAYMETA_STATE_DIR, else $XDG_STATE_HOME/raymeta, else
    ~/.local/state/raymeta (on the driver's machine, not in the store, which may be the thing
    that cannot be written)."""
    if os.environ.get("RAYMETA_STATE_DIR"):
        return Path(os.environ["RAYMETA_STATE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_STATE_HOME") or "~/.local/state").expanduser() / "raymeta"


def record_unwritten(store: str, entries) -> Path | None:
    """Note locally that these trials, (sweep, trial id, error) each, failed and their failed
    rows could not be written to `store`, for the next run's preflight to report. Best
    effort: the file, or None when it cannot be written either."""
    entries = list(entries)
    if not entries:
        return None
    shown = display_store(resolve_store(store))
    path = state_dir() / UNWRITTEN_FILE
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as out:
            for sweep, trial_id, error in entries:
                out.write(json.dumps({"store": shown, "sweep": sweep, "trial_id": trial_id,
                                      "error": redact(error, store),
                                      "at": dt.datetime.now(dt.timezone.utc).isoformat()}) + "\n")
    except OSError as err:
        print(f"warning: could not record the unwritten rows in {path}: {err}", file=sys.stderr)
        return None
    return path


def unwritten_rows(store: str) -> list[dict]:
    """The local record's trials of `store` whose row is still missing from it (one entry per
    trial, the newest); entries whose trial has a row by now are dropped from the record."""
    path = state_dir() / UNWRITTEN_FILE
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    shown = display_store(resolve_store(store))
    entries = []
    for line in lines:
        try:
            entries.append(json.loads(line))
        except ValueError:
            continue
    mine = {(e["sweep"], e["trial_id"]): e for e in entries if e.get("store") == shown}
    if not mine:
        return []
    try:
        fs, _ = filesystem(store)
        missing = {key: e for key, e in mine.items()
                   if fs.get_file_info(f"{table_dir(store, 'trials', key[0])}/{key[1]}.parquet").type
                   != pafs.FileType.File}
    except (OSError, ValueError):
        return list(mine.values())
    if len(missing) < len(mine):  # some were written since: forget them
        keep = [e for e in entries if e.get("store") != shown
                or (e["sweep"], e["trial_id"]) in missing]
        try:
            path.write_text("".join(json.dumps(e) + "\n" for e in keep))
        except OSError:
            pass
    return list(missing.values())

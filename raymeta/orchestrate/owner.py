"""One live driver per sweep name and store. Tune keeps a sweep's state in
`<store>/tune/<name>/`; two drivers of the same name would share it (one `tuner.pkl`, two
experiment states) and train trials twice. A driver therefore claims the sweep with an owner
file beside that folder, `<store>/tune/<name>.owner.json` (its host, pid, sweep file and the
sweep's digest), and refreshes it every HEARTBEAT_S seconds while it runs. A second driver is
refused while the owner is alive; an owner that is gone (its process no longer exists on this
host, or its heartbeat is older than STALE_S) is taken over, with a notice."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import socket
import sys
import threading
import time
import uuid
from contextlib import contextmanager

import pyarrow.fs as pafs

from raymeta.config import SweepSpec
from raymeta.errors import ConfigError
from raymeta.results.store import filesystem, store_join, write_bytes

HEARTBEAT_S = 20.0
STALE_S = 90.0
"""an owner silent this long is gone (a killed driver on another machine)"""


def sweep_digest(spec: SweepSpec) -> str:
    return hashlib.sha256(spec.model_dump_json().encode()).hexdigest()[:12]


def owner_path(spec: SweepSpec) -> tuple[pafs.FileSystem, str]:
    return filesystem(store_join(spec.store, "tune", f"{spec.name}.owner.json"))


def _read(fs: pafs.FileSystem, path: str) -> dict | None:
    try:
        with fs.open_input_stream(path) as source:
            return json.loads(source.read())
    except (FileNotFoundError, OSError, ValueError):
        return None


def _write(fs: pafs.FileSystem, path: str, record: dict) -> None:
    """All or nothing (store.write_bytes): a reader never sees half a record."""
    write_bytes(fs, path, json.dumps(record, sort_keys=True).encode())


def _alive(record: dict) -> bool:
    """Whether the driver that wrote `record` may still run."""
    if time.time() - record.get("heartbeat", 0) > STALE_S:
        return False
    if record.get("host") == socket.gethostname():
        try:
            os.kill(int(record["pid"]), 0)
        except ProcessLookupError:
            return False
        except (PermissionError, KeyError, ValueError):
            pass
    return True


def _since(record: dict) -> str:
    started = dt.datetime.fromtimestamp(record.get("started", 0), dt.timezone.utc)
    return started.strftime("%Y-%m-%d %H:%M:%S UTC")


def check_owner(spec: SweepSpec, source: str | None = None) -> dict | None:
    """Refuse (ConfigError) if another live driver runs this sweep; the record of a gone
    owner (to take over), or None."""
    fs, path = owner_path(spec)
    record = _read(fs, path)
    if record is None or record.get("token") == _TOKEN:
        return None
    if not _alive(record):
        return record
    digest = sweep_digest(spec)
    first = (f"sweep '{spec.name}' is already running in this store: started {_since(record)} "
             f"on {record.get('host')} (pid {record.get('pid')}) from "
             f"{record.get('sweep_file') or 'a sweep spec'}")
    if record.get("sweep_digest") != digest:
        raise ConfigError(f"{first}, with other settings than {source or 'this sweep'}. Two sweeps "
                          f"of one name share Tune's state and would overwrite each other; give "
                          f"this one another name (name: in the sweep file). If that driver is "
                          f"gone, it is taken over {STALE_S:.0f} s after it stopped, or at once "
                          f"if you delete {path}")
    raise ConfigError(f"{first}. Wait for it to finish (or stop it with Ctrl-C and continue with "
                      f"--resume); two drivers of one sweep would train every trial twice. If "
                      f"that driver is gone, it is taken over {STALE_S:.0f} s after it stopped, "
                      f"or at once if you delete {path}")


_TOKEN = uuid.uuid4().hex
"""this process's claim: a driver that holds the sweep may check it again"""


@contextmanager
def own_sweep(spec: SweepSpec, source: str | None = None):
    """Hold the sweep for the duration of the block (see the module's doc)."""
    fs, path = owner_path(spec)
    gone = check_owner(spec, source)
    if gone is not None:
        print(f"taking over sweep '{spec.name}' from its driver on {gone.get('host')} (pid "
              f"{gone.get('pid')}, started {_since(gone)}), which is no longer running",
              file=sys.stderr, flush=True)
    record = {"host": socket.gethostname(), "pid": os.getpid(), "token": _TOKEN,
              "sweep_file": source, "sweep_digest": sweep_digest(spec), "started": time.time()}
    _write(fs, path, {**record, "heartbeat": time.time()})
    check_owner(spec, source)  # two drivers that started together: the last write holds it
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            try:
                _write(fs, path, {**record, "heartbeat": time.time()})
            except OSError:  # a store hiccup: the next beat tries again
                pass

    thread = threading.Thread(target=beat, name="sweep-owner", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        if (_read(fs, path) or {}).get("token") == _TOKEN:
            try:
                fs.delete_file(path)
            except OSError:
                pass

"""A run's checkpoint file: written atomically, read without running code, checked against the
config that wants to continue from it. What goes into the state is the Trainer's
(`Trainer.state_dict`); this module only moves it to and from storage."""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import torch

from raymeta.errors import ConfigError, StorageError, is_storage_failure
from raymeta.safeload import safe_load

CHECKPOINT_FILE = "checkpoint.pt"


def check_digest(state: dict, path: Path, digest: str) -> None:
    """Refuse a state written by another config (given by its digest)."""
    if state["config_digest"] != digest:
        raise ConfigError(f"checkpoint {path} was written by another config "
                          f"(digest {state['config_digest']}, this one {digest}); "
                          f"use a fresh output folder (--out) or the original config")


def file_of(path: str | Path) -> Path:
    """The checkpoint file itself, given it or its folder."""
    path = Path(path)
    return path / CHECKPOINT_FILE if path.is_dir() else path


def check_checkpoint(path: str | Path, digest: str) -> None:
    """Raise before any training if the checkpoint at `path` belongs to another config (given
    by its digest: ExperimentConfig.digest(), or a pack's `pack_digest`)."""
    path = file_of(path)
    # memory-mapped: only the digest is read here, the tensors when the Trainer loads them
    check_digest(safe_load(str(path), mmap=True), path, digest)


def load_state_bytes(data: bytes) -> dict:
    """A Trainer state from a checkpoint's bytes (e.g. read from an object store)."""
    return safe_load(data)


def read(path: str | Path, device: torch.device) -> tuple[dict, Path]:
    """(the state in the checkpoint at `path`, a file or its folder; the file's path)."""
    path = file_of(path)
    return safe_load(str(path), map_location=device), path


def write(state: dict, folder: str | Path) -> Path:
    """Write `state` as checkpoint.pt atomically into `folder`. The bytes are made in memory
    first: torch.save into a file on a full disk fails with an opaque RuntimeError, a plain
    write with the errno. A write that no retry can fix (disk full, quota, permissions,
    read-only) raises StorageError; a failed write leaves the previous checkpoint and no
    temporary file."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    folder = Path(folder)
    tmp = folder / f".{CHECKPOINT_FILE}.{os.getpid()}.tmp"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as out:
            out.write(buffer.getbuffer())
        os.replace(tmp, folder / CHECKPOINT_FILE)
    except OSError as err:
        with contextlib.suppress(OSError):  # on a full disk it holds space
            tmp.unlink(missing_ok=True)
        if is_storage_failure(err):
            raise StorageError(f"cannot write the checkpoint {folder / CHECKPOINT_FILE}: "
                               f"{err}") from err
        raise
    return folder / CHECKPOINT_FILE

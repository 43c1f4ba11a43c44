"""One trial from start to results rows, with or without Ray around it."""

from __future__ import annotations

import datetime as dt
import functools
import platform
import socket
import subprocess
import sys
import traceback
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from raymeta.config import ExperimentConfig
from raymeta.errors import StorageError, is_storage_failure
from raymeta.results.store import display_store, resolve_store, write_trial
from raymeta.train import Trainer
from raymeta.train.health import collapse
from raymeta.train.packed import PackedTrainer


@functools.cache
def provenance() -> dict:
    """Versions, git revision and host that produced a result."""
    def version(pkg: str) -> str:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return ""

    repo = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip() != ""
    except (OSError, subprocess.SubprocessError):
        rev, dirty = "", False
    return {"git_rev": rev + ("-dirty" if rev and dirty else ""),
            "raymeta_version": version("raymeta"), "torch_version": version("torch"),
            "ray_version": version("ray"), "python_version": platform.python_version(),
            "hostname": socket.gethostname()}


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat()


def trial_row(cfg: ExperimentConfig, sweep: str, extra: dict | None = None) -> dict:
    """The columns every trial row has before it runs: config, provenance, start time."""
    return {"sweep_name": sweep, "config_digest": cfg.digest(), "config_json": cfg.model_dump_json(),
            **cfg.flat(), **provenance(), **(extra or {}), "started_at": _now()}


def write_failed(store: str, sweep: str, trial_id: str, row: dict, err: BaseException,
                 curves: list[dict]) -> dict:
    """The failed row, with the error as its reason and the curves trained so far."""
    row = {**row, "status": "failed", "error": f"{type(err).__name__}: {err}", "finished_at": _now()}
    write_trial(store, sweep, trial_id, row, curves)
    return row


def write_failed_rows(store: str, sweep: str, failed: list[tuple[str, dict, list[dict]]],
                      err: BaseException) -> None:
    """The failed row of each (trial id, row, curves), after `err` ended the trial. A row the
    store refuses for good (disk full, quota, permissions: errors.is_storage_failure) raises
    StorageError naming the trial, so the driver still lists it (`unwritten`) and a sweep
    stops; other errors of the write propagate (the driver finds the row missing)."""
    unwritten, last = [], None
    for trial_id, row, curves in failed:
        try:
            write_failed(store, sweep, trial_id, row, err, curves)
        except Exception as row_err:
            if not is_storage_failure(row_err):
                raise
            unwritten.append((sweep, trial_id, f"{type(err).__name__}: {err}"))
            last = row_err
    if unwritten:
        shown = display_store(resolve_store(store))
        ids = ", ".join(u[1] for u in unwritten)
        if is_storage_failure(err):  # the store refused the trial's writes, then its row
            text = str(err) if isinstance(err, StorageError) else f"{type(err).__name__}: {err}"
            message = f"{text}; the failed row of trial {ids} could not be written either"
        else:
            message = (f"{last} (the failed row of trial {ids}, which failed with "
                       f"{type(err).__name__}: {err})")
        raise StorageError(message, store=shown, unwritten=tuple(unwritten)) from err


def _written(store: str, sweep: str, trial_id: str, write: Callable[[], dict]) -> dict:
    """A finished trial's rows, or StorageError naming it when the store refuses them."""
    try:
        return write()
    except StorageError as err:
        raise StorageError(f"trial {trial_id} trained to its end but its rows could not be "
                           f"written: {err}", store=err.store,
                           unwritten=((sweep, trial_id, str(err)),)) from err


def completed_row(row: dict, result) -> dict:
    """The row of a run that trained to its end: `completed`, or `collapsed` (with the epoch
    and the reason) when it trained to nothing (`raymeta.train.health`); finished now."""
    status, error = "completed", ""
    if (found := collapse(result.curves, result.outcome["num_classes"])) is not None:
        status, error = "collapsed", f"collapsed at epoch {found[0]}: {found[1]}"
    return {**row, "status": status, "error": error, **result.outcome, "finished_at": _now()}


def write_finished(store: str, sweep: str, trial_id: str, row: dict, curves: list[dict]) -> dict:
    """Write a finished run's row (`completed_row`) and its curves; the row."""
    write_trial(store, sweep, trial_id, row, curves)
    return row


def write_completed(store: str, sweep: str, trial_id: str, row: dict, result) -> dict:
    """Write the completed (or collapsed) row of a finished run, and its curves."""
    return write_finished(store, sweep, trial_id, completed_row(row, result), result.curves)


def run_trial(cfg: ExperimentConfig, *, store: str, sweep: str, trial_id: str,
              on_epoch_end: Callable | None = None, checkpoint_dir: str | Path | None = None,
              resume_from: str | Path | None = None, extra: dict | None = None,
              write: Callable[[Callable[[], dict]], Any] | None = None,
              started: Callable[[], None] | None = None) -> Any:
    """Train `cfg` and write its trial row and curves; a failure writes a failed row and re-raises.
    `write`, when given, runs the write of the finished rows (a chain of cells hands it to a
    thread) and its result is returned; by default the rows are written here, and returned.
    `started` is called once the Trainer is set up, before its first step."""
    row = trial_row(cfg, sweep, extra)
    trainer = None
    try:
        trainer = Trainer(cfg, on_epoch_end=on_epoch_end, checkpoint_dir=checkpoint_dir,
                          resume_from=resume_from)
        if started is not None:
            started()
        result = trainer.fit()
    except Exception as err:  # KeyboardInterrupt, SystemExit: leave no row
        print(traceback.format_exc(), file=sys.stderr)
        write_failed_rows(store, sweep, [(trial_id, row, trainer.curves if trainer else [])], err)
        raise
    finish = functools.partial(  # the row is finished now, whenever its write runs
        _written, store, sweep, trial_id,
        functools.partial(write_finished, store, sweep, trial_id, completed_row(row, result), result.curves))
    return write(finish) if write is not None else finish()


def run_packed_trial(cfgs: list[ExperimentConfig], trial_ids: list[str], *, store: str, sweep: str,
                     on_epoch_end: Callable | None = None, checkpoint_dir: str | Path | None = None,
                     resume_from: str | Path | None = None, extra: dict | None = None) -> list[dict]:
    """Train the seeds of one configuration together (`PackedTrainer`) and write each seed's
    rows and curves; a failure writes a failed row for every seed and re-raises."""
    extra = {**(extra or {}), "packed_seeds": len(cfgs)}
    rows = [trial_row(cfg, sweep, extra) for cfg in cfgs]
    trainer = None
    try:
        trainer = PackedTrainer(cfgs[0], [cfg.seed for cfg in cfgs], on_epoch_end=on_epoch_end,
                                checkpoint_dir=checkpoint_dir, resume_from=resume_from)
        results = trainer.fit()
    except Exception as err:  # KeyboardInterrupt, SystemExit: leave no rows
        print(traceback.format_exc(), file=sys.stderr)
        write_failed_rows(store, sweep, [(trial_id, row, trainer.members[k].curves if trainer else [])
                                         for k, (trial_id, row) in enumerate(zip(trial_ids, rows))],
                          err)
        raise
    return [_written(store, sweep, trial_id,
                     functools.partial(write_completed, store, sweep, trial_id, row, result))
            for trial_id, row, result in zip(trial_ids, rows, results)]

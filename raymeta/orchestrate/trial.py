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

from raymeta.config import ExperimentConfig
from raymeta.results.store import write_trial
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


def write_completed(store: str, sweep: str, trial_id: str, row: dict, result) -> dict:
    """The row of a run that trained to its end: `completed`, or `collapsed` (with the epoch
    and the reason) when it trained to nothing (`raymeta.train.health`)."""
    status, error = "completed", ""
    if (found := collapse(result.curves, result.outcome["num_classes"])) is not None:
        status, error = "collapsed", f"collapsed at epoch {found[0]}: {found[1]}"
    row = {**row, "status": status, "error": error, **result.outcome, "finished_at": _now()}
    write_trial(store, sweep, trial_id, row, result.curves)
    return row


def run_trial(cfg: ExperimentConfig, *, store: str, sweep: str, trial_id: str,
              on_epoch_end: Callable | None = None, checkpoint_dir: str | Path | None = None,
              resume_from: str | Path | None = None, extra: dict | None = None) -> dict:
    """Train `cfg` and write its trial row and curves; a failure writes a failed row and re-raises."""
    row = trial_row(cfg, sweep, extra)
    trainer = None
    try:
        trainer = Trainer(cfg, on_epoch_end=on_epoch_end, checkpoint_dir=checkpoint_dir,
                          resume_from=resume_from)
        result = trainer.fit()
    except Exception as err:  # KeyboardInterrupt, SystemExit: leave no row
        print(traceback.format_exc(), file=sys.stderr)
        write_failed(store, sweep, trial_id, row, err, trainer.curves if trainer else [])
        raise
    return write_completed(store, sweep, trial_id, row, result)


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
        for k, (trial_id, row) in enumerate(zip(trial_ids, rows)):
            write_failed(store, sweep, trial_id, row, err, trainer.members[k].curves if trainer else [])
        raise
    return [write_completed(store, sweep, trial_id, row, result)
            for trial_id, row, result in zip(trial_ids, rows, results)]

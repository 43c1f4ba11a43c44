"""Experiment trackers: every run logged to MLflow and/or Weights & Biases, besides the Parquet
store (which stays the source of truth).

One tracked run per results row (a cell of a sweep, a seed of a pack, a search sample's seed):
its config as parameters, each epoch's scalar metrics at step = epoch, list-valued metrics
(MLC's T, FaMUS's gate frequencies, per-class accuracy) as one JSON artifact, and at its end
the row's outcomes (final and peak test accuracy, ...) and status.

Sweeps log from the driver, through a Tune callback: one process writes to the tracker, so a
sqlite URI or one W&B service is never written by several trials at once, and a trial of
several cells (packed seeds, chains) still gives one tracked run per cell. `raymeta run` logs
from its own epoch hook, through the same `Tracking` object.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from raymeta.config import MlflowTracking, TrackingConfig, WandbTracking, flatten
from raymeta.errors import ConfigError
from raymeta.results.store import ENDED

OUTCOMES = ("final_test_acc", "best_test_acc", "test_acc_at_best_meta", "final_meta_acc",
            "epochs_run", "wall_seconds", "ms_per_step", "realized_noise_rate")
"""what a finished run's row adds to its tracked run"""


def check_tracking(tracking: TrackingConfig) -> None:
    """Each tracker can be written to: fails before Ray starts, naming the fix."""
    if tracking.mlflow is not None:
        _Mlflow(tracking.mlflow, "raymeta-check", check_only=True)
    if tracking.wandb is not None:
        _wandb_module()
        if tracking.wandb.mode == "online" and not _wandb_logged_in():
            raise ConfigError("tracking.wandb.mode online needs a W&B login (run `wandb login`, or "
                              "set WANDB_API_KEY); or set tracking.wandb.mode: offline and upload "
                              "later with `wandb sync`")


def _mlflow_client(uri: str):
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise ConfigError("tracking.mlflow needs MLflow: pip install 'raymeta[track]' (or "
                          "mlflow-skinny)") from None
    return MlflowClient(tracking_uri=uri)


def _wandb_module():
    try:
        import wandb
    except ImportError:
        raise ConfigError("tracking.wandb needs Weights & Biases: pip install 'raymeta[track]' "
                          "(or wandb)") from None
    return wandb


def _wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import netrc

        hosts = netrc.netrc().hosts
    except (OSError, netrc.NetrcParseError):
        return False
    return any("wandb" in host for host in hosts)


def _uri(uri: str) -> str:
    """A local folder as MLflow takes it (absolute, file:// form)."""
    if "://" in uri or uri.startswith("sqlite:"):
        return uri
    return Path(uri).expanduser().resolve().as_uri()


def _artifacts_beside(uri: str) -> str | None:
    """Artifacts of a local sqlite store go beside its database file: MLflow's default is
    ./mlruns of whatever directory the sweep happens to run from."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or uri[len(prefix):] in ("", ":memory:"):
        return None
    database = Path(uri[len(prefix):].split("?")[0]).expanduser().resolve()
    return (database.parent / "mlruns").as_uri()


class _Mlflow:
    """One MLflow experiment (default: the sweep's name) on a tracking URI."""

    def __init__(self, cfg: MlflowTracking, sweep: str, check_only: bool = False):
        uri = _uri(cfg.uri)
        if uri.startswith("file:"):  # MLflow 3 keeps folders in maintenance mode; asked for here
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        # an unreachable server fails in seconds, not after MLflow's minutes of retries
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.client = _mlflow_client(uri)
        try:
            if check_only:
                self.client.search_experiments(max_results=1)
                return
            name = cfg.experiment or sweep
            found = self.client.get_experiment_by_name(name)
            self.experiment_id = found.experiment_id if found else self.client.create_experiment(
                name, artifact_location=_artifacts_beside(uri))
        except Exception as err:
            text = str(err)
            reason = ("nothing answers there: the connection was refused"
                      if "NewConnectionError" in text or "Connection refused" in text
                      else f"{type(err).__name__}: {text.splitlines()[0][:200]}")
            raise ConfigError(f"tracking.mlflow.uri {cfg.uri!r} cannot be used ({reason}); start "
                              f"the tracking server, or use a local URI such as "
                              f"sqlite:///mlflow.db") from None

    def start(self, name: str, params: dict[str, str], tags: dict[str, str]) -> str:
        from mlflow.entities import Param

        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        items = [Param(k, v[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params a call
            self.client.log_batch(run.info.run_id, params=items[i:i + 100])
        return run.info.run_id

    def log(self, run: str, scalars: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(run, metrics=[Metric(k, v, now, step) for k, v in scalars.items()])

    def finish(self, run: str, outcome: dict[str, float], lists: dict, status: str) -> None:
        if outcome:
            self.log(run, outcome, 0)
        if lists:
            self.client.log_dict(run, lists, "list_metrics.json")
        self.client.set_tag(run, "raymeta.status", status)
        self.client.set_terminated(run, "FINISHED" if status in ENDED else "FAILED")


class _Wandb:
    """W&B runs of one project (default: the sweep's name), grouped by sweep."""

    def __init__(self, cfg: WandbTracking, sweep: str):
        self.wandb, self.cfg, self.sweep = _wandb_module(), cfg, sweep
        self.dir = Path(cfg.dir or ".").expanduser().resolve()  # runs go to <dir>/wandb/
        self.dir.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, params: dict[str, str], tags: dict[str, str]):
        settings = self.wandb.Settings(silent=True, console="off", x_disable_stats=True)
        return self.wandb.init(project=self.cfg.project or self.sweep, entity=self.cfg.entity,
                               mode=self.cfg.mode, dir=str(self.dir), name=name,
                               group=self.sweep, config=params, tags=[self.sweep],
                               notes=json.dumps(tags), reinit="create_new", settings=settings)

    def log(self, run, scalars: dict[str, float], step: int) -> None:
        run.log(scalars, step=step)

    def finish(self, run, outcome: dict[str, float], lists: dict, status: str) -> None:
        run.summary.update({**outcome, "status": status})
        if lists:
            path = Path(run.dir) / "list_metrics.json"
            path.write_text(json.dumps(lists))
            artifact = self.wandb.Artifact(f"list_metrics-{run.id}", type="metrics")
            artifact.add_file(str(path))
            run.log_artifact(artifact)
        run.finish(exit_code=0 if status in ENDED else 1)


class Tracking:
    """The open tracked runs of one sweep, one per results row (trial id), in every tracker."""

    def __init__(self, cfg: TrackingConfig, sweep: str, store: str | None = None):
        self.sweep, self.store = sweep, store
        self.backends = ([_Mlflow(cfg.mlflow, sweep)] if cfg.mlflow else []) + \
                        ([_Wandb(cfg.wandb, sweep)] if cfg.wandb else [])
        self.runs: dict[str, list] = {}  # trial id -> each backend's run
        self.lists: dict[str, dict] = {}  # trial id -> metric -> [[epoch, value], ...]
        self.failed: set[int] = set()  # backends that failed once: skipped from then on

    def _each(self, call, runs: list | None = None) -> list:
        """call(backend, run) for every backend still working. A tracker that fails (a server
        gone, a full disk) is dropped with a warning, never the sweep: the store has every
        result."""
        out = []
        for i, backend in enumerate(self.backends):
            run = runs[i] if runs is not None else None
            if i in self.failed or (runs is not None and run is None):
                out.append(None)
                continue
            try:
                out.append(call(backend, run))
            except Exception as err:
                self.failed.add(i)
                out.append(None)
                print(f"warning: logging to {type(backend).__name__.strip('_')} failed "
                      f"({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}); "
                      f"it is skipped from now on; the results store has every row",
                      file=sys.stderr, flush=True)
        return out

    def epoch(self, trial_id: str, experiment: dict | None, metrics: dict) -> None:
        """One epoch of a run (started with its config at its first epoch)."""
        if trial_id not in self.runs:
            params = {k: json.dumps(v) if not isinstance(v, str) else v
                      for k, v in flatten(experiment or {}).items()}
            tags = {"raymeta.sweep": self.sweep, "raymeta.trial_id": trial_id}
            self.runs[trial_id] = self._each(lambda b, _: b.start(trial_id, params, tags))
            self.lists[trial_id] = {}
        step = int(metrics.get("epoch", 0))
        scalars = {k: float(v) for k, v in metrics.items() if _scalar(v) and k != "epoch"}
        for key, value in metrics.items():
            if isinstance(value, (list, tuple)):
                self.lists[trial_id].setdefault(key, []).append([step, value])
        self._each(lambda b, run: b.log(run, scalars, step), self.runs[trial_id])

    def finish(self, trial_id: str, row: dict | None = None, status: str | None = None) -> None:
        """End a run: its row's outcomes (read from the store when not given) and status."""
        if trial_id not in self.runs:
            return
        if row is None and self.store is not None:
            row = read_row(self.store, self.sweep, trial_id)
        row = row or {}
        status = row.get("status") or status or "failed"
        outcome = {k: float(row[k]) for k in OUTCOMES if _scalar(row.get(k))}
        lists = self.lists.pop(trial_id, {})
        self._each(lambda b, run: b.finish(run, outcome, lists, status), self.runs.pop(trial_id))

    def replay(self, trial_id: str) -> None:
        """Log a finished run from its rows in the store (a run whose epochs reached no hook
        here: Ray Train's workers)."""
        row = read_row(self.store, self.sweep, trial_id)
        if row is None:
            return
        experiment = json.loads(row["config_json"])
        from raymeta.results.store import read_run

        for metrics in read_run(self.store, "curves", self.sweep, trial_id):
            self.epoch(trial_id, experiment, metrics)
        self.finish(trial_id, row)

    def close(self, status: str = "failed") -> None:
        """End the runs still open (their rows say how they ended, when there are rows)."""
        for trial_id in list(self.runs):
            self.finish(trial_id, status=status)


def _scalar(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(float(value)))


def read_row(store: str, sweep: str, trial_id: str) -> dict | None:
    from raymeta.results.store import read_run

    rows = read_run(store, "trials", sweep, trial_id)
    return rows[0] if rows else None


class SweepCells:
    """The cells of a sweep's Tune trial (a cell, a pack of seeds, a chain): trial id ->
    experiment config."""

    def __call__(self, trial) -> dict[str, dict]:
        from raymeta.orchestrate.sweep import cells_of

        found = {}
        for link in cells_of(trial.config["cell"]):
            for cell in cells_of(link):
                found[cell["trial_id"]] = cell["experiment"]
        return found


def tune_callback(cfg: TrackingConfig, sweep: str, store: str, cells=None):
    """The driver-side Tune callback that logs every trial's cells (`cells(trial)`: trial id
    -> experiment config; default: a sweep's `SweepCells`)."""
    import ray.tune

    cells = cells or SweepCells()

    class TrackTrials(ray.tune.Callback):
        def __init__(self):
            self.tracking: Tracking | None = None

        def __getstate__(self) -> dict:  # the experiment state pickles callbacks: no clients
            return {}

        def __setstate__(self, state: dict) -> None:
            self.tracking = None

        def _open(self) -> Tracking:
            if self.tracking is None:
                self.tracking = Tracking(cfg, sweep, store)
            return self.tracking

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if "train_loss" not in result and "per_seed" not in result:
                return  # no epoch: rows found in the store, or a search's closing score
            known = cells(trial)
            if "per_seed" in result:
                parts = list(result["per_seed"].items())
            else:
                parts = [(result.get("cell") or next(iter(known)), result)]
            tracking = self._open()
            for trial_id, metrics in parts:
                tracking.epoch(trial_id, known.get(trial_id), metrics)

        def _end(self, trial) -> None:
            """Every run of the trial ends with it: a chain's rows are all written by then."""
            if self.tracking is not None:
                for trial_id in cells(trial):
                    self.tracking.finish(trial_id)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._end(trial)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._end(trial)

        def on_experiment_end(self, trials, **info):
            if self.tracking is not None:
                self.tracking.close()

    return TrackTrials()

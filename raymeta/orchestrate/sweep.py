"""Run a sweep with Ray Tune: one trial per grid cell, on a local Ray or a running cluster.

A one-worker trial is a plain Tune function trainable (ray-notes 1.5b: no Train controller
for a one-process trial) that runs the Trainer, reports every epoch with a checkpoint, and
writes its Parquet rows at the end. A trial with `workers_per_trial > 1` is a Tune function
trainable that builds a Ray Train TorchTrainer (the Train V2 pattern, ray-notes 1.2) whose
rank-0 metrics are forwarded to Tune; Tune does not see Train's workers, so the number of
concurrent trials is set from the cluster's resources.

With `resources.seeds_per_trial: K`, cells that differ only in their seed train K at a time
in one Tune trial (`raymeta.train.packed`), which writes each seed's rows.

Optional early stopping (`early_stopping.scheduler: asha`) ranks trials on a meta-set or
training metric per epoch; a stopped trial's rows are written from its last checkpoint.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import polars as pl
import pyarrow.fs as pafs

from raymeta import plugins
from raymeta.config import EarlyStoppingConfig, ExperimentConfig, ResourcesConfig, SweepSpec
from raymeta.errors import ConfigError, DataError, StorageError, is_storage_failure
from raymeta.orchestrate.grid import Cell, pack_cells
from raymeta.orchestrate.owner import own_sweep
from raymeta.orchestrate.runtime import capacity, check_capacity, start_ray
from raymeta.orchestrate.trial import run_packed_trial, run_trial, trial_row, write_failed_rows
from raymeta.results.store import (FINISHED, completed_digest, completed_digests, display_store,
                                   filesystem, read_json, read_run, record_unwritten, redact,
                                   resolve_store, storage_error, store_join, write_bytes,
                                   write_json, write_trial)
from raymeta.threads import use_threads
from raymeta.train.packed import pack_digest
from raymeta.train.checkpoint import CHECKPOINT_FILE, check_checkpoint, load_state_bytes
from raymeta.train.trainer import curve_outcome

DRIVER_CPUS = 0.01
"""what the Tune trial of a multi-worker run reserves itself (out of cpus_per_trial; the
workers share the rest): it only waits on its workers"""


class ChainFailed(RuntimeError):
    """Cells of a chain (resources.cells_per_trial) failed; the others trained."""

    def __init__(self, failed: list[tuple[str, str]], total: int):
        self.failed, self.total = failed, total
        super().__init__(f"{len(failed)} of the {total} cells of this trial failed: "
                         + "; ".join(f"{trial_id}: {error}" for trial_id, error in failed))

    def __reduce__(self):  # Tune pickles it to the driver
        return ChainFailed, (self.failed, self.total)


def cells_of(cell: dict) -> list[dict]:
    """The cells a Tune trial holds: a pack's seeds, a chain's cells, or the one cell."""
    return cell.get("pack") or cell.get("chain") or [cell]


def _tune_trial(config: dict) -> None:
    """The Tune trainable: train one cell (or, packed, several seeds of one setting; or,
    chained, several cells one after another), report each epoch, write the rows. Each
    checkpoint lives at a path of its own in the store (`TrialCheckpoint`), so a restarted or
    resumed trial continues from its last epoch whatever Tune's own state says."""
    import ray.tune

    plugins.restore(config.get("plugins"))  # the plugin methods the driver resolved
    cell = config["cell"]
    if "chain" not in cell:
        if not _train_cell(config, cell):
            ray.tune.report({ALREADY_DONE: True})
        return
    failed, trained = [], 0
    finished = (None if config.get("rerun") else  # one look at the store for the whole chain
                completed_digests(config["store"], config["sweep"], [c["trial_id"] for c in cell["chain"]]))
    # each cell's rows are written on a thread while the next cell trains
    with _RowWriter() as writer:
        for link in cell["chain"]:
            failed += writer.settle()
            try:
                if _train_cell(config, link, finished, write=writer.later(link["trial_id"]),
                               started=writer.release):
                    trained += 1
                    continue  # its rows wait until the next cell trains
            except Exception as err:  # its failed row is written; the next cells still train
                if is_storage_failure(err):  # the store refuses writes: every later cell would too
                    raise writer.refusal(err) from err
                failed.append((link["trial_id"], f"{type(err).__name__}: {err}"))
            writer.release()  # a cell that was done already, or failed, may not have started
        failed += writer.settle(wait=True)
    if failed:
        raise ChainFailed(failed, len(cell["chain"]))
    if not trained:
        ray.tune.report({ALREADY_DONE: True})


class _RowWriter:
    """Writes the finished rows of a chain's cells on one thread while the next cell trains
    (on a busy machine a write that waits for the disk can cost a cell's slot several ms).
    `settle` takes in the writes that have ended and gives the (trial id, error) of those that
    failed; when the store refused one, it raises one StorageError naming every cell whose
    rows the store refused, once the writes still running have ended."""

    def __init__(self):
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="raymeta-rows")
        self.writes: list[tuple[str, Future]] = []
        self.held: list[tuple[str, Callable]] = []

    def __enter__(self) -> _RowWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.pool.shutdown(wait=True)

    def later(self, trial_id: str) -> Callable:
        """`run_trial`'s write: held until the next cell has started (`release`), then run on
        the thread. Written while the cell before it is being set up, a row takes the GIL that
        the setup needs (for up to the 5 ms switch interval at a time): the slot idled."""
        return lambda finish: self.held.append((trial_id, finish))

    def release(self) -> None:
        """Start the held writes: the next cell has been set up and trains."""
        held, self.held = self.held, []
        self.writes += [(t, self.pool.submit(finish)) for t, finish in held]

    def settle(self, wait: bool = False) -> list[tuple[str, str]]:
        if wait:
            self.release()
        ended = [(t, f) for t, f in self.writes if wait or f.done()]
        self.writes = [w for w in self.writes if w not in ended]
        errors = [(t, e) for t, f in ended if (e := f.exception()) is not None]
        if refused := [e for _, e in errors if is_storage_failure(e)]:
            raise self.refusal(*refused)
        return [(t, f"{type(e).__name__}: {e}") for t, e in errors]

    def refusal(self, *errors: BaseException) -> StorageError:
        """One StorageError for the store's refusals: these, and those of the writes still
        running (waited for)."""
        self.release()
        running, self.writes = self.writes, []
        errors += tuple(e for _, f in running if (e := f.exception()) is not None
                        and is_storage_failure(e))
        first = errors[0]
        return StorageError(str(first), store=getattr(first, "store", ""),
                            unwritten=tuple(u for e in errors for u in getattr(e, "unwritten", ())))


def _train_cell(config: dict, cell: dict, finished: dict[str, str | None] | None = None,
                write: Callable | None = None, started: Callable | None = None,
                on_report: Callable[[dict], dict | None] | None = None) -> bool:
    """Train one cell or pack of seeds; False when its finished rows were already in the store
    (`finished`: their digests, when the caller has looked them up already). `write`: how a
    single cell's finished rows are written (`run_trial`'s); `started`: called once it trains;
    `on_report`: gives what Tune is told of each epoch's metrics (None: nothing). Columns in
    `config["row_extra"]` are added to the rows."""
    import ray
    import ray.tune

    pack = cell.get("pack", [cell])
    cfgs = [ExperimentConfig.model_validate(c["experiment"]) for c in pack]
    trial_ids = [c["trial_id"] for c in pack]
    resources = ResourcesConfig.model_validate(config["resources"])
    if not config.get("rerun"):
        if finished is None:
            finished = completed_digests(config["store"], config["sweep"], trial_ids)
        if all(finished.get(i) == c.digest() for i, c in zip(trial_ids, cfgs)):
            return False  # it finished before the sweep was interrupted: its rows are in the store
    if resources.workers_per_trial > 1:
        from ray.tune.integration.ray_train import TuneReportCallback

        from raymeta.orchestrate.distributed import fit_distributed

        fit_distributed(cfgs[0], resources, store=config["store"], sweep=config["sweep"],
                        trial_id=trial_ids[0], callbacks=[TuneReportCallback()],
                        driver_cpus=DRIVER_CPUS,
                        extra={**config.get("row_extra", {}),
                               "tune_trial_id": ray.tune.get_context().get_trial_id()})
        return True
    use_threads(cap=resources.cpus_per_trial)  # Ray's OMP_NUM_THREADS, less what is busy
    checkpoint = TrialCheckpoint(config["store"], config["sweep"], cell["trial_id"])
    digest = pack_digest(cfgs) if "pack" in cell else cfgs[0].digest()

    def report(metrics: dict | list[dict], trainer) -> None:
        if isinstance(metrics, list):  # packed seeds: Tune sees the mean of their metrics
            numeric = [k for k, v in metrics[0].items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)]
            per_seed = dict(zip(trial_ids, metrics))  # each seed's run, for trackers
            metrics = {k: sum(m[k] for m in metrics) / len(metrics) for k in numeric}
            metrics["per_seed"] = per_seed
        else:
            metrics = {**metrics, "cell": cell["trial_id"]}  # which cell of a chain, for trackers
        checkpoint.push()
        if on_report is not None and (metrics := on_report(metrics)) is None:
            return
        ray.tune.report(metrics)

    # a local store is written in place; an object store's checkpoint goes through a local copy
    with nullcontext() if checkpoint.in_place else tempfile.TemporaryDirectory() as scratch:
        folder = checkpoint.folder(scratch)
        extra = {**config.get("row_extra", {}), "tune_trial_id": ray.tune.get_context().get_trial_id(),
                 "ray_node_id": ray.get_runtime_context().get_node_id()}
        try:
            resume_from = None if config.get("rerun") else checkpoint.fetch(scratch, digest)
        except DataError as err:  # a planted or damaged file: the rows say so, nothing trains
            write_failed_rows(config["store"], config["sweep"],
                              [(trial_id, trial_row(cfg, config["sweep"], extra), [])
                               for trial_id, cfg in zip(trial_ids, cfgs)], err)
            raise
        where = {"store": config["store"], "sweep": config["sweep"], "on_epoch_end": report,
                 "checkpoint_dir": folder, "resume_from": resume_from, "extra": extra}
        if "pack" in cell:
            run_packed_trial(cfgs, trial_ids, **where)
        else:
            run_trial(cfgs[0], trial_id=trial_ids[0], write=write, started=started, **where)
    return True


ALREADY_DONE = "already_completed"
"""what a trial reports when its rows were in the store before it started"""


class TrialCheckpoint:
    """A trial's checkpoint at a stable path of its own in the store,
    `<store>/checkpoints/sweep=<name>/<trial id>/checkpoint.pt`, rewritten each epoch: a
    resume never meets a checkpoint that Tune deleted or never registered. The Trainer writes
    it in place in a local store; for an object store it writes a local copy that each
    epoch uploads."""

    def __init__(self, store: str, sweep: str, trial_id: str):
        self.fs, base = filesystem(store_join(store, "checkpoints", f"sweep={sweep}", trial_id))
        self.store = store
        self.file = f"{base}/{CHECKPOINT_FILE}"
        self.in_place = isinstance(self.fs, pafs.LocalFileSystem)
        self.scratch: str | None = None

    def folder(self, scratch: str | None) -> str:
        """Where the Trainer writes the checkpoint (`scratch`: a local folder, for an object
        store)."""
        self.scratch = None if self.in_place else scratch
        return self.file.rsplit("/", 1)[0] if self.in_place else scratch

    def fetch(self, scratch: str | None, digest: str) -> str | None:
        """The folder to resume from, or None: no checkpoint yet, or one of another config."""
        if self.fs.get_file_info(self.file).type != pafs.FileType.File:
            return None
        folder = self.file.rsplit("/", 1)[0]
        if not self.in_place:
            pafs.copy_files(self.file, f"{scratch}/{CHECKPOINT_FILE}", source_filesystem=self.fs,
                            destination_filesystem=pafs.LocalFileSystem())
            folder = scratch
        try:
            check_checkpoint(folder, digest)
        except (ConfigError, OSError, RuntimeError) as err:
            print(f"not resuming from {self.file} ({err}); training from epoch 0", file=sys.stderr)
            return None
        return folder

    def push(self) -> None:
        """After the Trainer saved an epoch: upload it (object stores), all or nothing (read
        whole, then one upload: pyarrow's copy would publish a partial object if reading
        failed mid-way). A store that refuses it for good raises StorageError."""
        local = f"{self.scratch}/{CHECKPOINT_FILE}"
        if self.scratch is not None and os.path.exists(local):
            with open(local, "rb") as source:
                payload = source.read()
            try:
                write_bytes(self.fs, self.file, payload)
            except OSError as err:
                if (failure := storage_error(err, self.store, f"the checkpoint {self.file}")):
                    raise failure from err
                raise

    def state(self) -> dict | None:
        """The Trainer state of the last saved epoch, or None."""
        try:
            with self.fs.open_input_file(self.file) as source:
                return load_state_bytes(source.read())
        except (FileNotFoundError, OSError):
            return None


def _progress_callback(total: int, early_stopping: bool):
    """`total`: the sweep's cells. Counts are of cells, so a pack of seeds or a chain of
    cells (one Tune trial) counts as the cells it holds, as the final summary does."""
    import ray.tune
    from ray.tune.experiment import Trial

    total_cells = total

    def size(trial) -> int:
        return len(cells_of(trial.config["cell"]))

    class Progress(ray.tune.Callback):
        """Instead of Tune's tables: one live line on a terminal (rewritten in place; failures
        keep their own line), one line per finished trial in a log file. Counts come from
        Tune's trial list, so a resumed sweep counts what finished before it."""

        def __init__(self):
            self.setup()

        def __getstate__(self) -> dict:
            return {}

        def __setstate__(self, state: dict) -> None:
            """Tuner.restore brings back this object as it was pickled with the experiment,
            and calls no setup: a resumed sweep counts afresh (its own clock, the trials Tune
            restores as finished)."""
            self.setup()

        def setup(self, **info):
            self.finished: dict[str, int] = {}  # Tune trial id -> its cells
            self.failed = self.trained = 0
            self.seen_restored = False
            self.started = time.monotonic()

        def on_step_begin(self, iteration, trials, **info):
            if not self.seen_restored:  # trials a resumed sweep restores as already finished
                self.seen_restored = True
                self.finished.update({t.trial_id: size(t) for t in trials
                                      if t.status in (Trial.TERMINATED, Trial.ERROR)})
                self.failed += sum(size(t) for t in trials if t.status == Trial.ERROR)

        def _line(self, trials, trial, text: str, keep: bool = False) -> None:
            self.finished[trial.trial_id] = size(trial)
            # Tune creates trials as slots free up: its list is not the whole sweep yet
            total = max(total_cells, sum(size(t) for t in trials))
            finished = sum(self.finished.values())
            running = sum(size(t) for t in trials
                          if t.status == Trial.RUNNING and t.trial_id not in self.finished)
            elapsed = time.monotonic() - self.started
            # the ETA of the cells that trained here (not of those found done in the store)
            eta = f", eta {elapsed / self.trained * (total - finished):.0f}s" if self.trained else ""
            line = (f"[{finished}/{total} done, {running} running, {self.failed} failed, "
                    f"{total - finished - running} pending; {elapsed:.0f}s{eta}] "
                    f"{trial.config['cell']['trial_id']}: {text}")
            if sys.stdout.isatty() and not keep:
                width = shutil.get_terminal_size().columns - 1
                end = "\n" if finished == total else ""
                print(f"\r{line[:width]:<{width}}", end=end, flush=True)
            else:
                print(("\n" if sys.stdout.isatty() else "") + line, flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            result = trial.last_result or {}
            epochs = trial.config["cell"]["experiment"]["train"]["epochs"]
            if result.get(ALREADY_DONE) or "test_acc" not in result:
                text = "already completed (rows in the store)"
            else:
                self.trained += size(trial)
                if early_stopping and result.get("epoch", epochs - 1) < epochs - 1:
                    text = (f"stopped early after epoch {result['epoch']} "
                            f"(meta_acc {result['meta_acc']:.4f})")
                else:
                    text = f"test_acc {result['test_acc']:.4f}"
                    if "pack" in trial.config["cell"]:
                        text += f" (mean of its {len(trial.config['cell']['pack'])} seeds)"
                    elif "chain" in trial.config["cell"]:
                        text += f" (the last of its {len(trial.config['cell']['chain'])} cells)"
            self._line(trials, trial, text)

        def on_trial_error(self, iteration, trials, trial, **info):
            exc = _trial_exception(trial)  # a chain names the cells that failed
            self.failed += len(exc.failed) if isinstance(exc, ChainFailed) else size(trial)
            self.trained += size(trial)
            self._line(trials, trial, "FAILED (see `raymeta results failed`)", keep=True)

    return Progress()


def _stopped_rows_callback(store: str, sweep: str, resources: ResourcesConfig,
                           cell_of: Callable | None = None, extra: Callable | None = None):
    """Early stopping ends a trial between two epochs, inside Tune: its own code never gets
    to write rows. This driver-side callback writes them from the trial's last checkpoint,
    with status `stopped` (summaries count completed trials only). `cell_of(trial)`: the
    trial's cell, {trial_id, experiment} (default: a sweep's, in its config); `extra(trial)`:
    columns its row adds."""
    import ray.tune

    class StoppedRows(ray.tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            cell = cell_of(trial) if cell_of is not None else trial.config["cell"]
            cfg = ExperimentConfig.model_validate(cell["experiment"])
            if completed_digest(store, sweep, cell["trial_id"]) == cfg.digest():
                return  # it ran to the end and wrote its rows
            state = _last_checkpoint_state(trial, store, sweep, cell["trial_id"], resources)
            if state is None:
                return
            curves = state["curves"]
            added = extra(trial) if extra is not None else {}
            row = {**trial_row(cfg, sweep, {**added, "tune_trial_id": trial.trial_id}),
                   **curve_outcome(curves), "status": "stopped",
                   "error": f"stopped early (ASHA) after epoch {len(curves) - 1}",
                   "train_seconds": state["train_seconds"], "restarts": state.get("restarts", 0),
                   "world_size": resources.workers_per_trial}
            try:
                write_trial(store, sweep, cell["trial_id"], row, curves)
            except StorageError as err:  # the store refuses writes: the sweep stops
                from raymeta.orchestrate import sweep as driver

                driver._storage_failed(cell["trial_id"], err,
                                       [(sweep, cell["trial_id"], row["error"])])

    return StoppedRows()


_SEEN: dict = {}
"""What this driver's sweep met (reset by each run): `storage`, the first storage error's
text; `unwritten`, (sweep, trial id, error) named by StorageErrors; `errored`, the cells of
each errored Tune trial (ids, error text, Tune trial id). Read through this module by the
callbacks below, which Tuner.restore brings back by value from the pickled experiment."""


def _reset_seen() -> None:
    _SEEN.clear()
    _SEEN.update(storage=None, unwritten=[], errored={})


def _storage_failed(name: str, err: BaseException, unwritten=()) -> None:
    """A storage error ended trial `name`: the sweep stops (StorageStop) at the next step."""
    _SEEN.setdefault("unwritten", []).extend(tuple(u) for u in unwritten)
    if _SEEN.get("storage") is None:
        _SEEN["storage"] = str(err) if isinstance(err, StorageError) else f"{type(err).__name__}: {err}"
        print(f"{name}: the store refuses writes ({_SEEN['storage']}); stopping the sweep, no "
              f"further trial starts", file=sys.stderr, flush=True)


def _trial_exception(trial) -> BaseException | None:
    """The exception a failed Tune trial raised, from the file Tune pickled it to on this
    machine (Tune's copy in the store may be the thing that could not be written)."""
    import cloudpickle

    try:
        with open(trial.pickled_error_file, "rb") as source:
            exc = cloudpickle.load(source)
    except Exception:  # no file, an empty or foreign one
        try:
            with open(trial.error_file()) as source:
                text = source.read().strip().splitlines()
            return RuntimeError(text[-1]) if text else None
        except Exception:
            return None
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


def _note_trial_error(trial) -> None:
    """Driver side of a failed trial: which cells it held and why; a storage error stops the
    sweep."""
    cell = trial.config["cell"]
    exc = _trial_exception(trial)
    if isinstance(exc, ChainFailed):
        ids = [trial_id for trial_id, _ in exc.failed]
    elif "chain" in cell and isinstance(exc, StorageError) and exc.unwritten:
        ids = [trial_id for _, trial_id, _ in exc.unwritten]  # the chain's later cells never started
    else:
        ids = [c["trial_id"] for c in cells_of(cell)]
    text = "" if exc is None else (str(exc) if isinstance(exc, StorageError)
                                   else f"{type(exc).__name__}: {exc}")
    _SEEN.setdefault("errored", {})[cell["trial_id"]] = (ids, text, trial.trial_id)
    if exc is not None and is_storage_failure(exc):
        _storage_failed(cell["trial_id"], exc, getattr(exc, "unwritten", ()))


def _storage_watch() -> list:
    """The callback that notes each failed trial (`_note_trial_error`), and the stopper that
    ends the sweep after a storage error: every later trial would fail the same way."""
    import ray.tune

    class StorageWatch(ray.tune.Callback):
        def on_trial_error(self, iteration, trials, trial, **info):
            from raymeta.orchestrate import sweep as driver

            driver._note_trial_error(trial)

    class StorageStop(ray.tune.Stopper):
        def __call__(self, trial_id, result) -> bool:
            return False

        def stop_all(self) -> bool:
            from raymeta.orchestrate import sweep as driver

            return driver._SEEN.get("storage") is not None

    return [StorageWatch(), StorageStop()]


def _row_written(store: str, sweep: str, trial_id: str, tune_trial_id: str | None) -> bool:
    """The store holds a row of this trial written by this Tune trial (a row of an earlier
    run does not count); a store that cannot be read counts as no row."""
    try:
        row = read_run(store, "trials", sweep, trial_id)
    except Exception:  # beyond the missing or unreadable file read_run gives as no rows
        return False
    return bool(row) and (tune_trial_id is None or row[0].get("tune_trial_id") in (None, tune_trial_id))


def _unwritten(store: str, sweep: str, grid) -> list[tuple[str, str, str]]:
    """(sweep, trial id, error) of each failed trial of this run whose row is not in the
    store: named by a StorageError, or found missing after its Tune trial errored (a row that
    could not be written, a worker killed before it wrote one)."""
    found = {(s, t): e for s, t, e in _SEEN.get("unwritten", [])}
    errored = dict(_SEEN.get("errored", {}))
    for result in grid or []:
        if result.error is not None:
            cell = result.config["cell"]
            ids = [c["trial_id"] for c in cells_of(cell)]
            exc = getattr(result.error, "cause", None) or result.error
            errored.setdefault(cell["trial_id"], (ids, f"{type(exc).__name__}: {exc}", None))
    for ids, text, tune_id in errored.values():
        for trial_id in ids:
            if (sweep, trial_id) not in found and not _row_written(store, sweep, trial_id, tune_id):
                found[(sweep, trial_id)] = text or "the trial failed (no error recorded)"
    return [(s, t, e) for (s, t), e in found.items()]


def _last_checkpoint_state(trial, store, sweep, trial_id, resources) -> dict | None:
    """The Trainer state in a trial's latest checkpoint: its own (one-worker trials) or Ray
    Train's (multi-worker trials)."""
    if resources.workers_per_trial == 1:
        return TrialCheckpoint(store, sweep, trial_id).state()
    from raymeta.orchestrate.distributed import train_storage
    from raymeta.results.store import list_folder

    fs, base = filesystem(store_join(train_storage(store, sweep), trial_id))
    infos = list_folder(fs, base)
    epochs = sorted(i.path for i in infos if i.base_name.startswith("epoch="))
    if not epochs:
        return None
    with fs.open_input_file(f"{epochs[-1]}/{CHECKPOINT_FILE}") as source:
        return load_state_bytes(source.read())


def _trial_name(trial) -> str:
    return trial.config["cell"]["trial_id"]


def _tune_cell(group: list[Cell]) -> dict:
    """What one Tune trial trains: a cell, or (packed seeds) several cells named after the first."""
    cells = [{"trial_id": c.trial_id, "experiment": c.config.model_dump(mode="json")} for c in group]
    if len(cells) == 1:
        return cells[0]
    return {**cells[0], "trial_id": f"{cells[0]['trial_id']}-pack{len(cells)}", "pack": cells}


def _tune_trials(cells: list[Cell], resources: ResourcesConfig) -> list[dict]:
    """The sweep's Tune trials: its cells one per trial, packed (seeds_per_trial) or chained
    (cells_per_trial: consecutive cells, named after the first)."""
    groups = pack_cells(cells, resources.seeds_per_trial)
    n = resources.cells_per_trial
    if n == 1:
        return [_tune_cell(group) for group in groups]
    chains = [[_tune_cell(group) for group in groups[i:i + n]] for i in range(0, len(groups), n)]
    return [chain[0] if len(chain) == 1 else
            {**chain[0], "trial_id": f"{chain[0]['trial_id']}-chain{len(chain)}", "chain": chain}
            for chain in chains]


def max_concurrent(resources: ResourcesConfig) -> int | None:
    """The sweep's concurrency limit: the user's, or for multi-worker trials (whose workers
    Tune cannot see) as many trials as the cluster's CPUs and GPUs hold."""
    if resources.workers_per_trial == 1:
        return resources.max_concurrent_trials
    have, _ = capacity()
    fits = [have["CPU"] // resources.cpus_per_trial]
    if resources.gpus_per_trial:
        fits.append(have["GPU"] // resources.gpus_per_trial)
    limit = max(1, int(min(fits)))
    return min(limit, resources.max_concurrent_trials or limit)


@dataclass
class SweepRun:
    failed: int
    """failed cells (a failed pack of seeds counts each of its seeds)"""
    interrupted: bool
    """SIGINT or SIGTERM stopped the sweep before every trial ran"""
    storage_error: str | None = None
    """the store refused a write for good (disk full, quota, permissions): the sweep stopped"""
    unwritten: list[tuple[str, str, str]] = field(default_factory=list)
    """(sweep, trial id, error) of failed trials whose row is not in the store"""
    cells: list[Cell] | None = None
    """the cells that ran, where they are not the grid's (a search's confirmation runs)"""
    unsearched: list[str] = field(default_factory=list)
    """a search's cells of which no sample finished (nothing to confirm)"""


GRID_FILE = "raymeta-grid.json"
"""beside Tune's experiment state: the cells the sweep was started with, so that a resume of a
sweep file that has changed since does not restore the old grid"""


def _grid_identity(cells: list[Cell], resources: ResourcesConfig) -> dict:
    """What fixes the Tune trials of a sweep: its cells, in order, and how they are packed
    and chained (without grouping them again: packing digests every cell)."""
    return {"cells": [c.trial_id for c in cells], "seeds_per_trial": resources.seeds_per_trial,
            "cells_per_trial": resources.cells_per_trial}


def _save_grid(experiment: str, grid: dict) -> None:
    write_json(store_join(experiment, GRID_FILE), grid)


def _saved_grid(experiment: str) -> dict | None:
    """The grid a sweep was started with (None: unknown, e.g. started by an older version)."""
    return read_json(store_join(experiment, GRID_FILE))


def finished_digests(store: str, sweep: str) -> set[str]:
    """Config digests of the sweep's runs that trained to their end (one listing of the
    store, whatever the trial ids of the rows)."""
    from raymeta.results import query

    try:
        trials = query.load(store, "trials", sweep)
    except ConfigError:  # no rows yet
        return set()
    if "config_digest" not in trials.columns:
        return set()
    done = trials.filter(pl.col("status").is_in(list(FINISHED)))
    return set(done["config_digest"].drop_nulls().to_list())


@contextmanager
def _graceful_stop():
    """SIGINT and SIGTERM end the sweep cleanly: the first stops Tune's loop (through the
    SIGUSR1 handler Tune installs; running trials are stopped, finished rows stay, the
    experiment state is saved for --resume); a second one stops at once."""
    stopped = {"signal": None}

    def handler(signum, frame):
        tune_stops = callable(signal.getsignal(signal.SIGUSR1))  # Tune's loop has started
        if stopped["signal"] is not None or not tune_stops:
            stopped["signal"] = signal.Signals(signum).name
            raise KeyboardInterrupt
        stopped["signal"] = signal.Signals(signum).name
        print(f"\n{stopped['signal']}: stopping the sweep; finished trials keep their rows "
              f"(send it again to stop at once)", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGUSR1)

    main = threading.current_thread() is threading.main_thread()
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)} if main else {}
    for sig in saved:
        signal.signal(sig, handler)
    # Tune's own SIGINT handler would replace ours and print Tuner.restore(...) as the way to
    # continue; `raymeta sweep FILE --resume` is
    previous = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    try:
        with _quiet_tune_results():
            yield stopped
    finally:
        if previous is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = previous
        for sig, old in saved.items():
            signal.signal(sig, old)


@contextmanager
def _quiet_tune_results():
    """After a driver was killed, Tune's results (read when it restores the experiment and
    when it ends) may miss a trial's result.json and warn; the rows in the store, not Tune's
    files, are a sweep's results."""
    quieted = [logging.getLogger(name) for name in
               ("ray.tune.tune", "ray.tune.analysis.experiment_analysis")]
    levels = [log.level for log in quieted]
    for log in quieted:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for log, level in zip(quieted, levels):
            log.setLevel(level)


def run_sweep(spec: SweepSpec, cells: list[Cell], *, address: str | None = None,
              resume: bool = False, rerun: bool = False, source: str | None = None,
              search_cells: list | None = None) -> SweepRun:
    """Run the cells with Ray Tune. Cells whose finished rows (with the same config) are
    already in the store are skipped unless `rerun`. While it runs, the sweep is this
    driver's (`raymeta.orchestrate.owner`): another driver of the same name is refused.
    `source`: the sweep file, named to a driver that is refused. A sweep with a search runs
    it first (`search_cells`: `raymeta.orchestrate.search.plan`'s), then the chosen
    configurations' confirmation runs as its cells."""
    with own_sweep(spec, source):
        if spec.search is None:
            return _run_sweep(spec, cells, address=address, resume=resume, rerun=rerun)
        from raymeta.orchestrate.search import plan, run_search

        found = run_search(spec, search_cells or plan(spec, cells), address=address,
                           resume=resume, rerun=rerun)
        if found.interrupted or not found.confirm:
            return SweepRun(0, found.interrupted, cells=found.confirm, unsearched=found.unsearched)
        # early stopping is the search's: a confirmation run trains to its end
        confirming = spec.model_copy(update={"early_stopping": EarlyStoppingConfig()})
        outcome = _run_sweep(confirming, found.confirm, address=address, resume=resume,
                             rerun=rerun)
        outcome.cells, outcome.unsearched = found.confirm, found.unsearched
        return outcome


def _run_sweep(spec: SweepSpec, cells: list[Cell], *, address: str | None, resume: bool,
               rerun: bool) -> SweepRun:
    import ray.tune

    store = resolve_store(spec.store)
    experiment = store_join(store, "tune", spec.name)
    # a store copied without Tune's state (another machine, fidelity-store/) restores nothing:
    # its finished rows are found by digest, whatever trial ids older versions gave them
    restoring = resume and ray.tune.Tuner.can_restore(experiment)
    grid_ids = _grid_identity(cells, spec.resources)
    if restoring and _saved_grid(experiment) not in (None, grid_ids):
        # Tune would restore the grid it saved, and silently skip the cells added since
        print("the sweep's cells changed since it was interrupted: starting it afresh (finished "
              "trials are skipped, interrupted ones continue from their last epoch)",
              file=sys.stderr, flush=True)
        restoring = False
    if not rerun and not restoring:
        done = finished_digests(store, spec.name)
        todo = [c for c in cells if c.config.digest() not in done]
        if len(todo) < len(cells):
            print(f"{len(cells) - len(todo)} of {len(cells)} trials already have finished rows "
                  f"in {display_store(store)}; skipping them (--rerun trains them again)",
                  flush=True)
        cells = todo
        if not cells:
            return SweepRun(0, False)
    storage_path = store_join(store, "tune")
    if not address:
        check_capacity(spec.resources, f"sweep '{spec.name}'")
    start_ray(address)
    if spec.resources.workers_per_trial > 1:  # the workers reserve the resources, not the trial
        resources = {"cpu": DRIVER_CPUS}
    else:
        resources = {"cpu": spec.resources.cpus_per_trial, "gpu": spec.resources.gpus_per_trial}
    trainable = ray.tune.with_resources(_tune_trial, resources)
    trials = _tune_trials(cells, spec.resources)
    _reset_seen()
    watch, stopper = _storage_watch()
    callbacks = [_progress_callback(len(cells), spec.early_stopping.scheduler != "none"), watch]
    scheduler = None
    stopping = spec.early_stopping
    if stopping.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        # our own epoch counter, not training_iteration, which restarts after a restore
        scheduler = ASHAScheduler(time_attr="epoch", metric=stopping.metric, mode=stopping.mode,
                                  max_t=max(c.config.train.epochs for c in cells),
                                  grace_period=stopping.grace_period,
                                  reduction_factor=stopping.reduction_factor)
        callbacks.append(_stopped_rows_callback(store, spec.name, spec.resources))
    if spec.tracking.enabled:
        from raymeta.tracking import tune_callback

        callbacks.append(tune_callback(spec.tracking, spec.name, store))  # after the rows' writers
    if restoring:
        with _quiet_tune_results():
            tuner = ray.tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True,
                                           resume_errored=True)
    else:
        if resume:
            print(f"nothing to resume at {display_store(experiment)}; starting the sweep",
                  file=sys.stderr)
        param_space = {"store": store, "sweep": spec.name, "rerun": rerun,
                       "plugins": plugins.resolved(), "resources": spec.resources.model_dump(mode="json"),
                       "cell": ray.tune.grid_search(trials)}
        tuner = ray.tune.Tuner(
            trainable, param_space=param_space,
            tune_config=ray.tune.TuneConfig(
                max_concurrent_trials=max_concurrent(spec.resources), scheduler=scheduler,
                reuse_actors=True,  # skips a process start and a torch import per trial
                trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
            # no Tune checkpoints: each trial keeps its own at a stable path (TrialCheckpoint)
            run_config=ray.tune.RunConfig(
                name=spec.name, storage_path=storage_path, verbose=0, callbacks=callbacks,
                stop=stopper, failure_config=ray.tune.FailureConfig(max_failures=0)))
    if not restoring:
        _save_grid(experiment, grid_ids)
    grid = None
    try:
        with _graceful_stop() as stopped:
            grid = tuner.fit()
    except Exception as err:  # Tune's own files in a store that refuses writes
        if _SEEN["storage"] is None and not is_storage_failure(err):
            raise
        _SEEN["storage"] = _SEEN["storage"] or f"{type(err).__name__}: {redact(str(err), store)}"
    unwritten = _unwritten(store, spec.name, grid)
    shown = display_store(store)
    for _, trial_id, error in unwritten:
        print(f"trial {trial_id} failed and its row could not be written to {shown}: "
              f"{redact(error, store)}", file=sys.stderr, flush=True)
    if (record := record_unwritten(store, unwritten)) is not None:
        print(f"(noted in {record}; the next run on this store reports them again until they "
              f"have rows)", file=sys.stderr)
    # a failed pack of seeds is one Tune trial but a failed row per seed; a chain, one per
    # failed cell (noted when Tune reported the error)
    errored = _SEEN["errored"]
    if grid is not None:
        failed = sum(len(errored[cell["trial_id"]][0]) if cell["trial_id"] in errored
                     else len(cells_of(cell))
                     for cell in (result.config["cell"] for result in grid if result.error))
    else:
        failed = sum(len(ids) for ids, _, _ in errored.values())
    return SweepRun(failed, stopped["signal"] is not None, storage_error=_SEEN["storage"],
                    unwritten=unwritten)


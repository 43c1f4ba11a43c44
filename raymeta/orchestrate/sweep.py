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

import io
import shutil
import sys
import tempfile
import time

from raymeta.config import ExperimentConfig, ResourcesConfig, SweepSpec
from raymeta.orchestrate.grid import Cell, pack_cells
from raymeta.orchestrate.runtime import capacity, check_capacity, start_ray
from raymeta.orchestrate.trial import run_packed_trial, run_trial, trial_row
from raymeta.results.store import completed_digest, resolve_store, store_join, write_trial
from raymeta.train.trainer import curve_outcome

DRIVER_CPUS = 0.01
"""what the Tune trial of a multi-worker run reserves itself (out of cpus_per_trial; the
workers share the rest): it only waits on its workers"""


def _tune_trial(config: dict) -> None:
    """The Tune trainable: train one cell (or, packed, several seeds of one setting), report
    each epoch, write the rows."""
    import ray
    import ray.tune

    cell = config["cell"]
    pack = cell.get("pack", [cell])
    cfgs = [ExperimentConfig.model_validate(c["experiment"]) for c in pack]
    trial_ids = [c["trial_id"] for c in pack]
    resources = ResourcesConfig.model_validate(config["resources"])
    if not config.get("rerun") and all(completed_digest(config["store"], config["sweep"], i)
                                       == c.digest() for i, c in zip(trial_ids, cfgs)):
        return  # it finished before the sweep was interrupted: its rows are in the store
    if resources.workers_per_trial > 1:
        from ray.tune.integration.ray_train import TuneReportCallback

        from raymeta.orchestrate.distributed import fit_distributed

        fit_distributed(cfgs[0], resources, store=config["store"], sweep=config["sweep"],
                        trial_id=trial_ids[0], callbacks=[TuneReportCallback()],
                        driver_cpus=DRIVER_CPUS,
                        extra={"tune_trial_id": ray.tune.get_context().get_trial_id()})
        return

    def report(metrics: dict | list[dict], trainer) -> None:
        if isinstance(metrics, list):  # packed seeds: Tune sees the mean of their metrics
            numeric = [k for k, v in metrics[0].items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)]
            metrics = {k: sum(m[k] for m in metrics) / len(metrics) for k in numeric}
        with tempfile.TemporaryDirectory() as folder:
            trainer.save_checkpoint(folder)
            ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint.from_directory(folder))

    def run(resume_from=None) -> None:
        extra = {"tune_trial_id": ray.tune.get_context().get_trial_id(),
                 "ray_node_id": ray.get_runtime_context().get_node_id()}
        where = {"store": config["store"], "sweep": config["sweep"], "on_epoch_end": report,
                 "resume_from": resume_from, "extra": extra}
        if "pack" in cell:
            run_packed_trial(cfgs, trial_ids, **where)
        else:
            run_trial(cfgs[0], trial_id=trial_ids[0], **where)

    checkpoint = ray.tune.get_checkpoint()
    if checkpoint is None:
        run()
    else:  # a restarted trial continues from its last epoch
        with checkpoint.as_directory() as folder:
            run(resume_from=folder)


def _progress_callback(total: int):
    import ray.tune

    class Progress(ray.tune.Callback):
        """Instead of Tune's tables: one live line on a terminal (rewritten in place; failures
        keep their own line), one line per finished trial in a log file."""

        def __init__(self):
            self.done = self.failed = 0
            self.started = time.monotonic()

        def _line(self, trials, trial, text: str, keep: bool = False) -> None:
            finished = self.done + self.failed
            running = sum(t.status == "RUNNING" and t is not trial for t in trials)
            elapsed = time.monotonic() - self.started
            eta = elapsed / finished * (total - finished) if finished else 0.0
            line = (f"[{finished}/{total} done, {running} running, {self.failed} failed, "
                    f"{total - finished - running} pending; {elapsed:.0f}s, eta {eta:.0f}s] "
                    f"{trial.config['cell']['trial_id']}: {text}")
            if sys.stdout.isatty() and not keep:
                width = shutil.get_terminal_size().columns - 1
                end = "\n" if finished == total else ""
                print(f"\r{line[:width]:<{width}}", end=end, flush=True)
            else:
                print(("\n" if sys.stdout.isatty() else "") + line, flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.done += 1
            result = trial.last_result or {}
            epochs = trial.config["cell"]["experiment"]["train"]["epochs"]
            if "test_acc" not in result:
                text = "already completed (rows in the store)"
            elif result.get("epoch", epochs - 1) < epochs - 1:
                text = f"stopped early after epoch {result['epoch']} (meta_acc {result['meta_acc']:.4f})"
            else:
                text = f"test_acc {result['test_acc']:.4f}"
                if "pack" in trial.config["cell"]:
                    text += f" (mean of its {len(trial.config['cell']['pack'])} seeds)"
            self._line(trials, trial, text)

        def on_trial_error(self, iteration, trials, trial, **info):
            self.failed += 1
            self._line(trials, trial, "FAILED (see `raymeta results failed`)", keep=True)

    return Progress()


def _stopped_rows_callback(store: str, sweep: str, resources: ResourcesConfig):
    """Early stopping ends a trial between two epochs, inside Tune: its own code never gets
    to write rows. This driver-side callback writes them from the trial's last checkpoint,
    with status `stopped` (summaries count completed trials only)."""
    import ray.tune

    class StoppedRows(ray.tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            cell = trial.config["cell"]
            cfg = ExperimentConfig.model_validate(cell["experiment"])
            if completed_digest(store, sweep, cell["trial_id"]) == cfg.digest():
                return  # it ran to the end and wrote its rows
            state = _last_checkpoint_state(trial, store, sweep, cell["trial_id"], resources)
            if state is None:
                return
            curves = state["curves"]
            row = {**trial_row(cfg, sweep, {"tune_trial_id": trial.trial_id}),
                   **curve_outcome(curves), "status": "stopped",
                   "error": f"stopped early (ASHA) after epoch {len(curves) - 1}",
                   "train_seconds": state["train_seconds"], "restarts": state.get("restarts", 0),
                   "world_size": resources.workers_per_trial}
            write_trial(store, sweep, cell["trial_id"], row, curves)

    return StoppedRows()


def _last_checkpoint_state(trial, store, sweep, trial_id, resources) -> dict | None:
    """The Trainer state in a trial's latest checkpoint: Tune's (one-worker trials) or Ray
    Train's (multi-worker trials)."""
    import torch

    from raymeta.train.trainer import CHECKPOINT_FILE

    if resources.workers_per_trial == 1:
        if trial.checkpoint is None:
            return None
        with trial.checkpoint.as_directory() as folder:
            return torch.load(f"{folder}/{CHECKPOINT_FILE}", weights_only=False)
    from raymeta.orchestrate.distributed import train_storage
    from raymeta.results.store import filesystem, list_folder

    fs, base = filesystem(store_join(train_storage(store, sweep), trial_id))
    infos = list_folder(fs, base)
    epochs = sorted(i.path for i in infos if i.base_name.startswith("epoch="))
    if not epochs:
        return None
    with fs.open_input_file(f"{epochs[-1]}/{CHECKPOINT_FILE}") as source:
        return torch.load(io.BytesIO(source.read()), weights_only=False)


def _trial_name(trial) -> str:
    return trial.config["cell"]["trial_id"]


def _tune_cell(group: list[Cell]) -> dict:
    """What one Tune trial trains: a cell, or (packed seeds) several cells named after the first."""
    cells = [{"trial_id": c.trial_id, "experiment": c.config.model_dump(mode="json")} for c in group]
    if len(cells) == 1:
        return cells[0]
    return {**cells[0], "trial_id": f"{cells[0]['trial_id']}-pack{len(cells)}", "pack": cells}


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


def run_sweep(spec: SweepSpec, cells: list[Cell], *, address: str | None = None,
              resume: bool = False, rerun: bool = False) -> int:
    """Run the cells with Ray Tune; returns the number of failed cells. Cells whose completed
    rows (with the same config) are already in the store are skipped unless `rerun`."""
    import ray.tune

    store = resolve_store(spec.store)
    if not rerun and not resume:
        todo = [c for c in cells
                if completed_digest(store, spec.name, c.trial_id) != c.config.digest()]
        if len(todo) < len(cells):
            print(f"{len(cells) - len(todo)} of {len(cells)} trials already have completed rows "
                  f"in {store}; skipping them (--rerun trains them again)", flush=True)
        cells = todo
        if not cells:
            return 0
    storage_path = store_join(store, "tune")
    if not address:
        check_capacity(spec.resources, f"sweep '{spec.name}'")
    start_ray(address)
    if spec.resources.workers_per_trial > 1:  # the workers reserve the resources, not the trial
        resources = {"cpu": DRIVER_CPUS}
    else:
        resources = {"cpu": spec.resources.cpus_per_trial, "gpu": spec.resources.gpus_per_trial}
    trainable = ray.tune.with_resources(_tune_trial, resources)
    experiment = store_join(store, "tune", spec.name)
    trials = [_tune_cell(group) for group in pack_cells(cells, spec.resources.seeds_per_trial)]
    callbacks = [_progress_callback(len(trials))]
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
    if resume and ray.tune.Tuner.can_restore(experiment):
        tuner = ray.tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True,
                                       resume_errored=True)
    else:
        if resume:
            print(f"nothing to resume at {experiment}; starting the sweep", file=sys.stderr)
        param_space = {"store": store, "sweep": spec.name, "rerun": rerun,
                       "resources": spec.resources.model_dump(mode="json"),
                       "cell": ray.tune.grid_search(trials)}
        tuner = ray.tune.Tuner(
            trainable, param_space=param_space,
            tune_config=ray.tune.TuneConfig(
                max_concurrent_trials=max_concurrent(spec.resources), scheduler=scheduler,
                reuse_actors=True,  # skips a process start and a torch import per trial
                trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
            run_config=ray.tune.RunConfig(
                name=spec.name, storage_path=storage_path, verbose=0, callbacks=callbacks,
                # two: a driver killed between a new checkpoint and its next state snapshot
                # still finds the checkpoint that snapshot names (--resume)
                checkpoint_config=ray.tune.CheckpointConfig(num_to_keep=2),
                failure_config=ray.tune.FailureConfig(max_failures=0)))
    grid = tuner.fit()
    # a failed pack of seeds is one Tune trial but a failed row per seed
    return sum(len(result.config["cell"].get("pack", [None])) for result in grid if result.error)


"""Data-parallel trials with Ray Train (Train V2): N workers run the same Trainer and engine
as `raymeta run`, inside the process group Ray Train sets up (gloo on CPU, NCCL on GPUs).

- Every worker reports each epoch (a collective); rank 0 attaches the checkpoint, which Ray
  Train stores under `<store>/train/<sweep>/<trial id>`. The run's name is the trial id, so a
  restarted run (a worker died, the driver was relaunched, a sweep resumed) continues from
  its last registered checkpoint.
- Rank 0 writes the trial's row and curves once, at the end.
- Errors of the experiment itself (bad config, missing data, a diverged loss) are the same on
  every worker and would recur on a retry: the workers end the run with a failed row instead
  of asking Ray Train to restart them. Lost workers (a killed process, a lost node) are
  retried up to `resources.max_failures` times.
"""

from __future__ import annotations

import tempfile

from raymeta.config import ExperimentConfig, ResourcesConfig
from raymeta.errors import ConfigError, RaymetaError
from raymeta.orchestrate.trial import trial_row, write_completed, write_failed
from raymeta.results.store import store_join

CONTROLLER_FAILURE_LIMIT = 3
"""Ray Train's own retries (e.g. workers that cannot be placed) before the run fails, instead
of the default: retrying forever (ray-notes 2.2)."""


class TrialFailed(RaymetaError):
    """The trial ended with a failed row; the message is its reason."""


def train_storage(store: str, sweep: str) -> str:
    """Where Ray Train keeps the checkpoints of a sweep's multi-worker trials."""
    return store_join(store, "train", sweep)


def _worker_loop(config: dict) -> dict:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch

    cfg = ExperimentConfig.model_validate(config["experiment"])
    store, sweep, trial_id = config["store"], config["sweep"], config["trial_id"]
    rank = ray.train.get_context().get_world_rank()
    row = trial_row(cfg, sweep, config["extra"])

    def report(metrics: dict, trainer) -> None:
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = None
            if rank == 0:
                trainer.save_checkpoint(folder)
                checkpoint = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(metrics, checkpoint=checkpoint,
                             checkpoint_dir_name=f"epoch={metrics['epoch']:04d}")

    from raymeta.train import Trainer

    trainer = None
    try:
        device = ray.train.torch.get_device()
        if cfg.train.device == "cuda" and device.type != "cuda":
            raise ConfigError("train.device is cuda but the trial's workers have no GPU; set "
                              "resources.gpus_per_trial, or train.device auto")
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            trainer = Trainer(cfg, on_epoch_end=report, device=device)
        else:
            with checkpoint.as_directory() as folder:
                trainer = Trainer(cfg, on_epoch_end=report, device=device, resume_from=folder)
        result = trainer.fit()
    except RaymetaError as err:  # deterministic: every worker has it, a restart cannot help
        if rank == 0:
            write_failed(store, sweep, trial_id, row, err, trainer.curves if trainer else [])
        return {"status": "failed", "error": f"{type(err).__name__}: {err}"}
    if rank == 0:
        write_completed(store, sweep, trial_id, row, result)
    return {"status": "completed", "final_test_acc": result.outcome["final_test_acc"],
            "world_size": result.outcome["world_size"], "restarts": result.outcome["restarts"]}


def fit_distributed(cfg: ExperimentConfig, resources: ResourcesConfig, *, store: str, sweep: str,
                    trial_id: str, extra: dict | None = None, callbacks: list | None = None,
                    driver_cpus: float = 0.0) -> dict:
    """Train `cfg` on `resources.workers_per_trial` Ray Train workers (Ray must be running);
    returns rank 0's summary. Raises TrialFailed after writing the failed row. `driver_cpus`:
    what the calling Tune trial reserves of cpus_per_trial itself."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    use_gpu = resources.gpus_per_trial > 0
    per_worker = {k: v for k, v in resources.per_worker(driver_cpus).items() if v > 0}
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"experiment": cfg.model_dump(mode="json"), "store": store,
                           "sweep": sweep, "trial_id": trial_id, "extra": extra or {}},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=resources.workers_per_trial,
                                               use_gpu=use_gpu, resources_per_worker=per_worker),
        run_config=ray.train.RunConfig(
            name=trial_id, storage_path=train_storage(store, sweep), callbacks=callbacks or [],
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            failure_config=ray.train.FailureConfig(
                max_failures=resources.max_failures,
                controller_failure_limit=CONTROLLER_FAILURE_LIMIT)))
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as err:
        reason = RuntimeError(f"workers failed more than resources.max_failures="
                              f"{resources.max_failures} times; last error: {err}")
        write_failed(store, sweep, trial_id, trial_row(cfg, sweep, extra), reason, [])
        raise TrialFailed(str(reason)) from err
    outcome = result.return_value
    if outcome["status"] != "completed":
        raise TrialFailed(outcome["error"])
    return outcome

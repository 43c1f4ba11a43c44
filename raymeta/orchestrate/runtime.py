"""Starting or joining Ray, with quiet, hermetic defaults (a user's own settings win).

Ray is imported here and in the modules that run trials only, so the rest of raymeta runs
without it.
"""

from __future__ import annotations

import os

from raymeta.errors import ConfigError

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "0")
# Tune's new output engine prints its experiment box even when silenced (verbose=0); the
# classic one is quiet at verbose=0, and our own progress line says what matters
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
# a checkpoint every epoch is the design; Tune's warning about frequent snapshots is noise here
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")


def start_ray(address: str | None, gpus_needed: float = 0.0, what: str = "this run") -> None:
    """Join the cluster at `address`, or start a local Ray with this machine's resources."""
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=False)
        return
    if gpus_needed > 0:
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"{what} asks for {gpus_needed:g} GPU per trial, but this machine "
                              f"has no GPU; set resources.gpus_per_trial to 0 or pass --address "
                              f"of a cluster with GPUs")
    ray.init(log_to_driver=False, configure_logging=True, logging_level="WARNING")


def check_fits(cpus: float, gpus: float, what: str) -> None:
    """A request that the running Ray cannot ever hold fails now, not after minutes of
    retries. (A cluster that autoscales may grow: joined clusters are not checked.)"""
    capacity = cluster_capacity()
    if cpus > capacity["CPU"] + 1e-9 or gpus > capacity["GPU"] + 1e-9:
        raise ConfigError(f"{what} needs {cpus:g} CPUs and {gpus:g} GPUs per trial, but this "
                          f"Ray has {capacity['CPU']:g} CPUs and {capacity['GPU']:g} GPUs; lower "
                          f"resources.cpus_per_trial / workers_per_trial, or pass --address of a "
                          f"larger cluster")


def cluster_capacity() -> dict[str, float]:
    """CPUs and GPUs of the running Ray cluster."""
    import ray

    total = ray.cluster_resources()
    return {"CPU": float(total.get("CPU", 0.0)), "GPU": float(total.get("GPU", 0.0))}

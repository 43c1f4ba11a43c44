"""Starting or joining Ray, with quiet, hermetic defaults (a user's own settings win).

Ray is imported here and in the modules that run trials only, so the rest of raymeta runs
without it.
"""

from __future__ import annotations

import logging
import os
import sys

from raymeta.config import ResourcesConfig
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
# Tune warns when a step of its loop takes over 0.5 s; on a busy 2-core machine writing a
# trial's rows does, and the warning says nothing the user can act on
os.environ.setdefault("TUNE_WARN_THRESHOLD_S", "10")
# a trial whose rows were already in the store reports only that (no epoch, no metric): the
# scheduler (ASHA) skips such a result; Tune's strict check would fail the trial instead
os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")


TRIAL_ENV = {"env_vars": {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}}
"""what every trial process starts with: OpenMP threads that wait sleep instead of spinning,
so a trial keeps its speed when other work shares its cores (raymeta.threads)"""


def start_ray(address: str | None) -> None:
    """Join the cluster at `address`, or start a local Ray with this machine's resources."""
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=False, runtime_env=TRIAL_ENV)
        return
    # token authentication stays on (Ray's default); its notice that it is on is not repeated
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    ray.init(log_to_driver=False, configure_logging=True, logging_level="WARNING",
             runtime_env=TRIAL_ENV)


def capacity() -> tuple[dict[str, float], str]:
    """CPUs and GPUs trials can use, and whose they are: the running Ray's, or, before one is
    started, this machine's (a local Ray takes all of them)."""
    ray = sys.modules.get("ray")  # not imported: certainly not running
    if ray is not None and ray.is_initialized():
        total = ray.cluster_resources()
        return {"CPU": float(total.get("CPU", 0.0)), "GPU": float(total.get("GPU", 0.0))}, "the running Ray"
    import torch

    return {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}, "this machine"


def check_capacity(resources: ResourcesConfig, what: str) -> None:
    """A trial that can never be placed fails now, not after minutes of Ray's retries. Only
    for a local Ray: a cluster joined with --address may autoscale."""
    have, where = capacity()
    if resources.gpus_per_trial > have["GPU"]:
        gpus = "no GPU" if not have["GPU"] else f"{have['GPU']:g} GPUs"
        raise ConfigError(f"{what} asks for {resources.gpus_per_trial:g} GPU per trial, but "
                          f"{where} has {gpus}; set resources.gpus_per_trial to "
                          f"{min(have['GPU'], 1):g} or pass --address of a cluster with GPUs")
    if resources.cpus_per_trial > have["CPU"]:
        raise ConfigError(f"{what} needs {resources.cpus_per_trial:g} CPUs per trial "
                          f"(workers_per_trial {resources.workers_per_trial}), but {where} has "
                          f"{have['CPU']:g}; lower resources.cpus_per_trial / workers_per_trial, "
                          f"or pass --address of a larger cluster")

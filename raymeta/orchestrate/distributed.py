"""Data-parallel trials with Ray Train (Train V2): N workers run the same Trainer and engine
as `raymeta run`, inside the process group Ray Train sets up (gloo on CPU, NCCL on GPUs).

- Every worker reports each epoch (a collective); rank 0 attaches the checkpoint, which Ray
  Train stores under `<store>/train/<sweep>/<trial id>`. The run's name is the trial id, so a
  restarted run (a worker died, the driver was relaunched, a sweep resumed) continues from
  its last registered checkpoint.
- Rank 0 writes the trial's row and curves once, at the end.
- Errors of the experiment itself (bad config, missing data, a diverged loss) are the same on
  every worker and would recur on a retry: the workers end the run with a failed row instead
  of asking Ray Train to restart them. So do storage errors (a full disk, a quota, no
  permission: rank 0's checkpoint cannot be written or uploaded), which rank 0 alone meets:
  every rank learns of it in one collective after each report and stops (StorageError). Lost
  workers (a killed process, a lost node) are retried up to `resources.max_failures` times.
- After losing workers a trial waits at most `resources.capacity_wait_s` for their resources
  (`CapacityWatch`, in the Ray Train controller), then fails with a row that names the lost
  node and keeps the curves of its last checkpoint; `--resume` continues it later. With
  `resources.elastic` it goes on with the workers that remain, each taking a larger share of
  the same global batch (`Trainer(batch_workers=...)`), so its results do not change.
- Rows name the Ray node of every worker: `ray_node_ids` (comma-joined, in rank order) and
  `ray_node_id` (rank 0's).
"""

from __future__ import annotations

import functools
import math
import os
import tempfile
import time

from raymeta import plugins
from raymeta.config import ExperimentConfig, ResourcesConfig
from raymeta.errors import ConfigError, RaymetaError, StorageError, is_storage_failure
from raymeta.orchestrate.trial import trial_row, write_completed, write_failed_rows
from raymeta.results.store import display_store, resolve_store, store_join

CONTROLLER_FAILURE_LIMIT = 3
"""Ray Train's own retries (e.g. workers that cannot be placed) before the run fails, instead
of the default: retrying forever (ray-notes 2.2)."""


class TrialFailed(RaymetaError):
    """The trial ended with a failed row; the message is its reason."""


START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
"""Ray Train's wait for one worker group's placement; CapacityWatch shortens it while a trial
waits for lost capacity"""
DEFAULT_START_TIMEOUT_S = 60.0
ELASTIC_ATTEMPT_S = 5.0
"""an elastic trial's placement attempts after a loss: right after it, Ray still counts the
lost node for a few seconds, so the first attempt may aim at the old size"""


class NodeLost(RaymetaError):
    """Raised in the Ray Train controller (by CapacityWatch) when a trial that lost workers
    found no capacity for them within resources.capacity_wait_s. `nodes`: (node id, IP) of
    the nodes whose workers were lost; `ranks`: the node id of each rank of the lost group."""

    def __init__(self, message: str, nodes: tuple[tuple[str, str], ...] = (),
                 ranks: tuple[str, ...] = ()):
        super().__init__(message)
        self.nodes = tuple(tuple(n) for n in nodes)
        self.ranks = tuple(ranks)

    def __reduce__(self):  # Ray pickles it from the controller to the driver
        return type(self), (str(self), self.nodes, self.ranks)


class WorkersUnplaceable(RaymetaError):
    """A trial's first worker group could not be placed within Ray Train's retries."""


@functools.cache
def _capacity_watch_class():
    """CapacityWatch, defined once Ray is imported (it subclasses Ray Train's callbacks)."""
    import ray
    from ray.exceptions import RayActorError
    from ray.train.v2._internal.execution.callback import ControllerCallback, WorkerGroupCallback

    class CapacityWatch(ControllerCallback, WorkerGroupCallback):
        """Runs in the Ray Train controller. Left alone, Ray Train restarts a worker group
        that lost a worker and retries placing it in slices of the start timeout (60 s), each
        a controller failure, until controller_failure_limit (issue 21: 240 s, then a "start
        timed out" error). This bounds it: from the moment the trial loses workers it waits
        at most `wait_s` for a new worker group to start (each placement attempt waits only
        what is left of that), then fails the run with NodeLost, naming the nodes of the
        workers that were lost. A first worker group that cannot be placed fails after
        `initial_retries` retries, as before.

        Elastic trials (`elastic`): Ray Train sizes the new group from the reservations of
        Ray's AutoscalingCoordinator, which it refreshes every 20 s, so right after a loss it
        still offers the lost node. Each retry here makes it recount the live nodes, and
        places for at most ELASTIC_ATTEMPT_S, so the group restarts on the workers that remain
        within seconds."""

        def __init__(self, wait_s: float, initial_retries: int, elastic: bool = False):
            self.wait_s = wait_s
            self.initial_retries = initial_retries
            self.elastic = elastic
            self.requester: str | None = None
            """the run's id at the AutoscalingCoordinator (as Ray Train's scaling policy names it)"""
            self.workers: dict[int, tuple[str, str]] = {}
            """rank -> (node id, IP) of the latest worker group"""
            self.dead: set[int] = set()
            """ranks of the latest group whose worker actor died (process or node lost)"""
            self.since: float | None = None
            """when the trial lost its workers (None: running, or not started yet)"""
            self.started = False
            self.initial_failures = 0
            self.base_timeout: str | None = None

        # -- WorkerGroupCallback
        def after_worker_group_start(self, worker_group) -> None:
            self.started = True
            self.workers = {w.distributed_context.world_rank: (w.metadata.node_id, w.metadata.node_ip)
                            for w in worker_group.get_workers()}

        # -- ControllerCallback
        def after_controller_start(self, train_run_context) -> None:
            self.base_timeout = os.environ.get(START_TIMEOUT_ENV)
            self.requester = f"train-{train_run_context.run_id}"

        def on_controller_start_worker_group(self, *, scaling_config, num_workers):
            # the WorkerGroup reads its placement timeout from the controller's environment
            base = float(self.base_timeout or DEFAULT_START_TIMEOUT_S)
            timeout = base
            if self.since is not None:
                left = self.wait_s - (time.monotonic() - self.since)
                timeout = max(1.0, min(base, left, ELASTIC_ATTEMPT_S if self.elastic else left))
            os.environ[START_TIMEOUT_ENV] = f"{timeout:g}"
            return None

        def recount(self) -> None:
            """Make the AutoscalingCoordinator recount the live nodes now (best effort)."""
            try:
                from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
                    get_or_create_autoscaling_coordinator,
                )

                coordinator = get_or_create_autoscaling_coordinator()
                ray.get(coordinator.get_reserved_resources.remote(self.requester, recompute=True),
                        timeout=5)
            except Exception:  # noqa: BLE001 - the next tick (20 s) recounts anyway
                pass

        def after_controller_state_update(self, previous_state, current_state) -> None:
            name = type(current_state).__name__
            if name == "RunningState":
                self.since, self.dead = None, set()
                return
            if name not in ("RestartingState", "ReschedulingState"):
                return
            error = getattr(current_state, "training_failed_error", None)
            failures = getattr(error, "worker_failures", None) or {}
            self.dead |= {rank for rank, e in failures.items() if isinstance(e, RayActorError)}
            if not self.started:  # the first worker group: Ray Train's own retries, bounded
                if name == "ReschedulingState" and previous_state is not current_state:
                    self.initial_failures += 1
                    if self.initial_failures > self.initial_retries:
                        raise WorkersUnplaceable(f"the trial's workers could not be placed in "
                                                 f"{self.initial_failures} attempts; last error: "
                                                 f"{error}")
                return
            if self.since is None:
                self.since = time.monotonic()
            if time.monotonic() - self.since >= self.wait_s:
                raise self.node_lost()
            if self.elastic:
                self.recount()

        def node_lost(self) -> NodeLost:
            known = ray.nodes()
            alive = {n["NodeID"]: n["Alive"] for n in known}
            ips = dict(self.workers.values())  # the GCS's address of a node, where it has one
            ips.update({n["NodeID"]: n["NodeManagerAddress"] for n in known if n["NodeID"] in ips})
            dead = sorted(node for node in ips if not alive.get(node, False))
            crashed = sorted({self.workers[r][0] for r in self.dead if r in self.workers} - set(dead))
            gone = set(dead) | set(crashed)
            lost_workers = sum(1 for node, _ in self.workers.values() if node in gone)
            parts = []
            if dead:
                parts.append(f"lost Ray node{'s' if len(dead) > 1 else ''} "
                             + ", ".join(f"{node} ({ips[node]})" for node in dead)
                             + " (Ray marked it dead)")
            if crashed:
                parts.append("lost worker processes on Ray node"
                             + ("s " if len(crashed) > 1 else " ")
                             + ", ".join(f"{node} ({ips[node]})" for node in crashed))
            lost = (" and ".join(parts) + f", {lost_workers} of the trial's "
                    f"{len(self.workers)} workers") if parts else "lost workers"
            return NodeLost(f"{lost}; no capacity for the workers came back within "
                            f"resources.capacity_wait_s={self.wait_s:g} s",
                            tuple((node, ips[node]) for node in sorted(gone)),
                            tuple(self.workers[r][0] for r in sorted(self.workers)))

    return CapacityWatch


def capacity_watch(resources: ResourcesConfig):
    """The CapacityWatch callback of a multi-worker trial (`_capacity_watch_class`)."""
    return _capacity_watch_class()(resources.capacity_wait_s, CONTROLLER_FAILURE_LIMIT,
                                   resources.elastic)


def controller_failure_limit(resources: ResourcesConfig) -> int:
    """Ray Train's controller failures allowed, a backstop only (CapacityWatch ends the
    waits first). Each placement attempt that times out counts one: the first group's
    retries, and per loss of workers about capacity_wait_s / start timeout attempts (of
    ELASTIC_ATTEMPT_S when elastic)."""
    timeout = float(os.environ.get(START_TIMEOUT_ENV) or DEFAULT_START_TIMEOUT_S)
    if resources.elastic:
        timeout = min(timeout, ELASTIC_ATTEMPT_S)
    attempt = max(min(timeout, resources.capacity_wait_s), 1.0)
    per_loss = math.ceil(resources.capacity_wait_s / attempt) + 1
    return CONTROLLER_FAILURE_LIMIT + 1 + (resources.max_failures + 1) * per_loss


def checkpointed_state(store: str, sweep: str, trial_id: str, digest: str) -> dict | None:
    """The Trainer state in the trial's last checkpoint registered with Ray Train (the one its
    `checkpoint_manager_snapshot.json` names), or None: none yet, unreadable, or of another
    config. Read with raymeta.safeload: tensors and plain data only."""
    import json

    from raymeta.results.store import filesystem
    from raymeta.train.checkpoint import CHECKPOINT_FILE, load_state_bytes

    fs, base = filesystem(store_join(train_storage(store, sweep), trial_id))
    try:
        with fs.open_input_stream(f"{base}/checkpoint_manager_snapshot.json") as source:
            latest = json.loads(source.read()).get("latest_checkpoint_result") or {}
        if not latest.get("checkpoint_dir_name"):
            return None
        with fs.open_input_file(f"{base}/{latest['checkpoint_dir_name']}/{CHECKPOINT_FILE}") as source:
            state = load_state_bytes(source.read())
    except (OSError, ValueError, RaymetaError):
        return None
    return state if state.get("config_digest") == digest else None


def _failure_reason(err: BaseException, resources: ResourcesConfig,
                    state: dict | None) -> RaymetaError | RuntimeError:
    """The failed row's reason for a run Ray Train gave up on."""
    cause = getattr(err, "controller_failure", None)
    resume = ("continue the trial with `raymeta sweep <file> --resume` (or the same `raymeta "
              "run --workers N` again): it resumes from "
              + (f"its checkpoint of epoch {state['epoch'] - 1}" if state else "its start"))
    if isinstance(cause, NodeLost):
        return NodeLost(f"{cause}; once capacity is back, {resume}", cause.nodes, cause.ranks)
    if isinstance(cause, WorkersUnplaceable):
        return cause
    return RuntimeError(f"workers failed more than resources.max_failures="
                        f"{resources.max_failures} times; {resume}; last error: {err}")


def _node_ids(device) -> list[str]:
    """The Ray node id of every worker, in rank order (one small all-reduce)."""
    import ray
    import torch

    from raymeta.parallel import all_reduce_sum_, rank_world

    rank, world = rank_world()
    mine = ray.get_runtime_context().get_node_id()
    if world == 1:
        return [mine]
    codes = torch.zeros(world, 64, dtype=torch.int64, device=device)
    data = mine.encode()[:64]
    codes[rank, :len(data)] = torch.tensor(list(data), dtype=torch.int64, device=device)
    all_reduce_sum_([codes])
    return [bytes(c for c in row if c).decode() for row in codes.tolist()]


def train_storage(store: str, sweep: str) -> str:
    """Where Ray Train keeps the checkpoints of a sweep's multi-worker trials."""
    return store_join(store, "train", sweep)


def _worker_loop(config: dict) -> dict:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch

    plugins.restore(config.get("plugins"))  # the plugin methods the driver resolved
    cfg = ExperimentConfig.model_validate(config["experiment"])
    store, sweep, trial_id = config["store"], config["sweep"], config["trial_id"]
    rank = ray.train.get_context().get_world_rank()
    row = trial_row(cfg, sweep, config["extra"])

    def report(metrics: dict, trainer) -> None:
        import torch

        from raymeta.parallel import all_reduce_sum_

        failure = None
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = None
            if rank == 0:
                try:
                    trainer.save_checkpoint(folder)
                    checkpoint = ray.train.Checkpoint.from_directory(folder)
                except StorageError as err:  # the local scratch folder is full
                    failure = err
            try:  # every rank reports (a collective), rank 0 uploads its checkpoint
                ray.train.report(metrics, checkpoint=checkpoint,
                                 checkpoint_dir_name=f"epoch={metrics['epoch']:04d}")
            except OSError as err:
                if not is_storage_failure(err):
                    raise
                failure = StorageError(f"cannot write the checkpoint of epoch {metrics['epoch']} "
                                       f"to the results store {display_store(store)}: {err}",
                                       store=display_store(store))
        # only rank 0 writes: every rank learns whether it could, and all stop together
        flag = torch.tensor([float(failure is not None)], device=trainer.device)
        all_reduce_sum_([flag])
        if failure is not None:
            raise failure
        if flag.item() > 0:
            raise StorageError(f"rank 0 could not write the checkpoint to the results store "
                               f"{display_store(store)}", store=display_store(store))

    from raymeta.train import Trainer

    trainer = None
    try:
        device = ray.train.torch.get_device()
        if cfg.train.device == "cuda" and device.type != "cuda":
            raise ConfigError("train.device is cuda but the trial's workers have no GPU; set "
                              "resources.gpus_per_trial, or train.device auto")
        nodes = _node_ids(device)  # every rank: a collective
        row.update(ray_node_id=nodes[0], ray_node_ids=",".join(nodes))
        # elastic: the global batch of workers_per_trial workers, on the workers there are
        batches = {"batch_workers": config.get("batch_workers")}
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            trainer = Trainer(cfg, on_epoch_end=report, device=device, **batches)
        else:
            with checkpoint.as_directory() as folder:
                trainer = Trainer(cfg, on_epoch_end=report, device=device, resume_from=folder,
                                  **batches)
        result = trainer.fit()
    except RaymetaError as err:  # deterministic: every worker has it, a restart cannot help
        outcome = {"status": "failed", "error": f"{type(err).__name__}: {err}",
                   "storage": isinstance(err, StorageError), "unwritten": []}
        if rank == 0:
            try:
                write_failed_rows(store, sweep, [(trial_id, row, trainer.curves if trainer else [])],
                                  err)
            except StorageError as row_err:  # returned, not raised: a raise is a worker death
                outcome.update(error=str(row_err), storage=True,
                               unwritten=[list(u) for u in row_err.unwritten])
        return outcome
    if rank == 0:
        try:
            write_completed(store, sweep, trial_id, row, result)
        except StorageError as err:
            return {"status": "failed", "error": f"trial {trial_id} trained to its end but its "
                    f"rows could not be written: {err}", "storage": True,
                    "unwritten": [[sweep, trial_id, str(err)]]}
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

    resources.check_elastic_batches(cfg.train.batch_size, cfg.train.meta_batch_size)
    use_gpu = resources.gpus_per_trial > 0
    per_worker = {k: v for k, v in resources.per_worker(driver_cpus).items() if v > 0}
    workers = resources.workers_per_trial
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"experiment": cfg.model_dump(mode="json"), "plugins": plugins.resolved(),
                           "store": store, "sweep": sweep, "trial_id": trial_id, "extra": extra or {},
                           "batch_workers": workers if resources.elastic else None},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=(min(resources.world_sizes()), workers) if resources.elastic else workers,
            use_gpu=use_gpu, resources_per_worker=per_worker),
        run_config=ray.train.RunConfig(
            name=trial_id, storage_path=train_storage(store, sweep),
            callbacks=[*(callbacks or []), capacity_watch(resources)],
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            failure_config=ray.train.FailureConfig(
                max_failures=resources.max_failures,
                controller_failure_limit=controller_failure_limit(resources))))
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as err:
        # the curves up to the last checkpoint, and what the trial ran on when it was lost
        state = checkpointed_state(store, sweep, trial_id, cfg.digest())
        reason = _failure_reason(err, resources, state)
        ranks = getattr(reason, "ranks", ())
        where = {"ray_node_id": ranks[0], "ray_node_ids": ",".join(ranks)} if ranks else {}
        row = trial_row(cfg, sweep, {**(extra or {}), **where})
        write_failed_rows(store, sweep, [(trial_id, row, state["curves"] if state else [])], reason)
        raise TrialFailed(str(reason)) from err
    outcome = result.return_value
    if outcome.get("storage"):  # the store refuses writes: the sweep stops (StorageError)
        raise StorageError(outcome["error"], store=display_store(resolve_store(store)),
                           unwritten=tuple(tuple(u) for u in outcome.get("unwritten", ())))
    if outcome["status"] != "completed":
        raise TrialFailed(outcome["error"])
    return outcome

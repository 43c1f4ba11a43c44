"""A multi-worker trial loses a node, on a real 2-node Ray cluster (tools/local_cluster.sh:
a head and one worker node, 1 CPU each, so a 2-worker trial has one worker on each node).
The worker node's raylet and everything under it is killed mid-epoch.

- Without elastic the trial waits resources.capacity_wait_s for the lost capacity, then fails
  with a row that names the lost node and keeps the curves of its last checkpoint.
- With elastic it goes on on the head alone, with the same global batch, and ends with the
  curves and parameters of an uninterrupted 2-worker run.

The driver runs in a subprocess (its own Ray connection, with the cluster's token), which
keeps this pytest process free of Ray; the cluster is stopped even when a test fails, and
only its own processes are touched."""

import json
import os
import secrets
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from raymeta.results import query

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "local_cluster.sh"
PORT, DASHBOARD, BASE = 6393, 8279, 26000  # this file's cluster, apart from every other one
CAPACITY_WAIT_S = 10.0
EPOCHS = 4

DRIVER = textwrap.dedent("""
    import json, sys, time
    import ray
    from raymeta.config import ExperimentConfig, ResourcesConfig
    from raymeta.orchestrate.distributed import TrialFailed, fit_distributed

    args = json.loads(sys.argv[1])
    ray.init(address=args["address"], log_to_driver=False, logging_level="ERROR")
    nodes = [n for n in ray.nodes() if n["Alive"]]
    head = [n["NodeID"] for n in nodes if n["NodeManagerPort"] == args["head_port"]]
    workers = [n["NodeID"] for n in nodes if n["NodeID"] not in head]
    assert ray.get_runtime_context().get_node_id() == head[0], "the driver is not on the head"
    print("NODES " + json.dumps({"head": head[0], "workers": workers,
                                 "ips": {n["NodeID"]: n["NodeManagerAddress"] for n in nodes}}),
          flush=True)
    for run in args["runs"]:
        started = time.monotonic()
        try:
            result = fit_distributed(ExperimentConfig.model_validate(run["experiment"]),
                                     ResourcesConfig.model_validate(run["resources"]),
                                     store=args["store"], sweep=run["sweep"], trial_id=run["trial_id"])
        except TrialFailed as err:
            result = {"status": "failed", "error": str(err)}
        result["seconds"] = time.monotonic() - started
        print("RESULT " + json.dumps(result), flush=True)
    """)


def experiment(samples: int = 1500) -> dict:
    """MW-Net on synthetic data in float64, an MLP without BatchNorm or dropout: two workers
    with batch 8 equal one worker with batch 16 to rounding (docs/distributed.md). An epoch
    takes a few seconds on two workers here, so the kill lands mid-epoch."""
    return {"dataset": {"name": "synthetic", "synthetic_samples": samples, "synthetic_classes": 4,
                        "synthetic_features": 6},
            "noise": {"type": "uniform", "rate": 0.4}, "meta_set": {"per_class": 14},
            "model": {"name": "mlp", "options": {"hidden": [32]}}, "method": {"name": "mwnet"},
            "train": {"epochs": EPOCHS, "batch_size": 8, "meta_batch_size": 8,
                      "dtype": "float64", "device": "cpu"},
            "famus": {"cosine_every": 0}}


def resources(**extra) -> dict:
    return {"workers_per_trial": 2, "cpus_per_trial": 2, "max_failures": 2,
            "capacity_wait_s": CAPACITY_WAIT_S, **extra}


class Cluster:
    def __init__(self, tmp_path: Path):
        self.dir = f"/tmp/rmnl-{os.getpid()}"  # short: Ray's unix sockets live under it
        self.env = {**os.environ, "RAYMETA_CLUSTER_DIR": self.dir,
                    "RAYMETA_CLUSTER_PORT": str(PORT), "RAYMETA_DASHBOARD_PORT": str(DASHBOARD),
                    "RAYMETA_PORT_BASE": str(BASE), "RAYMETA_CPUS_PER_NODE": "1",
                    "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
                    # the GCS marks a silent node dead within ~3 s (default: ~15-30 s)
                    "RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
                    "RAY_health_check_failure_threshold": "3",
                    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
                    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "20",
                    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_DEDUP_LOGS": "0",
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                    "PYTHONWARNINGS": "ignore"}
        self.env.pop("RAY_ADDRESS", None)
        self.store = str(tmp_path / "store")
        self.tmp = tmp_path

    def start(self) -> None:
        tic = time.monotonic()
        start = subprocess.run([str(SCRIPT), "start", "1"], env=self.env, capture_output=True,
                               text=True, timeout=180)
        if start.returncode != 0:
            self.stop()
            pytest.skip(f"the 2-node cluster did not start: {start.stderr[-2000:]}")
        self.started = time.monotonic() - tic

    def stop(self) -> None:
        subprocess.run([str(SCRIPT), "stop"], env=self.env, capture_output=True, timeout=120)

    def driver(self, runs: list[dict]) -> subprocess.Popen:
        args = {"address": f"127.0.0.1:{PORT}", "head_port": BASE, "store": self.store,
                "runs": runs}
        return subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(args)], env=self.env,
                                stdout=subprocess.PIPE, stderr=open(self.tmp / "driver.err", "w"),
                                text=True, cwd=ROOT)

    def kill_worker_node(self) -> int:
        """SIGKILL worker node 1: its raylet and every process under it (agents, workers)."""
        raylet = subprocess.run(
            ["pgrep", "-f", f"raylet --raylet_socket_name={self.dir}/session.* "
                            f"--node_manager_port={BASE + 10} "],
            capture_output=True, text=True).stdout.split()
        assert len(raylet) == 1, raylet
        pids = [int(raylet[0])]
        for pid in pids:  # grows as it goes: descendants, breadth first
            children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
            pids += [int(p) for p in children.stdout.split()]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return len(pids)


@pytest.fixture
def cluster(tmp_path):
    if sys.platform != "linux":
        pytest.skip("tools/local_cluster.sh needs Linux (pgrep, /tmp sockets)")
    cluster = Cluster(tmp_path)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
    leftover = subprocess.run(["pgrep", "-f", cluster.dir], capture_output=True, text=True)
    assert leftover.stdout.strip() == "", "the cluster left processes behind"


def read_line(proc: subprocess.Popen, tag: str, deadline: float) -> dict:
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith(tag + " "):
            return json.loads(line[len(tag) + 1:])
    raise AssertionError(f"no {tag} line from the driver")


def last_checkpoint_epoch(store: str, sweep: str, trial_id: str) -> int | None:
    snapshot = Path(store) / "train" / sweep / trial_id / "checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(snapshot.read_text())["latest_checkpoint_result"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return int(latest["checkpoint_dir_name"].split("=")[1]) if latest else None


def kill_mid_epoch(cluster: Cluster, proc: subprocess.Popen, sweep: str, trial_id: str,
                   after_epoch: int) -> tuple[int, float]:
    """Wait for the checkpoint of `after_epoch`, then kill the worker node a little into the
    next epoch; returns the last checkpointed epoch at the kill, and when it was."""
    deadline = time.monotonic() + 150
    while (last_checkpoint_epoch(cluster.store, sweep, trial_id) or -1) < after_epoch:
        assert proc.poll() is None and time.monotonic() < deadline, "training did not get going"
        time.sleep(0.05)
    time.sleep(0.3)  # into the next epoch (an epoch takes seconds here)
    epoch = last_checkpoint_epoch(cluster.store, sweep, trial_id)
    killed = cluster.kill_worker_node()
    assert killed >= 2
    return epoch, time.monotonic()


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_a_lost_node_fails_the_trial_within_the_wait_naming_it_and_keeping_its_curves(cluster):
    trial_id = "lost"
    proc = cluster.driver([{"experiment": experiment(), "resources": resources(),
                            "sweep": "nodeloss", "trial_id": trial_id}])
    try:
        nodes = read_line(proc, "NODES", time.monotonic() + 90)
        assert len(nodes["workers"]) == 1
        connected = time.monotonic()
        epoch, killed_at = kill_mid_epoch(cluster, proc, "nodeloss", trial_id, after_epoch=1)
        print(f"cluster up {cluster.started:.0f} s; driver to the kill {killed_at - connected:.0f} s")
        result = read_line(proc, "RESULT", time.monotonic() + 120)
        failed_after = time.monotonic() - killed_at
    finally:
        proc.kill()
        proc.wait()
    print(f"killed the worker node after epoch {epoch}; the trial failed {failed_after:.1f} s "
          f"later: {result['error']}")
    assert result["status"] == "failed"
    # waited for capacity (about capacity_wait_s), then gave up at once: not 4 x 60 s
    assert CAPACITY_WAIT_S <= failed_after < CAPACITY_WAIT_S + 30, failed_after
    error = result["error"]
    lost = nodes["workers"][0]
    assert f"lost Ray node {lost} ({nodes['ips'][lost]}) (Ray marked it dead)" in error
    assert "--resume" in error and f"capacity_wait_s={CAPACITY_WAIT_S:g}" in error
    trials = query.load(cluster.store, "trials", "nodeloss")
    row = trials.row(0, named=True)
    assert (row["status"], row["trial_id"]) == ("failed", trial_id)
    ranks = row["ray_node_ids"].split(",")  # rank order; Ray chooses which node is rank 0
    assert sorted(ranks) == sorted([nodes["head"], lost]) and row["ray_node_id"] == ranks[0]
    curves = query.load(cluster.store, "curves", "nodeloss")
    assert sorted(curves["epoch"].to_list()) == list(range(epoch + 1))  # up to the checkpoint


def checkpoint_params(store: str, sweep: str, trial_id: str) -> dict[str, np.ndarray]:
    from raymeta.config import ExperimentConfig
    from raymeta.orchestrate.distributed import checkpointed_state

    state = checkpointed_state(store, sweep, trial_id, ExperimentConfig.model_validate(experiment()).digest())
    assert state is not None and state["epoch"] == EPOCHS
    params = {f"model.{k}": v.numpy() for k, v in state["model"].items()}
    params.update({f"method.{k}": v.numpy() for k, v in state["method"].items()
                   if hasattr(v, "numpy")})
    return params


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_elastic_trial_goes_on_on_the_remaining_node_with_the_same_results(cluster):
    """The elastic run loses its second worker after epoch 1 and ends on one worker, each step
    on the global batch of 16 that two workers of batch 8 share: its curves and final
    parameters are those of the uninterrupted 2-worker run (run first, on both nodes)."""
    runs = [{"experiment": experiment(), "resources": resources(), "sweep": "reference",
             "trial_id": "whole"},
            {"experiment": experiment(), "resources": resources(elastic=True),
             "sweep": "elastic", "trial_id": "shrunk"}]
    proc = cluster.driver(runs)
    try:
        nodes = read_line(proc, "NODES", time.monotonic() + 90)
        reference = read_line(proc, "RESULT", time.monotonic() + 150)
        assert reference["status"] == "completed", reference
        assert reference["world_size"] == 2
        epoch, _ = kill_mid_epoch(cluster, proc, "elastic", "shrunk", after_epoch=1)
        result = read_line(proc, "RESULT", time.monotonic() + 150)
    finally:
        proc.kill()
        proc.wait()
    print(f"killed the worker node after epoch {epoch}: {result}")
    assert result["status"] == "completed", result
    assert (result["world_size"], result["restarts"]) == (1, 1)
    row = query.load(cluster.store, "trials", "elastic").row(0, named=True)
    assert row["ray_node_ids"] == nodes["head"] and row["world_size"] == 1
    whole = query.load(cluster.store, "curves", "reference").sort("epoch")
    shrunk = query.load(cluster.store, "curves", "elastic").sort("epoch")
    assert shrunk["epoch"].to_list() == list(range(EPOCHS))
    for column in ("train_loss", "train_acc", "test_loss", "test_acc", "meta_loss", "meta_acc"):
        gap = np.abs(whole[column].to_numpy() - shrunk[column].to_numpy()).max()
        assert gap < 1e-6, (column, gap)
    one, two = (checkpoint_params(cluster.store, s, t)
                for s, t in (("reference", "whole"), ("elastic", "shrunk")))
    gap = max(np.abs(one[k] - two[k]).max() for k in one)
    print(f"max |uninterrupted 2 workers - elastic 2 -> 1 worker| over parameters: {gap:.2e}")
    assert gap < 1e-6


# ----------------------------------------------------------------- without a cluster


def test_elastic_refuses_global_batches_it_cannot_split():
    from pydantic import ValidationError

    from raymeta.config import ResourcesConfig
    from raymeta.errors import ConfigError

    two = ResourcesConfig(workers_per_trial=2, cpus_per_trial=2, elastic=True)
    assert list(two.world_sizes()) == [1, 2]
    two.check_elastic_batches(5, 7)  # 10 and 14 split over 1 or 2 workers
    four = ResourcesConfig(workers_per_trial=4, cpus_per_trial=4, elastic=True)
    with pytest.raises(ConfigError, match=r"4 x 10 = 40 .* over 3 workers; set train.batch_size "
                                          r"to a multiple of 3 \(e.g. 12\)"):
        four.check_elastic_batches(10, 12)
    with pytest.raises(ConfigError, match="train.meta_batch_size to a multiple of 3"):
        four.check_elastic_batches(12, 10)
    four.check_elastic_batches(12, 6)
    # from 2 workers up, 4 x 10 splits over 2 and 4 but not 3: the range decides
    narrow = ResourcesConfig(workers_per_trial=4, cpus_per_trial=4, elastic=True, min_workers=4)
    narrow.check_elastic_batches(10, 10)
    ResourcesConfig(workers_per_trial=2).check_elastic_batches(3, 3)  # not elastic: no rule
    for bad, why in [({"min_workers": 1}, "set elastic: true"),
                     ({"elastic": True}, "workers_per_trial >= 2"),
                     ({"workers_per_trial": 2, "elastic": True, "min_workers": 3}, "at most 2")]:
        with pytest.raises(ValidationError, match=why):
            ResourcesConfig(**bad)


def test_a_worker_trains_its_share_of_the_fixed_global_batch():
    """batch_workers=2 on one worker: every step on the global batch of 2 x 8, exactly what
    one worker with batch 16 trains (what an elastic trial does on fewer workers)."""
    import torch

    from raymeta.config import ExperimentConfig
    from raymeta.errors import ConfigError
    from raymeta.train import Trainer
    from raymeta.train.trainer import _worker_share

    def run(batch: int, **kwargs) -> tuple[Trainer, list[dict]]:
        data = experiment(samples=200)
        data["train"] = {**data["train"], "epochs": 2, "batch_size": batch, "meta_batch_size": batch}
        trainer = Trainer(ExperimentConfig.model_validate(data), **kwargs)
        return trainer, trainer.fit().curves

    shared, curves_shared = run(8, batch_workers=2)
    whole, curves_whole = run(16)
    assert (shared.batch_size, shared.meta_batch_size) == (16, 16)
    assert shared.engine.steps == whole.engine.steps == 10
    for (name, a), b in zip(shared.model.state_dict().items(), whole.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert [c["test_loss"] for c in curves_shared] == [c["test_loss"] for c in curves_whole]
    assert _worker_share(8, 8, None, 3) == (8, 8) and _worker_share(6, 9, 2, 3) == (4, 6)
    with pytest.raises(ConfigError, match="over 3 workers; set train.batch_size to a multiple of 3"):
        _worker_share(8, 9, 2, 3)


def test_a_failed_row_reads_the_curves_of_the_last_registered_checkpoint(tmp_path):
    """What a node loss leaves: the curves of the checkpoint Ray Train's snapshot names (not
    of a later folder it never registered), and a reason naming the node and --resume."""
    from ray.train.v2.api.exceptions import ControllerError

    from raymeta.config import ExperimentConfig, ResourcesConfig
    from raymeta.orchestrate.distributed import NodeLost, _failure_reason, checkpointed_state
    from raymeta.train import Trainer

    data = {**experiment(samples=200), "method": {"name": "ce"}}
    data["train"] = {**data["train"], "epochs": 2}
    cfg = ExperimentConfig.model_validate(data)
    run = tmp_path / "store" / "train" / "sweep" / "t1"
    saved = []

    def save(metrics, trainer):
        trainer.save_checkpoint(run / f"epoch={metrics['epoch']:04d}")
        saved.append(metrics["epoch"])

    Trainer(cfg, on_epoch_end=save).fit()
    assert saved == [0, 1]
    (run / "checkpoint_manager_snapshot.json").write_text(json.dumps(
        {"latest_checkpoint_result": {"checkpoint_dir_name": "epoch=0000", "metrics": {}}}))
    state = checkpointed_state(str(tmp_path / "store"), "sweep", "t1", cfg.digest())
    assert [c["epoch"] for c in state["curves"]] == [0]
    assert checkpointed_state(str(tmp_path / "store"), "sweep", "t1", "another") is None
    assert checkpointed_state(str(tmp_path / "store"), "sweep", "none", cfg.digest()) is None

    lost = NodeLost("lost Ray node abc (10.0.0.2) (Ray marked it dead)", (("abc", "10.0.0.2"),),
                    ("def", "abc"))
    reason = _failure_reason(ControllerError(lost), ResourcesConfig(workers_per_trial=2), state)
    assert isinstance(reason, NodeLost) and reason.ranks == ("def", "abc")
    assert "abc (10.0.0.2)" in str(reason) and "--resume" in str(reason)
    assert "checkpoint of epoch 0" in str(reason)
    other = _failure_reason(RuntimeError("boom"), ResourcesConfig(workers_per_trial=2), None)
    assert "max_failures=1" in str(other) and "resumes from its start" in str(other)

"""Data-parallel training with Ray Train: exact semantics, recovery from a killed worker, sweeps.

The exactness tests run real Ray Train workers (gloo) and compare with one in-process worker
that sees the whole global batch."""

import sys
import threading
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from conftest import tiny_experiment
from test_conformance import CLASSES

from raymeta.config import ExperimentConfig, ResourcesConfig, parse_sweep
from raymeta.data.bundle import build_data
from raymeta.data.loader import DeviceSplit
from raymeta.methods import examples
from raymeta.methods.famus import Famus
from raymeta.orchestrate.grid import expand
from raymeta.parallel import shard
from raymeta.results import query
from raymeta.train import Trainer

BATCH, META_BATCH = 8, 8  # per worker; one worker gets twice as much


def exact_config(method: dict, world: int, epochs: int = 1) -> ExperimentConfig:
    """84 training samples: 5 steps of a global batch of 16. A BatchNorm model with
    train.sync_batchnorm when `method` asks for it; a pseudo-clean meta set (chosen each epoch
    after a one-epoch warm-up) when it asks for that."""
    method = dict(method)
    meta_set = {"per_class": 14}
    if method.pop("pseudo", False):
        meta_set = {"source": "pseudo", "pseudo": {"warmup_epochs": 1, "min_size": 16}}
    model = {"name": "mlp", "options": {"hidden": [16]}}  # no BatchNorm
    if method.pop("sync_batchnorm", False):
        model = {"name": "mlp", "options": {"hidden": [16, 16], "batchnorm": True}}
    return ExperimentConfig.model_validate({
        "dataset": {"name": "synthetic", "synthetic_samples": 200, "synthetic_classes": 4,
                    "synthetic_features": 6},
        "noise": {"type": "uniform", "rate": 0.4}, "meta_set": meta_set,
        "model": model, "method": method,
        "train": {"epochs": epochs, "batch_size": BATCH * (2 // world),
                  "meta_batch_size": META_BATCH * (2 // world), "dtype": "float64",
                  "device": "cpu", "sync_batchnorm": "batchnorm" in model["options"]},
        "famus": {"cosine_every": 0}})


METHODS = {**{name: {"name": name, **examples(cls)[0]} for name, cls in CLASSES.items()},
           "mwnet+famus": {"name": "mwnet", "famus": True},
           "ce+syncbn": {"name": "ce", "sync_batchnorm": True},
           "mwnet+syncbn": {"name": "mwnet", "sync_batchnorm": True}}
"""every method, built-in or plugin (test_conformance.CLASSES), as its first example says, and
FaMUS and synchronised BatchNorm on top"""


def snapshot(trainer: Trainer) -> dict[str, np.ndarray]:
    """Model parameters and buffers (BatchNorm statistics), and the meta-model's parameters."""
    state = {f"model.{n}": t.detach().numpy().copy() for n, t in trainer.model.state_dict().items()}
    if trainer.method.meta_model is not None:
        state.update({f"meta.{n}": p.detach().numpy().copy()
                      for n, p in trainer.method.meta_model.named_parameters()})
    return state


def five_steps(method: dict, world: int, steps: int = 5) -> dict[str, np.ndarray]:
    """`steps` steps of one epoch; methods that change at an epoch (a warm-up or an estimate
    before their own step, pruning) first train the epochs before it, so the compared steps
    are the changed ones."""
    config = exact_config(method, world, epochs=100)  # only to read the method's options
    until = type(config.method).plain_ce_until
    before = getattr(config.method, until) if until else int(hasattr(config.method, "prune_start"))
    trainer = Trainer(exact_config(method, world, epochs=before + 1))
    if isinstance(trainer.engine.meta_gradient, Famus):
        trainer.engine.meta_gradient.force = True  # every gate on: the exact meta gradient
    for _ in range(before if steps else 0):
        trainer.train_epoch()
        trainer.epoch += 1
    if steps:
        trainer.train_epoch()
    assert trainer.engine.steps == steps * (before + 1)
    return snapshot(trainer)


def pseudo_run(world: int) -> tuple[dict[str, np.ndarray], list[int], list[dict]]:
    """Three epochs of MW-Net with a pseudo-clean meta set: parameters, the last meta set, curves."""
    trainer = Trainer(exact_config({"name": "mwnet", "pseudo": True}, world, epochs=3))
    curves = trainer.fit().curves
    return snapshot(trainer), trainer.pseudo_index.tolist(), curves


def _two_worker_loop(config: dict) -> dict:
    """On each Ray Train worker: 5 steps of every method; rank 0 returns its parameters and
    how far the other replica's parameters are from them."""
    import torch.distributed as dist

    out = {}
    for name, method in METHODS.items():
        params = five_steps(method, world=2)
        gathered = [None, None]
        dist.all_gather_object(gathered, params)
        replica_gap = max(np.abs(gathered[0][k] - gathered[1][k]).max() for k in params)
        out[name] = (params, replica_gap)
    out["pseudo"] = pseudo_run(world=2)
    return out


def test_workers_split_the_global_batch_exactly():
    """Two workers' parts of each batch (inputs, augmentation, labels) are the one-worker batch."""
    cfg = ExperimentConfig.model_validate(tiny_experiment(dataset={"name": "synthetic"}))
    data = build_data(cfg)
    split = DeviceSplit(data.train, data, torch.device("cpu"))
    # augmentation only runs on images: give the split 8x8 single-channel inputs
    split.x = torch.randint(0, 255, (len(split), 1, 8, 8), dtype=torch.uint8)
    split.mean, split.std = torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1)

    def run(rank, world, batch):
        gens = [torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)]
        return list(split.batches(batch, shuffle=True, augment="crop_flip", order_generator=gens[0],
                                  aug_generator=gens[1], drop_last=True, rank=rank, world=world))

    whole, parts = run(0, 1, 10), [run(r, 2, 5) for r in range(2)]
    assert len(whole) == len(parts[0]) == len(parts[1]) > 3
    for one, a, b in zip(whole, *parts):
        assert torch.equal(one.x, torch.cat([a.x, b.x])) and torch.equal(one.y, torch.cat([a.y, b.y]))
        assert (a.offset, b.offset, a.global_size) == (0, 5, 10)
    assert [shard(7, r, 3) for r in range(3)] == [(0, 3), (3, 5), (5, 7)]


@pytest.mark.ray
def test_two_workers_equal_one_worker_with_the_global_batch(ray_session, tmp_path):
    import ray.cloudpickle
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    result = TorchTrainer(
        _two_worker_loop, torch_config=TorchConfig(backend="gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=2),
        run_config=ray.train.RunConfig(name="exact", storage_path=str(tmp_path))).fit()
    for name, method in METHODS.items():
        two, replica_gap = result.return_value[name]
        one = five_steps(method, world=1)
        assert replica_gap == 0.0, name  # the replicas stay bit-identical
        gap = max(np.abs(one[k] - two[k]).max() for k in one)
        print(f"{name}: max |1 worker - 2 workers| = {gap:.2e}")
        assert gap < 1e-6, (name, gap)
        start = five_steps(method, world=1, steps=0)
        moved = max(np.abs(one[k] - start[k]).max() for k in one)
        assert moved > 1e-3, name  # the comparison is not between untouched parameters
    # the pseudo meta set: losses gathered from both workers, one mixture fit, the same choice
    two, chosen_two, curves_two = result.return_value["pseudo"]
    one, chosen_one, curves_one = pseudo_run(world=1)
    assert chosen_two == chosen_one and len(chosen_one) >= 16
    assert [c["pseudo_meta_size"] for c in curves_two] == [c["pseudo_meta_size"] for c in curves_one]
    assert max(np.abs(one[k] - two[k]).max() for k in one) < 1e-6


def _worker_pids() -> list[int]:
    import ray
    from ray.util.state import list_actors

    # the address of the Ray this session started: another Ray may run on the machine
    address = ray.get_runtime_context().gcs_address
    return [a.pid for a in list_actors(address=address, filters=[
        ("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])]


@pytest.mark.ray
def test_killed_worker_resumes_from_checkpoint(ray_session, tmp_path):
    import os
    import signal

    from raymeta.orchestrate.distributed import fit_distributed, train_storage

    cfg = ExperimentConfig.model_validate(tiny_experiment(
        method={"name": "mwnet"}, noise={"type": "uniform", "rate": 0.4},
        model={"options": {"hidden": [256, 256]}}, train={"epochs": 4, "batch_size": 16}))
    store, trial_id = str(tmp_path / "store"), "killed"
    snapshot = Path(train_storage(store, "ddp")) / trial_id / "checkpoint_manager_snapshot.json"
    outcome, errors = {}, []

    def fit():
        try:
            outcome.update(fit_distributed(cfg, ResourcesConfig(workers_per_trial=2, cpus_per_trial=2),
                                           store=store, sweep="ddp", trial_id=trial_id))
        except Exception as err:  # noqa: BLE001 - reported by the assertion below
            errors.append(err)

    thread = threading.Thread(target=fit)
    thread.start()
    deadline = time.monotonic() + 240
    while not snapshot.exists() and time.monotonic() < deadline and thread.is_alive():
        time.sleep(0.05)  # until the first checkpoint is registered
    assert snapshot.exists(), errors
    pids = _worker_pids()
    assert len(pids) == 2
    os.kill(pids[1], signal.SIGKILL)  # mid-epoch: an epoch takes seconds here
    thread.join(timeout=300)
    assert not errors and outcome["status"] == "completed", errors

    trials = query.load(store, "trials", "ddp")
    assert len(trials) == 1
    row = trials.row(0, named=True)
    assert (row["status"], row["world_size"], row["restarts"]) == ("completed", 2, 1)
    curves = query.load(store, "curves", "ddp")
    assert sorted(curves["epoch"].to_list()) == [0, 1, 2, 3]


@pytest.mark.ray
def test_sweep_with_two_workers_per_trial(ray_session, tmp_path):
    from raymeta.orchestrate.grid import load_sweep
    from raymeta.orchestrate.sweep import run_sweep

    spec = load_sweep(Path(__file__).parents[1] / "sweeps" / "digits-ddp.yaml")
    assert spec.resources.workers_per_trial == 2
    spec = parse_sweep({**spec.model_dump(exclude_defaults=True), "store": str(tmp_path),
                        "grid": {"seed": [0]}})
    train = {k: v for k, v in spec.base["train"].items() if k != "meta_batch_size"}  # ce alone reads none
    spec = spec.model_copy(update={"base": {**spec.base, "train": {**train, "epochs": 2}}})
    cells = expand(spec)
    assert run_sweep(spec, cells).failed == 0
    trials = query.load(str(tmp_path), "trials", spec.name)
    assert trials["world_size"].to_list() == [2] and trials["status"].to_list() == ["completed"]
    assert trials["tune_trial_id"].str.len_chars().min() > 0
    ranks = trials["ray_node_ids"][0].split(",")  # every worker's node, in rank order
    assert len(ranks) == 2 and trials["ray_node_id"][0] == ranks[0]
    curves = query.load(str(tmp_path), "curves", spec.name)
    assert curves.filter(pl.col("trial_id") == trials["trial_id"][0])["epoch"].to_list() == [0, 1]

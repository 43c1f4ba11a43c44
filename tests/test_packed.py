"""Packed seeds (`resources.seeds_per_trial`): K seeds in one vmapped model train exactly as K
separate runs, resume exactly, refuse what they cannot pack, and write one row per seed."""

import polars as pl
import pytest
import torch
from conftest import tiny_experiment

from raymeta.config import parse_experiment, parse_sweep
from raymeta.errors import ConfigError
from raymeta.models import build_model
from raymeta.models.packed import PackedModel
from raymeta.orchestrate.grid import expand, pack_cells
from raymeta.orchestrate.sweep import run_sweep
from raymeta.results import query
from raymeta.train import TrainingDiverged
from raymeta.train.packed import PackedTrainer


def experiment(method: dict, epochs: int = 2):
    """float64, so that packed and separate runs can be compared to 1e-12; a BatchNorm model."""
    return parse_experiment(tiny_experiment(
        model={"options": {"hidden": [32], "batchnorm": True}},
        noise={"type": "uniform", "rate": 0.4},
        train={"epochs": epochs, "batch_size": 64, "meta_batch_size": 32, "dtype": "float64"},
        optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4},
        method=method), unread_ok=True)  # ce reads no meta batch


def test_packed_model_equals_its_models_and_round_trips():
    torch.manual_seed(0)
    models = [build_model("cnn8", 10, 3, 16).double() for _ in range(3)]
    packed = PackedModel(models)
    x = torch.randn(3 * 4, 3, 16, 16, dtype=torch.float64)
    out = packed(x)  # train mode: batch statistics, and each seed's running statistics move
    for k, model in enumerate(models):
        torch.testing.assert_close(out[4 * k:4 * (k + 1)], model(x[4 * k:4 * (k + 1)]))
    copies = [build_model("cnn8", 10, 3, 16).double() for _ in range(3)]
    packed.unpack_into(copies)
    for model, copy in zip(models, copies):
        for (name, a), b in zip(model.state_dict().items(), copy.state_dict().values()):
            torch.testing.assert_close(a, b, msg=name)  # running statistics included


def test_packed_resume_equals_an_uninterrupted_run(tmp_path):
    cfg = experiment({"name": "mwnet"}, epochs=3)
    saved = tmp_path / "after-epoch-1"

    def keep_first(per_seed, trainer):
        if trainer.epoch == 1:
            trainer.save_checkpoint(saved)

    whole = PackedTrainer(cfg, [1, 2], on_epoch_end=keep_first)
    whole.fit()
    resumed = PackedTrainer(cfg, [1, 2], resume_from=saved)
    assert resumed.epoch == 1 and resumed.restarts == 1
    results = resumed.fit()
    for a, b in zip(whole.members, resumed.members):
        for (name, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
            torch.testing.assert_close(y, x, rtol=0, atol=1e-12, msg=name)
    assert [c["epoch"] for c in results[0].curves] == [0, 1, 2]
    with pytest.raises(ConfigError, match="written by another config"):
        PackedTrainer(cfg, [1, 3], resume_from=saved)  # other seeds: another pack


@pytest.mark.parametrize("sections, message", [
    ({"method": {"name": "mlnt", "start_epoch": 1}}, "train mlnt one seed per trial"),
    ({"method": {"name": "mwnet", "famus": True}}, "do not combine with method.famus"),
])
def test_what_cannot_be_packed_is_refused_with_the_fix(sections, message):
    with pytest.raises(ConfigError, match=message):
        PackedTrainer(parse_experiment(tiny_experiment(**sections)), [0, 1])
    spec = parse_sweep({"name": "p", "base": tiny_experiment(**sections), "grid": {"seed": [0, 1]},
                        "resources": {"seeds_per_trial": 2}})
    with pytest.raises(ConfigError, match=message):
        expand(spec)


def test_cells_are_packed_by_everything_but_the_seed():
    spec = parse_sweep({"name": "p", "base": tiny_experiment(),
                        "grid": {"method.name": ["ce", "mwnet"], "seed": [0, 1, 2]},
                        "resources": {"seeds_per_trial": 2}})
    groups = pack_cells(expand(spec), 2)
    assert [[c.config.seed for c in g] for g in groups] == [[0, 1], [2], [0, 1], [2]]
    assert all(len({c.config.method.name for c in g}) == 1 for g in groups)


def test_one_seed_a_trial_keeps_the_grid_order():
    """A sweep file orders its cells to run what matters first (one seed of every cell, then
    the others); unpacked, the trials run in that order, not grouped by all but the seed."""
    spec = parse_sweep({"name": "p", "base": tiny_experiment(),
                        "grid": {".": [{"seed": 0}, {"seed": 1}], "method.name": ["ce", "mwnet"]}})
    cells = expand(spec)
    assert [(c.config.seed, c.config.method.name) for c in cells] == [
        (0, "ce"), (0, "mwnet"), (1, "ce"), (1, "mwnet")]
    assert [[c.trial_id for c in g] for g in pack_cells(cells, 1)] == [[c.trial_id] for c in cells]


@pytest.mark.ray
def test_packed_sweep_writes_a_row_and_curves_per_seed(ray_session, tmp_path):
    spec = parse_sweep({"name": "packed", "store": str(tmp_path),
                        "base": tiny_experiment(noise={"type": "uniform", "rate": 0.4}),
                        "grid": {".": [{"method.name": "ce"}, {"method.name": "mwnet"},
                                       {"method.name": "ce", "optimizer.lr": 1.0e12}],  # diverges
                                 "seed": [0, 1, 2]},
                        "resources": {"cpus_per_trial": 1, "seeds_per_trial": 2}})
    cells = expand(spec)
    assert run_sweep(spec, cells).failed == 3  # failed cells, not failed packs
    trials = query.load(str(tmp_path), "trials", "packed")
    assert sorted(trials["trial_id"].to_list()) == sorted(c.trial_id for c in cells)
    done = trials.filter(pl.col("status") == "completed")
    failed = trials.filter(pl.col("status") == "failed")
    assert len(done) == 6 and len(failed) == 3
    assert sorted(done["packed_seeds"].to_list()) == [1, 1, 2, 2, 2, 2]
    assert done.group_by("method").agg(pl.col("seed").sort())["seed"].to_list() == [[0, 1, 2]] * 2
    assert failed["error"].str.contains("packed seeds").sum() == 2  # the pack of two names its seed
    curves = query.load(str(tmp_path), "curves", "packed").filter(
        pl.col("trial_id").is_in(done["trial_id"].to_list()))
    assert curves.group_by("trial_id").agg(pl.len())["len"].to_list() == [2] * 6
    # a rerun finds every completed seed's row and trains only the failed ones again
    before = done["finished_at"].sort().to_list()
    assert run_sweep(spec, expand(spec)).failed == 3
    again = query.load(str(tmp_path), "trials", "packed").filter(pl.col("status") == "completed")
    assert again["finished_at"].sort().to_list() == before


def test_a_diverging_seed_is_named():
    cfg = parse_experiment(tiny_experiment(optimizer={"lr": 1.0e12}))
    with pytest.raises(TrainingDiverged, match=r"training loss of seed \d \(one of the packed "
                                                r"seeds\) is nan in epoch 0"):
        PackedTrainer(cfg, [0, 1]).fit()

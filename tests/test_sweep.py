"""A real Ray Tune sweep, end to end: trials run, report each epoch, write Parquet."""

import json
from pathlib import Path

import polars as pl
import pytest
from conftest import tiny_experiment

from raymeta.config import parse_sweep
from raymeta.orchestrate.grid import expand
from raymeta.orchestrate.sweep import run_sweep
from raymeta.results import query

pytestmark = pytest.mark.ray


def test_sweep_writes_rows_curves_and_failures(ray_session, tmp_path):
    spec = parse_sweep({
        "name": "e2e", "store": str(tmp_path),
        "base": tiny_experiment(train={"epochs": 3}),
        "grid": {"optimizer.lr": [0.1, 1.0e12],
                 "noise": [{"type": "none"}, {"type": "uniform", "rate": 0.4}], "seed": [0, 1]},
        # one diverging cell (lr 1e12, uniform, seed 0) beside four healthy ones
        "exclude": [{"optimizer.lr": 1.0e12, "seed": 1}, {"optimizer.lr": 1.0e12, "noise.type": "none"}],
    })
    cells = expand(spec)
    assert len(cells) == 5
    assert run_sweep(spec, cells) == 1

    trials = query.load(str(tmp_path), "trials", "e2e")
    assert len(trials) == 5 and trials["trial_id"].n_unique() == 5
    done = trials.filter(pl.col("status") == "completed")
    failed = trials.filter(pl.col("status") == "failed")
    assert len(done) == 4 and len(failed) == 1
    assert "training loss is nan in epoch 0" in failed["error"].item()
    assert (done["epochs_run"] == 3).all()
    for column in ("git_rev", "torch_version", "ray_version", "hostname", "config_json",
                   "noisy_labels_sha", "meta_split_sha", "tune_trial_id"):
        assert column in trials.columns, column
    assert done["torch_version"].str.len_chars().min() > 0
    config = json.loads(done["config_json"][0])
    assert config["train"]["epochs"] == 3

    curves = query.load(str(tmp_path), "curves", "e2e")
    per_trial = curves.filter(pl.col("trial_id").is_in(done["trial_id"].to_list())).group_by(
        "trial_id").agg(pl.col("epoch").sort())
    assert all(epochs == [0, 1, 2] for epochs in per_trial["epoch"].to_list())

    table = query.summary(trials)
    assert table.columns == ["method", "clean", "uniform 0.4"]
    assert table["clean"].item().endswith("(2)") and table["uniform 0.4"].item().endswith("(2)")

    # Tune saw every epoch of every healthy trial (its own result files)
    tune_dir = Path(tmp_path) / "tune" / "e2e"
    for trial_id in done["trial_id"]:
        lines = (tune_dir / trial_id / "result.json").read_text().strip().splitlines()
        assert [json.loads(line)["epoch"] for line in lines] == [0, 1, 2]

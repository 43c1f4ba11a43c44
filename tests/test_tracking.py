"""Experiment trackers, for real: a sweep logged to a local MLflow store (read back through
the MLflow client) and to W&B offline runs; `raymeta run --track`; refusals before Ray."""

import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml
from conftest import tiny_experiment

from raymeta.config import TrackingConfig, parse_sweep
from raymeta.errors import ConfigError
from raymeta.orchestrate.grid import expand
from raymeta.orchestrate.sweep import run_sweep
from raymeta.results import query
from raymeta.tracking import check_tracking


def _sweep(tmp_path, tracking: dict, **resources):
    return parse_sweep({
        "name": "tracked", "store": str(tmp_path / "store"),
        "base": tiny_experiment(noise={"type": "uniform", "rate": 0.4}, train={"epochs": 3}),
        "grid": {"method": [{"name": "ce"}, {"name": "mlc"}]},
        "tracking": tracking, "resources": {"max_concurrent_trials": 2, **resources}})


def _runs(uri: str, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    return client, client.search_runs([found.experiment_id])


@pytest.mark.ray
def test_a_chained_sweep_is_logged_to_mlflow_one_run_per_cell(ray_session, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = _sweep(tmp_path, {"mlflow": {"uri": uri}}, cells_per_trial=2)  # both in one trial
    assert run_sweep(spec, expand(spec)).failed == 0
    rows = query.load(str(tmp_path / "store"), "trials", "tracked")
    client, runs = _runs(uri, "tracked")
    assert sorted(r.info.run_name for r in runs) == sorted(rows["trial_id"])
    for run in runs:
        row = rows.filter(pl.col("trial_id") == run.info.run_name).row(0, named=True)
        assert run.info.status == "FINISHED" and run.data.tags["raymeta.status"] == "completed"
        assert run.data.params["method.name"] == row["method.name"]
        assert run.data.params["noise.rate"] == "0.4"
        history = client.get_metric_history(run.info.run_id, "test_acc")
        assert sorted(m.step for m in history) == [0, 1, 2]
        curve = query.load(str(tmp_path / "store"), "curves", "tracked").filter(
            pl.col("trial_id") == row["trial_id"]).sort("epoch")
        assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(
            curve["test_acc"].to_list())
        assert run.data.metrics["final_test_acc"] == pytest.approx(row["final_test_acc"])
        # list-valued metrics (per-class accuracy, MLC's T) are an artifact, not scalars
        saved = client.download_artifacts(run.info.run_id, "list_metrics.json", str(tmp_path))
        lists = json.loads(Path(saved).read_text())
        # beside the database, not in ./mlruns of whatever directory the sweep ran from
        assert run.info.artifact_uri.startswith((tmp_path / "mlruns").as_uri())
        assert [epoch for epoch, _ in lists["test_class_acc"]] == [0, 1, 2]
        assert ("T" in lists) == (row["method.name"] == "mlc")
        assert "T" not in run.data.metrics and "test_class_acc" not in run.data.metrics


@pytest.mark.ray
def test_a_packed_sweep_is_logged_to_wandb_offline_one_run_per_seed(ray_session, tmp_path):
    spec = parse_sweep({
        "name": "wb", "store": str(tmp_path / "store"),
        "base": tiny_experiment(method={"name": "mlc"}, noise={"type": "uniform", "rate": 0.4}),
        "grid": {"seed": [0, 1]}, "resources": {"seeds_per_trial": 2},
        "tracking": {"wandb": {"mode": "offline", "dir": str(tmp_path)}}})
    assert run_sweep(spec, expand(spec)).failed == 0
    rows = query.load(str(tmp_path / "store"), "trials", "wb")
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2  # a run per seed, though both trained in one Tune trial
    logged = [b"".join(p.read_bytes() for p in run.glob("*.wandb")) for run in runs]
    for trial_id in rows["trial_id"]:
        assert sum(trial_id.encode() in data for data in logged) == 1
    for run, data in zip(runs, logged):
        assert b"final_test_acc" in data and b"train_loss" in data
        assert (run / "files" / "list_metrics.json").is_file()


def test_mlflow_run_track_uses_the_same_code_path(tmp_path):
    """`raymeta run --track mlflow` logs the run as a sweep's trial is logged."""
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(tiny_experiment()))
    uri = f"sqlite:///{tmp_path / 'runs.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    proc = subprocess.run([sys.executable, "-m", "raymeta.cli", "run", "exp.yaml", "--track",
                           "mlflow", "--store", str(tmp_path / "store")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    client, runs = _runs(uri, "runs")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert len(client.get_metric_history(runs[0].info.run_id, "meta_acc")) == 2
    assert runs[0].data.params["dataset.name"] == "digits"


def test_an_unreachable_tracking_server_is_refused_before_ray_starts(tmp_path):
    with pytest.raises(ConfigError, match="cannot be used .nothing answers.*sqlite:///mlflow.db"):
        check_tracking(TrackingConfig.model_validate({"mlflow": {"uri": "http://127.0.0.1:9"}}))
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({
        "name": "t", "store": str(tmp_path / "store"), "base": tiny_experiment(),
        "grid": {"seed": [0]}, "tracking": {"mlflow": {"uri": "http://127.0.0.1:9"}}}))
    proc = subprocess.run([sys.executable, "-m", "raymeta.cli", "sweep", "s.yaml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "tracking.mlflow.uri 'http://127.0.0.1:9'" in proc.stderr
    assert not Path(tmp_path / "store" / "tune").exists()


def test_wandb_online_without_a_login_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    with pytest.raises(ConfigError, match="wandb login.*mode: offline"):
        check_tracking(TrackingConfig.model_validate({"wandb": {"mode": "online"}}))


def test_a_tracker_that_fails_mid_run_is_dropped_with_a_warning_not_the_run(tmp_path, capsys):
    from raymeta.tracking import Tracking

    tracking = Tracking(TrackingConfig.model_validate(
        {"wandb": {"mode": "offline", "dir": str(tmp_path)}}), "sweep")
    tracking.epoch("trial", {"seed": 0}, {"epoch": 0, "train_loss": 1.0})
    tracking.runs["trial"][0].finish()  # the run ends underneath: logging to it now fails
    tracking.epoch("trial", {"seed": 0}, {"epoch": 1, "train_loss": 0.5})
    tracking.epoch("trial", {"seed": 0}, {"epoch": 2, "train_loss": 0.4})
    tracking.finish("trial", row={"status": "completed", "final_test_acc": 0.9})
    err = capsys.readouterr().err
    assert err.count("warning: logging to Wandb failed") == 1
    assert "the results store has every row" in err

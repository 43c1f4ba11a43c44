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
                 "noise": [{"type": "none"}, {"type": "uniform", "rate": 0.4}], "seed": [0, 1, 2]},
        # one diverging cell (lr 1e12, uniform, seed 0) beside five healthy ones
        "exclude": [{"optimizer.lr": 1.0e12, "seed": 1}, {"optimizer.lr": 1.0e12, "seed": 2},
                    {"optimizer.lr": 1.0e12, "noise.type": "none"},
                    {"optimizer.lr": 0.1, "noise.type": "none", "seed": 2}],
    })
    cells = expand(spec)
    assert len(cells) == 6
    assert run_sweep(spec, cells).failed == 1  # the sweep goes on past the failed trial

    trials = query.load(str(tmp_path), "trials", "e2e")
    assert len(trials) == 6 and trials["trial_id"].n_unique() == 6
    done = trials.filter(pl.col("status") == "completed")
    failed = trials.filter(pl.col("status") == "failed")
    assert len(done) == 5 and len(failed) == 1
    assert "training loss is nan in epoch 0: the training loss (ce's actual-step loss) became " \
           "non-finite at step" in failed["error"].item()
    assert "lower optimizer.lr" in failed["error"].item()
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
    clean = table["clean"].item()
    assert clean == f"**{clean.strip('*')}**"  # the only row is the best of its column
    assert clean.endswith("(2)**") and table["uniform 0.4"].item().endswith("(3, 1 failed)**")

    # Tune saw every epoch of every healthy trial (its own result files)
    tune_dir = Path(tmp_path) / "tune" / "e2e"
    for trial_id in done["trial_id"]:
        lines = (tune_dir / trial_id / "result.json").read_text().strip().splitlines()
        assert [json.loads(line)["epoch"] for line in lines] == [0, 1, 2]


RESUMABLE = """
name: resumable
store: out
base:
  dataset: {name: digits}
  model: {name: mlp, options: {hidden: [32]}}
  meta_set: {per_class: 5}
  train: {epochs: 3, batch_size: 64}
grid:
  method.name: [ce, mwnet]
  noise: [{type: uniform, rate: 0.4}, {type: flip_to_one, rate: 0.4}]
  seed: [0, 1, 2]
resources: {cpus_per_trial: 1, max_concurrent_trials: 2}
"""


def test_chained_cells_share_tune_trials_and_keep_their_own_rows(ray_session, tmp_path, capsys):
    """resources.cells_per_trial: consecutive cells train one after another in one Tune
    trial; each writes its own rows, and a failing cell neither stops the others nor
    counts more than once."""
    spec = parse_sweep({
        "name": "chain", "store": str(tmp_path), "base": tiny_experiment(train={"epochs": 2}),
        "grid": {"optimizer.lr": [0.1, 1.0e12], "seed": [0, 1, 2]},
        "exclude": [{"optimizer.lr": 1.0e12, "seed": 1}, {"optimizer.lr": 1.0e12, "seed": 2}],
        "resources": {"cells_per_trial": 3}})
    cells = expand(spec)
    assert len(cells) == 4
    assert run_sweep(spec, cells).failed == 1
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert len(lines) == 2 and lines[-1].startswith("[4/4 done, 0 running, 1 failed")  # cells
    trials = query.load(str(tmp_path), "trials", "chain")
    assert sorted(trials["trial_id"]) == sorted(c.trial_id for c in cells)
    assert trials["status"].to_list().count("completed") == 3
    assert "lower optimizer.lr" in trials.filter(pl.col("status") == "failed")["error"].item()
    # 4 cells in chains of 3 and 1: two Tune trials
    assert trials["tune_trial_id"].n_unique() == 2
    curves = query.load(str(tmp_path), "curves", "chain").filter(
        pl.col("trial_id").is_in(trials.filter(pl.col("status") == "completed")["trial_id"].to_list()))
    assert curves.group_by("trial_id").len()["len"].to_list() == [2, 2, 2]
    # finished cells are not trained again; the failed one is, and fails once more
    assert run_sweep(spec, cells).failed == 1
    again = query.load(str(tmp_path), "trials", "chain")
    assert len(again) == 4 and again["status"].to_list().count("completed") == 3


def test_resume_on_a_copied_store_skips_rows_written_under_older_trial_ids(ray_session, tmp_path,
                                                                          capsys):
    """A store copied to another machine has rows but no Tune state, and rows written before a
    digest rule changed carry an older trial id. `--resume` there starts the sweep afresh and
    must still find those runs by their config, not train them again (it did: 2 minutes of a
    fidelity sweep's CE cell, a row under a second id)."""
    import shutil

    spec = parse_sweep({"name": "copied", "store": str(tmp_path),
                        "base": tiny_experiment(train={"epochs": 1}), "grid": {"seed": [0, 1]}})
    cells = expand(spec)
    assert run_sweep(spec, cells).failed == 0
    rows = tmp_path / "trials" / "sweep=copied"
    old_id = cells[0].trial_id.rsplit("_", 1)[0] + "_0123456789"
    row = pl.read_parquet(rows / f"{cells[0].trial_id}.parquet")
    row.with_columns(pl.lit(old_id).alias("trial_id"), pl.lit("0123456789").alias("config_digest")
                     ).write_parquet(rows / f"{old_id}.parquet")
    (rows / f"{cells[0].trial_id}.parquet").unlink()
    shutil.rmtree(tmp_path / "tune")  # only trials/ and curves/ were copied
    capsys.readouterr()

    assert run_sweep(spec, cells, resume=True).failed == 0
    assert sorted(p.stem for p in rows.glob("*.parquet")) == sorted([old_id, cells[1].trial_id])
    assert "2 of 2 trials already have finished rows" in capsys.readouterr().out
    assert len(query.load(str(tmp_path), "trials", "copied")) == 2


def test_resume_after_the_sweep_file_changed_runs_the_new_cells(ray_session, tmp_path, capsys):
    """Cells added to a sweep file between an interruption and `--resume` run: Tune would
    restore the grid it saved and skip them silently."""
    base = {"name": "grown", "store": str(tmp_path), "base": tiny_experiment(train={"epochs": 1})}
    spec = parse_sweep({**base, "grid": {"seed": [0, 1]}})
    assert run_sweep(spec, expand(spec)).failed == 0
    grown = parse_sweep({**base, "grid": {"seed": [0, 1, 2]}})
    capsys.readouterr()
    assert run_sweep(grown, expand(grown), resume=True).failed == 0
    captured = capsys.readouterr()
    assert "the sweep's cells changed since it was interrupted" in captured.err
    assert "2 of 3 trials already have finished rows" in captured.out
    trials = query.load(str(tmp_path), "trials", "grown")
    assert sorted(trials["seed"].to_list()) == [0, 1, 2]
    # unchanged, a resume restores Tune's state as before: nothing to train, no message
    assert run_sweep(grown, expand(grown), resume=True).failed == 0
    assert "changed since" not in capsys.readouterr().err
    assert len(query.load(str(tmp_path), "trials", "grown")) == 3


def test_interrupted_sweep_says_so_and_resumes_each_trial_once(tmp_path):
    """Ctrl-C (SIGINT) mid-sweep: exit 130, a message that names --resume, a summary marked
    partial. Then SIGKILL of the driver and its Ray mid-resume. Then a resume that finishes:
    every trial exactly once, finished trials not rerun, curves complete."""
    import os
    import signal
    import subprocess
    import sys
    import time

    (tmp_path / "sweep.yaml").write_text(RESUMABLE)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "raymeta.cli", "sweep", "sweep.yaml"]
    rows = tmp_path / "out" / "trials" / "sweep=resumable"

    def start_and_wait_for(count: int, *args: str) -> subprocess.Popen:
        proc = subprocess.Popen([*command, *args], cwd=tmp_path, env=env, start_new_session=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if len(list(rows.glob("*.parquet"))) >= count:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the sweep finished before it could be interrupted"
        return proc

    proc = start_and_wait_for(3)
    proc.send_signal(signal.SIGINT)  # the driver only, as `kill -INT`
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out + err
    assert "continue with: raymeta sweep sweep.yaml --resume" in err
    assert "interrupted after" in err and "of 12 trials completed" in err
    assert "Tuner.restore" not in out + err
    before = query.load(str(tmp_path / "out"), "trials", "resumable")
    assert 3 <= len(before) < 12 and (before["status"] == "completed").all()
    assert "partial results: " in out

    proc = start_and_wait_for(len(before) + 2, "--resume")
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started
    proc.communicate()
    middle = query.load(str(tmp_path / "out"), "trials", "resumable")
    finished = dict(zip(middle["trial_id"], middle["finished_at"]))

    started = time.monotonic()
    done = subprocess.run([*command, "--resume"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=400)
    wall = time.monotonic() - started
    assert done.returncode == 0, done.stdout + done.stderr
    assert "12 completed, 0 failed" in done.stdout and "[12/12 done" in done.stdout
    import re

    elapsed = [int(s) for s in re.findall(r"pending; (\d+)s", done.stdout)]
    assert elapsed and max(elapsed) <= wall  # its own clock, not the first run's
    assert "Traceback" not in done.stderr and "Could not fetch metrics" not in done.stderr, done.stderr
    trials = query.load(str(tmp_path / "out"), "trials", "resumable")
    assert len(trials) == 12 and trials["trial_id"].n_unique() == 12
    assert (trials["status"] == "completed").all()
    after = dict(zip(trials["trial_id"], trials["finished_at"]))
    assert all(after[t] == finished[t] for t in finished)  # finished trials were not rerun
    curves = query.load(str(tmp_path / "out"), "curves", "resumable")
    assert curves.group_by("trial_id").agg(pl.col("epoch").sort())["epoch"].to_list() == [[0, 1, 2]] * 12


def test_asha_stops_bad_trials_and_records_them(ray_session, tmp_path):
    spec = parse_sweep({
        "name": "asha", "store": str(tmp_path),
        "base": tiny_experiment(train={"epochs": 4}),
        # run one at a time: the good trials set each rung before the bad ones reach it
        "grid": {"optimizer.lr": [0.1, 0.05, 1.0e-5, 2.0e-5]},
        "resources": {"max_concurrent_trials": 1},
        "early_stopping": {"scheduler": "asha", "grace_period": 1, "reduction_factor": 2},
    })
    assert run_sweep(spec, expand(spec)).failed == 0
    trials = query.load(str(tmp_path), "trials", "asha")
    assert len(trials) == 4
    by_lr = {r["optimizer.lr"]: r for r in trials.iter_rows(named=True)}
    assert by_lr[0.1]["status"] == "completed" and by_lr[0.1]["epochs_run"] == 4
    stopped = trials.filter(pl.col("status") == "stopped")
    assert len(stopped) >= 1 and (stopped["epochs_run"] < 4).all()
    assert {1.0e-5, 2.0e-5} <= set(stopped["optimizer.lr"])  # the trials that cannot learn
    curves = query.load(str(tmp_path), "curves", "asha")
    for row in stopped.iter_rows(named=True):
        epochs = curves.filter(pl.col("trial_id") == row["trial_id"])["epoch"].sort().to_list()
        assert epochs == list(range(row["epochs_run"]))
    assert query.summary(trials, mark_best=False)["clean"].item().endswith(f"({4 - len(stopped)})")
    with pytest.raises(Exception, match="test-set metric"):
        parse_sweep({"name": "x", "early_stopping": {"scheduler": "asha", "metric": "test_acc"}})

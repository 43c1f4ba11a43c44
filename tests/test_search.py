"""Hyperparameter search inside grid cells (a sweep file's `search:`), with real Ray Tune
search algorithms, chosen on the clean meta set and confirmed on fresh seeds."""

import json
import subprocess
import sys

import polars as pl
import pytest
import yaml
from click.testing import CliRunner
from conftest import tiny_experiment

from raymeta.cli import cli
from raymeta.config import parse_sweep
from raymeta.errors import ConfigError
from raymeta.orchestrate.grid import expand
from raymeta.orchestrate.search import plan
from raymeta.orchestrate.sweep import run_sweep
from raymeta.results import query
from raymeta.results.search import sample_scores

pytestmark = pytest.mark.ray


def _spec(tmp_path, search: dict, grid: dict | None = None, **base):
    return parse_sweep({
        "name": "srch", "store": str(tmp_path / "store"),
        "base": tiny_experiment(method={"name": "mwnet"}, noise={"type": "uniform", "rate": 0.4},
                                train={"epochs": 3}, **base),
        "grid": grid or {"noise.type": ["uniform", "flip_to_one"]},
        "search": search, "resources": {"max_concurrent_trials": 2}})


def test_optuna_search_chooses_on_the_meta_set_and_confirms_on_fresh_seeds(ray_session, tmp_path,
                                                                           capsys):
    spec = _spec(tmp_path, {"space": {"method.meta_lr": {"loguniform": [1.0e-4, 1.0]}},
                            "num_samples": 3, "confirm_seeds": [1, 2]})
    run = run_sweep(spec, expand(spec))
    assert run.failed == 0 and not run.interrupted
    store = str(tmp_path / "store")

    samples = query.load(store, "trials", "srch.search")
    assert len(samples) == 6 and set(samples["status"]) == {"completed"}
    curves = query.load(store, "curves", "srch.search")
    last = (curves.sort("epoch").group_by("trial_id").agg(pl.col("meta_acc").last())
            .join(samples.select("trial_id", "search_cell", "method.meta_lr", "seed"), on="trial_id"))
    confirmed = query.load(store, "trials", "srch")
    assert len(confirmed) == 4 and set(confirmed["status"]) == {"completed"}
    for cell, part in last.group_by("search_cell"):
        assert len(part) == 3 and part["method.meta_lr"].n_unique() == 3  # three proposals
        best = part.sort("meta_acc", descending=True, maintain_order=True)["meta_acc"][0]
        runs = confirmed.filter(pl.col("noise.type") == samples.filter(
            pl.col("search_cell") == cell[0])["noise.type"][0])
        # the confirmation runs train the chosen value, which scored best on the meta set
        chosen_lr = runs["method.meta_lr"].unique().to_list()
        assert len(chosen_lr) == 1 and sorted(runs["seed"].to_list()) == [1, 2]
        assert part.filter(pl.col("method.meta_lr") == chosen_lr[0])["meta_acc"][0] == best

    # `raymeta results summary` of the sweep is the confirmation runs: two seeds per cell,
    # their mean
    result = CliRunner().invoke(cli, ["results", "summary", "--sweep", "srch", "--store", store])
    assert result.exit_code == 0, result.output
    row = result.output.splitlines()[2].split()
    assert row[0] == "mwnet" and row.count("(2)") == 2
    for noise in ("uniform", "flip_to_one"):
        accs = confirmed.filter(pl.col("noise.type") == noise)["final_test_acc"] * 100
        assert f"{accs.mean():.2f}" in result.output
    result = CliRunner().invoke(cli, ["results", "search", "--sweep", "srch", "--store", store])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "method.meta_lr" in lines[0] and "confirmed test acc" in lines[0]
    assert len(lines) == 4 and all("(2)" in line for line in lines[2:])
    result = CliRunner().invoke(cli, ["results", "plot", "search", "--sweep", "srch", "--store",
                                      store, "--out", str(tmp_path / "search.png")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "search.png").stat().st_size > 10_000

    # Tune sees the searched key as its own axis, and each sample's cell; the cells' samples
    # share one experiment (they search side by side)
    import ray.tune

    frame = ray.tune.ExperimentAnalysis(str(tmp_path / "store" / "tune" / "srch.search")).dataframe()
    assert "config/method.meta_lr" in frame.columns and len(frame) == 6
    assert sorted(frame["config/cell"].value_counts().to_list()) == [3, 3]

    # a second start searches nothing again and trains nothing
    capsys.readouterr()
    assert run_sweep(spec, expand(spec)).failed == 0
    out = capsys.readouterr().out
    assert "searched already (3 samples in each of 2 cells)" in out
    assert "4 of 4 trials already have finished rows" in out
    assert len(query.load(store, "trials", "srch.search")) == 6


def test_random_search_scores_several_seeds_together(ray_session, tmp_path):
    """Seeds of a cell are searched together (the mean over them, here of each run's best
    meta loss); without confirm_seeds the chosen sample's own runs are the results, copied."""
    spec = _spec(tmp_path, {"space": {"method.meta_interval": {"choice": [1, 2]}},
                            "algorithm": "random", "num_samples": 2, "metric": "meta_loss",
                            "at": "best", "seed": 3}, grid={"seed": [0, 1]})
    assert run_sweep(spec, expand(spec)).failed == 0
    store = str(tmp_path / "store")
    scores = sample_scores(store, "srch")
    curves = query.load(store, "curves", "srch.search")
    for row in scores.iter_rows(named=True):
        assert row["seeds"] == 2
        best = [curves.filter(pl.col("trial_id") == t)["meta_loss"].min() for t in row["trial_id"]]
        assert row["score"] == pytest.approx(sum(best) / 2)
    chosen = scores.sort("score")["method.meta_interval"][0]  # the smaller loss
    confirmed = query.load(store, "trials", "srch")
    assert sorted(confirmed["seed"].to_list()) == [0, 1]
    assert set(confirmed["method.meta_interval"].to_list()) == {json.loads(chosen)}
    assert set(confirmed["trial_id"]) <= set(query.load(store, "trials", "srch.search")["trial_id"])


@pytest.mark.parametrize("search, expected", [
    ({"space": {"method.meta_lr": {"uniform": [0.001, 0.1]}}, "metric": "test_acc"},
     "test_acc is a test-set metric"),
    ({"space": {"method.meta_lr": {"uniform": [0.001, 0.1]}}, "algorithm": "hyperband"},
     "search.algorithm"),
    ({"space": {"method.meta_lr": {"loguniform": [0, 1]}}}, "loguniform [0, 1] needs low > 0"),
    ({"space": {"method.meta_interval": {"choice": []}}}, "choice takes a non-empty list"),
    ({"space": {"method.meta_lr": {"normal": [0, 1]}}}, "unknown distribution 'normal'"),
    ({"space": {"noise.type": {"choice": ["uniform"]}}}, "both a grid key and searched"),
])
def test_bad_searches_are_refused_with_the_fix(tmp_path, search, expected):
    with pytest.raises(ConfigError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        spec = _spec(tmp_path, search)
        plan(spec, expand(spec))


@pytest.mark.parametrize("algorithm, samples, random_only", [
    ("optuna", 8, True), ("optuna", 10, True), ("optuna", 11, False), ("random", 8, False)])
def test_an_optuna_search_too_short_for_tpe_says_its_samples_are_random(
        tmp_path, algorithm, samples, random_only):
    """Optuna's TPE draws its first 10 samples at random: a search of 8 (the default) never
    uses it, which a user reading `algorithm: optuna` would not guess."""
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump({
        "name": "srch", "store": str(tmp_path / "store"),
        "base": tiny_experiment(method={"name": "mwnet"}, noise={"type": "uniform", "rate": 0.4}),
        "grid": {"seed": [0]}, "search": {"space": {"method.meta_lr": {"loguniform": [1e-3, 1.0]}},
                                          "algorithm": algorithm, "num_samples": samples}}))
    for command in (["sweep", str(path), "--dry-run"], ["validate", str(path)]):
        result = CliRunner().invoke(cli, command)
        assert result.exit_code == 0, result.output
        said = f"all {samples} samples of each cell are random draws" in result.output
        assert said == random_only, result.output


def test_a_searched_key_the_method_never_reads_is_refused(tmp_path):
    spec = _spec(tmp_path, {"space": {"famus.k": {"randint": [1, 3]}}})
    with pytest.raises(ConfigError, match="famus.k"):
        plan(spec, expand(spec))


def test_a_search_on_the_test_set_stops_before_ray_starts(tmp_path):
    (tmp_path / "s.yaml").write_text(json.dumps({
        "name": "t", "store": str(tmp_path / "store"), "base": tiny_experiment(),
        "grid": {"seed": [0]},
        "search": {"space": {"optimizer.lr": {"loguniform": [0.01, 1.0]}}, "metric": "test_acc"}}))
    proc = subprocess.run([sys.executable, "-m", "raymeta.cli", "sweep", "s.yaml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "test-set metric" in proc.stderr and "meta_acc or meta_loss" in proc.stderr
    assert not (tmp_path / "store").exists()  # nothing started, nothing written


def test_asha_stops_samples_whose_rows_still_score(ray_session, tmp_path):
    """With early stopping, stopped samples are `stopped` rows, scored on the epochs they ran."""
    space = {"optimizer.lr": {"loguniform": [1.0e-6, 0.3]}}
    spec = parse_sweep({
        "name": "srch", "store": str(tmp_path / "store"), "base": tiny_experiment(train={"epochs": 4}),
        "grid": {"seed": [0]}, "search": {"space": space, "algorithm": "random", "num_samples": 5},
        # on the meta loss, which (unlike the accuracy) differs between the lrs that cannot learn
        "early_stopping": {"scheduler": "asha", "metric": "meta_loss", "mode": "min",
                           "grace_period": 1, "reduction_factor": 2},
        "resources": {"max_concurrent_trials": 1}})  # one at a time: the same stops every run
    assert run_sweep(spec, expand(spec)).failed == 0
    store = str(tmp_path / "store")
    samples = query.load(store, "trials", "srch.search")
    assert len(samples) == 5
    stopped = samples.filter(pl.col("status") == "stopped")
    assert len(stopped) >= 1 and (stopped["epochs_run"] < 4).all()
    scores = sample_scores(store, "srch")
    assert len(scores) == 5  # every sample is scored, the stopped ones too
    best_lr = json.loads(scores["optimizer.lr"][0])
    assert best_lr not in stopped["optimizer.lr"].to_list()
    confirmed = query.load(store, "trials", "srch")
    assert confirmed["status"].to_list() == ["completed"]
    assert confirmed["optimizer.lr"].item() == best_lr
    # early stopping is the search's: confirmation runs on fresh seeds train to their end
    more = spec.model_copy(update={"search": spec.search.model_copy(
        update={"confirm_seeds": [1, 2, 3]})})
    assert run_sweep(more, expand(more)).failed == 0
    confirmed = query.load(store, "trials", "srch").filter(pl.col("seed") > 0)
    assert confirmed["status"].to_list() == ["completed"] * 3
    assert confirmed["epochs_run"].to_list() == [4] * 3


def test_a_cell_whose_samples_all_fail_is_named_and_confirms_nothing(ray_session, tmp_path, capsys):
    spec = parse_sweep({
        "name": "srch", "store": str(tmp_path / "store"), "base": tiny_experiment(),
        "grid": {"optimizer.momentum": [0.0, 0.5]},
        "search": {"space": {"optimizer.lr": {"loguniform": [1.0e11, 1.0e12]}},  # every lr diverges
                   "algorithm": "random", "num_samples": 2},
        "exclude": [], "resources": {"max_concurrent_trials": 2}})
    run = run_sweep(spec, expand(spec))
    assert run.cells == [] and len(run.unsearched) == 2
    assert "no sample of cell" in capsys.readouterr().err
    samples = query.load(str(tmp_path / "store"), "trials", "srch.search")
    assert len(samples) == 4 and set(samples["status"]) == {"failed"}

"""The Parquet results store and the summary table (written for real, read back with polars)."""

import math
from pathlib import Path

import polars as pl
import pytest

from raymeta.errors import ConfigError
from raymeta.results import query
from raymeta.results.store import write_trial


def row(method, noise_type, rate, seed, acc, status="completed"):
    return {"method.name": method, "noise.type": noise_type, "noise.rate": rate, "seed": seed,
            "final_test_acc": acc, "best_test_acc": acc + 0.01, "status": status,
            "model.options": {"hidden": [8]}}


def fill(store, sweep="s"):
    accs = {("ce", "none", 0.0): [0.98, 0.96], ("ce", "uniform", 0.4): [0.80, 0.70],
            ("mwnet", "uniform", 0.4): [0.90, 0.86, 0.88]}
    for (method, noise_type, rate), values in accs.items():
        for seed, acc in enumerate(values):
            trial = f"{method}-{noise_type}-{seed}"
            write_trial(store, sweep, trial, row(method, noise_type, rate, seed, acc),
                        [{"epoch": e, "test_acc": acc * (e + 1) / 3} for e in range(3)])
    return accs


def test_rows_round_trip(tmp_path):
    fill(str(tmp_path))
    trials = query.load(str(tmp_path), "trials", "s")
    curves = query.load(str(tmp_path), "curves", "s")
    assert len(trials) == 7 and len(curves) == 21
    assert set(trials["sweep"]) == {"s"}
    assert trials.filter(pl.col("trial_id") == "ce-uniform-1")["final_test_acc"].item() == 0.70
    assert trials["model.options"][0] == '{"hidden": [8]}'  # nested values are stored as JSON


def test_rewriting_a_trial_replaces_its_rows(tmp_path):
    store = str(tmp_path)
    fill(store)
    write_trial(store, "s", "ce-none-0", row("ce", "none", 0.0, 0, 0.5), [{"epoch": 0, "test_acc": 0.5}])
    trials = query.load(store, "trials", "s")
    assert len(trials) == 7
    assert trials.filter(pl.col("trial_id") == "ce-none-0")["final_test_acc"].item() == 0.5
    assert len(query.load(store, "curves", "s").filter(pl.col("trial_id") == "ce-none-0")) == 1
    leftovers = [p for p in Path(store).rglob("*") if p.is_file() and not p.name.endswith(".parquet")]
    assert leftovers == []  # no temporary files left behind


def test_summary_is_mean_std_n_in_percent(tmp_path):
    fill(str(tmp_path))
    table = query.summary(query.load(str(tmp_path), "trials", "s"))
    assert table.columns == ["method", "clean", "uniform 0.4"]
    cells = {r["method"]: r for r in table.iter_rows(named=True)}
    std = 100 * math.sqrt(((0.80 - 0.75) ** 2 + (0.70 - 0.75) ** 2) / 1)
    assert cells["ce"]["uniform 0.4"] == f"75.00 ± {std:.2f} (2)" == "75.00 ± 7.07 (2)"
    assert cells["mwnet"]["uniform 0.4"] == "88.00 ± 2.00 (3)"
    assert cells["ce"]["clean"] == "97.00 ± 1.41 (2)"
    assert cells["mwnet"]["clean"] is None
    peak = query.summary(query.load(str(tmp_path), "trials", "s"), metric="peak")
    assert {r["method"]: r for r in peak.iter_rows(named=True)}["mwnet"]["uniform 0.4"] == "89.00 ± 2.00 (3)"
    text = query.render(table)
    assert "mwnet" in text and "88.00 ± 2.00 (3)" in text
    assert query.render(table, "markdown").startswith("| method | clean | uniform 0.4 |")


def test_famus_rows_get_a_suffix(tmp_path):
    store = str(tmp_path)
    fill(store)
    write_trial(store, "s", "mwnet-famus", {**row("mwnet", "uniform", 0.4, 0, 0.9), "method.famus": True}, [])
    methods = query.summary(query.load(store, "trials", "s"))["method"].to_list()
    assert methods == ["ce", "mwnet", "mwnet+famus"]


def test_failed_trials_are_left_out_of_the_summary(tmp_path):
    store = str(tmp_path)
    fill(store)
    write_trial(store, "s", "ce-uniform-9", row("ce", "uniform", 0.4, 9, float("nan"), "failed"), [])
    table = query.summary(query.load(store, "trials", "s"))
    assert {r["method"]: r for r in table.iter_rows(named=True)}["ce"]["uniform 0.4"].endswith("(2)")


def test_damaged_file_is_reported_and_the_rest_read(tmp_path, capsys):
    store = str(tmp_path)
    fill(store)
    (tmp_path / "trials" / "sweep=s" / "junk.parquet").write_bytes(b"not parquet")
    assert len(query.load(store, "trials", "s")) == 7
    assert "skipped unreadable results file" in capsys.readouterr().err


def test_unknown_sweep_and_column_are_clear_errors(tmp_path):
    fill(str(tmp_path))
    with pytest.raises(ConfigError, match="no trials results for sweep 'nope'.*sweeps in this store: s"):
        query.load(str(tmp_path), "trials", "nope")
    with pytest.raises(ConfigError, match="unknown results column"):
        query.summary(query.load(str(tmp_path), "trials", "s"), by=["methd"])

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
    assert cells["mwnet"]["uniform 0.4"] == "**88.00 ± 2.00 (3)**"  # the column's best
    assert cells["ce"]["clean"] == "**97.00 ± 1.41 (2)**"
    assert cells["mwnet"]["clean"] is None
    peak = query.summary(query.load(str(tmp_path), "trials", "s"), metric="peak", mark_best=False)
    assert {r["method"]: r for r in peak.iter_rows(named=True)}["mwnet"]["uniform 0.4"] == "89.00 ± 2.00 (3)"
    text = query.render(table)
    assert "mwnet" in text and "88.00 ± 2.00 (3) *" in text and "75.00 ± 7.07 (2) " in text
    assert query.render(table, "markdown").startswith("| method | clean | uniform 0.4 |")
    assert "88.00 ± 2.00 (3) *" in query.render(table, "csv")
    latex = query.render(table, "latex")
    assert "\\textbf{88.00 $\\pm$ 2.00 (3)}" in latex and latex.startswith("\\begin{tabular}{lcc}")
    assert latex.rstrip().endswith("\\end{tabular}")


def test_summary_of_a_metric_some_trials_lack_leaves_them_out(tmp_path):
    """The pseudo meta set's precision exists only for trials with meta_set.source pseudo."""
    store = str(tmp_path)
    fill(store)
    for seed, precision in enumerate([0.9, 0.8]):
        write_trial(store, "s", f"pseudo-{seed}", {**row("mwnet", "uniform", 0.4, seed, 0.9),
                                                   "final_pseudo_meta_precision": precision}, [])
    trials = query.load(store, "trials", "s")
    table = query.summary(trials, metric="final_pseudo_meta_precision", mark_best=False)
    assert table.columns == ["method", "uniform 0.4"]  # no pseudo trial is clean: no column
    assert table.to_dicts() == [{"method": "mwnet", "uniform 0.4": "85.00 ± 7.07 (2)"}]
    with pytest.raises(ConfigError, match="no completed trial has a value of final_rare"):
        query.summary(trials.with_columns(final_rare_third_acc=None), metric="final_rare_third_acc")


def test_famus_rows_get_a_suffix(tmp_path):
    store = str(tmp_path)
    fill(store)
    write_trial(store, "s", "mwnet-famus", {**row("mwnet", "uniform", 0.4, 0, 0.9), "method.famus": True}, [])
    methods = query.summary(query.load(store, "trials", "s"))["method"].to_list()
    assert methods == ["ce", "mwnet", "mwnet+famus"]


def test_failed_trials_are_counted_but_left_out_of_the_mean(tmp_path):
    store = str(tmp_path)
    fill(store)
    write_trial(store, "s", "ce-uniform-9", row("ce", "uniform", 0.4, 9, float("nan"), "failed"), [])
    write_trial(store, "s", "mwnet-none-0", row("mwnet", "none", 0.0, 0, float("nan"), "failed"), [])
    table = query.summary(query.load(store, "trials", "s"))
    cells = {r["method"]: r for r in table.iter_rows(named=True)}
    assert cells["ce"]["uniform 0.4"] == "75.00 ± 7.07 (2, 1 failed)"
    assert cells["mwnet"]["clean"] == "- (0, 1 failed)"  # nothing completed in that cell
    assert cells["ce"]["clean"] == "**97.00 ± 1.41 (2)**"


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


def test_reads_stay_right_as_trials_are_added_replaced_and_removed(tmp_path):
    """Queries read a compacted copy plus the trial files that changed since."""
    store = str(tmp_path)
    fill(store)
    assert len(query.load(store, "trials", "s")) == 7  # first read writes the compacted copy
    assert (tmp_path / "_compact" / "trials" / "s.parquet").exists()
    write_trial(store, "s", "ce-none-0", row("ce", "none", 0.0, 0, 0.5), [{"epoch": 0, "test_acc": 0.5}])
    write_trial(store, "s", "new", row("l2r", "none", 0.0, 0, 0.9), [{"epoch": 0, "test_acc": 0.9}])
    (tmp_path / "trials" / "sweep=s" / "ce-uniform-1.parquet").unlink()
    (tmp_path / "curves" / "sweep=s" / "ce-uniform-1.parquet").unlink()
    for _ in range(2):  # after the refresh, and from the refreshed copy
        trials = query.load(store, "trials", "s")
        assert sorted(trials["trial_id"]) == sorted(["ce-none-0", "ce-none-1", "ce-uniform-0",
                                                     "mwnet-uniform-0", "mwnet-uniform-1",
                                                     "mwnet-uniform-2", "new"])
        assert trials.filter(pl.col("trial_id") == "ce-none-0")["final_test_acc"].item() == 0.5
        curves = query.load(store, "curves", "s")
        assert len(curves) == 3 * 5 + 1 + 1 and "_source" not in curves.columns


def test_ablation_curves_and_speed(tmp_path):
    store = str(tmp_path)
    for i, (method, famus, per_class, acc, ms) in enumerate(
            [("mwnet", False, 5, 0.80, 40.0), ("mwnet", False, 50, 0.90, 40.0),
             ("mwnet", True, 5, 0.78, 20.0), ("ce", False, 5, 0.70, 10.0)]):
        values = {**row(method, "uniform", 0.4, 0, acc), "method.famus": famus,
                  "meta_set.per_class": per_class, "model.name": "mlp", "ms_per_step": ms,
                  "meta_step_share": 0.5, "peak_memory_mb": 100.0}
        write_trial(store, "a", f"t{i}", values,
                    [{"epoch": e, "test_acc": acc * (e + 1) / 2} for e in range(2)])
    trials = query.load(store, "trials", "a")
    table = query.ablation(trials, "meta_set.per_class")
    assert table.columns == ["method", "5", "50"]
    cells = {r["method"]: r for r in table.iter_rows(named=True)}
    assert cells["mwnet"]["50"] == "**90.00 ± 0.00 (1)**" and cells["mwnet+famus"]["50"] is None
    with pytest.raises(ConfigError, match="unknown results column 'meta.per_class'"):
        query.ablation(trials, "meta.per_class")

    chosen = query.curves(store, trial_ids=["t1"], metrics=["test_acc"])
    assert chosen["test_acc"].to_list() == [0.45, 0.9] and chosen["epoch"].to_list() == [0, 1]
    mean = query.curves(store, metrics=["test_acc"], by=["method"])
    ce = mean.filter(pl.col("method") == "ce")
    assert ce["test_acc_mean"].to_list() == [0.35, 0.7] and ce["trials"].to_list() == [1, 1]
    assert mean.filter(pl.col("method") == "mwnet")["trials"].to_list() == [2, 2]

    speed = {(r["method.name"], r["famus"]): r for r in query.speed(trials).iter_rows(named=True)}
    assert speed[("mwnet", True)]["speedup_step"] == 2.0  # 40 ms full vs 20 ms with FaMUS
    assert speed[("mwnet", True)]["speedup_meta_step"] == 2.0
    assert speed[("ce", False)]["ms_per_step"] == 10.0


def test_plots_are_written(tmp_path):
    from PIL import Image

    from raymeta.results import plots

    store = str(tmp_path)
    fill(store)
    trials = query.load(store, "trials", "s")
    noisy = trials.filter(pl.col("noise.type") != "none")
    path = plots.metric_against(noisy, "noise.rate", tmp_path / "p" / "noise.png")
    curves = query.curves(store, metrics=["test_acc"], by=["method", "noise.type", "noise.rate"])
    second = plots.accuracy_curves(curves, tmp_path / "p" / "curves.png")
    for png in (path, second):
        with Image.open(png) as image:
            assert image.format == "PNG" and image.size[0] > 300 and image.size[1] > 200
    with pytest.raises(ConfigError, match="unknown results column"):
        plots.metric_against(noisy, "meta_set.per_class", tmp_path / "x.png")
    # accuracy against the noise rate: each noise type's line starts at the clean runs
    points = plots.clean_at_rate_zero(trials).group_by("noise.type", "noise.rate").len().sort("noise.rate")
    assert points.rows() == [("uniform", 0.0, 2), ("uniform", 0.4, 5)]
    assert plots.against_noise_rate(trials, tmp_path / "n.png").exists()


def _write_one(args):
    store, i = args
    curves = [{"epoch": e, "test_acc": i / 100 + e / 1000} for e in range(50)]
    write_trial(store, "busy", f"t{i:03d}", row("ce", "uniform", 0.4, i, i / 100), curves)
    return i


def test_fifty_concurrent_writers_lose_nothing(tmp_path):
    """50 trials finishing at once (separate processes), while queries read the store."""
    import multiprocessing

    store = str(tmp_path)
    with multiprocessing.get_context("spawn").Pool(50) as pool:
        pending = pool.map_async(_write_one, [(store, i) for i in range(50)])
        while not pending.ready():  # reads meanwhile see only whole files
            try:
                trials = query.load(store, "trials", "busy")
                assert trials["final_test_acc"].is_not_null().all()
            except ConfigError:  # nothing written yet
                pass
        assert sorted(pending.get()) == list(range(50))
    trials = query.load(store, "trials", "busy")
    assert len(trials) == 50 and trials["trial_id"].n_unique() == 50
    assert sorted(trials["final_test_acc"].to_list()) == [i / 100 for i in range(50)]
    curves = query.load(store, "curves", "busy")
    assert len(curves) == 50 * 50
    assert curves.group_by("trial_id").len()["len"].to_list() == [50] * 50


WRITER = """
import sys
from raymeta.results.store import write_trial
store = sys.argv[1]
rows = [{"epoch": e, "test_acc": 0.5, "blob": "x" * 2000} for e in range(20000)]
for i in range(1000):
    write_trial(store, "killed", f"t{i:04d}", {"status": "completed", "final_test_acc": 0.5}, rows)
    print(i, flush=True)
"""


def test_a_writer_killed_mid_write_leaves_no_partial_file(tmp_path):
    import subprocess
    import sys

    store = str(tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", WRITER, store], stdout=subprocess.PIPE, text=True)
    for _ in range(3):  # a few trials written, the next one mid-write
        proc.stdout.readline()
    proc.kill()
    proc.wait()
    trials = query.load(store, "trials", "killed")
    curves = query.load(store, "curves", "killed")
    assert len(trials) >= 3 and set(curves["trial_id"]) >= set(trials["trial_id"])
    assert curves.group_by("trial_id").len()["len"].unique().to_list() == [20000]  # whole files only


def run_row(digest, acc, finished, status="completed", **more):
    return {**row("mwnet", "uniform", 0.4, 0, acc, status), "config_digest": digest,
            "finished_at": finished, **more}


def test_the_same_experiment_counts_once_across_sweeps_and_commands(tmp_path, capsys):
    """One run in two sweeps of one store (or a run and a --seeds pack of it) is one seed."""
    store = str(tmp_path)
    write_trial(store, "a", "mwnet-0", run_row("d0", 0.80, "2026-01-01T00:00:00"), [])
    write_trial(store, "b", "mwnet-0", run_row("d0", 0.90, "2026-01-02T00:00:00"), [])
    write_trial(store, "b", "mwnet-0-old-id", run_row("d0", 0.10, "2026-01-03T00:00:00", "failed"), [])
    write_trial(store, "b", "mwnet-1", {**run_row("d1", 0.70, "2026-01-01T00:00:00"), "seed": 1}, [])
    table = query.summary(query.load(store), mark_best=False)
    # the newest finished row of d0 (0.90) and d1: two seeds, not four rows
    assert table["uniform 0.4"].item() == "80.00 ± 14.14 (2)"
    assert "2 row(s) repeat an experiment already counted" in capsys.readouterr().err


def test_costs_are_summarised_in_their_units_and_the_smallest_is_best(tmp_path):
    store = str(tmp_path)
    for method, seconds in (("ce", [10.0, 12.0]), ("mwnet", [40.0, 44.0])):
        for seed, value in enumerate(seconds):
            write_trial(store, "s", f"{method}-{seed}",
                        {**row(method, "uniform", 0.4, seed, 0.9), "wall_seconds": value}, [])
    table = query.summary(query.load(store, "trials", "s"), metric="wall_seconds")
    cells = dict(zip(table["method"], table["uniform 0.4"]))
    assert cells == {"ce": "**11 ± 1.4 (2)**", "mwnet": "42 ± 2.8 (2)"}
    with pytest.raises(ConfigError, match="unknown metric 'finl' \\(did you mean 'final'\\?\\)"):
        query.summary(query.load(store, "trials", "s"), metric="finl")
    cells = query.summary_cells(query.load(store, "trials", "s"), metric="final")
    assert cells["mean"].dtype == pl.Float64 and cells["n"].to_list() == [2, 2]


def test_collapsed_runs_are_left_out_of_the_means_and_counted(tmp_path):
    store = str(tmp_path)
    fill(store)
    write_trial(store, "s", "mwnet-uniform-9", row("mwnet", "uniform", 0.4, 9, 0.1, "collapsed"), [])
    trials = query.load(store, "trials", "s")
    cells = {r["method"]: r for r in query.summary(trials).iter_rows(named=True)}
    assert cells["mwnet"]["uniform 0.4"] == "**88.00 ± 2.00 (3, 1 collapsed)**"
    assert query.footnotes(trials) == ["1 run(s) collapsed (trained to chance or to a few "
                                       "classes), left out of the means: raymeta results failed"]


def test_render_of_an_empty_table():
    assert query.render(pl.DataFrame(schema={"method": pl.String})).splitlines() == ["method", "------"]


def test_a_mixed_method_store_reads_with_plain_polars_and_duckdb(tmp_path):
    """The one-liners of docs/queries.md: trial files of different methods have different
    columns, so they are read by column name."""
    store = str(tmp_path)
    fill(store)
    write_trial(store, "s", "mlc-0", {**row("mlc", "uniform", 0.4, 0, 0.9), "method.t_on_logits": False},
                [{"epoch": 0, "test_acc": 0.9, "T": [[0.9, 0.1], [0.2, 0.8]]}])
    trials = pl.concat([pl.read_parquet(f) for f in sorted(tmp_path.glob("trials/*/*.parquet"))],
                       how="diagonal_relaxed")
    assert len(trials) == 8 and trials["method.t_on_logits"].null_count() == 7
    curves = pl.read_parquet(tmp_path / "curves" / "sweep=s" / "mlc-0.parquet")
    assert curves["T"].to_list() == [[[0.9, 0.1], [0.2, 0.8]]]  # a list column, not JSON text
    import duckdb

    got = duckdb.sql(f"""
        SELECT "method.name" AS method, count(*) AS n, avg(final_test_acc) AS acc
        FROM read_parquet('{tmp_path}/trials/*/*.parquet', union_by_name = true,
                          hive_partitioning = true)
        WHERE status = 'completed' GROUP BY ALL ORDER BY method""").fetchall()
    assert [(m, n) for m, n, _ in got] == [("ce", 4), ("mlc", 1), ("mwnet", 3)]
    sweeps = duckdb.sql(f"""SELECT DISTINCT sweep FROM read_parquet(
        '{tmp_path}/trials/*/*.parquet', union_by_name = true, hive_partitioning = true)""").fetchall()
    assert sweeps == [("s",)]


def test_costs_count_each_run_once_and_busy_time_as_the_union_of_trial_intervals(tmp_path):
    """`raymeta results costs`: concurrent trials count once in busy hours, a gap between two
    sessions not at all, and a rerun of the same config once among the trials (its time twice)."""
    store = str(tmp_path)
    at = "2026-12-07T{}+00:00".format
    for trial, digest, start, end, status, device in [
            ("t0", "d0", at("10:00:00"), at("11:00:00"), "failed", "cpu"),
            ("t0b", "d0", at("11:00:00"), at("11:30:00"), "completed", "cpu"),  # its rerun
            ("t1", "d1", at("10:30:00"), at("11:15:00"), "completed", "cuda"),  # concurrent
            ("t2", "d2", at("14:00:00"), at("14:30:00"), "collapsed", "cpu")]:  # next session
        seconds = (int(end[11:13]) - int(start[11:13])) * 3600 + (int(end[14:16]) - int(start[14:16])) * 60
        write_trial(store, "a", trial, {**row("mwnet", "uniform", 0.4, 0, 0.9, status),
                                        "config_digest": digest, "started_at": start,
                                        "finished_at": end, "wall_seconds": float(seconds),
                                        "device": device, "gpu_name": "H100" if device == "cuda" else ""},
                    [])
    write_trial(store, "b", "u0", {**row("ce", "uniform", 0.4, 0, 0.8), "config_digest": "e0",
                                   "started_at": at("09:00:00"), "finished_at": at("09:06:00"),
                                   "wall_seconds": 360.0, "device": "cpu", "gpu_name": ""}, [])
    table = {r["sweep"]: r for r in query.costs(query.load(store, "trials")).iter_rows(named=True)}
    a = table["a"]
    assert (a["trials"], a["completed"], a["collapsed"], a["failed"]) == (3, 2, 1, 0)
    assert a["devices"] == "H100, cpu"
    assert a["busy_hours"] == 2.0  # 10:00-11:30 and 14:00-14:30
    assert a["trial_hours"] == 2.75  # 1 + 0.5 + 0.75 + 0.5: the failed first try cost time too
    assert (a["first_started"], a["last_finished"]) == ("2026-12-07 10:00", "2026-12-07 14:30")
    assert table["b"]["busy_hours"] == 0.1 and table["b"]["median_trial_min"] == 6.0

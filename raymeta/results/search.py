"""Searches in the store: each sample's score on the meta set, the configuration chosen per
grid cell, and the confirmation runs that are the sweep's results.

A search's samples are rows of their own partition, `sweep=<name>.search` (so summaries of the
sweep count only the chosen configurations' runs); each sample row says which cell it searched
(`search_cell`, `search_label`), which keys were searched and what it was chosen on.
"""

from __future__ import annotations

import json

import polars as pl

from raymeta.errors import ConfigError
from raymeta.results import query
from raymeta.results.store import ENDED

SAMPLES = ".search"
"""the suffix of the partition that holds a sweep's search samples"""


def samples_sweep(sweep: str) -> str:
    return f"{sweep}{SAMPLES}"


def setting_key(config_json: str) -> str:
    """A run's configuration without its seed (the seeds of one sample share it)."""
    from raymeta.config import ExperimentConfig

    return ExperimentConfig.model_validate(json.loads(config_json)).setting_digest()


def trial_score(curve: pl.DataFrame, metric: str, at: str) -> float:
    """One run's score: `metric` at its last epoch, or its best over the epochs."""
    values = curve.sort("epoch")[metric]
    if at == "last":
        return float(values[-1])
    return float(values.max() if metric.endswith("_acc") else values.min())


def sample_scores(store: str, sweep: str) -> pl.DataFrame:
    """One row per sample (a configuration of a cell, over its seeds): search_cell,
    search_label, setting, the searched keys' values (as JSON text: any type), score (mean over
    its seeds), seeds, trial_id (a list), metric, at; best first within each cell."""
    trials = query.load(store, "trials", samples_sweep(sweep))
    if "search_cell" not in trials.columns:
        raise ConfigError(f"sweep '{samples_sweep(sweep)}' holds no search samples")
    scored = trials.filter(pl.col("status").is_in(list(ENDED)))  # each ran epochs: a score
    if scored.is_empty():
        raise ConfigError(f"no sample of the search of sweep '{sweep}' has finished yet "
                          f"({len(trials)} row(s), none completed)")
    metric, at = scored["search_metric"][0], scored["search_at"][0]
    curves = query.load(store, "curves", samples_sweep(sweep))
    by_trial = {key[0]: frame for key, frame in curves.group_by("trial_id")}
    keys = json.loads(scored["search_keys"][0])
    rows = []
    for row in scored.iter_rows(named=True):
        curve = by_trial.get(row["trial_id"])
        if curve is None or curve.is_empty():
            continue
        rows.append({"search_cell": row["search_cell"], "search_label": row["search_label"],
                     "setting": setting_key(row["config_json"]), "trial_id": row["trial_id"],
                     "started_at": row["started_at"],
                     "score": trial_score(curve, metric, at),
                     **{key: json.dumps(row.get(key)) for key in keys}})
    per_trial = pl.DataFrame(rows)
    samples = (per_trial.group_by("search_cell", "search_label", "setting", *keys)
               .agg(pl.col("score").mean(), pl.len().alias("seeds"), pl.col("trial_id"),
                    pl.col("started_at").min()))
    descending = not metric.endswith("_loss")
    samples = samples.sort(["search_cell", "score", "started_at"],
                           descending=[False, descending, False])
    return samples.with_columns(pl.lit(metric).alias("metric"), pl.lit(at).alias("at"))


def searched_keys(samples: pl.DataFrame) -> list[str]:
    fixed = {"search_cell", "search_label", "setting", "score", "seeds", "trial_id",
             "started_at", "metric", "at"}
    return [c for c in samples.columns if c not in fixed]


def chosen(samples: pl.DataFrame) -> pl.DataFrame:
    """The best sample of each cell (ties: the one tried first)."""
    return samples.unique("search_cell", keep="first", maintain_order=True)


def report(store: str, sweep: str) -> pl.DataFrame:
    """`raymeta results search`: per cell, the chosen values, their meta-set score, how many
    samples were tried, and the test accuracy of the chosen configuration's confirmation runs
    (the sweep's own rows), mean ± std over their seeds."""
    samples = sample_scores(store, sweep)
    keys = searched_keys(samples)
    best = chosen(samples)
    tried = samples.group_by("search_cell").agg(pl.len().alias("samples"))
    try:
        runs = query.unique_runs(query.load(store, "trials", sweep), quiet=True)
        runs = runs.filter(pl.col("status") == "completed")
        runs = runs.with_columns(pl.col("config_json").map_elements(setting_key, return_dtype=pl.String)
                                 .alias("setting"))
    except ConfigError:  # the confirmation runs have not started yet
        runs = pl.DataFrame(schema={"setting": pl.String, "final_test_acc": pl.Float64})
    confirm = runs.group_by("setting").agg((pl.col("final_test_acc").mean() * 100).alias("mean"),
                                           (pl.col("final_test_acc").std() * 100).alias("std"),
                                           pl.len().alias("n"))
    table = best.join(tried, on="search_cell").join(confirm, on="setting", how="left")
    metric = best["metric"][0]
    text = []
    for row in table.iter_rows(named=True):
        if row["n"] is None:
            test = "not run yet"
        else:
            std = f" ± {row['std']:.2f}" if row["std"] is not None else ""
            test = f"{row['mean']:.2f}{std} ({row['n']})"
        label = json.loads(row["search_label"])
        text.append({"cell": ", ".join(f"{k}={_short(v)}" for k, v in label.items()) or "(all)",
                     **{k: _short(json.loads(row[k])) for k in keys},
                     f"{metric} ({row['at']})": f"{row['score']:.4f}",
                     "samples": str(row["samples"]), "confirmed test acc": test})
    return pl.DataFrame(text)


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ",".join(f"{k}:{_short(v)}" for k, v in value.items())
    return str(value)

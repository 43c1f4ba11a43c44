"""Read the results store with polars and build the tables researchers publish."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import polars as pl
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raymeta.config import check_sweep_name
from raymeta.errors import ConfigError, did_you_mean
from raymeta.results.store import FINISHED, display_store, filesystem, list_folder, write_parquet

METRICS = {"final": "final_test_acc", "peak": "best_test_acc", "best_meta": "test_acc_at_best_meta"}
"""--metric shorthands: final epoch, peak over epochs, at the epoch of best meta-set accuracy"""


def list_sweeps(store: str) -> list[str]:
    fs, base = filesystem(store)
    infos = list_folder(fs, f"{base.rstrip('/')}/trials")
    return sorted(i.base_name.removeprefix("sweep=") for i in infos
                  if i.type == pafs.FileType.Directory and i.base_name.startswith("sweep="))


def load(store: str, table: str = "trials", sweep: str | None = None) -> pl.DataFrame:
    """All rows of a table (trials or curves), for one sweep or every sweep, with a `sweep`
    column. A file that cannot be read is reported on stderr and skipped."""
    sweeps = [check_sweep_name(sweep, "--sweep")] if sweep else list_sweeps(store)
    frames = [frame for name in sweeps if (frame := _load_sweep(store, table, name)) is not None]
    if not frames:
        where = f"sweep '{sweep}'" if sweep else "any sweep"
        known = list_sweeps(store)
        hint = f"; sweeps in this store: {', '.join(known)}" if known else ""
        raise ConfigError(f"no {table} results for {where} in store {display_store(store)}{hint}")
    rows = pl.concat(frames, how="diagonal_relaxed")
    return with_method_label(_run_digests(rows) if table == "trials" else rows)


def _run_digests(trials: pl.DataFrame) -> pl.DataFrame:
    """Each row's config_digest as this version computes it from the row's config: a row
    written while a setting that run never reads still changed the digest gets the digest of
    the run it is, so it is found and counted as that run. A config that does not parse here
    (a plugin not installed, a newer version's option) keeps its stored digest."""
    if "config_json" not in trials.columns or "config_digest" not in trials.columns:
        return trials
    from pydantic import ValidationError

    from raymeta.config import ExperimentConfig

    current = {}
    for text in trials["config_json"].drop_nulls().unique():
        try:
            current[text] = ExperimentConfig.model_validate(json.loads(text)).digest()
        except (ValidationError, ConfigError, ValueError):
            pass
    digests = [current.get(text, stored) for text, stored in
               zip(trials["config_json"], trials["config_digest"])]
    return trials.with_columns(pl.Series("config_digest", digests, dtype=pl.String))


def _read_file(fs: pafs.FileSystem, path: str) -> pl.DataFrame | None:
    try:
        return pl.from_arrow(pq.read_table(path, filesystem=fs))
    except Exception as err:  # a damaged or foreign file must not hide the others
        print(f"warning: skipped unreadable results file {path}: {err}", file=sys.stderr)
        return None


def _load_sweep(store: str, table: str, sweep: str) -> pl.DataFrame | None:
    """One sweep's rows of a table. The per-trial files are the truth (each written atomically
    by its trial, so trials never contend); reading thousands of small files is slow, so the
    rows are also kept in one compacted file per sweep and table, `_compact/<table>/<sweep>`,
    with the name, size and mtime of every trial file it holds. A read takes the compacted
    rows of unchanged files and reads only new or changed files, then refreshes the
    compacted file (best effort: a read-only store just reads)."""
    fs, base = filesystem(store)
    base = base.rstrip("/")
    infos = list_folder(fs, f"{base}/{table}/sweep={sweep}")
    files = {i.base_name: [i.size, i.mtime_ns] for i in infos
             if i.type == pafs.FileType.File and i.base_name.endswith(".parquet")}
    compact_path = f"{base}/_compact/{table}/{sweep}.parquet"
    held, compact = {}, None
    try:
        meta = pq.read_schema(compact_path, filesystem=fs).metadata or {}
        held = json.loads(meta.get(b"raymeta_sources", b"{}"))
    except (FileNotFoundError, OSError, ValueError):
        pass
    keep = {name for name, stamp in held.items() if files.get(name) == stamp}
    if keep:
        compact = pl.from_arrow(pq.read_table(compact_path, filesystem=fs))
        if len(keep) < len(held):
            compact = compact.filter(pl.col("_source").is_in(sorted(keep)))
    frames = [compact] if compact is not None else []
    fresh = sorted(set(files) - keep)
    # many small reads: overlap them (latency-bound on object stores, parsing releases the GIL)
    with ThreadPoolExecutor(max_workers=16) as pool:
        read = list(pool.map(lambda n: _read_file(fs, f"{base}/{table}/sweep={sweep}/{n}"), fresh))
    for name, frame in zip(fresh, read):
        if frame is not None:
            frames.append(frame.with_columns(pl.lit(name).alias("_source")))
        else:
            files.pop(name)
    if not frames:
        return None
    rows = pl.concat(_same_list_types(frames), how="diagonal_relaxed")
    if fresh or len(keep) < len(held):
        _write_compact(fs, compact_path, rows, {n: files[n] for n in files})
    return rows.drop("_source").with_columns(pl.lit(sweep).alias("sweep"))


def _same_list_types(frames: list[pl.DataFrame]) -> list[pl.DataFrame]:
    """Curves written before list columns were stored as Parquet lists hold them as JSON text;
    where another file of the sweep has that column as a list, the text is parsed to it."""
    lists = {name: dtype for frame in frames for name, dtype in frame.schema.items()
             if isinstance(dtype, pl.List)}
    return [frame.with_columns(pl.col(name).str.json_decode(lists[name]) for name, dtype
                               in frame.schema.items() if name in lists and dtype == pl.String)
            for frame in frames]


def _write_compact(fs: pafs.FileSystem, path: str, rows: pl.DataFrame, sources: dict) -> None:
    data = rows.to_arrow().replace_schema_metadata({"raymeta_sources": json.dumps(sources)})
    try:
        write_parquet(fs, path, data)
    except OSError as err:  # read-only store: queries still work, only slower
        print(f"note: could not cache results in {path}: {err}", file=sys.stderr)


def with_method_label(frame: pl.DataFrame) -> pl.DataFrame:
    """Add `method`: the method name, with +famus when FaMUS was on (the papers' row labels)
    and -oracle when Forward used the realized noise matrix (method.oracle_t)."""
    if "method.name" not in frame.columns or "method" in frame.columns:
        return frame
    label = pl.col("method.name")
    if "method.famus" in frame.columns:
        label = pl.when(pl.col("method.famus").fill_null(False)).then(label + "+famus").otherwise(label)
    if "method.oracle_t" in frame.columns:  # forward with the realized T: an upper bound
        label = pl.when(pl.col("method.oracle_t").fill_null(False)).then(label + "-oracle").otherwise(label)
    return frame.with_columns(label.alias("method"))


def column_label(noise_type: str, rate: float) -> str:
    return "clean" if noise_type == "none" else f"{noise_type} {rate:g}"


def _cell_text(c: dict) -> str:
    problems = "".join(f", {c[k]} {k}" for k in ("failed", "collapsed") if c[k])
    count = f"{c['n']}{problems}"
    if c["mean"] is None:
        return f"- ({count})"
    if c["percent"]:
        return f"{c['mean']:.2f} ± {c['std'] or 0.0:.2f} ({count})"
    return f"{c['mean']:.4g} ± {c['std'] or 0.0:.2g} ({count})"


LOWER_IS_BETTER = ("seconds", "ms_per_step", "memory", "loss", "restarts")
"""results columns whose smallest value is the best (costs and losses)"""


def metric_column(trials: pl.DataFrame, metric: str) -> str:
    """The results column of a --metric (a shorthand or a numeric column), or a clear error."""
    column = METRICS.get(metric, metric)
    if column in trials.columns:
        return column
    numeric = sorted(c for c, t in trials.schema.items() if t.is_numeric() and "." not in c)
    raise ConfigError(f"unknown metric '{metric}'{did_you_mean(metric, [*METRICS, *numeric])}; "
                      f"use {', '.join(METRICS)} or a numeric results column such as "
                      f"{', '.join(c for c in numeric if c.endswith('_acc'))}, wall_seconds, "
                      f"ms_per_step")


def is_fraction(column: str) -> bool:
    """Accuracies, precisions and recalls are shown in percent."""
    return any(word in column for word in ("acc", "precision", "recall"))


def lower_is_better(column: str) -> bool:
    return any(word in column for word in LOWER_IS_BETTER)


def unique_runs(trials: pl.DataFrame, quiet: bool = False) -> pl.DataFrame:
    """One row per experiment: rows with the same config digest (which covers the seed) are
    the same run, whichever sweep, command or pack of seeds wrote them; the newest finished
    row is kept (else the newest row), and a note on stderr says how many were dropped."""
    if "config_digest" not in trials.columns or trials["config_digest"].null_count() == len(trials):
        return trials
    unfinished = ~pl.col("status").is_in(list(FINISHED)) if "status" in trials.columns else pl.lit(False)
    newest = pl.col("finished_at") if "finished_at" in trials.columns else pl.lit(None)
    keyed = trials.with_columns(pl.col("config_digest").fill_null(pl.col("trial_id")).alias("_run"),
                                unfinished.alias("_unfinished"), newest.alias("_newest"))
    kept = (keyed.sort(["_unfinished", "_newest"], descending=[False, True], nulls_last=True)
            .unique("_run", keep="first", maintain_order=True)
            .drop("_run", "_unfinished", "_newest"))
    if len(kept) < len(trials) and not quiet:
        print(f"note: {len(trials) - len(kept)} row(s) repeat an experiment already counted "
              f"(the same config digest, e.g. the same cell in two sweeps, or a run and a "
              f"--seeds pack of it); each experiment counts once, with its newest finished row",
              file=sys.stderr)
    return kept


def summary_cells(trials: pl.DataFrame, by: Sequence[str] = ("method",),
                  columns: Sequence[str] = ("noise.type", "noise.rate"),
                  metric: str = "final") -> pl.DataFrame:
    """One row per cell (`by` x `columns`): mean and std over seeds of completed runs (in
    percent for accuracies), and how many runs completed, failed and collapsed; `best` marks
    the best mean of each setting (the largest, or the smallest for costs and losses)."""
    metric_col = metric_column(trials, metric)
    missing = [c for c in [*by, *columns] if c not in trials.columns]
    if missing:
        raise ConfigError(f"unknown results column(s): {', '.join(missing)}; available: "
                          f"{', '.join(sorted(trials.columns))}")
    trials = unique_runs(trials)
    status = pl.col("status") if "status" in trials.columns else pl.lit("completed")
    ok = status == "completed"
    if not trials.select(ok.any()).item():
        raise ConfigError("no completed trials to summarise (see `raymeta results failed`)")
    # completed trials a metric does not apply to (e.g. the pseudo meta set's precision of a
    # trial with a clean meta set) have no value: they are not part of its table
    trials = trials.filter(~ok | pl.col(metric_col).is_not_null())
    if not trials.select(ok.any()).item():
        raise ConfigError(f"no completed trial has a value of {metric_col}; it applies to some "
                          f"settings only (e.g. final_rare_third_acc to dataset.imbalance > 1)")
    scale = 100.0 if is_fraction(metric_col) else 1.0
    cells = (trials.group_by([*by, *columns])
             .agg((pl.col(metric_col).filter(ok).mean() * scale).alias("mean"),
                  (pl.col(metric_col).filter(ok).std() * scale).alias("std"),
                  ok.sum().alias("n"), (status == "failed").sum().alias("failed"),
                  (status == "collapsed").sum().alias("collapsed"))
             .sort([*columns, *by]))
    if columns and columns[0] == "noise.type":  # the clean column first, as in the papers
        cells = cells.sort(pl.col("noise.type") != "none", maintain_order=True)
    label = (pl.struct(list(columns)).map_elements(
        lambda s: column_label(*(s[c] for c in columns)) if len(columns) == 2 and
        columns[0] == "noise.type" else " ".join(str(s[c]) for c in columns),
        return_dtype=pl.String).alias("setting"))
    best = pl.col("mean").min() if lower_is_better(metric_col) else pl.col("mean").max()
    return cells.with_columns(label, (pl.col("mean") == best.over(label)).fill_null(False)
                              .alias("best"), pl.lit(metric_col).alias("metric"))


def summary(trials: pl.DataFrame, by: Sequence[str] = ("method",),
            columns: Sequence[str] = ("noise.type", "noise.rate"),
            metric: str = "final", mark_best: bool = True) -> pl.DataFrame:
    """Mean ± std (over seeds) of a metric, in percent for accuracies: one row per `by`, one
    column per noise setting. Cells read `mean ± std (n)` over completed runs, with `k failed`
    and `k collapsed` when runs of the cell did not complete; each experiment counts once
    (`unique_runs`); the best of each column is marked (bold in markdown and latex, a
    trailing * in text and csv)."""
    cells = summary_cells(trials, by, columns, metric)
    percent = is_fraction(cells["metric"][0])
    text = (pl.struct("mean", "std", "n", "failed", "collapsed")
            .map_elements(lambda c: _cell_text({**c, "percent": percent}), return_dtype=pl.String))
    cells = cells.with_columns(text.alias("cell"))
    if mark_best:  # the best mean of each column, as papers set it in bold
        cells = cells.with_columns(pl.when("best").then(BEST[0] + pl.col("cell") + BEST[1])
                                   .otherwise(pl.col("cell")).alias("cell"))
    order = cells["setting"].unique(maintain_order=True).to_list()
    table = (cells
             .pivot(on="setting", index=list(by), values="cell")
             .sort(list(by)))
    for key in ("method", "method.name"):
        if key in by:  # the baseline first, as in the papers
            table = table.sort(pl.col(key) != "ce", maintain_order=True)
    return table.select([*by, *order])


def footnotes(trials: pl.DataFrame) -> list[str]:
    """What a table leaves out, for the lines under it: runs that did not complete."""
    if "status" not in trials.columns:
        return []
    counts = dict(unique_runs(trials, quiet=True).group_by("status").len().iter_rows())
    notes = []
    for status, why in (("failed", "failed"), ("collapsed", "collapsed (trained to chance or to a few classes)"),
                        ("stopped", "stopped early")):
        if counts.get(status):
            notes.append(f"{counts[status]} run(s) {why}, left out of the means: "
                         f"raymeta results failed")
    return notes


BEST = ("**", "**")
"""how summary() marks a column's best cell (markdown bold; render() converts it)"""


def ablation(trials: pl.DataFrame, key: str, metric: str = "final",
             by: Sequence[str] = ("method",)) -> pl.DataFrame:
    """The metric as a function of any config key (columns: its values), per method and per
    noise setting when the trials have several."""
    if key not in trials.columns:
        raise ConfigError(f"unknown results column '{key}'; config keys are dotted, e.g. "
                          f"meta_set.per_class, method.meta_interval, famus.k")
    rows = list(by) + [c for c in ("noise.type", "noise.rate")
                       if c in trials.columns and c != key and trials[c].n_unique() > 1]
    table = summary(trials, by=rows, columns=[key], metric=metric)
    values = sorted(trials[key].drop_nulls().unique().to_list())
    return table.select([*rows, *[str(v) for v in values if str(v) in table.columns]])


def speed(trials: pl.DataFrame, by: Sequence[str] = ("method.name", "model.name")) -> pl.DataFrame:
    """Cost per method and model: ms per step, share of time in the meta step, peak memory,
    and for FaMUS rows the speed-up of the meta step over the full method (full / FaMUS)."""
    done = trials.filter(pl.col("status") == "completed") if "status" in trials.columns else trials
    famus = pl.col("method.famus").fill_null(False) if "method.famus" in done.columns else pl.lit(False)
    costs = (done.with_columns(famus.alias("famus"))
             .group_by([*by, "famus"])
             .agg(pl.col("ms_per_step").mean().round(2),
                  pl.col("meta_step_share").mean().round(3),
                  (pl.col("ms_per_step") * pl.col("meta_step_share")).mean().round(2)
                  .alias("meta_ms_per_step"),
                  pl.col("peak_memory_mb").max().round(0), pl.len().alias("trials")))
    full = costs.filter(~pl.col("famus")).select(
        *by, pl.col("ms_per_step").alias("full_ms"), pl.col("meta_ms_per_step").alias("full_meta_ms"))
    return (costs.join(full, on=list(by), how="left")
            .with_columns((pl.col("full_ms") / pl.col("ms_per_step")).round(2).alias("speedup_step"),
                          (pl.col("full_meta_ms") / pl.col("meta_ms_per_step")).round(2)
                          .alias("speedup_meta_step"))
            .drop("full_ms", "full_meta_ms")
            .sort([*by, "famus"]))


def costs(trials: pl.DataFrame) -> pl.DataFrame:
    """What each sweep of a store cost: its trials by status, where they ran, when, and the time
    they took. `busy_hours` is the time during which at least one of its trials was running
    (the union of their intervals, so interruptions between sessions do not count and
    concurrent trials count once); `trial_hours` is the sum of the trials' own wall times,
    reruns included."""
    rows = trials.with_columns(
        pl.col("started_at").str.to_datetime(time_zone="UTC").alias("_start"),
        pl.col("finished_at").str.to_datetime(time_zone="UTC").alias("_end"))
    runs = (rows.sort("_end", descending=True, nulls_last=True)
            .unique(["sweep", "config_digest"], keep="first", maintain_order=True))
    counts = (runs.group_by("sweep")
              .agg(pl.len().alias("trials"),
                   *[(pl.col("status") == s).sum().alias(s)
                     for s in ("completed", "collapsed", "failed", "stopped")]))
    device = pl.when(pl.col("gpu_name").fill_null("") != "").then(pl.col("gpu_name")).otherwise(
        pl.col("device")) if "gpu_name" in rows.columns else pl.col("device")
    timed = rows.filter(pl.col("_start").is_not_null() & pl.col("_end").is_not_null())
    spent = (timed.with_columns(device.alias("_device"))
             .group_by("sweep")
             .agg(pl.col("_device").unique().sort().str.join(", ").alias("devices"),
                  pl.col("_start").min().dt.strftime("%Y-%m-%d %H:%M").alias("first_started"),
                  pl.col("_end").max().dt.strftime("%Y-%m-%d %H:%M").alias("last_finished"),
                  (pl.col("wall_seconds").sum() / 3600).round(2).alias("trial_hours"),
                  (pl.col("wall_seconds").median() / 60).round(1).alias("median_trial_min")))
    groups = timed.partition_by("sweep", as_dict=True)
    busy = pl.DataFrame({"sweep": [key[0] for key in groups],
                         "busy_hours": [round(_covered_seconds(g["_start"], g["_end"]) / 3600, 2)
                                        for g in groups.values()]},
                        schema={"sweep": pl.String, "busy_hours": pl.Float64})
    return (counts.join(spent, on="sweep", how="left").join(busy, on="sweep", how="left")
            .select("sweep", "trials", "completed", "collapsed", "failed", "stopped", "devices",
                    "first_started", "last_finished", "busy_hours", "trial_hours",
                    "median_trial_min")
            .sort("sweep"))


def _covered_seconds(starts: pl.Series, ends: pl.Series) -> float:
    """Length of the union of the intervals [start, end]."""
    total, reach = 0.0, None
    for start, end in sorted(zip(starts.to_list(), ends.to_list())):
        if reach is None or start > reach:
            total, reach = total + (end - start).total_seconds(), end
        elif end > reach:
            total, reach = total + (end - reach).total_seconds(), end
    return total


def curves(store: str, *, sweep: str | None = None, trial_ids: Sequence[str] | None = None,
           metrics: Sequence[str] = ("test_acc",), by: Sequence[str] | None = None) -> pl.DataFrame:
    """Per-epoch curves: of chosen trials (one row per trial and epoch), or averaged over
    trials grouped `by` results columns (e.g. method; mean and std per epoch)."""
    rows = load(store, "curves", sweep).lazy()
    if trial_ids:
        known = rows.select(pl.col("trial_id").unique()).collect()["trial_id"].to_list()
        unknown = [t for t in trial_ids if t not in known]
        if unknown:
            where = f"sweep '{sweep}'" if sweep else f"store {display_store(store)}"
            raise ConfigError(f"no curves of trial(s) {', '.join(unknown)} in {where}"
                              f"{did_you_mean(unknown[0], known)}; its {len(known)} trial ids "
                              f"include {', '.join(sorted(known)[:5])}")
        rows = rows.filter(pl.col("trial_id").is_in(list(trial_ids)))
    missing = [m for m in metrics if m not in rows.collect_schema().names()]
    if missing:
        raise ConfigError(f"unknown curve metric(s): {', '.join(missing)}; available: "
                          f"{', '.join(sorted(rows.collect_schema().names()))}")
    if not by:
        return rows.select("sweep", "trial_id", "epoch", *metrics).sort("trial_id", "epoch").collect()
    trials = load(store, "trials", sweep).lazy().select("sweep", "trial_id", *by)
    joined = rows.join(trials, on=["sweep", "trial_id"])
    aggs = [agg for m in metrics
            for agg in (pl.col(m).mean().alias(f"{m}_mean"), pl.col(m).std().alias(f"{m}_std"))]
    return (joined.group_by([*by, "epoch"]).agg(*aggs, pl.len().alias("trials"))
            .sort([*by, "epoch"]).collect())


def render(table: pl.DataFrame, fmt: str = "text") -> str:
    """The table as aligned text, markdown, csv or latex (booktabs)."""
    header = table.columns
    rows = [["" if v is None else f"{v:.6g}" if isinstance(v, float) else str(v) for v in row]
            for row in table.iter_rows()]
    bold = re.escape(BEST[0]) + "(.*?)" + re.escape(BEST[1])
    if fmt == "latex":
        def tex(v: str) -> str:
            v = v.replace("_", "\\_").replace("±", "$\\pm$").replace("%", "\\%")
            return re.sub(bold, r"\\textbf{\1}", v)

        lines = ["\\begin{tabular}{l" + "c" * (len(header) - 1) + "}", "\\toprule",
                 " & ".join(tex(h) for h in header) + " \\\\", "\\midrule"]
        lines += [" & ".join(tex(v) for v in r) + " \\\\" for r in rows]
        return "\n".join([*lines, "\\bottomrule", "\\end{tabular}"])
    if fmt != "markdown":  # text and csv mark the best cell with a trailing *
        rows = [[re.sub(bold, r"\1 *", v) for v in r] for r in rows]
    if fmt == "csv":
        return pl.DataFrame(rows, schema=header, orient="row").write_csv()
    if fmt == "markdown":
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)

"""Read the results store with polars and build the tables researchers publish."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import polars as pl
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raymeta.errors import ConfigError
from raymeta.results.store import filesystem

METRICS = {"final": "final_test_acc", "peak": "best_test_acc", "best_meta": "test_acc_at_best_meta"}
"""--metric shorthands: final epoch, peak over epochs, at the epoch of best meta-set accuracy"""


def list_sweeps(store: str) -> list[str]:
    fs, base = filesystem(store)
    infos = fs.get_file_info(pafs.FileSelector(f"{base.rstrip('/')}/trials", allow_not_found=True))
    return sorted(i.base_name.removeprefix("sweep=") for i in infos
                  if i.type == pafs.FileType.Directory and i.base_name.startswith("sweep="))


def load(store: str, table: str = "trials", sweep: str | None = None) -> pl.DataFrame:
    """All rows of a table (trials or curves), for one sweep or every sweep, with a `sweep`
    column. A file that cannot be read is reported on stderr and skipped."""
    fs, base = filesystem(store)
    sweeps = [sweep] if sweep else list_sweeps(store)
    frames = []
    for name in sweeps:
        folder = f"{base.rstrip('/')}/{table}/sweep={name}"
        infos = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
        for info in sorted(infos, key=lambda i: i.path):
            if info.type != pafs.FileType.File or not info.base_name.endswith(".parquet"):
                continue
            try:
                frame = pl.from_arrow(pq.read_table(info.path, filesystem=fs))
            except Exception as err:  # a damaged or foreign file must not hide the others
                print(f"warning: skipped unreadable results file {info.path}: {err}",
                      file=sys.stderr)
                continue
            frames.append(frame.with_columns(pl.lit(name).alias("sweep")))
    if not frames:
        where = f"sweep '{sweep}'" if sweep else "any sweep"
        known = list_sweeps(store)
        hint = f"; sweeps in this store: {', '.join(known)}" if known else ""
        raise ConfigError(f"no {table} results for {where} in store {store}{hint}")
    return with_method_label(pl.concat(frames, how="diagonal_relaxed"))


def with_method_label(frame: pl.DataFrame) -> pl.DataFrame:
    """Add `method`: the method name, with +famus when FaMUS was on (the papers' row labels)."""
    if "method.name" not in frame.columns or "method" in frame.columns:
        return frame
    label = pl.col("method.name")
    if "method.famus" in frame.columns:
        label = pl.when(pl.col("method.famus").fill_null(False)).then(label + "+famus").otherwise(label)
    return frame.with_columns(label.alias("method"))


def _column_label(noise_type: str, rate: float) -> str:
    return "clean" if noise_type == "none" else f"{noise_type} {rate:g}"


def summary(trials: pl.DataFrame, by: Sequence[str] = ("method",),
            columns: Sequence[str] = ("noise.type", "noise.rate"),
            metric: str = "final") -> pl.DataFrame:
    """Mean ± std (over seeds) of a metric, in percent: one row per `by`, one column per
    noise setting. Cells read `mean ± std (n)`."""
    metric_col = METRICS.get(metric, metric)
    missing = [c for c in [*by, *columns, metric_col] if c not in trials.columns]
    if missing:
        raise ConfigError(f"unknown results column(s): {', '.join(missing)}; available: "
                          f"{', '.join(sorted(trials.columns))}")
    done = trials.filter(pl.col("status") == "completed") if "status" in trials.columns else trials
    if done.is_empty():
        raise ConfigError("no completed trials to summarise (see `raymeta results failed`)")
    cells = (done.group_by([*by, *columns])
             .agg((pl.col(metric_col).mean() * 100).alias("mean"),
                  (pl.col(metric_col).std() * 100).alias("std"),
                  pl.len().alias("n"))
             .sort([*columns, *by]))
    if columns and columns[0] == "noise.type":  # the clean column first, as in the papers
        cells = cells.sort(pl.col("noise.type") != "none", maintain_order=True)
    label = (pl.struct(list(columns)).map_elements(
        lambda s: _column_label(*(s[c] for c in columns)) if len(columns) == 2 and
        columns[0] == "noise.type" else " ".join(str(s[c]) for c in columns),
        return_dtype=pl.String).alias("setting"))
    text = pl.struct("mean", "std", "n").map_elements(
        lambda c: f"{c['mean']:.2f} ± {c['std'] or 0.0:.2f} ({c['n']})", return_dtype=pl.String)
    order = cells.select(label)["setting"].unique(maintain_order=True).to_list()
    table = (cells.with_columns(label, text.alias("cell"))
             .pivot(on="setting", index=list(by), values="cell")
             .sort(list(by)))
    for key in ("method", "method.name"):
        if key in by:  # the baseline first, as in the papers
            table = table.sort(pl.col(key) != "ce", maintain_order=True)
    return table.select([*by, *order])


def render(table: pl.DataFrame, fmt: str = "text") -> str:
    """The table as aligned text, markdown or csv."""
    header = table.columns
    rows = [["" if v is None else str(v) for v in row] for row in table.iter_rows()]
    if fmt == "csv":
        return table.write_csv()
    if fmt == "markdown":
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)

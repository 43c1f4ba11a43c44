"""Figures from the results store (PNG, matplotlib's file-only backend): accuracy against the
noise rate, against any config key (e.g. the meta-set size), and test-accuracy curves.
Each shows mean ± std over seeds per method."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import polars as pl

from raymeta.errors import ConfigError
from raymeta.results.query import METRICS, column_label, is_fraction, unique_runs

LABELS = {"final": "final test accuracy (%)", "peak": "peak test accuracy (%)",
          "best_meta": "test accuracy at best meta epoch (%)"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: works on machines without a display
    import matplotlib.pyplot as plt

    return plt


def _completed(trials: pl.DataFrame) -> pl.DataFrame:
    done = trials.filter(pl.col("status") == "completed") if "status" in trials.columns else trials
    if done.is_empty():
        raise ConfigError("no completed trials to plot (see `raymeta results failed`)")
    return done


def metric_against(trials: pl.DataFrame, key: str, out: str | Path, metric: str = "final",
                   panels: Sequence[str] = ("noise.type",), title: str = "") -> Path:
    """The metric (mean ± std over seeds) against `key`, one line per method, one panel per
    value of `panels` (e.g. each noise type); each experiment counts once."""
    return _against(_completed(unique_runs(trials)), key, out, metric, panels, title)


def _against(done: pl.DataFrame, key: str, out: str | Path, metric: str,
             panels: Sequence[str], title: str = "") -> Path:
    column = METRICS.get(metric, metric)
    missing = [c for c in (key, column, "method", *panels) if c not in done.columns]
    if missing:
        raise ConfigError(f"unknown results column(s) {', '.join(missing)} for the plot")
    panels = [p for p in panels if p != key]
    scale = 100.0 if is_fraction(column) else 1.0
    groups = (done.group_by(["method", *panels, key])
              .agg((pl.col(column).mean() * scale).alias("mean"),
                   (pl.col(column).std().fill_null(0.0) * scale).alias("std"))
              .sort(key))
    panel_values = (groups.select(panels).unique().sort(panels).rows() if panels else [()])
    plt = _pyplot()
    fig, axes = _grid(plt, len(panel_values))
    for ax, values in zip(axes, panel_values):
        part = groups.filter(*(pl.col(p) == v for p, v in zip(panels, values))) if panels else groups
        for method in sorted(part["method"].unique().to_list(), key=lambda m: (m != "ce", m)):
            line = part.filter(pl.col("method") == method)
            ax.errorbar(line[key].to_list(), line["mean"].to_list(), yerr=line["std"].to_list(),
                        marker="o", capsize=3, label=method)
        ax.set_title(_panel_title(panels, values) or title)
        ax.set_xlabel(key)
        if groups[key].dtype == pl.String and groups[key].str.len_chars().max() > 8:
            ax.tick_params(axis="x", labelrotation=25)  # long labels (lists) would overlap
        ax.grid(alpha=0.3)
    _finish(axes, len(panel_values), LABELS.get(metric, column))
    return _save(fig, out, plt)


def _panel_title(panels: Sequence[str], values: tuple) -> str:
    """A panel's title: its noise as the tables name it ("clean", "uniform 0.4"), or its values."""
    if list(panels) == ["noise.type", "noise.rate"]:
        return column_label(*values)
    return " ".join(str(v) for v in values)


def against_noise_rate(trials: pl.DataFrame, out: str | Path, metric: str = "final") -> Path:
    """The metric against the noise rate, one panel per noise type, each starting from the
    clean runs at rate 0."""
    return _against(clean_at_rate_zero(_completed(unique_runs(trials))), "noise.rate", out,
                    metric, panels=("noise.type",))


def clean_at_rate_zero(trials: pl.DataFrame) -> pl.DataFrame:
    """The noisy trials, and the clean ones once per noise type at rate 0 (each noise type's
    curve starts where no label is wrong)."""
    noisy = trials.filter(pl.col("noise.type") != "none")
    if noisy.is_empty():
        raise ConfigError("no noisy trials to plot against the noise rate (every trial is "
                          "clean); plot an ablation over another key instead")
    clean = trials.filter(pl.col("noise.type") == "none")
    starts = [clean.with_columns(pl.lit(t).alias("noise.type"), pl.lit(0.0).alias("noise.rate"))
              for t in sorted(noisy["noise.type"].unique().to_list())]
    return pl.concat([noisy, *starts], how="diagonal_relaxed")


def accuracy_curves(curves: pl.DataFrame, out: str | Path, metric: str = "test_acc") -> Path:
    """Per-epoch curves (mean ± std per epoch), one line per method, one panel per setting;
    `curves` is query.curves(..., by=["method", <setting columns>])."""
    settings = [c for c in curves.columns if c not in ("method", "epoch", "trials")
                and not c.startswith(f"{metric}_")]
    panel_values = curves.select(settings).unique().sort(settings).rows() if settings else [()]
    plt = _pyplot()
    fig, axes = _grid(plt, len(panel_values))
    for ax, values in zip(axes, panel_values):
        part = curves.filter(*(pl.col(s) == v for s, v in zip(settings, values))) if settings else curves
        for method in sorted(part["method"].unique().to_list(), key=lambda m: (m != "ce", m)):
            line = part.filter(pl.col("method") == method).sort("epoch")
            mean = (line[f"{metric}_mean"] * 100).to_list()
            std = (line[f"{metric}_std"].fill_null(0.0) * 100).to_list()
            ax.plot(line["epoch"].to_list(), mean, label=method)
            ax.fill_between(line["epoch"].to_list(), [m - s for m, s in zip(mean, std)],
                            [m + s for m, s in zip(mean, std)], alpha=0.2)
        ax.set_title(" ".join(str(v) for v in values))
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    _finish(axes, len(panel_values), f"{metric} (%)")
    return _save(fig, out, plt)


COLUMNS = 4
"""panels per row"""


def _grid(plt, panels: int):
    rows, cols = -(-panels // COLUMNS), min(panels, COLUMNS)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.6 * rows), squeeze=False,
                             sharey=True)
    return fig, list(axes.ravel())


def _finish(axes, panels: int, ylabel: str) -> None:
    for ax in axes[panels:]:
        ax.set_visible(False)
    for ax in axes[::COLUMNS]:
        ax.set_ylabel(ylabel)
    axes[min(panels, COLUMNS) - 1].legend(fontsize="small", loc="upper left",
                                          bbox_to_anchor=(1.02, 1.0))


def _save(fig, out: str | Path, plt) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=120, bbox_inches="tight")  # keeps the legend beside the panels
    plt.close(fig)
    return out


def search(samples: pl.DataFrame, out: str | Path) -> Path:
    """A search's meta-set score against each searched key (log scale where the values span
    over a decade), then all keys at once (parallel coordinates: each sample a line, its
    colour its score); one colour per grid cell in the score panels, the chosen sample ringed.
    `samples` is results.search.sample_scores(...)."""
    import json

    import numpy as np

    from raymeta.results.search import chosen, searched_keys

    keys = searched_keys(samples)
    metric, at = samples["metric"][0], samples["at"][0]
    best = set(chosen(samples)["setting"].to_list())
    values = {k: [json.loads(v) for v in samples[k]] for k in keys}
    numeric = {k: all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vs)
               for k, vs in values.items()}
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(keys) + 1, figsize=(4.5 * (len(keys) + 1), 3.8), squeeze=False)
    axes = list(axes.ravel())
    cells = samples["search_label"].unique(maintain_order=True).to_list()
    score = samples["score"].to_numpy()
    for ax, key in zip(axes, keys):
        xs = values[key] if numeric[key] else [json.dumps(v) for v in values[key]]
        for cell in cells:
            rows = [i for i, c in enumerate(samples["search_label"]) if c == cell]
            label = ", ".join(f"{k}={v}" for k, v in json.loads(cell).items()) or "(all)"
            ax.scatter([xs[i] for i in rows], score[rows], label=label, alpha=0.8)
            ringed = [i for i in rows if samples["setting"][i] in best]
            ax.scatter([xs[i] for i in ringed], score[ringed], s=160, facecolors="none",
                       edgecolors="black")
        positive = numeric[key] and min(xs) > 0
        if positive and max(xs) / min(xs) > 10:
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(f"{metric} ({at} epoch)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small", title="cell (ringed: chosen)")
    # parallel coordinates: every key scaled to [0, 1] (log where a range spans decades)
    ax = axes[-1]
    columns = []
    for key in keys:
        if numeric[key]:
            col = np.asarray(values[key], dtype=float)
            if col.min() > 0 and col.max() / col.min() > 10:
                col = np.log10(col)
        else:
            names = sorted({json.dumps(v) for v in values[key]})
            col = np.asarray([names.index(json.dumps(v)) for v in values[key]], dtype=float)
        span = col.max() - col.min()
        columns.append((col - col.min()) / span if span else np.full_like(col, 0.5))
    # each cell's scores scaled on their own: cells differ more than their samples do
    labels = samples["search_label"].to_numpy()
    within = np.zeros_like(score)
    for cell in cells:
        part = labels == cell
        within[part] = (score[part] - score[part].min()) / (np.ptp(score[part]) or 1.0)
    columns.append(within)
    lines = np.stack(columns, axis=1)
    # brighter is better: a loss is mapped the other way round
    colours = plt.get_cmap("viridis_r" if metric.endswith("_loss") else "viridis")(within)
    for line, colour in zip(lines, colours):
        ax.plot(range(len(keys) + 1), line, color=colour, alpha=0.7)
    ax.set_xticks(range(len(keys) + 1), [*keys, metric], rotation=20)
    ax.set_yticks([])
    ax.set_title("all samples (scaled per key; score per cell; brighter: better)", fontsize="small")
    return _save(fig, out, plt)

"""Our MNIST numbers beside the MLC paper's Table 1 (Wang, Hu, Hu, CVPR 2020), cell by cell.

    python tools/fidelity_table.py --store results [--metric peak]

Rows come from the sweeps mnist-mlc-table1 (CE, L2R, MLC as the paper writes it),
mnist-mlc-table1-code (MLC as its official code runs it: "MLC (code)"), mnist-mlc-table1-beta
(the paper's MLC at the beta chosen on the meta set: "MLC (beta 0.003)"),
mnist-mlc-table1-baselines (Forward, GLC) and mnist-coteaching; --sweep picks others. Forward
and GLC train in two stages, the first of which is CE's run: read their final accuracy (their
peak may be the first stage's).

`--extra` prints the rows no paper has published (MW-Net, MetaLabelNet, each meta method with
FaMUS) in the 30% and 40% columns, each setting a row, each cell with its difference to CE.

`--cheap` prints instead each meta method's fast setting (FaMUS on the classifier only,
sweeps/mnist-cheap-meta.yaml) beside the full method on the 40% column (issue 16, part 2).

Each cell: our mean ± std over seeds (n) / the paper's number (ours minus the paper's).
MLC's protocol reports the peak test accuracy (the best of all evaluations; its code keeps
the best checkpoint on the test set), so `--metric peak` is the comparable one; `final`
is printed beside it because it is the number that selects nothing on the test set.
"""

from __future__ import annotations

import argparse
import sys

import polars as pl

from raymeta.errors import ConfigError
from raymeta.results import query

RATES = (0.1, 0.2, 0.3, 0.4)
NOISE = ("uniform", "flip_random", "flip_to_one")
PAPER = {  # MLC Table 1, MNIST, test accuracy %: noise -> the 10/20/30/40% cells
    "ce": {"uniform": (98.59, 98.39, 98.27, 98.02), "flip_random": (98.60, 98.46, 98.25, 98.18),
           "flip_to_one": (97.59, 96.65, 94.26, 84.68)},
    "l2r": {"uniform": (98.66, 98.60, 98.28, 97.79), "flip_random": (98.92, 98.54, 98.33, 97.77),
            "flip_to_one": (98.82, 98.48, 98.15, 97.78)},
    "mlc": {"uniform": (98.98, 98.80, 98.64, 98.47), "flip_random": (98.97, 98.91, 98.63, 98.54),
            "flip_to_one": (99.18, 98.94, 98.31, 97.36)},
    "forward": {"uniform": (98.64, 98.40, 98.36, 98.14), "flip_random": (98.70, 98.48, 98.44, 98.31),
                "flip_to_one": (97.84, 97.07, 95.40, 95.21)},
    "glc": {"uniform": (98.72, 98.52, 98.45, 98.23), "flip_random": (98.78, 98.70, 98.42, 98.29),
            "flip_to_one": (97.86, 97.45, 96.53, 95.47)},
    "coteaching": {"uniform": (None, 97.25, None, None), "flip_to_one": (None, None, None, 87.63)},
}
LABELS = {"ce": "CE", "mwnet": "MW-Net", "metalabelnet": "MetaLabelNet", "l2r": "L2R (LRE)",
          "mlc": "MLC", "mlc-code": "MLC (code)",
          "forward": "Forward", "glc": "GLC", "coteaching": "Co-teaching", "mlnt": "MLNT"}
SWEEPS = ("mnist-mlc-table1", "mnist-mlc-table1-code", "mnist-mlc-table1-beta",
          "mnist-mlc-table1-baselines", "mnist-coteaching")


def with_variant(trials: pl.DataFrame) -> pl.DataFrame:
    """`method` names MLC's official-code form (T on logits, reset every step) apart, and the
    paper's form at another beta than the paper's 1 ("mlc@0.003")."""
    if "method.t_on_logits" not in trials.columns:
        return trials
    mlc = pl.col("method.name") == "mlc"
    code = mlc & pl.col("method.t_on_logits").fill_null(False) \
        & pl.col("method.reset_t_each_step").fill_null(False)
    method = pl.col("method")  # "mlc", or "mlc+famus" where FaMUS is on
    if "method.meta_lr" in trials.columns:
        beta = pl.col("method.meta_lr")
        method = pl.when(mlc & (beta != 1.0)).then(method + "@" + beta.round(6).cast(pl.String)) \
            .otherwise(method)
    return trials.with_columns(pl.when(code).then(pl.col("method").str.replace("mlc", "mlc-code"))
                               .otherwise(method).alias("method"))


def base_method(method: str) -> str:
    """The method a row label names: "mlc" for "mlc-code+famus@0.1"."""
    return method.split("@")[0].split("+")[0].removesuffix("-code")


def paper_row(method: str) -> dict:
    """The paper's numbers for one of our rows: MLC's variants compare with MLC's."""
    return PAPER.get(base_method(method), {})


def label(method: str) -> str:
    base, _, beta = method.partition("@")
    name = base.removesuffix("+famus")
    text = LABELS.get(name, name) + (" + FaMUS" if name != base else "")
    return f"{text} (beta {beta})" if beta else text


def seed_stats(runs: pl.DataFrame, metric: str, keys) -> pl.DataFrame:
    """For each group of `keys`: mean and std (in percent) and the number of seeds of `metric`
    over its completed runs, and how many of its runs collapsed."""
    column = query.METRICS.get(metric, metric)
    ok = pl.col("status") == "completed"
    return runs.group_by(*keys).agg((pl.col(column).filter(ok).mean() * 100).alias("mean"),
                                    (pl.col(column).filter(ok).std() * 100).alias("std"),
                                    ok.sum().alias("n"),
                                    (pl.col("status") == "collapsed").sum().alias("collapsed"))


def cell_text(stats: dict | None) -> str:
    if stats is None:
        return "—"
    text = "—" if not stats["n"] else f"{stats['mean']:.2f} ± {stats['std'] or 0:.2f} ({stats['n']})"
    # a collapsed run is left out of the mean, but the cell says it ran (never a bare "—")
    return f"{text} + {stats['collapsed']} collapsed" if stats["collapsed"] else text


def table(trials: pl.DataFrame, metric: str) -> str:
    runs = with_variant(query.unique_runs(trials, quiet=True)).filter(
        pl.col("status").is_in(["completed", "collapsed"]))
    stats = seed_stats(runs, metric, ("method", "noise.type", "noise.rate"))
    found = {(r["method"], r["noise.type"], round(r["noise.rate"], 2)): r
             for r in stats.iter_rows(named=True)}
    header = ["method", "noise", *(f"{int(100 * r)}%" for r in RATES)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    order = ("ce", "l2r", "mlc", "mlc-code", "forward", "glc", "coteaching")
    present = set(stats["method"])
    methods = [m for m in order if m in present]
    variants = sorted(m for m in present - set(methods) if m.startswith("mlc@"))
    at = methods.index("mlc-code") + 1 if "mlc-code" in methods else len(methods)
    methods[at:at] = variants
    methods += sorted(present - set(methods))
    for noise in NOISE:
        for method in methods:
            if noise not in paper_row(method) and not any(
                    (method, noise, rate) in found for rate in RATES):
                continue  # a cell neither the paper nor we have (Co-teaching's are few)
            cells = []
            for i, rate in enumerate(RATES):
                ours = found.get((method, noise, rate))
                paper = paper_row(method).get(noise, (None,) * 4)[i]
                text = cell_text(ours)
                if paper is not None:
                    diff = "" if ours is None or not ours["n"] else f" ({ours['mean'] - paper:+.2f})"
                    text += f" / {paper:.2f}{diff}"
                cells.append(text)
            lines.append(f"| {label(method)} | {noise} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


CHEAP_SWEEPS = ("mnist-cheap-meta", "mnist-cheap-meta-2", "mnist-mlc-table1", "mnist-mlc-table1-code")


def cheap_table(trials: pl.DataFrame, metric: str, rate: float = 0.4) -> str:
    """Each meta method's fast settings (method.famus true; each meta interval and meta batch
    size its own row) beside the full method, at `rate`."""
    done = query.unique_runs(trials, quiet=True).filter(
        (pl.col("status") == "completed") & ((pl.col("noise.rate") - rate).abs() < 1e-9))
    # the base name keeps MLC's code form apart; the FaMUS flag tells fast from full
    done = with_variant(done.with_columns(pl.col("method.name").alias("method"))).with_columns(
        pl.col("method.famus").fill_null(False).alias("fast"),
        pl.col("method.meta_interval").fill_null(1).alias("every"),
        pl.col("train.meta_batch_size").alias("meta_batch"))
    keys = ("method", "fast", "every", "meta_batch")
    stats = seed_stats(done, metric, (*keys, "noise.type"))
    found = {tuple(r[k] for k in (*keys, "noise.type")): r for r in stats.iter_rows(named=True)}
    full_rows = {(r["method"], r["noise.type"]): r for r in stats.iter_rows(named=True) if not r["fast"]}
    settings = sorted({tuple(r[k] for k in keys) for r in stats.iter_rows(named=True) if r["fast"]},
                      key=lambda s: (s[2], -s[3]))
    lines = ["| method | fast setting | noise | fast | full | fast − full |", "|---|---|---|---|---|---|"]
    for method in ("mwnet", "l2r", "mlc-code", "metalabelnet"):
        rows = [s for s in settings if s[0] == method] or [(method, True, None, None)]
        for setting in rows:
            label = ("—" if setting[2] is None else
                     f"every {setting[2]}, meta batch {setting[3]}")
            for noise in NOISE:
                fast, full = found.get((*setting, noise)), full_rows.get((method, noise))
                if fast is None and full is None:
                    continue
                diff = "" if fast is None or full is None else f"{fast['mean'] - full['mean']:+.2f}"
                lines.append(f"| {LABELS.get(method, method)} | {label} | {noise} {int(100 * rate)}% | "
                             f"{cell_text(fast)} | {cell_text(full)} | {diff} |")
    return "\n".join(lines)


EXTRA_SWEEPS = ("mnist-mlc-table1", "mnist-mlc-table1-beta", "mnist-cheap-meta", "mnist-cheap-meta-2",
                "mnist-cheap-meta-3", "mnist-metalabelnet-flip-seeds", "mnist-extra-rows",
                "mnist-metalabelnet-warmup", "mnist-mlnt")


EXTRA_SETTING = {"method.meta_interval": 1, "train.meta_batch_size": 100, "method.warmup_epochs": 0}
"""what tells one extra row from another, with the value of a run that does not set it"""


def extra_table(trials: pl.DataFrame, metric: str, rates=(0.3, 0.4)) -> str:
    """The rows no paper has published (MW-Net, MetaLabelNet, and each meta method with FaMUS)
    at `rates`, each setting a row of its own, each cell with its difference to CE's there."""
    runs = with_variant(query.unique_runs(trials, quiet=True)).with_columns(
        pl.col("noise.rate").round(2)).filter(
        pl.col("status").is_in(["completed", "collapsed"]) & pl.col("noise.rate").is_in(rates))
    if "optimizer.momentum" in runs.columns:  # another optimizer: its own sweep compares it with CE
        runs = runs.filter(pl.col("optimizer.momentum").fill_null(0.0) == 0.0)
    setting = [c for c in EXTRA_SETTING if c in runs.columns]
    runs = runs.with_columns(pl.col(c).fill_null(EXTRA_SETTING[c]) for c in setting)
    stats = seed_stats(runs, metric, ("method", *setting, "noise.type", "noise.rate"))
    ce = {(r["noise.type"], r["noise.rate"]): r for r in stats.iter_rows(named=True) if r["method"] == "ce"}
    found = {tuple(r[k] for k in ("method", *setting, "noise.type", "noise.rate")): r
             for r in stats.iter_rows(named=True)}
    order = {m: i for i, m in enumerate(("ce", "mwnet", "l2r", "mlc", "metalabelnet", "mlnt"))}
    rows = sorted({tuple(r[k] for k in ("method", *setting)) for r in stats.iter_rows(named=True)},
                  key=lambda r: (order.get(base_method(r[0]), 9), r))
    header = ["method", "setting", "noise", *(f"{int(100 * r)}%" for r in rates)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        values = {**EXTRA_SETTING, **dict(zip(setting, row[1:]))}
        details = [f"every {values['method.meta_interval']}"] if values["method.meta_interval"] > 1 else []
        if values["train.meta_batch_size"] != EXTRA_SETTING["train.meta_batch_size"] and row[0] != "ce":
            details.append(f"meta batch {values['train.meta_batch_size']}")
        if values["method.warmup_epochs"]:
            details.append(f"warm-up {values['method.warmup_epochs']}")
        for noise in NOISE:
            cells = []
            for rate in rates:
                ours, base = found.get((*row, noise, rate)), ce.get((noise, rate))
                text = cell_text(ours)
                if row[0] != "ce" and ours is not None and ours["n"] and base is not None and base["n"]:
                    text += f" [{ours['mean'] - base['mean']:+.2f}]"
                cells.append(text)
            if set(cells) == {"—"}:
                continue
            lines.append(f"| {label(row[0])} | {', '.join(details) or 'full'} | {noise} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default="results")
    parser.add_argument("--sweep", action="append",
                        help=f"a sweep to read (repeat; default: {', '.join(SWEEPS)})")
    parser.add_argument("--metric", default="peak", help="peak | final | best_meta")
    parser.add_argument("--extra", action="store_true",
                        help=f"the rows no paper has published, 30%% and 40%% columns, each cell's "
                             f"difference to CE in brackets (default sweeps: {', '.join(EXTRA_SWEEPS)})")
    parser.add_argument("--cheap", action="store_true",
                        help=f"each meta method's fast setting beside the full method, 40%% column "
                             f"(default sweeps: {', '.join(CHEAP_SWEEPS)})")
    args = parser.parse_args()
    print(f"{args.metric} test accuracy, mean ± std (seeds)"
          + (" [ours - CE]" if args.extra else ", fast setting and full method" if args.cheap
             else " / paper, ours - paper")
          + "; MNIST (official files)\n")
    frames = []
    defaults = EXTRA_SWEEPS if args.extra else CHEAP_SWEEPS if args.cheap else SWEEPS
    for name in args.sweep or defaults:
        try:
            frames.append(query.load(args.store, "trials", name))
        except ConfigError as error:  # a sweep not started yet: its rows are "—"
            print(f"({error})\n", file=sys.stderr)
    if not frames:
        raise SystemExit("no rows of any sweep in the store yet")
    trials = pl.concat(frames, how="diagonal_relaxed")
    if args.extra:
        print(extra_table(trials, args.metric))
    else:
        print(cheap_table(trials, args.metric) if args.cheap else table(trials, args.metric))


if __name__ == "__main__":
    main()

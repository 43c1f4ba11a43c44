"""Time the results queries on a large store: 2,000 trials and 1,000,000 curve rows.

The store is written with raymeta's own writer (one Parquet file per trial and table, as
sweeps write it), with the columns real trials have (the full flattened config, outcomes,
costs, provenance; curves with every per-epoch metric). The first read of a fresh store reads
every trial file and writes the compacted copies (timed once); then each query is timed,
best of --repeats, reading the store again each time (no in-process cache):

    python tools/bench_results.py                    # 2000 trials x 500 epochs
    python tools/bench_results.py --trials 200 --epochs 50 --store /tmp/small
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import time

import numpy as np

from raymeta.config import parse_experiment
from raymeta.results import query
from raymeta.results.store import write_trial

METHODS = [("ce", False), ("mwnet", False), ("l2r", False), ("mlc", False), ("metalabelnet", False),
           ("mlnt", False), ("mwnet", True), ("l2r", True), ("mlc", True), ("metalabelnet", True)]
NOISES = [("uniform", r) for r in (0.2, 0.4, 0.6, 0.8)] + [("flip_to_one", r) for r in (0.2, 0.4)]


def build(store: str, trials: int, epochs: int) -> None:
    rng = np.random.default_rng(0)
    cells = itertools.cycle(itertools.product(METHODS, NOISES, (10, 50, 100), range(10)))
    for i in range(trials):
        (method, famus), (noise, rate), per_class, seed = next(cells)
        cfg = parse_experiment({"method": {"name": method, **({"famus": True} if famus else {})},
                                "noise": {"type": noise, "rate": rate},
                                "meta_set": {"per_class": per_class}, "seed": seed})
        acc = np.clip(0.9 - rate * 0.5 + rng.normal(0, 0.02, epochs).cumsum() / epochs, 0, 1)
        row = {"sweep_name": "big", "config_json": cfg.model_dump_json(), **cfg.flat(),
               "status": "completed", "error": "", "final_test_acc": float(acc[-1]),
               "best_test_acc": float(acc.max()), "test_acc_at_best_meta": float(acc[-5]),
               "ms_per_step": float(rng.uniform(10, 50)), "meta_step_share": 0.5,
               "peak_memory_mb": 900.0, "wall_seconds": 100.0, "epochs_run": epochs,
               "world_size": 1, "restarts": 0, "model.name": cfg.model.name,
               "git_rev": "0" * 40, "torch_version": "2.15.0", "ray_version": "2.60.0"}
        curves = [{"epoch": e, "lr": 0.1, "epoch_seconds": 1.0, "ms_per_step": 20.0,
                   "meta_step_share": 0.5, "train_loss": 1.0 / (e + 1), "train_acc": float(a),
                   "train_acc_clean": float(a), "test_loss": 1.0, "test_acc": float(a),
                   "meta_loss": 1.0, "meta_acc": float(a)} for e, a in enumerate(acc)]
        write_trial(store, "big", f"t{i:05d}", row, curves)


def timed(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        tic = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - tic)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=500)
    parser.add_argument("--store", default=None, help="reuse or create this store")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    store = args.store or tempfile.mkdtemp(prefix="bench_results_")
    if not os.path.exists(os.path.join(store, "trials")):
        tic = time.perf_counter()
        build(store, args.trials, args.epochs)
        print(f"wrote {args.trials} trials, {args.trials * args.epochs} curve rows to {store} "
              f"in {time.perf_counter() - tic:.1f}s")
    queries = {
        "summary (methods x noise, mean ± std)": lambda: query.summary(query.load(store, "trials")),
        "ablation meta_set.per_class": lambda: query.ablation(query.load(store, "trials"),
                                                              "meta_set.per_class"),
        "curves (10 trials, test_acc)": lambda: query.curves(
            store, trial_ids=[f"t{i:05d}" for i in range(0, 10 * 7, 7)], metrics=["test_acc"]),
        "curves (all trials, mean test_acc per method and epoch)": lambda: query.curves(
            store, metrics=["test_acc"], by=["method"]),
    }
    import shutil

    shutil.rmtree(os.path.join(store, "_compact"), ignore_errors=True)
    for table in ("trials", "curves"):
        tic = time.perf_counter()
        rows = len(query.load(store, table))
        print(f"first read of {table} ({rows} rows, {args.trials} files; builds the compacted "
              f"copy): {time.perf_counter() - tic:.2f}s")
    print(f"| query | seconds (best of {args.repeats}) | result rows |")
    print("|---|---|---|")
    for name, fn in queries.items():
        seconds, out = timed(fn, args.repeats)
        print(f"| {name} | {seconds:.3f} | {len(out)} |", flush=True)


if __name__ == "__main__":
    main()

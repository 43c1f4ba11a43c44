"""The sweep driver at scale: N trials that each train for well under a second, through
`raymeta sweep` (run_sweep: our progress, store, checkpoints) and through a bare Ray Tune
Tuner running the same training with the same resources, in the same run.

    python tools/bench_sweep.py --trials 1000            # --trials 10000 for the full check
    python tools/bench_sweep.py --trials 60 --quick      # CI-sized

Prints, for each: trials per minute; the mean gap between consecutive trial finishes per
block of trials (flat = the driver's cost per trial does not grow); slot occupancy (the share
of the time, while trials were pending, that every slot was busy); and the overhead per trial
of raymeta's driver over Tune's own. A third run chains cells (`resources.cells_per_trial`),
which takes Tune's scheduling out of the time between short cells.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import tempfile
import time

EXPERIMENT = {"dataset": {"name": "digits"}, "model": {"name": "mlp", "options": {"hidden": [64]}},
              "train": {"epochs": 2, "batch_size": 128, "checkpoint": False},
              "meta_set": {"per_class": 5}}


def bare_trainable(config: dict) -> None:
    """What a hand-written Tune script would run: train, report each epoch."""
    import ray.tune

    from raymeta.config import ExperimentConfig
    from raymeta.train import Trainer

    started = time.time()
    cfg = ExperimentConfig.model_validate({**EXPERIMENT, "seed": config["seed"]})
    last = {}

    def report(metrics, trainer):
        last.update(metrics)
        ray.tune.report({"test_acc": metrics["test_acc"], "started": started, "finished": time.time()})

    Trainer(cfg, on_epoch_end=report).fit()


def run_bare(trials: int, slots: int, storage: str) -> list[tuple[float, float, str]]:
    import ray.tune

    tuner = ray.tune.Tuner(
        ray.tune.with_resources(bare_trainable, {"cpu": 1}),
        param_space={"seed": ray.tune.grid_search(list(range(trials)))},
        tune_config=ray.tune.TuneConfig(max_concurrent_trials=slots, reuse_actors=True),
        run_config=ray.tune.RunConfig(name="bare", storage_path=storage, verbose=0))
    grid = tuner.fit()
    return [(r.metrics["started"], r.metrics["finished"], str(i)) for i, r in enumerate(grid)]


def run_raymeta(trials: int, slots: int, store: str, chain: int = 1) -> list[tuple[float, float, str]]:
    from raymeta.config import parse_sweep
    from raymeta.orchestrate.grid import expand
    from raymeta.orchestrate.sweep import run_sweep
    from raymeta.results import query

    spec = parse_sweep({"name": "bench", "store": store, "base": EXPERIMENT,
                        "grid": {"seed": list(range(trials))},
                        "resources": {"cpus_per_trial": 1, "max_concurrent_trials": slots,
                                      "cells_per_trial": chain}})
    run_sweep(spec, expand(spec))
    rows = query.load(store, "trials", "bench")
    stamp = lambda s: dt.datetime.fromisoformat(s).timestamp()  # noqa: E731
    return [(stamp(a), stamp(b), t) for a, b, t in
            zip(rows["started_at"], rows["finished_at"], rows["tune_trial_id"])]


def describe(label: str, spans: list[tuple[float, float, str]], seconds: float, slots: int,
             block: int) -> dict:
    """`spans`: (start, finish, Tune trial) of each cell (a chain's cells share a Tune trial)."""
    finishes = sorted(b for _, b, _ in spans)
    gaps = [b - a for a, b in zip(finishes, finishes[1:])]
    blocks = [statistics.mean(gaps[i:i + block]) for i in range(0, len(gaps), block)]
    # occupancy: the share of the time while Tune trials were pending (from the first start to
    # the start of the last Tune trial; a chain's later cells cannot move to a free slot) during
    # which all slots were busy
    events = sorted([(a, 1) for a, _, _ in spans] + [(b, -1) for _, b, _ in spans])
    trial_starts: dict[str, float] = {}
    for a, _, trial in spans:
        trial_starts[trial] = min(a, trial_starts.get(trial, a))
    last_start = max(trial_starts.values())
    busy, running, full = events[0][0], 0, 0.0
    for t, step in events:
        if running >= slots and busy < last_start:
            full += min(t, last_start) - busy
        running += step
        busy = t
    first = min(a for a, _, _ in spans)
    window = last_start - first
    # where the slots idle: between the cells of a chain, or between Tune trials (the rest)
    clip = lambda t: min(max(t, first), last_start)  # noqa: E731
    busy_time = sum(clip(b) - clip(a) for a, b, _ in spans)
    by_trial: dict[str, list[tuple[float, float]]] = {}
    for a, b, trial in spans:
        by_trial.setdefault(trial, []).append((a, b))
    within = sum(clip(nxt[0]) - clip(prev[1]) for cells in map(sorted, by_trial.values())
                 for prev, nxt in zip(cells, cells[1:]))
    idle = slots * window - busy_time
    return {"label": label, "trials": len(spans), "seconds": seconds,
            "per_minute": 60 * len(spans) / seconds, "blocks": blocks,
            "occupancy": full / window if window > 0 else 1.0,
            "idle": idle, "idle_within_chains": within}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="smaller blocks, for CI sizes")
    parser.add_argument("--chain", type=int, default=8,
                        help="also run raymeta with resources.cells_per_trial CHAIN (1: skip)")
    parser.add_argument("--no-unchained", action="store_true",
                        help="skip raymeta without chaining (halves a 10,000-trial run)")
    args = parser.parse_args()
    block = max(1, args.trials // (5 if args.quick else 10))
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from raymeta.orchestrate.runtime import start_ray

    start_ray(None)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = [("ray tune, bare", lambda: run_bare(args.trials, args.slots, f"{tmp}/tune"))]
        if not args.no_unchained:
            runs.append(("raymeta sweep", lambda: run_raymeta(args.trials, args.slots, f"{tmp}/store")))
        if args.chain > 1:
            runs.append((f"raymeta sweep, cells_per_trial {args.chain}",
                         lambda: run_raymeta(args.trials, args.slots, f"{tmp}/chained", args.chain)))
        for label, run in runs:
            tic = time.monotonic()
            spans = run()
            results.append(describe(label, spans, time.monotonic() - tic, args.slots, block))
    ray.shutdown()
    print(f"{args.trials} trials of 2 epochs of ce on digits (mlp [64]), {args.slots} slots of 1 CPU")
    print("| driver | trials/min | s per trial | all slots busy | gap between finishes per "
          f"block of {block} (s) |\n|---|---|---|---|---|")
    for r in results:
        gaps = " ".join(f"{g:.3f}" for g in r["blocks"])
        print(f"| {r['label']} | {r['per_minute']:.0f} | {r['seconds'] / r['trials']:.3f} | "
              f"{100 * r['occupancy']:.0f}% | {gaps} |")
    for r in results:
        print(f"\n{r['label']}: slots idle {r['idle']:.1f} slot-s while trials were pending, "
              f"{r['idle_within_chains']:.1f} of them between the cells of a chain")
    bare = results[0]
    for ours in results[1:]:
        print(f"\n{ours['label']}: overhead per trial over Tune's own "
              f"{(ours['seconds'] - bare['seconds']) / args.trials:+.3f} s; last block / first "
              f"block of gaps {ours['blocks'][-1] / ours['blocks'][0]:.2f} (bare Tune: "
              f"{bare['blocks'][-1] / bare['blocks'][0]:.2f})")


if __name__ == "__main__":
    main()

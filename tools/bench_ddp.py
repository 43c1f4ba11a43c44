"""Throughput of data-parallel training: 1 vs N Ray Train workers, same global batch.

For each method, the same experiment trains on 1 worker with the whole global batch (all the
CPUs, as threads) and on N workers with batch/N each (the CPUs split between them), in turn,
repeated round-robin (this machine is shared and noisy; compare ratios taken in one run).
Throughput is training samples per second over the epochs after the first (the first pays for
warm-up), from the curves the runs write; Ray's start-up cost per run is reported apart.

    python tools/bench_ddp.py                       # digits MLP, ce and mwnet, 1 vs 2 workers
    python tools/bench_ddp.py --methods ce,mwnet,mlc --workers 2 --epochs 4 --repeats 2
    python tools/bench_ddp.py --gpus-per-worker 1 --address auto   # on a GPU cluster
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")

import polars as pl

from raymeta.config import ResourcesConfig, parse_experiment
from raymeta.orchestrate.distributed import fit_distributed
from raymeta.orchestrate.runtime import check_capacity, start_ray
from raymeta.results import query


def experiment(method: str, batch: int, args) -> dict:
    return {"dataset": {"name": args.dataset}, "model": {"name": args.model,
                                                         "options": {"hidden": [512, 512]}
                                                         if args.model == "mlp" else {}},
            "noise": {"type": "uniform", "rate": 0.4}, "meta_set": {"per_class": 10},
            "method": {"name": method}, "train": {"epochs": args.epochs, "batch_size": batch,
                                                  "meta_batch_size": batch, "checkpoint": True}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="ce,mwnet")
    parser.add_argument("--workers", type=int, default=2, help="N, compared with 1")
    parser.add_argument("--batch", type=int, default=128, help="global batch size")
    parser.add_argument("--cpus", type=float, default=2.0, help="CPUs per run (split over workers)")
    parser.add_argument("--gpus-per-worker", type=int, default=0)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--address", default=None)
    args = parser.parse_args()
    if args.batch % args.workers:
        parser.error(f"--batch {args.batch} must be divisible by --workers {args.workers}")

    if not args.address:
        check_capacity(ResourcesConfig(workers_per_trial=args.workers, cpus_per_trial=args.cpus,
                                       gpus_per_trial=args.gpus_per_worker * args.workers),
                       "bench_ddp")
    start_ray(args.address)
    store = tempfile.mkdtemp(prefix="bench_ddp_")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    samples: dict[tuple[str, int], list[float]] = {}
    overhead: dict[tuple[str, int], list[float]] = {}
    for repeat in range(args.repeats):
        for method in methods:
            for workers in (1, args.workers):
                cfg = parse_experiment(experiment(method, args.batch // workers, args), unread_ok=True)
                resources = ResourcesConfig(workers_per_trial=workers, cpus_per_trial=args.cpus,
                                            gpus_per_trial=args.gpus_per_worker * workers)
                trial_id = f"{method}-w{workers}-r{repeat}"
                tic = time.perf_counter()
                fit_distributed(cfg, resources, store=store, sweep="bench", trial_id=trial_id)
                wall = time.perf_counter() - tic
                curves = query.load(store, "curves", "bench").filter(pl.col("trial_id") == trial_id)
                trial = query.load(store, "trials", "bench").filter(pl.col("trial_id") == trial_id)
                steps = trial["train_size"].item() // args.batch
                later = curves.filter(pl.col("epoch") >= 1)["epoch_seconds"].to_list()
                samples.setdefault((method, workers), []).append(
                    steps * args.batch / statistics.median(later))
                overhead.setdefault((method, workers), []).append(
                    wall - sum(curves["epoch_seconds"].to_list()))
                print(f"  {trial_id}: {samples[(method, workers)][-1]:.0f} samples/s, "
                      f"{wall:.1f}s wall", flush=True)

    n = args.workers
    print(f"\n{args.dataset} {args.model}, global batch {args.batch}, {args.cpus:g} CPUs per run"
          f"{f', {args.gpus_per_worker} GPU per worker' if args.gpus_per_worker else ''}; "
          f"median over {args.repeats} repeat(s)")
    print(f"| method | 1 worker (samples/s) | {n} workers (samples/s) | ratio {n}/1 "
          f"| start-up + teardown, 1 / {n} workers (s) |")
    print("|---|---|---|---|---|")
    for method in methods:
        one, many = (statistics.median(samples[(method, w)]) for w in (1, n))
        setup = [statistics.median(overhead[(method, w)]) for w in (1, n)]
        print(f"| {method} | {one:.0f} | {many:.0f} | {many / one:.2f}x "
              f"| {setup[0]:.1f} / {setup[1]:.1f} |")


if __name__ == "__main__":
    main()

"""The two virtual steps side by side, under SGD with momentum: mirroring the optimizer
(`virtual_step: optimizer`) against the official codes' plain theta - lr * grad (`sgd`).

Each method keeps its own step size (MetaLabelNet 1, MLNT 0.2, MW-Net and L2R the current
learning rate); the rest is sweeps/digits-methods.yaml's setting (8x8 digits, MLP [256, 256],
SGD momentum 0.9, cosine, 30 epochs), 40% noise. Prints the final test and meta accuracy of
each run as a markdown table. About two minutes on one core.

    python tools/virtual_step_ab.py
    python tools/virtual_step_ab.py --methods metalabelnet,mlnt --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import itertools

from raymeta.config import parse_experiment
from raymeta.train import Trainer

SETTINGS = {  # each method's setting in sweeps/digits-methods.yaml
    "metalabelnet": ({"warmup_epochs": 10}, 0.1),
    "mlnt": ({"start_epoch": 2, "ramp_epochs": 5, "num_fast": 4}, 0.1),
    "mwnet": ({"meta_lr": 0.1}, 0.1),
    "l2r": ({}, 0.03),
}


def run(method: str, mode: str, noise: str, seed: int) -> tuple[float, float]:
    options, lr = SETTINGS[method]
    cfg = parse_experiment({
        "dataset": {"name": "digits"}, "model": {"name": "mlp", "options": {"hidden": [256, 256]}},
        "meta_set": {"per_class": 10},
        "train": {"epochs": 30, "batch_size": 64, "meta_batch_size": 100},
        "optimizer": {"name": "sgd", "lr": lr, "momentum": 0.9, "weight_decay": 1e-4},
        "schedule": {"name": "cosine"}, "noise": {"type": noise, "rate": 0.4},
        "method": {"name": method, **options, "virtual_step": mode}, "seed": seed})
    last = Trainer(cfg).fit().curves[-1]
    return last["test_acc"], last["meta_acc"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(SETTINGS))
    parser.add_argument("--noise", default="uniform,flip_to_one")
    parser.add_argument("--seeds", default="0,1")
    args = parser.parse_args()
    print("| method | noise 40% | seed | test, optimizer | test, sgd | meta, optimizer | meta, sgd |")
    print("|---|---|---|---|---|---|---|")
    for method, noise, seed in itertools.product(args.methods.split(","), args.noise.split(","),
                                                 [int(s) for s in args.seeds.split(",")]):
        (test_o, meta_o), (test_s, meta_s) = (run(method, mode, noise, seed)
                                              for mode in ("optimizer", "sgd"))
        print(f"| {method} | {noise} | {seed} | {100 * test_o:.2f} | {100 * test_s:.2f} | "
              f"{meta_o:.3f} | {meta_s:.3f} |", flush=True)


if __name__ == "__main__":
    main()

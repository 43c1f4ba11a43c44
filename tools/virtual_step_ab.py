"""The two virtual steps side by side, under SGD with momentum: mirroring the optimizer
(`virtual_step: optimizer`) against the official codes' plain theta - lr * grad (`sgd`).

The runs are the 40% cells of sweeps/digits-methods.yaml (8x8 digits, MLP [256, 256], SGD
momentum 0.9, cosine, 30 epochs, each method with its settings there), read from that file;
each method keeps its own step size (MetaLabelNet 1, MLNT 0.2, MW-Net and L2R the current
learning rate), and only the virtual step changes. Prints the final test and meta accuracy of
each run as a markdown table. About two minutes on one core.

    python tools/virtual_step_ab.py
    python tools/virtual_step_ab.py --methods metalabelnet,mlnt --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

from raymeta.config import parse_experiment
from raymeta.orchestrate.grid import expand, load_sweep
from raymeta.train import Trainer

SWEEP = Path(__file__).resolve().parents[1] / "sweeps" / "digits-methods.yaml"


def final_accuracies(config, mode: str) -> tuple[float, float]:
    """(test, meta) accuracy at the last epoch of `config` with virtual step `mode`."""
    data = config.model_dump()
    data["method"]["virtual_step"] = mode
    last = Trainer(parse_experiment(data)).fit().curves[-1]
    return last["test_acc"], last["meta_acc"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="metalabelnet,mlnt,mwnet,l2r")
    parser.add_argument("--noise", default="uniform,flip_to_one")
    parser.add_argument("--seeds", default="0,1")
    args = parser.parse_args()
    cells = {(c.config.method.name, c.config.noise.type, c.config.seed): c.config
             for c in expand(load_sweep(SWEEP), SWEEP.parent.parent) if c.config.noise.rate == 0.4}
    print("| method | noise 40% | seed | test, optimizer | test, sgd | meta, optimizer | meta, sgd |")
    print("|---|---|---|---|---|---|---|")
    for method, noise, seed in itertools.product(args.methods.split(","), args.noise.split(","),
                                                 [int(s) for s in args.seeds.split(",")]):
        config = cells[(method, noise, seed)]
        (test_o, meta_o), (test_s, meta_s) = (final_accuracies(config, mode)
                                              for mode in ("optimizer", "sgd"))
        print(f"| {method} | {noise} | {seed} | {100 * test_o:.2f} | {100 * test_s:.2f} | "
              f"{meta_o:.3f} | {meta_s:.3f} |", flush=True)


if __name__ == "__main__":
    main()

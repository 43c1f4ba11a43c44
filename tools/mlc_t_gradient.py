"""How MLC's T moves: the size of its meta gradient step by step, and where the large ones come from.

Trains MLC in the paper's form on the MLC table's protocol (LeNet on MNIST, SGD 1e-2, meta
set of 500 from the test split) and prints, each epoch, T's mean diagonal and its total
variation to the realized noise, test and meta accuracy, and the steps whose largest meta
gradient entry falls in each size band with the median smallest corrected probability of a
training label, min (pT)_y, on them (docs/fidelity.md, "What drives the drift").

    python tools/mlc_t_gradient.py --rate 0.1 --beta 0.003 --epochs 3 [--clip 1]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from raymeta.config import parse_experiment
from raymeta.train import Trainer

BANDS = ((0.0, 1.0), (1.0, 100.0), (100.0, float("inf")))
MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=0.1)
    parser.add_argument("--noise", default="uniform")
    parser.add_argument("--beta", type=float, default=0.003)
    parser.add_argument("--clip", type=float, default=None, help="method.meta_grad_clip")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--dataset", default="mnist", help="mnist (../shared/data/mnist) or digits")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dataset = {"name": "digits"} if args.dataset == "digits" else {"name": "mnist", "root": str(MNIST)}
    trainer = Trainer(parse_experiment({
        "dataset": dataset, "model": {"name": "lenet" if args.dataset == "mnist" else "mlp"},
        "meta_set": {"per_class": 50 if args.dataset == "mnist" else 5, "source": "test"},
        "noise": {"type": args.noise, "rate": args.rate}, "seed": args.seed,
        "train": {"epochs": args.epochs, "batch_size": 100, "meta_batch_size": 100, "checkpoint": False},
        "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.0, "weight_decay": 0.0},
        "schedule": {"name": "constant"},
        "method": {"name": "mlc", "virtual_step": "sgd", "virtual_lr": 0.01, "meta_lr": args.beta,
                   "meta_grad_clip": args.clip}}))
    mlc = trainer.method
    steps: list[tuple[float, float]] = []  # (largest |entry| of T's meta gradient, min (pT)_y)
    min_py = {}

    def meta_parameters(batch, original=mlc.meta_parameters):
        with torch.no_grad():  # before the step: the T and model this step's gradient sees
            p = torch.softmax(trainer.model(batch.x), 1) @ mlc.meta_model.T
            min_py["last"] = p.gather(1, batch.y[:, None]).min().item()
        return original(batch)

    def apply_meta_gradient(grads, original=mlc.apply_meta_gradient):
        steps.append((grads[0].abs().max().item(), min_py["last"]))
        original(grads)

    mlc.meta_parameters, mlc.apply_meta_gradient = meta_parameters, apply_meta_gradient
    for epoch in range(args.epochs):
        trainer.epoch = epoch
        metrics, evaluation = trainer.train_epoch(), trainer.evaluate()
        print(f"epoch {epoch}: T diagonal {mlc.meta_model.T.diag().mean():.3f}, total variation "
              f"{metrics['T_total_variation']:.3f}, test {100 * evaluation['test_acc']:.2f}, meta "
              f"{100 * evaluation['meta_acc']:.2f}", flush=True)
        sizes, py = np.array(steps).T
        for low, high in BANDS:
            band = (sizes >= low) & (sizes < high)
            if band.any():
                print(f"  largest entry in [{low:g}, {high:g}): {band.sum()} steps, median min (pT)_y "
                      f"{np.median(py[band]):.2e}")
        print(f"  largest entry of the epoch: {sizes.max():.3g}", flush=True)
        steps.clear()


if __name__ == "__main__":
    main()

"""The Trainer: epochs of Method.step, evaluation, checkpoints, metrics.

Runs in a plain process (no Ray needed); orchestration passes a callback that is called at
each epoch's end. Metrics are summed on the device and read once per epoch, so a step never
waits for the host.
"""

from __future__ import annotations

import math
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from raymeta.config import ExperimentConfig
from raymeta.data.bundle import DataBundle, build_data, seeded_rng
from raymeta.data.loader import DeviceSplit
from raymeta.errors import ConfigError, RaymetaError
from raymeta.methods import Engine, build_method
from raymeta.methods.base import masked_sum_count, scalar_sum_count
from raymeta.methods.famus import Famus
from raymeta.methods.optim import build_optimizer, lr_factor, set_lr
from raymeta.models import build_model

CHECKPOINT_FILE = "checkpoint.pt"


class TrainingDiverged(RaymetaError):
    """A loss became NaN or infinite; the trial ends as failed with this reason."""


@dataclass
class RunResult:
    curves: list[dict]
    """one dict per epoch"""
    outcome: dict
    """final/peak/at-best-meta accuracies, costs, data facts"""


@dataclass
class _Generators:
    order: torch.Generator
    meta: torch.Generator
    augment: torch.Generator
    method: torch.Generator

    def state(self) -> dict:
        state = {k: getattr(self, k).get_state() for k in ("order", "meta", "augment", "method")}
        state["torch"] = torch.random.get_rng_state()  # dropout and other global draws
        return state

    def load(self, state: dict) -> None:
        torch.random.set_rng_state(state.pop("torch"))
        for key, value in state.items():
            getattr(self, key).set_state(value)


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is cuda but no CUDA GPU is visible; use auto or cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Trainer:
    """Trains one ExperimentConfig.

    Args:
        cfg: the experiment.
        on_epoch_end: called as on_epoch_end(metrics, trainer) after each epoch (and after the
            checkpoint is saved), e.g. to report to Ray Tune.
        checkpoint_dir: where `checkpoint.pt` is written each epoch (None: no file).
        resume_from: a checkpoint file or folder to continue from.
    """

    def __init__(self, cfg: ExperimentConfig, *, on_epoch_end: Callable | None = None,
                 checkpoint_dir: str | Path | None = None, resume_from: str | Path | None = None,
                 data: DataBundle | None = None):
        self.cfg = cfg
        self.device = pick_device(cfg.train.device)
        self.on_epoch_end = on_epoch_end
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        torch.manual_seed(cfg.seed)  # the initialisation of the model and meta-model
        self.data = data if data is not None else build_data(cfg)
        channels, size = self.data.input_shape[0], self.data.input_shape[-1]
        self.model = build_model(cfg.model.name, self.data.num_classes, channels, size,
                                 **cfg.model.options).to(self.device)
        self.method = build_method(cfg.method, self.data.num_classes, self.model).to(self.device)
        self.optimizer = build_optimizer(cfg.optimizer, self.model.parameters())
        self.engine = Engine(self.model, self.optimizer)
        if getattr(cfg.method, "famus", False):
            self.engine.famus = Famus(cfg.famus, self.model)
        self.splits = {name: DeviceSplit(getattr(self.data, name), self.data, self.device)
                       for name in ("train", "meta", "test")}
        seeds = [int(s) for s in seeded_rng(cfg.seed, "batches").integers(0, 2**62, size=4)]
        self.gens = _Generators(torch.Generator().manual_seed(seeds[0]),
                                torch.Generator().manual_seed(seeds[1]),
                                torch.Generator(self.device).manual_seed(seeds[2]),
                                torch.Generator().manual_seed(seeds[3]))
        self.method.generator = self.gens.method
        if self.engine.famus is not None:
            self.engine.famus.generator = self.gens.method
        self.epoch = 0
        self.curves: list[dict] = []
        self.train_seconds = 0.0
        self.meta_seconds = 0.0
        if resume_from is not None:
            self.load_checkpoint(resume_from)

    # ------------------------------------------------------------------------- training
    def fit(self) -> RunResult:
        started = time.perf_counter()
        while self.epoch < self.cfg.train.epochs:
            metrics = self.train_epoch()
            metrics.update(self.evaluate())
            self.curves.append(metrics)
            self.epoch += 1
            if self.checkpoint_dir is not None and self.cfg.train.checkpoint:
                self.save_checkpoint(self.checkpoint_dir)
            if self.on_epoch_end is not None:
                self.on_epoch_end(metrics, self)
        return RunResult(self.curves, self.outcome(time.perf_counter() - started))

    def train_epoch(self) -> dict:
        cfg, method, engine = self.cfg, self.method, self.engine
        lr = set_lr(self.optimizer, cfg.optimizer.lr,
                    lr_factor(cfg.schedule, self.epoch, cfg.train.epochs))
        self.model.train()
        method.on_epoch_start(self.epoch, engine)
        train, meta = self.splits["train"], self.splits["meta"]

        def meta_batch():
            return meta.sample(cfg.train.meta_batch_size, self.gens.meta, self.data.augment,
                               self.gens.augment)

        sums: dict[str, torch.Tensor] = {}  # name -> [sum, count], on the device
        count = 0
        tic = time.perf_counter()
        for batch in train.batches(cfg.train.batch_size, shuffle=True,
                                   augment=self.data.augment, order_generator=self.gens.order,
                                   aug_generator=self.gens.augment,
                                   drop_last=len(train) > cfg.train.batch_size):
            out = method.step(engine, batch, meta_batch)
            pred = out.logits.argmax(1)
            values = {"loss": scalar_sum_count(out.loss.float()),
                      "acc": masked_sum_count((pred == batch.y).float(), batch.y >= 0),
                      "acc_clean": masked_sum_count((pred == batch.y_clean).float(),
                                                    batch.y_clean >= 0),
                      **out.extras}
            for key, value in values.items():
                value = value.detach().float()
                sums[key] = sums[key] + value if key in sums else value
            count += 1
        totals = torch.stack(list(sums.values())).tolist()  # the epoch's one wait for the device
        means = {k: (t[0] / t[1] if t[1] else float("nan")) for k, t in zip(sums, totals)}
        seconds = time.perf_counter() - tic
        meta_seconds = engine.take_meta_seconds()
        self.train_seconds += seconds
        self.meta_seconds += meta_seconds
        if not math.isfinite(means.get("loss", 0.0)):
            raise TrainingDiverged(f"training loss is {means['loss']} in epoch {self.epoch} "
                                   f"(method {method.name}); lower optimizer.lr or check the data")
        return {"epoch": self.epoch, "lr": lr, "epoch_seconds": seconds,
                "ms_per_step": 1000.0 * seconds / max(count, 1),
                "meta_step_share": meta_seconds / seconds if seconds else 0.0,
                **{f"train_{key}": value for key, value in means.items()},
                **method.epoch_metrics(self.data),
                **(engine.famus.epoch_metrics() if engine.famus is not None else {})}

    @torch.no_grad()
    def evaluate(self) -> dict:
        self.model.eval()
        results = {}
        for name in ("test", "meta"):
            split = self.splits[name]
            loss_sum = torch.zeros((), device=self.device)
            correct = torch.zeros((), device=self.device)
            for batch in split.batches(self.cfg.train.eval_batch_size, shuffle=False):
                logits = self.model(batch.x)
                loss_sum += F.cross_entropy(logits, batch.y, reduction="sum")
                correct += (logits.argmax(1) == batch.y).sum()
            loss, acc = (torch.stack([loss_sum, correct]) / max(len(split), 1)).tolist()
            results[f"{name}_loss"], results[f"{name}_acc"] = loss, acc
        return results

    # ---------------------------------------------------------------------- bookkeeping
    def outcome(self, wall_seconds: float) -> dict:
        test = np.array([c["test_acc"] for c in self.curves])
        meta = np.array([c["meta_acc"] for c in self.curves])
        best_meta = int(len(meta) - 1 - np.argmax(meta[::-1]))  # latest epoch among ties
        if self.device.type == "cuda":
            peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:  # ru_maxrss is in KiB on Linux
            peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return {
            "epochs_run": len(self.curves),
            "final_test_acc": float(test[-1]), "best_test_acc": float(test.max()),
            "best_test_epoch": int(np.argmax(test)),
            "final_meta_acc": float(meta[-1]), "best_meta_epoch": best_meta,
            "test_acc_at_best_meta": float(test[best_meta]),
            "final_train_loss": float(self.curves[-1]["train_loss"]),
            "wall_seconds": wall_seconds, "train_seconds": self.train_seconds,
            "ms_per_step": 1000.0 * self.train_seconds / max(self.engine.steps, 1),
            "meta_step_share": self.meta_seconds / self.train_seconds if self.train_seconds else 0.0,
            "peak_memory_mb": peak_mb,
            "device": str(self.device),
            "gpu_name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "",
            **self.data.summary(),
        }

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "method": self.method.state_dict(),
                "famus": self.engine.famus.state_dict() if self.engine.famus is not None else None,
                "generators": self.gens.state(), "curves": self.curves,
                "train_seconds": self.train_seconds, "meta_seconds": self.meta_seconds,
                "steps": self.engine.steps,
                "config_digest": self.cfg.digest(), "noisy_labels_sha": self.data.noise.sha}

    def save_checkpoint(self, folder: str | Path) -> Path:
        """Write checkpoint.pt atomically into `folder`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{CHECKPOINT_FILE}.{os.getpid()}.tmp"
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, folder / CHECKPOINT_FILE)
        return folder / CHECKPOINT_FILE

    def load_checkpoint(self, path: str | Path) -> None:
        path = Path(path)
        if path.is_dir():
            path = path / CHECKPOINT_FILE
        state = torch.load(path, map_location=self.device, weights_only=False)
        if state["config_digest"] != self.cfg.digest():
            raise ConfigError(f"checkpoint {path} was written by another config "
                              f"(digest {state['config_digest']}, this one {self.cfg.digest()}); "
                              f"use a fresh output folder or the original config")
        if state["noisy_labels_sha"] != self.data.noise.sha:
            raise ConfigError(f"checkpoint {path} was trained on other noisy labels; the data "
                              f"or label file changed since; start a fresh run")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.method.load_state_dict(state["method"])
        if self.engine.famus is not None:
            self.engine.famus.load_state_dict(state["famus"])
        self.gens.load(dict(state["generators"]))
        self.epoch, self.curves = state["epoch"], state["curves"]
        self.train_seconds, self.meta_seconds = state["train_seconds"], state["meta_seconds"]
        self.engine.steps = state["steps"]

"""The Trainer: epochs of Method.step, evaluation, checkpoints, metrics.

Runs in a plain process (no Ray needed); orchestration passes a callback that is called at
each epoch's end. Metrics are summed on the device and read once per epoch, so a step never
waits for the host.

Inside a torch.distributed process group (Ray Train's workers) the same Trainer trains data
parallel: every worker draws the same global batch order, meta batch and augmentation, and
trains on its contiguous part (`raymeta.parallel`); metrics and evaluation are summed across
workers, so every worker ends each epoch with the same model and the same numbers.
BatchNorm uses each worker's own batch statistics in training; the running statistics are
averaged across workers at each epoch's end, before evaluation.

With `meta_set.source: pseudo` there is no fixed meta set: after a cross-entropy warm-up, the
meta set of each epoch is chosen at the end of the previous one from the training losses
(`choose_pseudo_meta`).
"""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from raymeta.config import ExperimentConfig
from raymeta.data import pseudo
from raymeta.data.bundle import DataBundle, build_data, seeded_rng
from raymeta.data.loader import DeviceSplit
from raymeta.errors import ConfigError
from raymeta.methods import Engine, build_method
from raymeta.methods.base import Method, masked_sum_count, per_sample_ce, scalar_sum_count
from raymeta.methods.famus import Famus
from raymeta.methods.optim import build_optimizer, lr_factor, set_lr
from raymeta.models import build_model
from raymeta.parallel import all_reduce_sum_, average_buffers_, rank_world, synchronize_batchnorm
from raymeta.train import checkpoint
from raymeta.train.health import TrainingDiverged, divergence
from raymeta.train.streams import Streams


@dataclass
class RunResult:
    curves: list[dict]
    """one dict per epoch"""
    outcome: dict
    """final/peak/at-best-meta accuracies, costs, data facts"""


OPTIONAL_FINALS = {"test_acc_rare_third": "final_rare_third_acc",
                   "pseudo_meta_size": "final_pseudo_meta_size",
                   "pseudo_meta_precision": "final_pseudo_meta_precision"}
"""per-epoch metrics of some settings (long-tailed data, pseudo meta sets) -> results column"""


def curve_outcome(curves: list[dict]) -> dict:
    """What a results row says about the accuracy curves: final, peak, at the best meta epoch."""
    test = np.array([c["test_acc"] for c in curves])
    meta = np.array([c["meta_acc"] for c in curves])
    best_meta = int(len(meta) - 1 - np.argmax(meta[::-1]))  # latest epoch among ties
    return {"epochs_run": len(curves),
            "final_test_acc": float(test[-1]), "best_test_acc": float(test.max()),
            "best_test_epoch": int(np.argmax(test)),
            "final_meta_acc": float(meta[-1]), "best_meta_epoch": best_meta,
            "test_acc_at_best_meta": float(test[best_meta]),
            "final_train_loss": float(curves[-1]["train_loss"]),
            **{column: float(curves[-1][key]) for key, column in OPTIONAL_FINALS.items()
               if key in curves[-1]}}


def _worker_share(batch: int, meta_batch: int, batch_workers: int | None,
                  world: int) -> tuple[int, int]:
    """Per-worker batch and meta batch when the global ones are batch_workers times the
    configured sizes and `world` workers share them."""
    if batch_workers is None or batch_workers == world:
        return batch, meta_batch
    shares = []
    for key, size in (("batch_size", batch), ("meta_batch_size", meta_batch)):
        if (size * batch_workers) % world:
            raise ConfigError(f"the global {key.replace('_', ' ')} {batch_workers} x {size} does not "
                              f"split evenly over {world} workers; set train.{key} to a "
                              f"multiple of {world // math.gcd(world, batch_workers)}")
        shares.append(size * batch_workers // world)
    return shares[0], shares[1]


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
        batch_workers: how many workers train.batch_size and train.meta_batch_size are per
            (default: the workers there are). The global batches are batch_workers times
            them, split over the workers there are (an elastic run on fewer workers).
    """

    def __init__(self, cfg: ExperimentConfig, *, on_epoch_end: Callable | None = None,
                 checkpoint_dir: str | Path | None = None, resume_from: str | Path | None = None,
                 data: DataBundle | None = None, device: torch.device | None = None,
                 batch_workers: int | None = None):
        self.cfg = cfg
        self.device = device if device is not None else pick_device(cfg.train.device)
        self.dtype = getattr(torch, cfg.train.dtype)
        self.rank, self.world = rank_world()
        self.batch_size, self.meta_batch_size = (
            _worker_share(cfg.train.batch_size, cfg.train.meta_batch_size, batch_workers, self.world))
        """this worker's share of each global batch and meta batch"""
        torch.manual_seed(cfg.seed)  # the initialisation of the model and meta-model
        self.data = data if data is not None else build_data(cfg)
        channels, size = self.data.input_shape[0], self.data.input_shape[-1]
        model = build_model(cfg.model.name, self.data.num_classes, channels, size,
                            **cfg.model.options).to(self.device, self.dtype)
        if cfg.train.channels_last:
            model.to(memory_format=torch.channels_last)
        if cfg.train.sync_batchnorm and self.world > 1:
            synchronize_batchnorm(model)
        method = build_method(cfg.method, self.data.num_classes, model).to(self.device, self.dtype)
        self.start_loop(model, method, on_epoch_end, checkpoint_dir)
        if cfg.train.compile:
            torch._dynamo.reset()  # a fresh cache per trial: reused Tune actors train new models
            self.engine.plain_model = torch.compile(self.model)
        self.pseudo_index: torch.Tensor | None = None
        """positions in the training split of the current pseudo-clean meta set"""
        if getattr(cfg.method, "famus", False):
            self.engine.meta_gradient = Famus(cfg.famus, self.model)
        layout = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
        self.splits = {name: DeviceSplit(getattr(self.data, name), self.data, self.device,
                                         self.dtype, layout)
                       for name in ("train", "meta", "test")}
        self.method.splits = self.splits
        for name in ("train",) if self.pseudo else ("train", "meta"):
            if len(self.splits[name]) < self.world:
                raise ConfigError(f"the {name} split has {len(self.splits[name])} samples, fewer "
                                  f"than the {self.world} data-parallel workers; use fewer workers")
        self.gens = Streams.for_run(cfg.seed, self.device)
        self.method.generator = self.engine.meta_gradient.generator = self.gens.method
        if resume_from is not None:
            self.load_checkpoint(resume_from)

    def start_loop(self, model: torch.nn.Module, method: Method, on_epoch_end: Callable | None,
                   checkpoint_dir: str | Path | None) -> None:
        """What the training loop (fit, train_epoch) reads beside the data, set in one place
        for one run and for a pack of runs (raymeta.train.packed): the model and method, their
        optimizer and engine, the warm-up method, the epoch's counters."""
        cfg = self.cfg
        self.model, self.method = model, method
        self.on_epoch_end = on_epoch_end
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.optimizer = build_optimizer(cfg.optimizer, model.parameters())
        self.engine = Engine(model, self.optimizer)
        self.pseudo = cfg.meta_set.pseudo if cfg.meta_set.source == "pseudo" else None
        """settings of the pseudo-clean meta set, chosen each epoch (None: a fixed meta set)"""
        self.warmup_method = Method(cfg.method, method.num_classes, model)
        """plain cross-entropy, for the warm-up epochs before the first pseudo meta set"""
        self.epoch = 0
        self.curves: list[dict] = []
        self.train_seconds = 0.0
        self.meta_seconds = 0.0
        self.restarts = 0
        """how many times this run continued from a checkpoint"""

    # ------------------------------------------------------------------------- training
    def fit(self) -> RunResult:
        started = time.perf_counter()
        while self.epoch < self.cfg.train.epochs:
            metrics = self.train_epoch()
            self.average_batchnorm_statistics()
            if self.pseudo is not None:  # the meta set of the next epoch (and of this evaluation)
                metrics.update(self.choose_pseudo_meta())
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
        if self.world > 1:  # dropout differs per worker, reproducibly (and exactly after a resume)
            torch.manual_seed(int(seeded_rng(cfg.seed, "dropout", self.epoch, self.rank).integers(2**62)))
        warmup = self.pseudo is not None and self.epoch < self.pseudo.warmup_epochs
        step = self.warmup_method.step if warmup else method.step
        sums: dict[str, torch.Tensor] = {}  # name -> [sum, count], on the device
        count = 0
        # the first step whose training / meta loss is not finite (-1: none), kept on the device
        first_bad = torch.full((2,), -1, dtype=torch.long, device=self.device)
        engine.last_meta_loss = None
        tic = time.perf_counter()
        for batch in self.epoch_batches():
            with self.autocast():
                out = step(engine, batch, self.meta_batch)
            for key, value in self.step_values(out, batch).items():
                value = value.detach().float()
                sums[key] = sums[key] + value if key in sums else value
            meta_loss = engine.last_meta_loss if engine.last_meta_loss is not None else out.loss
            bad = ~torch.isfinite(torch.stack([out.loss.float(), meta_loss.float()]))
            first_bad = torch.where(bad & (first_bad < 0), count, first_bad)
            count += 1
        stacked = torch.stack(list(sums.values()))
        all_reduce_sum_([stacked])  # sums and counts of every worker
        totals = stacked.tolist()  # the epoch's one wait for the device
        means = {k: (t[0] / t[1] if t[1] else float("nan")) for k, t in zip(sums, totals)}
        seconds = time.perf_counter() - tic
        meta_seconds = engine.take_meta_seconds()
        self.train_seconds += seconds
        self.meta_seconds += meta_seconds
        self.check_finite(means, first_bad.tolist(), count)
        return {"epoch": self.epoch, "lr": lr, "epoch_seconds": seconds,
                "ms_per_step": 1000.0 * seconds / max(count, 1),
                "meta_step_share": meta_seconds / seconds if seconds else 0.0,
                **{f"train_{key}": value for key, value in means.items()},
                **method.epoch_metrics(self.data), **engine.meta_gradient.epoch_metrics()}

    def epoch_batches(self):
        """This epoch's training batches (this worker's part of each)."""
        train = self.splits["train"]
        return train.batches(self.batch_size, shuffle=True, augment=self.data.augment,
                             order_generator=self.gens.order, aug_generator=self.gens.augment,
                             drop_last=len(train) > self.batch_size * self.world,
                             rank=self.rank, world=self.world)

    def meta_batch(self):
        """A clean meta batch (this worker's part); drawn only on steps that update the meta-model."""
        return self.splits["meta"].sample(self.meta_batch_size, self.gens.meta,
                                          self.data.augment, self.gens.augment, self.rank,
                                          self.world)

    @staticmethod
    def step_values(out, batch) -> dict[str, torch.Tensor]:
        """What a step adds to the epoch's training metrics: name -> tensor([sum, count])."""
        pred = out.logits.argmax(1)
        return {"loss": scalar_sum_count(out.loss.float()),
                "acc": masked_sum_count((pred == batch.y).float(), batch.y >= 0),
                "acc_clean": masked_sum_count((pred == batch.y_clean).float(), batch.y_clean >= 0),
                **out.extras}

    def check_finite(self, means: dict[str, float], first_bad: list[int], steps: int) -> None:
        """Raise TrainingDiverged, with where it happened, if the epoch's training loss is not
        finite (`first_bad`: the first step whose training / meta loss was not)."""
        if not math.isfinite(means["loss"]):
            raise TrainingDiverged(self.divergence(means["loss"], first_bad, steps))

    def divergence(self, loss: float, first_bad: list[int], steps: int, whose: str = "") -> str:
        return divergence(loss, self.epoch, first_bad, steps, method=self.method.name,
                          meta=self.method.uses_meta_batch, lr=self.cfg.optimizer.lr, whose=whose)

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Test and meta loss/accuracy, and the test accuracy per class; each worker evaluates
        its part of the split."""
        self.model.eval()
        k = self.data.num_classes
        per_class = torch.zeros(2, k, device=self.device, dtype=torch.float64)  # correct, count
        sums = []
        for name in ("test", "meta"):
            sum_ = torch.zeros(2, device=self.device, dtype=torch.float64)  # loss, correct
            for batch in self.splits[name].batches(self.cfg.train.eval_batch_size, shuffle=False,
                                                   rank=self.rank, world=self.world):
                logits = self.eval_logits(batch)
                sum_[0] += F.cross_entropy(logits, batch.y, reduction="sum")
                correct = logits.argmax(1) == batch.y
                sum_[1] += correct.sum()
                if name == "test":
                    per_class[0] += torch.bincount(batch.y, weights=correct.double(), minlength=k)
                    per_class[1] += torch.bincount(batch.y, minlength=k)
            sums.append(sum_)
        all_reduce_sum_([*sums, per_class])
        results = {}
        for name, sum_ in zip(("test", "meta"), sums):
            loss, acc = (sum_ / max(len(self.splits[name]), 1)).tolist()
            results[f"{name}_loss"], results[f"{name}_acc"] = loss, acc
        class_acc = (per_class[0] / per_class[1].clamp_min(1)).tolist()
        results["test_class_acc"] = [round(a, 5) for a in class_acc]
        if self.cfg.dataset.imbalance > 1:  # class c has n_max * F^(-c/(K-1)): the last are rarest
            rare = class_acc[k - math.ceil(k / 3):]
            results["test_acc_rare_third"] = sum(rare) / len(rare)
        return results

    @torch.no_grad()
    def choose_pseudo_meta(self) -> dict:
        """A pseudo-clean meta set from the model's losses on the whole training split
        (`raymeta.data.pseudo`): each worker computes its part of the losses, the first fits
        the mixture on all of them, and every worker gets the same choice. Returns how many it
        took and how clean they are (known for synthetic noise; never used for training)."""
        self.model.eval()
        train = self.splits["train"]
        losses = torch.zeros(len(train), dtype=torch.float64, device=self.device)
        for batch in train.batches(self.cfg.train.eval_batch_size, shuffle=False,
                                   rank=self.rank, world=self.world):
            losses[batch.index] = per_sample_ce(self.eval_logits(batch), batch.y).double()
        all_reduce_sum_([losses])
        index, fallback = pseudo.choose_meta_set(losses, train.y, self.pseudo, self.cfg.seed,
                                                 self.epoch, self.rank)
        self.use_pseudo_meta(index)
        return pseudo.quality(index, train.y, train.y_clean, fallback)

    def autocast(self):
        """bfloat16 matrix multiplies and convolutions when train.bf16 is set."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.train.bf16)

    def eval_logits(self, batch) -> torch.Tensor:
        """The model's logits for an evaluation batch, in the model's dtype (bf16 cast up)."""
        with self.autocast():
            return self.engine.plain_forward(batch.x).to(self.dtype)

    def use_pseudo_meta(self, index: torch.Tensor) -> None:
        """Draw meta batches (and evaluate the meta set) from these training positions."""
        self.pseudo_index = index.cpu()
        self.splits["meta"] = self.splits["train"].subset(index)

    def average_batchnorm_statistics(self) -> None:
        """Workers saw different batches: average their BatchNorm running statistics."""
        if not self.cfg.train.sync_batchnorm:  # synced: already the same
            average_buffers_(self.model)

    # ---------------------------------------------------------------------- bookkeeping
    def outcome(self, wall_seconds: float) -> dict:
        if self.device.type == "cuda":
            peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:  # ru_maxrss is in KiB on Linux
            peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return {
            **curve_outcome(self.curves),
            "wall_seconds": wall_seconds, "train_seconds": self.train_seconds,
            "ms_per_step": 1000.0 * self.train_seconds / max(self.engine.steps, 1),
            "meta_step_share": self.meta_seconds / self.train_seconds if self.train_seconds else 0.0,
            "peak_memory_mb": peak_mb, "world_size": self.world, "restarts": self.restarts,
            "cpu_threads": torch.get_num_threads(),
            "packed_seeds": 1,  # seeds trained together with this one (raymeta.train.packed)
            "device": str(self.device),
            "gpu_name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "",
            **self.data.summary(),
        }

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "method": self.method.state_dict(),
                "meta_gradient": self.engine.meta_gradient.state_dict(),
                "generators": self.gens.state(), "curves": self.curves,
                "train_seconds": self.train_seconds, "meta_seconds": self.meta_seconds,
                "steps": self.engine.steps, "restarts": self.restarts,
                "pseudo_meta": self.pseudo_index,
                "config_digest": self.cfg.digest(), "noisy_labels_sha": self.data.noise.sha}

    def save_checkpoint(self, folder: str | Path) -> Path:
        """checkpoint.pt in `folder`, written atomically (raymeta.train.checkpoint.write)."""
        return checkpoint.write(self.state_dict(), folder)

    def load_checkpoint(self, path: str | Path) -> None:
        self.load_state(*checkpoint.read(path, self.device))

    def load_state(self, state: dict, path: Path) -> None:
        """Continue from a state_dict() read from the checkpoint at `path`."""
        checkpoint.check_digest(state, path, self.cfg.digest())
        if state["noisy_labels_sha"] != self.data.noise.sha:
            raise ConfigError(f"checkpoint {path} was trained on other noisy labels; the data "
                              f"or label file changed since; start a fresh run")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.method.load_state_dict(state["method"])
        # "famus": the key of checkpoints written before the meta gradient was a strategy
        self.engine.meta_gradient.load_state_dict(state.get("meta_gradient", state.get("famus")))
        self.gens.load(dict(state["generators"]))
        self.epoch, self.curves = state["epoch"], state["curves"]
        self.train_seconds, self.meta_seconds = state["train_seconds"], state["meta_seconds"]
        self.engine.steps = state["steps"]
        if state.get("pseudo_meta") is not None:
            self.use_pseudo_meta(state["pseudo_meta"])
        self.restarts = state.get("restarts", 0) + 1

"""K seeds of one configuration trained together in one process (`resources.seeds_per_trial`).

Each seed keeps a Trainer of its own for everything that is its own: noisy labels, meta split,
initialisation, batch order, augmentation, method state, evaluation, curves and results row.
What the seeds share is the expensive part: one `PackedModel` (their models stacked and run
with vmap), one optimizer over the stacked tensors, and one engine, so a step of K small models
is one set of wide kernels instead of K sets of narrow ones. Each seed trains exactly as it
would alone (`tests/test_packed.py` compares the two).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from raymeta.config import ExperimentConfig
from raymeta.data.loader import pack_batches
from raymeta.errors import ConfigError
from raymeta.methods.packed import PackedMethod, packing_problem
from raymeta.models.packed import PackedModel
from raymeta.train.checkpoint import check_digest
from raymeta.train.health import TrainingDiverged
from raymeta.train.trainer import RunResult, Trainer

SHARED_KEYS = ("epoch", "lr", "epoch_seconds", "ms_per_step", "meta_step_share")
"""per-epoch metrics of the packed step itself, the same for every seed"""


def packed_configs(cfg: ExperimentConfig, seeds: list[int]) -> list[ExperimentConfig]:
    """The configuration of each seed of a pack."""
    problem = packing_problem(cfg)
    if problem:
        raise ConfigError(problem)
    if len(set(seeds)) != len(seeds) or not seeds:
        raise ConfigError(f"packed seeds must be distinct and at least one, got {seeds}")
    return [cfg.model_copy(update={"seed": int(s)}) for s in seeds]


def pack_digest(cfgs: list[ExperimentConfig]) -> str:
    """What a pack's checkpoint is checked against: its seeds' configs, in order."""
    return "+".join(cfg.digest() for cfg in cfgs)


class PackedTrainer(Trainer):
    """Trains `cfg` once per seed in `seeds`, all in one packed model.

    `fit()` returns one RunResult per seed, in the order of `seeds`. `on_epoch_end` is called
    as on_epoch_end([metrics of each seed], trainer).
    """

    def __init__(self, cfg: ExperimentConfig, seeds: list[int], *,
                 on_epoch_end: Callable | None = None, checkpoint_dir: str | Path | None = None,
                 resume_from: str | Path | None = None, device: torch.device | None = None):
        self.members = [Trainer(c, device=device) for c in packed_configs(cfg, seeds)]
        first = self.members[0]
        for name in ("train", "meta"):
            sizes = [len(m.splits[name]) for m in self.members]
            if len(set(sizes)) > 1:
                raise ConfigError(f"packed seeds need {name} splits of one size, got {sizes} for "
                                  f"seeds {seeds}; use seeds_per_trial: 1 for this setting")
        self.seeds = [int(s) for s in seeds]
        self.cfg, self.device, self.dtype = first.cfg, first.device, first.dtype
        self.rank, self.world = 0, 1
        self.data = [m.data for m in self.members]
        self.start_loop(PackedModel([m.model for m in self.members]),
                        PackedMethod([m.method for m in self.members]),
                        on_epoch_end, checkpoint_dir)
        if resume_from is not None:
            self.load_checkpoint(resume_from)

    # ------------------------------------------------------------------------- training
    def fit(self) -> list[RunResult]:
        started = time.perf_counter()
        while self.epoch < self.cfg.train.epochs:
            record = self.train_epoch()
            self.model.unpack_into([m.model for m in self.members])  # each seed evaluates its own
            per_seed = []
            for seed, member in zip(self.seeds, self.members):
                metrics = {k: record[k] for k in SHARED_KEYS}
                prefix = f"train_{seed}/"
                metrics.update({f"train_{k[len(prefix):]}": v for k, v in record.items()
                                if k.startswith(prefix)})
                metrics.update(member.method.epoch_metrics(member.data))
                metrics.update(member.evaluate())
                member.curves.append(metrics)
                member.epoch += 1
                per_seed.append(metrics)
            self.epoch += 1
            if self.checkpoint_dir is not None and self.cfg.train.checkpoint:
                self.save_checkpoint(self.checkpoint_dir)
            if self.on_epoch_end is not None:
                self.on_epoch_end(per_seed, self)
        wall = time.perf_counter() - started
        self._share_costs()
        return [RunResult(m.curves, {**m.outcome(wall), "packed_seeds": len(self.members)})
                for m in self.members]

    def epoch_batches(self):
        return map(pack_batches, zip(*(m.epoch_batches() for m in self.members)))

    def meta_batch(self):
        return pack_batches([m.meta_batch() for m in self.members])

    def step_values(self, out, batch) -> dict[str, torch.Tensor]:
        """Each seed's own step values, as "{seed}/{name}" (fit() hands each seed its own)."""
        return {f"{seed}/{key}": value
                for seed, seed_out, part in zip(self.seeds, self.method.outputs, batch.parts)
                for key, value in Trainer.step_values(seed_out, part).items()}

    def check_finite(self, means: dict[str, float], first_bad: list[int], steps: int) -> None:
        for seed in self.seeds:
            loss = means[f"{seed}/loss"]
            if not math.isfinite(loss):
                raise TrainingDiverged(self.divergence(
                    loss, first_bad, steps, whose=f" of seed {seed} (one of the packed seeds)"))

    # ---------------------------------------------------------------------- bookkeeping
    def _share_costs(self) -> None:
        """The seeds' Trainers take the pack's model, step count and time (shared by all)."""
        self.model.unpack_into([m.model for m in self.members])
        for m in self.members:
            m.engine.steps, m.restarts = self.engine.steps, self.restarts
            m.train_seconds, m.meta_seconds = self.train_seconds, self.meta_seconds

    def digest(self) -> str:
        return pack_digest([m.cfg for m in self.members])

    def state_dict(self) -> dict:
        self._share_costs()
        return {"packed_seeds": self.seeds, "members": [m.state_dict() for m in self.members],
                "optimizer": self.optimizer.state_dict(), "epoch": self.epoch,
                "steps": self.engine.steps, "restarts": self.restarts,
                "train_seconds": self.train_seconds, "meta_seconds": self.meta_seconds,
                "config_digest": self.digest()}

    def load_state(self, state: dict, path: Path) -> None:
        check_digest(state, path, self.digest())
        for member, member_state in zip(self.members, state["members"]):
            member.load_state(member_state, path)
        self.model.pack_from([m.model for m in self.members])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.engine.steps = state["epoch"], state["steps"]
        self.train_seconds, self.meta_seconds = state["train_seconds"], state["meta_seconds"]
        self.restarts = state["restarts"] + 1

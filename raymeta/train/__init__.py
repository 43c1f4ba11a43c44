"""Training: the Trainer loop, evaluation, checkpoints. Runs without Ray."""

from raymeta.train.trainer import RunResult, Trainer, TrainingDiverged

__all__ = ["RunResult", "Trainer", "TrainingDiverged"]

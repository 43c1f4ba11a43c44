"""Collapse detection: a trial that trained to nothing must not look like a result.

A model whose outputs no longer depend on its input predicts the same distribution for every
sample; with roughly balanced classes its training loss is ln K and its test accuracy is
chance. Such a trial ends without a NaN, so nothing else catches it (L2R with FaMUS on MNIST
reached loss 3.35 at epoch 9, then sat at ln 10 with 10% accuracy and ended `completed`).
"""

from __future__ import annotations

import math

from raymeta.errors import RaymetaError

LOSS_TOLERANCE = 0.01
"""the training loss is "at ln K" within this fraction of ln K"""
STUCK_EPOCHS = 3
"""the last this many epochs must all sit at ln K (a run needs at least this many epochs)"""
CHANCE_MARGIN = 0.1
"""test accuracy is "at chance" up to 1/K + this share of (1 - 1/K)"""
LEARNED_MARGIN = 0.5
"""and "well above chance" from 1/K + this share of (1 - 1/K)"""
ZERO_LOSS = 1e-9
"""a training loss at most this is "0": every sample weighted 0 (a weighting net's collapse)"""
DEAD_SHARE = 0.5
"""a model that gets no test sample of at least this share of the classes right predicts only
the others (a learned model, even at 40% noise, misses at most one class of ten)"""


def collapse(curves: list[dict], num_classes: int) -> tuple[int, str] | None:
    """(first epoch of the collapse, why) if the run collapsed, else None.

    Collapsed: the training loss of each of the last STUCK_EPOCHS epochs is within 1% of ln K
    and the final test accuracy is at chance, or the final test accuracy is at chance after an
    earlier epoch was well above it, or the training loss of each of the last STUCK_EPOCHS
    epochs is 0 and the final test accuracy is at chance (a weighting net that weights every
    sample 0 from the start: nothing trains, and no epoch ever learned), or at the end the
    model gets no test sample of half the classes right after an epoch where it did. (The
    loss alone is not enough: at 80% label noise a model that learned has a training loss only 2-6% below ln K. Chance alone is not
    either: MW-Net on digits at 40% uniform noise drove every weight to 0 and ended at 19.1%,
    predicting two classes, just above the chance margin.)"""
    k = num_classes
    if k < 2 or not curves:
        return None
    ln_k, chance = math.log(k), 1.0 / k
    accs = [c.get("test_acc", math.nan) for c in curves]
    at_chance = [a <= chance + CHANCE_MARGIN * (1 - chance) for a in accs]
    losses = [c.get("train_loss", math.nan) for c in curves]
    stuck = [abs(loss - ln_k) <= LOSS_TOLERANCE * ln_k for loss in losses]
    if len(curves) >= STUCK_EPOCHS and all(stuck[-STUCK_EPOCHS:]) and at_chance[-1]:
        start = _final_run_start(stuck)
        return start, (f"training loss stuck at ln K = {ln_k:.4f} (within {LOSS_TOLERANCE:.0%}) "
                       f"from epoch {start} to the end; the model predicts the same for every "
                       f"input")
    zero = [loss <= ZERO_LOSS for loss in losses]
    if len(curves) >= STUCK_EPOCHS and all(zero[-STUCK_EPOCHS:]) and at_chance[-1]:
        start = _final_run_start(zero)
        return start, (f"training loss 0 from epoch {start} to the end and test accuracy at "
                       f"chance ({accs[-1]:.4f}, K = {k}): every sample is weighted 0, so "
                       f"nothing trains")
    if at_chance[-1]:
        start = _final_run_start(at_chance)
        peak = max(accs[:start], default=math.nan)
        if peak >= chance + LEARNED_MARGIN * (1 - chance):
            return start, (f"test accuracy fell to chance ({accs[-1]:.4f}, K = {k}) from epoch "
                           f"{start} on, after {peak:.4f} before")
    dead = [sum(a == 0 for a in c.get("test_class_acc") or ()) >= DEAD_SHARE * k for c in curves]
    if dead[-1] and not all(dead):
        start = _final_run_start(dead)
        missed = sum(a == 0 for a in curves[-1]["test_class_acc"])
        return start, (f"the model predicts only a few classes: it gets no test sample of "
                       f"{missed} of the {k} classes right from epoch {start} to the end (test "
                       f"accuracy {accs[-1]:.4f}, {max(accs):.4f} at best)")
    return None


def _final_run_start(flags: list[bool]) -> int:
    """The epoch from which every flag to the end is true (len(flags) when the last is false)."""
    return len(flags) - next((i for i, f in enumerate(reversed(flags)) if not f), len(flags))


class TrainingDiverged(RaymetaError):
    """A loss became NaN or infinite; the trial ends as failed with this reason."""


def divergence(loss: float, epoch: int, first_bad: list[int], steps: int, *, method: str,
               meta: bool, lr: float, whose: str = "") -> str:
    """Why a run failed, for its row: which loss went non-finite first, and where.
    `first_bad`: the first step whose training / meta loss was not finite (-1: none); `meta`:
    whether the method has a meta loss; `whose`: which of several runs it was."""
    train_step, meta_step = first_bad
    if meta and meta_step >= 0 and not 0 <= train_step < meta_step:
        where = f"the meta loss became non-finite at step {meta_step}"
    else:
        where = f"the training loss ({method}'s actual-step loss) became non-finite at step {train_step}"
    hint = "lower optimizer.lr" + (" or method.meta_lr" if meta else "")
    return (f"training loss{whose} is {loss} in epoch {epoch}: {where} of {steps} "
            f"(method {method}, optimizer.lr {lr:g}); {hint}, or check the data")

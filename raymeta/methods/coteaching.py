"""Co-teaching: two networks that pick each other's training samples.

Han, Yao, Yu, Niu, Xu, Hu, Tsang, Sugiyama. "Co-teaching: Robust Training of Deep Neural
Networks with Extremely Noisy Labels." NeurIPS 2018.

Two networks of the same architecture with different initialisations see every batch. Each
ranks the batch by its own per-sample cross-entropy and keeps the 1 - R share with the
smallest loss (the samples it believes are clean); each network is then updated on the
samples its *peer* kept, so the two filter different errors instead of confirming their own.
The forget rate R ramps up from 0 to `forget_rate` (by default the noise rate) over the
first `num_gradual` epochs, while the networks still fit the clean labels first.

The trainer's model (stepped by the engine, with the experiment's optimizer and schedule)
is one network; the peer is built like it, right after it, from the global RNG (seeded by the
trainer, so a seed gives the same two networks), stepped by its own
optimizer of the same type and hyperparameters, its learning rate following the model's
each step. `evaluate: second` swaps the two initialisations before training: the method is
symmetric in the networks, so the trainer's model is then network 2 and every evaluation,
checkpoint and result is network 2's, with no hook in the trainer.

Data parallel: the small-loss ranking is over the *global* batch (every worker gathers all
per-sample losses, one collective per step, ties broken by position in the global batch), so
N workers choose exactly what one worker with the whole batch chooses. Unlabeled samples
(label -1) are never chosen; the kept count is int((1 - R) * labeled samples of the batch),
as the official code's int(remember_rate * batch size).

Paper vs official code (bhanML/Co-teaching):
- the ramp: the paper's R(T) = forget_rate * min(T / T_k, 1) (Algorithm 1, epochs T = 1, 2, ...)
  with the code's exponent c as (T / T_k)^c (`ramp: paper`, the default); the code's
  linspace(0, forget_rate^c, T_k) over its epochs 1.. (`ramp: code`). raymeta's 0-based epoch e
  is T = e + 1 in both (the code's epoch 0 only evaluates the random initialisations).
- the loss: the code returns (mean CE over the kept samples) / (number kept), a second
  division that its Adam optimizer all but cancels; raymeta uses the paper's mean (no switch:
  with Adam the two are the same up to epsilon, with SGD the code's is a learning-rate scale).
- network 2 is built as network 1 is (`rebuild_model`: the model's own initialisation, and
  pretrained weights where the model loads them), right after it from the seeded global RNG.
"""

from __future__ import annotations

import torch
from torch import nn

from raymeta.methods.base import (
    Method,
    StepOutput,
    masked_sum_count,
    per_sample_ce,
    scalar_sum_count,
    split_accuracy,
)
from raymeta.models import rebuild_model
from raymeta.parallel import SyncedBatchNorm, all_reduce_sum_, average_buffers_, batch_mean


@torch.no_grad()
def swap_states(a: nn.Module, b: nn.Module) -> None:
    """Exchange the parameters and buffers of two modules of the same architecture."""
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        kept = x.clone()
        x.copy_(y)
        y.copy_(kept)


@torch.no_grad()
def global_rows(rows: list[torch.Tensor], batch) -> torch.Tensor:
    """Per-sample rows of this worker's part -> (len(rows), global batch size) of the whole
    global batch, the same on every worker (zero-padded parts summed over workers)."""
    whole = rows[0].new_zeros(len(rows), batch.global_size)
    whole[:, batch.offset:batch.offset + len(rows[0])] = torch.stack(rows)
    all_reduce_sum_([whole])
    return whole


def smallest_losses(losses: torch.Tensor, labeled: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mask of the `keep` labeled samples with the smallest loss (ties: the earlier sample)."""
    order = torch.argsort(losses.masked_fill(~labeled, float("inf")), stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order), device=order.device)
    return (rank < keep) & labeled


class Coteaching(Method):
    name = "coteaching"
    examples = ({"num_gradual": 3},)

    def __init__(self, cfg, num_classes, model):
        super().__init__(cfg, num_classes, model)
        self.peer = rebuild_model(model)
        """the other network (network 2, or network 1 with evaluate: second)"""
        if cfg.evaluate == "second":
            swap_states(model, self.peer)
        self.peer_optimizer: torch.optim.Optimizer | None = None
        """built at the first step, like the model's (whose type and settings it copies)"""
        self.pending_optimizer_state: dict | None = None
        """the peer optimizer's state from a checkpoint, loaded when it is built"""

    def forget_rate(self, epoch: int) -> float:
        """R: the share of each batch's labeled samples that `epoch` (0-based) leaves out."""
        cfg, t = self.cfg, epoch + 1
        tau, t_k, c = cfg.forget_rate, cfg.num_gradual, cfg.exponent
        if t >= t_k:
            return tau
        if cfg.ramp == "code":  # main.py: rate_schedule[:T_k] = linspace(0, tau ** c, T_k)
            return tau ** c / (t_k - 1) * t
        return tau * (t / t_k) ** c

    def step(self, engine, batch, meta_batch) -> StepOutput:
        logits, peer_logits = engine.plain_forward(batch.x), self.peer(batch.x)
        losses, peer_losses = per_sample_ce(logits, batch.y), per_sample_ce(peer_logits, batch.y)
        labeled = batch.y >= 0
        chosen, peer_chosen = self.choose(losses.detach(), peer_losses.detach(), labeled, batch)
        loss = batch_mean(losses, peer_chosen)  # each network learns from its peer's choice
        peer_loss = batch_mean(peer_losses, chosen)
        engine.actual_step(loss)
        self.step_peer(engine, peer_loss)
        known = labeled & (batch.y_clean >= 0)
        clean = (batch.y == batch.y_clean).float()
        return StepOutput(loss.detach(), logits.detach(), {
            "forget_rate": masked_sum_count((~chosen).float(), labeled),
            "peer_loss": scalar_sum_count(peer_loss),
            "chosen_clean": masked_sum_count(clean, chosen & known),  # the model's choice
            "peer_chosen_clean": masked_sum_count(clean, peer_chosen & known)})

    def choose(self, losses: torch.Tensor, peer_losses: torch.Tensor, labeled: torch.Tensor,
               batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Which of this worker's samples the model and the peer keep: each the (1 - R) share
        of the global batch's labeled samples with its own smallest losses."""
        whole = global_rows([losses, peer_losses, labeled.to(losses.dtype)], batch)
        whole_labeled = whole[2] > 0
        keep = (torch.tensor(1.0 - self.forget_rate(self.epoch), dtype=torch.float64,
                             device=whole.device) * whole[2].sum().double()).floor()
        mine = slice(batch.offset, batch.offset + len(labeled))
        return (smallest_losses(whole[0], whole_labeled, keep)[mine],
                smallest_losses(whole[1], whole_labeled, keep)[mine])

    def step_peer(self, engine, loss: torch.Tensor) -> None:
        """The peer's update, as engine.actual_step does the model's (gradients summed over
        workers)."""
        optimizer = self.peer_optimizer_like(engine.optimizer)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        all_reduce_sum_([p.grad for p in self.peer.parameters() if p.grad is not None])
        optimizer.step()

    def peer_optimizer_like(self, model_optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """The peer's optimizer, with the model optimizer's current hyperparameters (the
        trainer schedules the model's learning rate)."""
        if self.peer_optimizer is None:
            self.peer_optimizer = type(model_optimizer)(self.peer.parameters(),
                                                        **model_optimizer.defaults)
            if self.pending_optimizer_state is not None:
                self.peer_optimizer.load_state_dict(self.pending_optimizer_state)
                self.pending_optimizer_state = None
        settings = {k: v for k, v in model_optimizer.param_groups[0].items() if k != "params"}
        for group in self.peer_optimizer.param_groups:
            group.update(settings)
        return self.peer_optimizer

    def average_peer_batchnorm(self) -> None:
        """What the trainer does for the model at each epoch's end: workers saw different
        batches, so their running statistics are averaged (not needed when synchronised)."""
        if not any(isinstance(m, SyncedBatchNorm) for m in self.peer.modules()):
            average_buffers_(self.peer)

    def epoch_metrics(self, data) -> dict:
        self.average_peer_batchnorm()
        if self.splits is None:
            return {}
        return {"peer_test_acc": split_accuracy(self.peer, self.splits["test"], self.num_classes)}

    def to(self, device, dtype=None) -> Coteaching:
        self.peer.to(device, dtype)
        return self

    def state_dict(self) -> dict:
        optimizer = (self.peer_optimizer.state_dict() if self.peer_optimizer is not None
                     else self.pending_optimizer_state)
        return {"peer": self.peer.state_dict(), "peer_optimizer": optimizer}

    def load_state_dict(self, state: dict) -> None:
        self.peer.load_state_dict(state["peer"])
        if self.peer_optimizer is not None and state["peer_optimizer"] is not None:
            self.peer_optimizer.load_state_dict(state["peer_optimizer"])
        else:
            self.pending_optimizer_state = state["peer_optimizer"]

"""MLNT: meta-learning on synthetic noisy labels with a mean teacher.

Li, Wong, Zhao, Kankanhalli. "Learning to Learn from Noisy Labeled Data." CVPR 2019.

No clean data is needed for training. Each step builds M synthetic label sets (a share of the
batch takes the label of a random one of its nearest neighbours in feature space), takes a
fast-weight step on each, and asks the fast model to still agree with a mean teacher (KL).
As in the official code, that consistency loss and the cross-entropy are summed into one
step of the real optimizer. The meta weight ramps up as exp(-5(1-u)^2).

Neighbours are found with the teacher's penultimate features (the official code uses a
separate network pre-trained with cross-entropy, which raymeta does not assume exists).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from raymeta.methods.base import (
    MetaMethod,
    StepOutput,
    frozen_copy,
    mean_ce,
    scalar_sum_count,
    split_accuracy,
)
from raymeta.parallel import batch_mean, global_rows


class MLNT(MetaMethod):
    name = "mlnt"
    examples = ({"start_epoch": 1, "ramp_epochs": 2, "num_fast": 2},)

    def __init__(self, cfg, num_classes, model):
        super().__init__(cfg, num_classes, model)
        self.model = model
        self.teacher = None

    def meta_weight(self) -> float:
        """0 before start_epoch, then ramped up to cfg.meta_weight."""
        done = self.epoch - self.cfg.start_epoch
        if done < 0:
            return 0.0
        u = min(done / self.cfg.ramp_epochs, 1.0) if self.cfg.ramp_epochs else 1.0
        return self.cfg.meta_weight * math.exp(-5.0 * (1.0 - u) ** 2)

    @torch.no_grad()
    def update_teacher(self) -> None:
        if self.teacher is None:
            self.teacher = frozen_copy(self.model)
            return
        ramping = self.epoch - self.cfg.start_epoch < self.cfg.ramp_epochs
        decay = 0.99 if ramping else self.cfg.ema_decay
        for t, s in zip(self.teacher.parameters(), self.model.parameters()):
            t.lerp_(s, 1.0 - decay)
        for t, s in zip(self.teacher.buffers(), self.model.buffers()):
            t.copy_(s)

    def synthetic_labels(self, batch, neighbours: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Relabel a random share of the batch with the label of a random near neighbour.
        `neighbours` and `labels` are those of the global batch, and so are the draws (the
        same on every worker); each worker relabels the chosen samples of its own part."""
        n = batch.global_size
        chosen = torch.randperm(n, generator=self.generator)[: int(n * self.cfg.perturb_ratio)]
        pick = torch.randint(0, neighbours.shape[1], (len(chosen),), generator=self.generator)
        mine = (chosen >= batch.offset) & (chosen < batch.offset + len(batch.y))
        chosen, pick = chosen[mine].to(labels.device), pick[mine].to(labels.device)
        synthetic = batch.y.clone()
        synthetic[chosen - batch.offset] = labels[neighbours[chosen, pick]]
        return synthetic

    def consistency(self, engine, logits, batch, synthetic, teacher_probs) -> torch.Tensor:
        """KL(teacher || model after a fast step on the synthetic labels), per sample."""
        fast = engine.virtual_params(mean_ce(logits, synthetic), self.cfg.virtual_lr,
                                     self.cfg.virtual_step)
        log_fast = F.log_softmax(engine.functional_forward(fast, batch.x), dim=1)
        return batch_mean(F.kl_div(log_fast, teacher_probs, reduction="none").sum(dim=1))

    def step(self, engine, batch, meta_batch) -> StepOutput:
        logits = engine.forward(batch.x)
        loss = self.train_loss(logits, batch)
        weight = self.meta_weight()
        if weight == 0.0 or not engine.meta_due(self):
            engine.actual_step(loss)
            return StepOutput(loss.detach(), logits.detach())
        engine.optimizer.zero_grad(set_to_none=True)
        with engine.meta_timer():
            self.update_teacher()
            self.teacher.train(self.model.training)
            with torch.no_grad():
                features = self.teacher.features(batch.x)
                teacher_probs = F.softmax(self.teacher.classifier(features), dim=1)
                # neighbours among the whole global batch, as one worker would find them
                features = global_rows(features, batch.offset, batch.global_size)
                labels = global_rows(batch.y, batch.offset, batch.global_size)
                k = min(self.cfg.neighbours, len(features) - 1)
                neighbours = torch.cdist(features, features).topk(k + 1, largest=False).indices[:, 1:]
            total = torch.zeros((), device=logits.device)
            for _ in range(self.cfg.num_fast):  # one graph at a time: backward each, keep the forward
                meta = weight * self.consistency(engine, logits, batch,
                                                 self.synthetic_labels(batch, neighbours, labels),
                                                 teacher_probs) / self.cfg.num_fast
                meta.backward(retain_graph=True)
                total += meta.detach()
        loss.backward()
        engine.apply_gradients()
        return StepOutput(loss.detach(), logits.detach(), {"consistency": scalar_sum_count(total)})

    def epoch_metrics(self, data) -> dict:
        """The mean teacher's own accuracy (once there is one): MLNT's paper reports teacher and
        student, and its code keeps whichever is better on clean validation data."""
        if self.teacher is None or self.splits is None:
            return {}
        return {f"teacher_{name}_acc": split_accuracy(self.teacher, self.splits[name], self.num_classes)
                for name in ("test", "meta") if len(self.splits[name])}

    def state_dict(self):
        return {"teacher": self.teacher.state_dict() if self.teacher is not None else None}

    def load_state_dict(self, state):
        if state["teacher"] is not None:
            self.teacher = frozen_copy(self.model)
            self.teacher.load_state_dict(state["teacher"])

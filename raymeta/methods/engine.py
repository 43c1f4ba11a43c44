"""The bilevel engine: the virtual step, the meta gradient, and the actual step, written once.

One training step of a meta method (`bilevel_step`):
  1. forward the training batch through the real model (BatchNorm in train mode: this is the
     step's one update of the running statistics); these logits serve the virtual *and* the
     actual loss, so the step costs one training forward, not two;
  2. virtual step: theta' = step(theta, grad of the virtual loss), built with create_graph so
     theta' is a differentiable function of the meta parameters;
  3. meta loss on a clean meta batch at theta' (a functional forward with *cloned* BN buffers:
     meta forwards never change the model's running statistics), its gradient into the
     meta parameters, and the method's meta update;
  4. actual step: the real optimizer on the actual loss, computed with the updated meta-model.

Every gradient that crosses the batch is summed across data-parallel workers
(`raymeta.parallel`): the virtual gradient differentiably, the meta gradient and the actual
gradient plainly; with one worker those sums are no-ops.

The virtual step mirrors the real optimizer (SGD with momentum/Nesterov/weight decay, or Adam)
by default, so the meta loss is measured where training will really go; `virtual_step: sgd`
gives the papers' plain theta - lr * grad.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.func import functional_call

from raymeta.parallel import all_reduce_sum_, global_sum_many

if TYPE_CHECKING:
    from raymeta.data.loader import Batch
    from raymeta.methods.base import MetaMethod, StepOutput


class MetaGradient:
    """How a bilevel step turns the meta loss after the virtual step into the gradients of the
    meta parameters. This one is exact; a strategy that is cheaper or differs (FaMUS:
    `raymeta.methods.famus.Famus`) subclasses it, and the engine is given one. Its state is
    saved with the run's checkpoint and its metrics join each epoch's."""

    generator: torch.Generator | None = None
    """the run's stream for the strategy's own random draws (set by the Trainer)"""

    def gradient(self, engine: Engine, method: MetaMethod, logits: torch.Tensor, batch: Batch,
                 meta_batch: Batch, meta_params: list[torch.Tensor]):
        """(the meta loss, its gradient w.r.t. each of meta_params: None where unused)"""
        meta_loss = engine.meta_objective(method, logits, batch, meta_batch)
        return meta_loss, torch.autograd.grad(meta_loss, meta_params, allow_unused=True)

    def epoch_metrics(self) -> dict:
        return {}

    def state_dict(self) -> dict | None:
        return None

    def load_state_dict(self, state: dict | None) -> None:
        pass


class Engine:
    """Runs the steps of a method on one model with its real optimizer."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model = model
        self.plain_model: Callable[[torch.Tensor], torch.Tensor] = model
        """the model for forwards that are differentiated only once (plain steps, evaluation):
        torch.compile'd with train.compile; bilevel steps use `model` (eager), whose backward
        the meta gradient differentiates again"""
        self.optimizer = optimizer
        self.steps = 0
        self.meta_seconds = 0.0
        self.meta_gradient: MetaGradient = MetaGradient()
        """how a bilevel step gets its meta gradient: exactly (this default), or FaMUS's gated
        virtual step (raymeta.methods.famus.Famus, with method.famus: true)"""
        self.last_meta_loss: torch.Tensor | None = None
        """the meta loss of the latest meta step (detached), to find where training diverged"""
        self._cuda_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    # ---------------------------------------------------------------------- forwards
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def plain_forward(self, x: torch.Tensor) -> torch.Tensor:
        """forward() for a step whose loss is differentiated once (it may be compiled)."""
        return self.plain_model(x)

    def named_params(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def functional_forward(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The model at `params`; BatchNorm uses batch statistics and updates only clones."""
        buffers = {n: b.clone() for n, b in self.model.named_buffers()}
        return functional_call(self.model, {**params, **buffers}, (x,))

    # ------------------------------------------------------------------ virtual step
    def gradients(self, loss: torch.Tensor, create_graph: bool = True,
                  names: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Gradients of `loss` w.r.t. every trainable parameter, or those named (zeros where
        unused), summed over workers (differentiably: the meta gradient flows back to every
        worker)."""
        params = self.named_params()
        if names is not None:
            params = {n: params[n] for n in names}
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph,
                                    allow_unused=True)
        grads = global_sum_many([torch.zeros_like(p) if g is None else g
                                 for p, g in zip(params.values(), grads)])
        return dict(zip(params, grads))

    def step_params(self, grads: dict[str, torch.Tensor], lr: float | None = None,
                    mode: str = "optimizer") -> dict[str, torch.Tensor]:
        """theta' = theta - lr * direction(grads), the real optimizer's step written functionally;
        a tensor without a gradient in `grads` keeps its value."""
        group = self.optimizer.param_groups[0]
        lr = group["lr"] if lr is None else lr
        new = {}
        for name, p in self.named_params().items():
            g = grads.get(name)
            if g is None:
                new[name] = p
            elif mode == "sgd":
                new[name] = p - lr * g
            elif isinstance(self.optimizer, torch.optim.Adam):
                new[name] = p - lr * _adam_direction(p, g, group, self.optimizer.state.get(p, {}))
            else:
                new[name] = p - lr * _sgd_direction(p, g, group, self.optimizer.state.get(p, {}))
        return new

    def virtual_params(self, loss: torch.Tensor, lr: float | None = None, mode: str = "optimizer",
                       create_graph: bool = True) -> dict[str, torch.Tensor]:
        """theta' after one step on `loss`, differentiable w.r.t. whatever `loss` depends on."""
        return self.step_params(self.gradients(loss, create_graph), lr, mode)

    def meta_objective(self, method: MetaMethod, logits: torch.Tensor, batch: Batch,
                       meta_batch: Batch) -> torch.Tensor:
        """L_meta(theta'(phi)): the meta loss after the virtual step, differentiable in phi."""
        cfg = method.cfg
        theta = self.virtual_params(method.virtual_loss(logits, batch), cfg.virtual_lr,
                                    cfg.virtual_step)
        return method.meta_loss(self.functional_forward(theta, meta_batch.x), meta_batch)

    # ------------------------------------------------------------------- full steps
    def bilevel_step(self, method: MetaMethod, batch: Batch,
                     meta_batch: Callable[[], Batch]) -> StepOutput:
        from raymeta.methods.base import StepOutput

        logits = self.forward(batch.x)
        if self.meta_due(method):
            with self.meta_timer():
                meta_params = method.meta_parameters(batch)
                meta_loss, grads = self.meta_gradient.gradient(self, method, logits, batch,
                                                               meta_batch(), meta_params)
                self.last_meta_loss = meta_loss.detach()
                grads = [torch.zeros_like(p) if g is None else g for p, g in zip(meta_params, grads)]
                if not method.per_sample_meta_parameters:
                    all_reduce_sum_(grads)
                method.apply_meta_gradient(grads)
        loss = method.actual_loss(logits, batch)
        self.actual_step(loss)
        return StepOutput(loss.detach(), logits.detach(), method.step_extras(batch))

    def actual_step(self, loss: torch.Tensor) -> None:
        """The real update of the classifier."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.apply_gradients()

    def apply_gradients(self) -> None:
        """Step the real optimizer on the gradients accumulated in .grad (summed over workers)."""
        all_reduce_sum_([p.grad for p in self.model.parameters() if p.grad is not None])
        self.optimizer.step()
        self.steps += 1

    def meta_due(self, method: MetaMethod) -> bool:
        """Whether this step updates the meta-model (every `meta_interval` steps)."""
        return self.steps % method.cfg.meta_interval == 0

    # ------------------------------------------------------------------------ timing
    @contextlib.contextmanager
    def meta_timer(self):
        """Adds the time of the enclosed meta update to `meta_seconds`."""
        if not next(self.model.parameters()).is_cuda:
            tic = time.perf_counter()
            yield
            self.meta_seconds += time.perf_counter() - tic
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        self._cuda_events.append((start, end))  # read at the epoch's end: no step waits

    def take_meta_seconds(self) -> float:
        """Seconds spent in meta updates since the last call."""
        if self._cuda_events:
            torch.cuda.synchronize()
            self.meta_seconds += sum(s.elapsed_time(e) for s, e in self._cuda_events) / 1000
            self._cuda_events.clear()
        seconds, self.meta_seconds = self.meta_seconds, 0.0
        return seconds


def _sgd_direction(p, g, group, state) -> torch.Tensor:
    """What torch.optim.SGD subtracts (divided by lr) for gradient g, written differentiably."""
    d = g + group["weight_decay"] * p if group["weight_decay"] else g
    momentum = group["momentum"]
    if momentum:
        buf = state.get("momentum_buffer")
        buf = d if buf is None else momentum * buf + (1 - group["dampening"]) * d
        d = d + momentum * buf if group["nesterov"] else buf
    return d


def _adam_direction(p, g, group, state) -> torch.Tensor:
    """What torch.optim.Adam subtracts (divided by lr) for gradient g, written differentiably."""
    beta1, beta2 = group["betas"]
    if group["weight_decay"]:
        g = g + group["weight_decay"] * p
    step = float(state["step"]) + 1 if "step" in state else 1.0
    m = beta1 * state["exp_avg"] + (1 - beta1) * g if "exp_avg" in state else (1 - beta1) * g
    v = (beta2 * state["exp_avg_sq"] + (1 - beta2) * g * g if "exp_avg_sq" in state
         else (1 - beta2) * g * g)
    m_hat = m / (1 - beta1 ** step)
    # the tiny constant keeps the derivative of sqrt finite where v == 0 (unused parameters)
    v_hat = (v + 1e-30) / (1 - beta2 ** step)
    return m_hat / (v_hat.sqrt() + group["eps"])

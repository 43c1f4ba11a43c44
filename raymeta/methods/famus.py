"""FaMUS: Faster Meta Update Strategy.

Xu, Zhu, Jiang, Yang. "Faster Meta Update Strategy for Noise-Robust Deep Learning." CVPR 2021.

The meta gradient is a sum of per-layer terms. A small sampler per parameter tensor looks at
that tensor's (pooled, standardised) virtual-step gradient and draws a hard gate
r in {0, 1} (straight-through Gumbel-softmax). A tensor that is on keeps r * g (its
second-order path, and a gradient into its sampler); one that is off uses (1 - r) * stopgrad(g):
the same value, so the virtual step is exact, but no path back through its gradient. Autograd
then skips the backward-through-the-backward of every tensor that is off, and the whole meta
backward below the lowest active tensor (tensors down there are plainly detached; their
samplers learn from the count loss on that step).

The samplers learn with the meta-model from L_meta + lambda_count * (sum r - k)^2
+ lambda_grad * L_g, where L_g is the squared distance between the pooled training and
validation gradients of the classifier weight (paper Eq. 10-12; the count loss sums over every
gate, not only the last as in the released code). Works with every method of the engine's
bilevel step (mwnet, l2r, mlc, metalabelnet): it is the engine's meta-gradient strategy
(`Engine.meta_gradient`) in place of the exact one.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from raymeta.config import FamusConfig
from raymeta.errors import ConfigError
from raymeta.methods.engine import MetaGradient
from raymeta.parallel import all_reduce_sum_, global_sum, rank_world


def unit_means(g: torch.Tensor) -> torch.Tensor:
    """A tensor's gradient as one value per output unit (its mean over the unit's inputs)."""
    return g.flatten(1).mean(dim=1) if g.dim() > 1 else g


def pooled(g: torch.Tensor) -> torch.Tensor:
    """unit_means of a gradient, standardised (detached): a sampler's input."""
    v = unit_means(g.detach())
    return (v - v.mean()) / (v.std(unbiased=False) + 1e-9)


class GateSampler(nn.Module):
    """D -> hidden -> hidden -> 2 with PReLU: logits of (off, on)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.PReLU(), nn.Linear(hidden, hidden),
                                 nn.PReLU(), nn.Linear(hidden, 2))

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return self.net(v)


def hard_gumbel_gate(logits: torch.Tensor, temperature: float,
                     generator: torch.Generator | None) -> torch.Tensor:
    """Straight-through Gumbel-softmax: the value is one-hot, the gradient is the softmax's."""
    u = torch.rand(logits.shape, generator=generator).to(logits.device)
    soft = F.softmax((logits - torch.log(-torch.log(u + 1e-20) + 1e-20)) / temperature, dim=-1)
    hard = F.one_hot(soft.argmax(dim=-1), 2).to(soft.dtype)
    return (hard - soft.detach() + soft)[..., 1]  # index 1 means "on"


class Famus(MetaGradient):
    """The meta gradient through a gated virtual step: the samplers of one model, their
    optimizer, and their statistics."""

    def __init__(self, cfg: FamusConfig, model: nn.Module):
        self.cfg = cfg
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        classifier = {n for n in names if n.startswith("classifier.")}
        modules = dict(model.named_modules())
        self.stage: nn.Module | None = None
        """the last stage, when it is the window: the meta forward detaches its input"""
        by_stage = cfg.candidates is None and cfg.window == "last_stage"
        if by_stage:  # the released code's setup
            window = names[self._stage_start(model, names):]
            self.stage = modules[model.last_stage] if cfg.detach_at is None else None
        else:
            window = names if cfg.candidates is None else names[-cfg.candidates:]
        self.probe = next((n for n in names if n.startswith("classifier.") and n.endswith("weight")),
                          None)
        """the tensor whose training and meta gradients the gradient-matching loss compares"""
        if self.probe is None:
            raise ConfigError(f"FaMUS compares the gradients of the classifier's weight, and "
                              f"{type(model).__name__} has no trainable parameter classifier.*weight: "
                              f"name the model's last layer `classifier`, or train without famus")
        self.always_on = classifier if cfg.classifier_always_on or by_stage else set()
        self.candidates = [n for n in window if n not in self.always_on]
        self.scope: list[str] | None = None if cfg.exact_below_window else [
            n for n in names if n in window or n in self.always_on]
        """the tensors that take a virtual step (None: all, the exact virtual step)"""
        shapes = dict(model.named_parameters())
        first = next(model.parameters())
        device = first.device
        self.samplers = nn.ModuleDict({n.replace(".", "/"): GateSampler(shapes[n].shape[0], cfg.hidden)
                                       for n in self.candidates}).to(device=device, dtype=first.dtype)
        # no candidates (only always-on tensors) is a valid baseline: last-layer meta gradients
        self.optimizer = torch.optim.SGD(self.samplers.parameters(), lr=cfg.sampler_lr,
                                         momentum=0.9, nesterov=True) if self.candidates else None
        self.generator: torch.Generator | None = None
        self.gate_sum = torch.zeros(len(self.candidates), device=device, dtype=first.dtype)
        self.meta_steps = 0
        self.total_steps = 0
        self.cosines: list[float] = []
        self.force: bool | None = None
        """tests and diagnostics: True/False sets every gate on/off instead of sampling"""
        if cfg.detach_at is not None:
            if cfg.detach_at not in modules:
                raise ConfigError(f"famus.detach_at '{cfg.detach_at}' is not a module of this "
                                  f"model; choose one of: {', '.join(n for n in modules if n)}")
            self.detach_module = modules[cfg.detach_at]

    @staticmethod
    def _stage_start(model: nn.Module, names: list[str]) -> int:
        """The position, in `names`, of the first parameter of the model's last stage."""
        stage = getattr(model, "last_stage", None)
        if stage is None:
            raise ConfigError(f"{type(model).__name__} names no last stage, so FaMUS has no default "
                              f"window: set famus.window: all (every tensor, as in the paper) or "
                              f"famus.candidates: N (the last N parameter tensors)")
        inside = [i for i, n in enumerate(names) if n.startswith(stage + ".")]
        if not inside:
            raise ConfigError(f"{type(model).__name__}.last_stage {stage!r} holds no trainable "
                              f"parameter; set famus.window: all or famus.candidates")
        return inside[0]

    def parameters(self):
        return self.samplers.parameters()

    # ------------------------------------------------------------ the meta gradient
    def gated_objective(self, engine, method, logits, batch, meta_batch):
        """The meta loss through the gated virtual step, and the samplers' extra loss."""
        cfg = method.cfg
        grads = engine.gradients(method.virtual_loss(logits, batch), names=self.scope)
        gated, gates = self.gate_gradients(grads)
        theta = engine.step_params(gated, cfg.virtual_lr, cfg.virtual_step)
        with self.truncating():
            meta_loss = method.meta_loss(engine.functional_forward(theta, meta_batch.x), meta_batch)
        val_grad, = torch.autograd.grad(meta_loss, theta[self.probe], retain_graph=True)
        all_reduce_sum_([val_grad])  # this worker's share of the meta loss -> the whole
        return meta_loss, self.extra_loss(gates, grads[self.probe], val_grad)

    def gradient(self, engine, method, logits, batch, meta_batch, meta_params):
        """The meta gradient through the gated step; steps the samplers on the way."""
        meta_loss, extra = self.gated_objective(engine, method, logits, batch, meta_batch)
        every = self.cfg.cosine_every
        if every and (self.total_steps - 1) % every == 0:  # diagnostic: compare with the exact one
            self.cosines.append(self._cosine_to_exact(engine, method, logits, batch, meta_batch,
                                                      meta_params, meta_loss))
        samplers = list(self.parameters())
        # the extra loss is the same on every worker: count it once in the summed gradient
        world = rank_world()[1]
        grads = torch.autograd.grad(meta_loss + extra / world, meta_params + samplers,
                                    allow_unused=True)
        sampler_grads = grads[len(meta_params):]
        all_reduce_sum_([g for g in sampler_grads if g is not None])  # same pattern on all workers
        self.step(sampler_grads)
        return meta_loss, grads[: len(meta_params)]

    @staticmethod
    def _cosine_to_exact(engine, method, logits, batch, meta_batch, meta_params, meta_loss) -> float:
        gated = torch.autograd.grad(meta_loss, meta_params, retain_graph=True, allow_unused=True)
        full = torch.autograd.grad(engine.meta_objective(method, logits, batch, meta_batch),
                                   meta_params, retain_graph=True, allow_unused=True)
        a, b = [torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                           for p, g in zip(meta_params, gs)]) for gs in (gated, full)]
        if not method.per_sample_meta_parameters:
            all_reduce_sum_([a, b])
            dots = torch.stack([a @ b, a @ a, b @ b])
        else:  # each worker holds its samples' part of the vectors
            dots = global_sum(torch.stack([a @ b, a @ a, b @ b]))
        return (dots[0] / (dots[1] * dots[2]).sqrt().clamp_min(1e-30)).item()

    def gate_gradients(self, grads: dict[str, torch.Tensor]) -> tuple[dict, torch.Tensor]:
        """Sample the gates and return the gated gradients and the gates (r) as a tensor."""
        if self.force is None and self.candidates:
            logits = [self.samplers[n.replace(".", "/")](pooled(grads[n])) for n in self.candidates]
            gates = hard_gumbel_gate(torch.stack(logits), self.cfg.temperature, self.generator)
        else:
            gates = torch.full((len(self.candidates),), float(bool(self.force)),
                               device=self.gate_sum.device)
        on = gates.detach().bool().tolist()  # the one host read per meta step: it prunes the graph
        gated = {}
        for name, g in grads.items():
            if name in self.always_on:
                gated[name] = g
            elif name not in self.candidates:  # outside the window: always off
                gated[name] = g.detach()
        # below the lowest active tensor nothing needs the meta backward: detach fully there, so
        # autograd stops at that tensor (those samplers learn from the count loss this step)
        lowest = on.index(True) if True in on else len(on)
        for i, name in enumerate(self.candidates):
            g = grads[name]
            if on[i]:
                gated[name] = gates[i] * g
            elif i > lowest:
                gated[name] = (1 - gates[i]) * g.detach()
            else:
                gated[name] = g.detach()
        self.gate_sum += gates.detach()
        self.meta_steps += 1
        self.total_steps += 1
        return gated, gates

    def extra_loss(self, gates: torch.Tensor, train_grad: torch.Tensor,
                   val_grad: torch.Tensor) -> torch.Tensor:
        """lambda_count * (sum r - k)^2 + lambda_grad * ||pool(g_train) - pool(g_val)||^2."""
        count = (gates.sum() - self.cfg.k) ** 2
        distance = (unit_means(train_grad) - unit_means(val_grad.detach())).pow(2).sum()
        return self.cfg.lambda_count * count + self.cfg.lambda_grad * distance

    def step(self, grads: list[torch.Tensor | None]) -> None:
        if self.optimizer is None:
            return
        for p, g in zip(self.samplers.parameters(), grads):
            p.grad = g
        self.optimizer.step()

    @contextlib.contextmanager
    def truncating(self):
        """Within it, the meta forward detaches the output of `detach_at`, or the input of the
        last stage when that is the window."""
        if self.stage is not None:
            handle = self.stage.register_forward_pre_hook(
                lambda m, args: tuple(a.detach() for a in args))
        elif self.cfg.detach_at is not None:
            handle = self.detach_module.register_forward_hook(lambda m, i, out: out.detach())
        else:
            yield
            return
        try:
            yield
        finally:
            handle.remove()

    def epoch_metrics(self) -> dict:
        steps = max(self.meta_steps, 1)
        frequency = (self.gate_sum / steps).tolist()
        metrics = {"famus_active_tensors": float(sum(frequency)) + len(self.always_on),
                   "famus_gate_frequency": [round(f, 4) for f in frequency],
                   "famus_meta_cosine": (sum(self.cosines) / len(self.cosines)
                                         if self.cosines else None)}  # null: not measured
        self.gate_sum.zero_()
        self.meta_steps = 0
        self.cosines = []
        return metrics

    def state_dict(self) -> dict:
        return {"samplers": self.samplers.state_dict(),
                "optimizer": self.optimizer.state_dict() if self.optimizer else None}

    def load_state_dict(self, state: dict) -> None:
        self.samplers.load_state_dict(state["samplers"])
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])

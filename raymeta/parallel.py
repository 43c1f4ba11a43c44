"""Data parallelism, written once: N workers with batch b each equal one worker with batch N*b.

Every loss that is a mean over the batch is written as (this worker's sum) / (global count),
so the global loss is the *sum* of the workers' losses, and every gradient is summed across
workers: the virtual-step gradient through a differentiable all-reduce (its backward
all-reduces too, so the meta gradient still reaches every worker's meta-model), the
meta-model's gradient and the actual step's gradient with a plain all-reduce. With one worker,
or without `torch.distributed` initialised, every function here is the identity and costs
nothing; the Trainer runs unchanged in a plain process.

The process group is the default one that Ray Train (or torchrun) initialises.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def rank_world() -> tuple[int, int]:
    """(this worker's rank, number of workers); (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_distributed() -> bool:
    return rank_world()[1] > 1


def global_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of `t` over workers, differentiable (the backward sums the gradients too)."""
    if not is_distributed():
        return t
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(t)


def global_sum_many(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """global_sum of each tensor in one collective (differentiable): flatten, reduce, split."""
    if not is_distributed() or not tensors:
        return tensors
    flat = global_sum(torch.cat([t.reshape(-1) for t in tensors]))
    return [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


@torch.no_grad()
def all_reduce_sum_(tensors: list[torch.Tensor]) -> None:
    """Sum each tensor over workers in place (not differentiable), in one collective."""
    if not is_distributed() or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    for part, t in zip(flat.split([t.numel() for t in tensors]), tensors):
        t.copy_(part.view_as(t))


@torch.no_grad()
def global_rows(values: torch.Tensor, offset: int, total: int) -> torch.Tensor:
    """The rows of the whole global batch, on every worker, from this worker's rows, which
    start at row `offset` of `total` (not differentiable)."""
    if not is_distributed():
        return values
    full = values.new_zeros((total, *values.shape[1:]))
    full[offset:offset + len(values)] = values
    all_reduce_sum_([full])
    return full


def global_count(count: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
    """How many samples the whole global batch has, given this worker's count."""
    count = torch.as_tensor(count, dtype=like.dtype, device=like.device)
    return global_sum(count.detach())


def batch_mean(values: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The mean of per-sample values over the global batch (where `mask`), as this worker's
    share: the sum of its values divided by the global count. Summed over workers it is the
    mean one worker would compute on the whole batch."""
    if mask is None:
        return values.sum() / global_count(values.shape[0], values)
    mask = mask.to(values.dtype)
    return (values * mask).sum() / global_count(mask.sum(), values).clamp_min(1)


def shard(n: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of this worker's contiguous part of n items (sizes differ by at most 1)."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class SyncedBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch, computed with one
    differentiable all-reduce per layer, so meta gradients (which differentiate through the
    backward) stay exact. `nn.SyncBatchNorm`'s backward is not twice differentiable."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed()):
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        local = torch.cat([x.sum(dims), (x * x).sum(dims),
                           torch.full((1,), x.numel() / x.shape[1], dtype=x.dtype, device=x.device)])
        total = global_sum(local)
        channels = x.shape[1]
        count = total[-1]
        mean = total[:channels] / count
        var = total[channels:2 * channels] / count - mean * mean  # biased, as BatchNorm trains
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)  # in place: functional_call swaps buffers
                momentum = (self.momentum if self.momentum is not None
                            else 1.0 / float(self.num_batches_tracked))  # cumulative average
                self.running_mean.lerp_(mean.detach(), momentum)
                self.running_var.lerp_(var.detach() * count / (count - 1).clamp_min(1), momentum)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")


@torch.no_grad()
def average_buffers_(model: nn.Module) -> None:
    """Average the floating-point buffers of `model` (BatchNorm running statistics) over the
    workers, in place: after an epoch on different batches, every replica gets the same."""
    world = rank_world()[1]
    if world == 1:
        return
    stats = [b for b in model.buffers() if b.is_floating_point()]
    all_reduce_sum_(stats)
    for b in stats:
        b.div_(world)


def synchronize_batchnorm(model: nn.Module) -> nn.Module:
    """Replace every BatchNorm layer of `model` with a SyncedBatchNorm (same state)."""
    for name, child in model.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, SyncedBatchNorm):
            synced = SyncedBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                     child.track_running_stats)
            like = [t for t in child.state_dict().values() if t.is_floating_point()]
            if like:
                synced.to(like[0])  # the layer's device and dtype
            synced.load_state_dict(child.state_dict())
            setattr(model, name, synced)
        else:
            synchronize_batchnorm(child)
    return model

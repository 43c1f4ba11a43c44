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

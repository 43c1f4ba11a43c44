"""Several copies of one backbone trained as one module: the seeds of a trial, packed.

`PackedModel` stacks the parameters and buffers of K models of one architecture
(`torch.func.stack_module_state`) and runs them with `vmap`: every convolution becomes one
grouped convolution and every matrix multiply one batched multiply, so K small models fill a
GPU that one leaves idle. Inputs and outputs are seed-major: rows [k*B, (k+1)*B) belong to
seed k. Seed k's outputs depend only on slice k of each stacked tensor, so the gradient of a
sum of per-seed losses is, slice by slice, each seed's own gradient; any elementwise optimizer
(SGD, Adam) then steps each seed exactly as if it trained alone.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap


class PackedModel(nn.Module):
    """K models of one architecture as one module whose tensors have a leading seed axis."""

    def __init__(self, models: list[nn.Module]):
        super().__init__()
        self.seeds = len(models)
        params, buffers = stack_module_state(models)
        # the architecture without storage; real tensors are passed to it on every call
        object.__setattr__(self, "template", copy.deepcopy(models[0]).to("meta"))
        self.stack = copy.deepcopy(models[0])  # same names (so the state dict reads familiarly)
        for name, value in params.items():
            _set(self.stack, name, nn.Parameter(value.detach().clone()))
        for name, value in buffers.items():
            _set(self.stack, name, value.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params = dict(self.stack.named_parameters())
        buffers = dict(self.stack.named_buffers())
        xs = x.reshape(self.seeds, -1, *x.shape[1:])
        out = vmap(self._one, randomness="different")(params, buffers, xs)
        return out.reshape(-1, *out.shape[2:])

    def _one(self, params, buffers, x):
        return functional_call(self.template, (params, buffers), (x,))

    def unpack_into(self, models: list[nn.Module]) -> None:
        """Copy seed k's parameters and buffers into models[k] (for evaluation, checkpoints)."""
        with torch.no_grad():
            for name, stacked in self._tensors():
                for k, model in enumerate(models):
                    _get(model, name).copy_(stacked[k])

    def pack_from(self, models: list[nn.Module]) -> None:
        """The reverse of unpack_into (after the seeds' models were loaded from checkpoints)."""
        with torch.no_grad():
            for name, stacked in self._tensors():
                for k, model in enumerate(models):
                    stacked[k].copy_(_get(model, name))

    def _tensors(self):
        return [*self.stack.named_parameters(), *self.stack.named_buffers()]


def _owner(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    module, _, leaf = name.rpartition(".")
    return (root.get_submodule(module) if module else root), leaf


def _get(root: nn.Module, name: str) -> torch.Tensor:
    owner, leaf = _owner(root, name)
    return owner._parameters[leaf] if leaf in owner._parameters else owner._buffers[leaf]


def _set(root: nn.Module, name: str, value: torch.Tensor) -> None:
    owner, leaf = _owner(root, name)
    if isinstance(value, nn.Parameter):
        owner._parameters[leaf] = value
    else:
        owner._buffers[leaf] = value

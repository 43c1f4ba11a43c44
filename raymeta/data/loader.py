"""Mini-batches from device-resident data, with augmentation run on the device.

In-memory datasets are copied to the training device once, as uint8 (a quarter of float32),
and every batch is a gather by index: no DataLoader, no worker processes, no host copies.
The batch order comes from a CPU generator, so it is the same on CPU and GPU for a seed.
Lazily decoded image files (clothing1m) are decoded per batch instead.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from raymeta.data.bundle import DataBundle, Split
from raymeta.data.datasets import ImageFiles
from raymeta.parallel import shard


@dataclass
class Batch:
    x: torch.Tensor
    """normalised inputs (B, C, H, W), float32"""
    y: torch.Tensor
    """labels training sees (noisy for the training split)"""
    y_clean: torch.Tensor
    """true labels (-1 where unknown); for diagnostics only, never for training"""
    index: torch.Tensor
    """positions in the split (to look up per-sample state)"""
    offset: int = 0
    """where this worker's samples start in the global batch (data parallelism)"""
    global_size: int | None = None
    """size of the global batch, all workers together (None: this batch is all of it)"""

    def __post_init__(self):
        if self.global_size is None:
            self.global_size = len(self.y)


@dataclass
class PackedBatch(Batch):
    """The batches of K seeds trained together (`raymeta.models.packed`): their rows
    concatenated seed-major, and each seed's own batch."""

    parts: list[Batch] = field(default_factory=list)


def pack_batches(parts: list[Batch]) -> PackedBatch:
    """One batch of the seeds' batches (each seed drew its own samples and augmentation)."""
    if len({len(p.y) for p in parts}) > 1:
        raise ValueError(f"packed seeds need batches of one size, got {[len(p.y) for p in parts]}")
    return PackedBatch(torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts]),
                       torch.cat([p.y_clean for p in parts]), torch.cat([p.index for p in parts]),
                       parts=parts)


class DeviceSplit:
    """One split on a device, normalised on the fly."""

    def __init__(self, split: Split, bundle: DataBundle, device: torch.device,
                 dtype: torch.dtype = torch.float32,
                 layout: torch.memory_format = torch.contiguous_format):
        self.device = device
        self.dtype = dtype
        self.layout = layout
        """memory format of image batches (channels_last for faster convolutions)"""
        self.lazy = isinstance(split.x, ImageFiles)
        self.files = split.x if self.lazy else None
        self.x = None if self.lazy else torch.as_tensor(np.ascontiguousarray(split.x)).to(device)
        self.y = torch.as_tensor(split.y, dtype=torch.long).to(device)
        self.y_clean = torch.as_tensor(split.y_clean, dtype=torch.long).to(device)
        shape = (1, -1, 1, 1)
        self.mean = torch.tensor(bundle.mean, dtype=torch.float32, device=device).view(shape)
        self.std = torch.tensor(bundle.std, dtype=torch.float32, device=device).view(shape)

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, index: torch.Tensor) -> DeviceSplit:
        """The samples at `index` as a split of their own (gathered on the device)."""
        part = copy.copy(self)
        index = index.to(self.device)
        if self.lazy:
            part.files = self.files[index.cpu().numpy()]
        else:
            part.x = self.x[index]
        part.y, part.y_clean = self.y[index], self.y_clean[index]
        return part

    def inputs(self, index: torch.Tensor) -> torch.Tensor:
        """Float inputs in [0, 1] (images) or raw features, for the given positions."""
        if self.lazy:
            raw = torch.from_numpy(self.files[index.cpu().numpy()].decode()).to(self.device)
        else:
            raw = self.x[index]
        if raw.dtype == torch.uint8:
            return raw.float().div_(255.0)
        return raw.float()

    def batch(self, index: torch.Tensor, augment: str = "none",
              generator: torch.Generator | None = None, rank: int = 0, world: int = 1) -> Batch:
        """The samples at `index` (a global batch); with several workers, only this worker's
        contiguous part of it is gathered. Random augmentation is drawn for the whole global
        batch, so N workers see exactly the inputs one worker with the whole batch would."""
        start, stop = shard(len(index), rank, world)
        mine = index[start:stop]
        x = self.inputs(mine)
        if augment != "none" and x.dim() == 4 and x.shape[-1] > 1:
            x = augment_batch(x, augment, generator, draws=len(index), offset=start)
        x = ((x - self.mean) / self.std).to(self.dtype)
        if x.dim() == 4:
            x = x.contiguous(memory_format=self.layout)
        return Batch(x, self.y[mine], self.y_clean[mine], mine, start, len(index))

    def batches(self, batch_size: int, *, shuffle: bool, augment: str = "none",
                order_generator: torch.Generator | None = None,
                aug_generator: torch.Generator | None = None, drop_last: bool = False,
                rank: int = 0, world: int = 1):
        """Iterate over the split once in global batches of batch_size * world samples,
        yielding this worker's part of each."""
        n, size = len(self), batch_size * world
        order = torch.randperm(n, generator=order_generator) if shuffle else torch.arange(n)
        order = order.to(self.device)
        stop = n - n % size if drop_last and n >= size else n
        for start in range(0, stop, size):
            yield self.batch(order[start:start + size], augment, aug_generator, rank, world)

    def sample(self, batch_size: int, generator: torch.Generator, augment: str = "none",
               aug_generator: torch.Generator | None = None, rank: int = 0,
               world: int = 1) -> Batch:
        """A random global batch of batch_size * world samples drawn without replacement
        (e.g. a meta batch per step); this worker's part of it."""
        k = min(batch_size * world, len(self))
        index = torch.randperm(len(self), generator=generator)[:k].to(self.device)
        return self.batch(index, augment, aug_generator, rank, world)


def augment_batch(x: torch.Tensor, mode: str, generator: torch.Generator | None,
                  draws: int | None = None, offset: int = 0) -> torch.Tensor:
    """Random crop with zero padding (1/8 of the side, 4 px on 32x32) and horizontal flip,
    for a whole batch at once on its device. The random draws are made for `draws` samples
    (the global batch) and samples offset.. of them are used."""
    b, _, h, w = x.shape
    draws = b if draws is None else draws
    pick = slice(offset, offset + b)
    if "crop" in mode:
        pad = max(1, h // 8)
        padded = F.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (draws,), device=x.device, generator=generator)[pick]
        dx = torch.randint(0, 2 * pad + 1, (draws,), device=x.device, generator=generator)[pick]
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        batch_idx = torch.arange(b, device=x.device)[:, None, None, None]
        chan_idx = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        x = padded[batch_idx, chan_idx, rows, cols]
    if "flip" in mode:
        flip = torch.rand(draws, device=x.device, generator=generator)[pick] < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x

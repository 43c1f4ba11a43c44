"""Mini-batches from device-resident data, with augmentation run on the device.

In-memory datasets are copied to the training device once, as uint8 (a quarter of float32),
and every batch is a gather by index: no DataLoader, no worker processes, no host copies.
The batch order comes from a CPU generator, so it is the same on CPU and GPU for a seed.
Lazily decoded image files (clothing1m) are decoded per batch instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from raymeta.data.bundle import DataBundle, Split
from raymeta.data.datasets import ImageFiles


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


class DeviceSplit:
    """One split on a device, normalised on the fly."""

    def __init__(self, split: Split, bundle: DataBundle, device: torch.device):
        self.device = device
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
              generator: torch.Generator | None = None) -> Batch:
        x = self.inputs(index)
        if augment != "none" and x.dim() == 4 and x.shape[-1] > 1:
            x = augment_batch(x, augment, generator)
        x = (x - self.mean) / self.std
        return Batch(x, self.y[index], self.y_clean[index], index)

    def batches(self, batch_size: int, *, shuffle: bool, augment: str = "none",
                order_generator: torch.Generator | None = None,
                aug_generator: torch.Generator | None = None, drop_last: bool = False):
        """Iterate over the split once."""
        n = len(self)
        order = torch.randperm(n, generator=order_generator) if shuffle else torch.arange(n)
        order = order.to(self.device)
        stop = n - n % batch_size if drop_last and n >= batch_size else n
        for start in range(0, stop, batch_size):
            yield self.batch(order[start:start + batch_size], augment, aug_generator)

    def sample(self, batch_size: int, generator: torch.Generator, augment: str = "none",
               aug_generator: torch.Generator | None = None) -> Batch:
        """A random batch drawn without replacement (e.g. a meta batch per step)."""
        k = min(batch_size, len(self))
        index = torch.randperm(len(self), generator=generator)[:k].to(self.device)
        return self.batch(index, augment, aug_generator)


def augment_batch(x: torch.Tensor, mode: str, generator: torch.Generator | None) -> torch.Tensor:
    """Random crop with zero padding (1/8 of the side, 4 px on 32x32) and horizontal flip,
    for a whole batch at once on its device."""
    b, _, h, w = x.shape
    if "crop" in mode:
        pad = max(1, h // 8)
        padded = F.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (b,), device=x.device, generator=generator)
        dx = torch.randint(0, 2 * pad + 1, (b,), device=x.device, generator=generator)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        batch_idx = torch.arange(b, device=x.device)[:, None, None, None]
        chan_idx = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        x = padded[batch_idx, chan_idx, rows, cols]
    if "flip" in mode:
        flip = torch.rand(b, device=x.device, generator=generator) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x

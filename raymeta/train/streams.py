"""A run's random streams: one generator per consumer, each seeded from the run's seed, so a
change in how often one of them draws (another meta interval, augmentation on or off) leaves
the others' draws as they were, and a resumed run continues every stream where it stopped."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raymeta.data.bundle import seeded_rng


@dataclass
class Streams:
    order: torch.Generator
    """the training batches' order"""
    meta: torch.Generator
    """which meta samples each meta batch draws"""
    augment: torch.Generator
    """augmentation (on the run's device)"""
    method: torch.Generator
    """the method's own draws, and its meta-gradient strategy's (FaMUS's gates)"""

    @classmethod
    def for_run(cls, seed: int, device: torch.device) -> Streams:
        seeds = [int(s) for s in seeded_rng(seed, "batches").integers(0, 2**62, size=4)]
        return cls(torch.Generator().manual_seed(seeds[0]), torch.Generator().manual_seed(seeds[1]),
                   torch.Generator(device).manual_seed(seeds[2]),
                   torch.Generator().manual_seed(seeds[3]))

    def state(self) -> dict:
        state = {k: getattr(self, k).get_state() for k in ("order", "meta", "augment", "method")}
        state["torch"] = torch.random.get_rng_state()  # dropout and other global draws
        return state

    def load(self, state: dict) -> None:
        torch.random.set_rng_state(state.pop("torch"))
        for key, value in state.items():
            getattr(self, key).set_state(value)

"""Training batches: a global order from (seed, epoch), each process taking its rows.

Draw number d covers positions d*G .. d*G+G-1 of the endless concatenation of per-epoch
permutations (``SeededSampler.order``, a function of seed and epoch only), G the global batch.
Process r keeps rows [r*b, (r+1)*b) with b = G / world size. ``data`` is anything with ``len`` and
``rows(idx) -> (x0, cond)``: a ``data.ImageSet`` or a ``t2i.data.TextToImageData``. The whole state is the draw
counter, so resume is exact and independent of the number of processes.
"""
from __future__ import annotations

import torch

from ..data import SeededSampler
from .randomness import BatchRandom, derive_seed


class BatchStream:
    def __init__(self, data, global_batch: int, seed: int, rank: int, world: int,
                 device: torch.device | str = "cpu"):
        self.data, self.G, self.seed = data, int(global_batch), int(seed)
        self.b = self.G // world
        self.rows = slice(rank * self.b, (rank + 1) * self.b)
        self.sampler = SeededSampler(len(data), seed)
        self.device = torch.device(device)
        self._orders: dict[int, torch.Tensor] = {}

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._orders:  # keep the two newest epochs (a batch may straddle them)
            self._orders = {e: o for e, o in self._orders.items() if e == epoch - 1}
            self._orders[epoch] = self.sampler.order(epoch)
        return self._orders[epoch]

    def indices(self, draw: int) -> torch.Tensor:
        """This process's dataset indices for draw number `draw`."""
        n = len(self.data)
        pos = torch.arange(draw * self.G, (draw + 1) * self.G)[self.rows]
        epochs, within = pos // n, pos % n
        out = torch.empty_like(pos)
        for e in epochs.unique().tolist():
            m = epochs == e
            out[m] = self._order(e)[within[m]]
        return out

    def batch(self, draw: int, *, step: int, phase: str, repeat: int, micro: int) -> dict:
        x0, cond = self.data.rows(self.indices(draw))
        rng = BatchRandom(derive_seed(self.seed, step, phase, repeat, micro), self.G, self.rows, self.device)
        return {"x0": x0.to(self.device),
                "cond": None if cond is None else {k: v.to(self.device) for k, v in cond.items()},
                "rng": rng}

"""Training batches: a global order from (seed, epoch), each process taking its rows.

Draw number d covers positions d*G .. d*G+G-1 of the endless concatenation of per-epoch
permutations (``SeededSampler.order``, a function of seed and epoch only), G the global batch.
Process r keeps rows [r*b, (r+1)*b) with b = G / world size. ``data`` is anything with ``len`` and
``rows(idx) -> (x0, cond)``: a ``data.ImageSet``, a ``disk_data.FolderImages`` or a
``t2i.data.TextToImageData``. The whole state is the draw counter, so resume is exact and
independent of the number of processes.

With ``workers`` > 0 a torch DataLoader reads the rows of the coming draws in worker processes
(``prefetch`` draws ahead per worker) while the trainer computes: its sampler counts draw numbers
up from the one asked for, so a resume restarts it at the checkpointed draw and every batch is the
one the draw number names, whatever the number of workers.
"""
from __future__ import annotations

import itertools

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..data import SeededSampler
from .randomness import BatchRandom, derive_seed


class _DrawRows(Dataset):
    """Item d: (d, x0, cond) of draw d, read in a worker."""

    def __init__(self, stream: "BatchStream"):
        self.stream = stream

    def __len__(self) -> int:
        return 2**62  # draws never run out

    def __getitem__(self, draw: int):
        return (draw, *self.stream.data.rows(self.stream.indices(draw)))


class _CountFrom(Sampler):
    def __init__(self, start: int):
        self.start = int(start)

    def __iter__(self):
        return itertools.count(self.start)


class BatchStream:
    def __init__(self, data, global_batch: int, seed: int, rank: int, world: int,
                 device: torch.device | str = "cpu", workers: int = 0, prefetch: int = 2):
        self.workers, self.prefetch = int(workers), int(prefetch)
        self._reader, self._next = None, None
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

    def read(self, draw: int):
        """(x0, cond) of draw ``draw``: read here, or taken from the workers' queue."""
        if not self.workers:
            return self.data.rows(self.indices(draw))
        if self._reader is None or self._next != draw:  # first use, or a resume at another draw
            self.close()
            self._reader = iter(DataLoader(_DrawRows(self), batch_size=None, sampler=_CountFrom(draw),
                                           num_workers=self.workers, prefetch_factor=self.prefetch))
        got, x0, cond = next(self._reader)
        assert got == draw, (got, draw)
        self._next = draw + 1
        return x0, cond

    def close(self) -> None:
        """Let go of the reader: its workers stop when it is collected (the DataLoader iterator's own
        shutdown), at the latest with the stream."""
        self._reader = self._next = None

    def batch(self, draw: int, *, step: int, phase: str, repeat: int, micro: int) -> dict:
        x0, cond = self.read(draw)
        rng = BatchRandom(derive_seed(self.seed, step, phase, repeat, micro), self.G, self.rows, self.device)
        return {"x0": x0.to(self.device),
                "cond": None if cond is None else {k: v.to(self.device) for k, v in cond.items()},
                "rng": rng, "rows": self.indices(draw)}  # the dataset rows (a per-prompt table's index)

"""Randomness that does not depend on how a batch is split over processes.

Data-parallel training is only a faithful copy of single-process training if every sample sees the
same noise and time whatever process it lands on. So per-sample randomness is drawn for the whole
*global* batch from a generator seeded by (seed, step, phase, repeat, micro-step), and each process
keeps its slice. Every process draws the same global tensors in the same order, so a 2-process run
equals a 1-process run with the full batch, and resuming needs no generator state at all: the
stream is a pure function of the position in training. Objectives find it as ``batch["rng"]``.

Draws from torch's global generator (which the trainer seeds per process and restores on resume)
stay exactly resumable but are not split-invariant.
"""
from __future__ import annotations

import hashlib

import torch


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from a tuple (stable across runs and platforms, unlike ``hash``)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class BatchRandom:
    """Per-sample random draws for one global batch; each call returns this process's slice."""

    def __init__(self, seed: int, global_batch: int, rows: slice, device: torch.device | str = "cpu"):
        self.generator = torch.Generator().manual_seed(int(seed))
        self.global_batch, self.rows, self.device = int(global_batch), rows, torch.device(device)

    def _out(self, x: torch.Tensor, dtype=None) -> torch.Tensor:
        x = x[self.rows]
        return x.to(self.device, dtype) if dtype is not None else x.to(self.device)

    def randn(self, *shape: int, dtype=torch.float32) -> torch.Tensor:
        """Standard normal, [B_local, *shape]."""
        return self._out(torch.randn((self.global_batch, *shape), generator=self.generator), dtype)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return self.randn(*x.shape[1:], dtype=x.dtype)

    def rand(self, *shape: int, dtype=torch.float32) -> torch.Tensor:
        """Uniform [0, 1), [B_local, *shape]."""
        return self._out(torch.rand((self.global_batch, *shape), generator=self.generator), dtype)

    def randint(self, low: int, high: int, *shape: int) -> torch.Tensor:
        return self._out(torch.randint(low, high, (self.global_batch, *shape), generator=self.generator))

    def sample_t(self, schedule) -> torch.Tensor:
        """Training times from the schedule's own distribution (float64, [B_local])."""
        return self._out(schedule.sample_t(self.global_batch, generator=self.generator))

    def generator_for_student(self) -> torch.Generator:
        """A generator for ``Student.forward``'s between-step noise (drawn per process: use a 1-step
        student, or draw the noise here, where split invariance matters)."""
        return torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=self.generator)))

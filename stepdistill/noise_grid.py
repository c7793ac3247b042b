"""Times on a schedule's 1000-step noise grid: the grid itself, index ranges of a fraction of it, and
uniform draws from such a range (DMD's and SiD's time sampling); shared by the objectives, the fake
score and the diagnostics."""
from __future__ import annotations

import weakref
from typing import Sequence

import torch

from .errors import UserError
from .schedules import Schedule

_GRIDS: "weakref.WeakKeyDictionary[Schedule, torch.Tensor]" = weakref.WeakKeyDictionary()


def noise_grid(schedule: Schedule, n: int = 1000) -> torch.Tensor:
    """The schedule's n-step sampling grid without its clean end, least noisy first (float64)."""
    g = _GRIDS.get(schedule)
    if g is None or len(g) != n:
        g = schedule.timesteps(n)[:-1].flip(0).contiguous()
        _GRIDS[schedule] = g
    return g


def sample_times(schedule: Schedule, n: int, t_range: Sequence[float] = (0.02, 0.98), *,
                 device=None) -> torch.Tensor:
    """Times drawn uniformly from a fraction of the schedule's 1000-step grid, 0 = least noisy,
    1 = noisiest. On a VP schedule (0.02, 0.98) is DMD's t ~ U[0.02T, 0.98T] (Yin et al., 2024,
    sec. 4.2); on an EDM grid (0, 0.8) is SiD's tmax = 800 of the Karras rho-grid."""
    i_lo, i_hi = time_indices(schedule, t_range)
    return noise_grid(schedule)[torch.randint(i_lo, i_hi, (n,))].to(device)


def time_indices(schedule: Schedule, t_range: Sequence[float]) -> tuple[int, int]:
    """[lo, hi) indices of the 1000-step ``noise_grid`` that a time range covers, both ends included:
    (0.02, 0.98) is DMD2's randint(min_step, max_step + 1) = 20..980 (tianweiy/DMD2 sd_guidance.py,
    min_step = int(0.02 * 1000)); (0, 1) is the whole grid, 0..999."""
    lo, hi = float(t_range[0]), float(t_range[1])
    if not 0.0 <= lo < hi <= 1.0:
        raise UserError(f"time range {list(t_range)} must satisfy 0 <= lo < hi <= 1 (fractions of the noise range)")
    n = len(noise_grid(schedule))
    return int(round(lo * n)), min(int(round(hi * n)) + 1, n)


__all__ = ["noise_grid", "sample_times", "time_indices"]

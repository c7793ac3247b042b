"""Diagnostics for score-based distillation runs: a side-by-side preview and a collapse watchdog.

* ``score_preview``: the student's samples, then the teacher's and the fake score's x0
  predictions at the same noisy copy of them, one row each, so a drifting fake score (or a real
  score that disagrees with the student) is visible at a glance.
* ``collapse_check``: mean pairwise distance of student samples in detector features relative to
  that of real data; mode collapse (the failure DMD's regression loss and DMD2's TTUR guard
  against) shows as a ratio well below 1.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

from .images import save_grid


@torch.no_grad()
def score_preview(nets, noise: torch.Tensor, cond=None, path=None, *, t: float | None = None,
                  generator: torch.Generator | None = None, decode=None) -> torch.Tensor:
    """Rows: student samples x; teacher x0(x_t); fake-score x0(x_t) at one shared x_t (t defaults
    to the middle of the schedule's 1000-step grid). Saved with ``save_grid`` when `path` is given;
    returns the stacked batch [3B, C, H, W]. ``decode`` maps latents to images (latent teachers)."""
    from .fake_score import noise_grid, real_score

    x = nets.student(noise, cond, generator=generator)
    sched = nets.teacher.schedule
    tt = noise_grid(sched)[len(noise_grid(sched)) // 2] if t is None else torch.tensor(float(t), dtype=torch.float64)
    tt = tt.expand(x.shape[0])
    eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    x_t = sched.add_noise(x, eps, tt)
    rows = [x, real_score(nets)(x_t, tt, cond)]
    if nets.get("fake_score") is not None:
        rows.append(nets.fake_score(x_t, tt, cond))
    if decode is not None:
        rows = [decode(r) for r in rows]
    grid = torch.cat([r.float().clamp(-1, 1) for r in rows])
    if path is not None:
        save_grid(grid, Path(path), nrow=x.shape[0])
    return grid


def mean_pairwise_distance(features: torch.Tensor) -> float:
    """Mean Euclidean distance over distinct pairs of rows."""
    f = features.double().flatten(1)
    n = f.shape[0]
    if n < 2:
        raise ValueError("need at least two samples")
    d = torch.cdist(f, f)
    return float(d.sum() / (n * (n - 1)))


def collapse_check(sample_features: torch.Tensor, real_features: torch.Tensor, min_ratio: float = 0.5,
                   *, warn: bool = True) -> dict:
    """Ratio of the samples' mean pairwise feature distance to real data's; ``collapsed`` (and a
    warning) when it falls below `min_ratio`. Compare equal-size sets from the same detector."""
    ratio = mean_pairwise_distance(sample_features) / max(mean_pairwise_distance(real_features), 1e-12)
    collapsed = ratio < min_ratio
    if collapsed and warn:
        warnings.warn(f"possible mode collapse: sample diversity is {ratio:.2f} of real data's "
                      f"(threshold {min_ratio}); lower the generator learning rate or raise critic_repeats",
                      RuntimeWarning, stacklevel=2)
    return {"diversity_ratio": ratio, "collapsed": collapsed}


__all__ = ["score_preview", "collapse_check", "mean_pairwise_distance"]

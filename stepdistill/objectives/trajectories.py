"""Consistency links from cached teacher ODE trajectories (TBCM, "Image-Free Timestep Distillation via
Continuous-Time Consistency with Trajectory-Sampled Pairs", 2025): trajectories sampled once from
noise by a solver (``stepdistill.cache``), then per sample a trajectory and a start time on the
teacher's grid: x_t is the trajectory's state there and the target its state at the link's end, so
training calls no teacher and x_t lies where the student's own samples do.
"""
from __future__ import annotations

import torch

from .common import Draws


class TrajectoryLinks:
    """A trajectory cache as links: ``check`` before any compute, ``load`` (in ``build`` on the
    trainer's main process first, else at first use), ``draw`` per batch."""

    def __init__(self, path: str, *, num: int, steps: int, solver: str, guidance: float, seed: int):
        self.path, self.num, self.steps, self.solver = path, num, steps, solver
        self.guidance, self.seed = guidance, seed
        self.pairs = None
        self._links = None

    def grid(self, schedule, starts: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        """The trajectories' grid: the teacher's `steps`-step grid holding every link's start and end
        (``cache.trajectory_grid``)."""
        from ..cache import trajectory_grid

        return trajectory_grid(schedule, self.steps, torch.cat([starts, ends]))

    def check(self, schedule, starts: torch.Tensor, ends: torch.Tensor) -> None:
        """An existing cache matches these settings, its grid included."""
        from ..cache import check_cache_settings

        check_cache_settings(self.path, num=self.num, steps=self.steps, sampler=self.solver, guidance=self.guidance,
                             seed=self.seed, trajectory=True, grid=self.grid(schedule, starts, ends))

    def load(self, teacher, starts: torch.Tensor, ends: torch.Tensor, context=None) -> None:
        """Load the trajectories (sampling them first where the cache is missing, with the context's prompts)."""
        from ..cache import ensure_cache

        self.pairs = ensure_cache(teacher, self.path, num=self.num, steps=self.steps, sampler=self.solver,
                                  guidance=self.guidance, seed=self.seed, trajectory=True,
                                  prompts=getattr(context, "prompts", None), log=getattr(context, "log", None),
                                  grid=self.grid(teacher.schedule, starts, ends))
        self._links = (starts, ends, self.pairs.grid_index(starts), self.pairs.grid_index(ends))

    def draw(self, draws: Draws, device):
        """(x_t, t, t_end, target, cond): per sample a trajectory and a start, the state there and at its end."""
        starts, ends, pos, pos_end = self._links
        j, n = draws.randint(0, len(self.pairs)), draws.randint(0, len(starts))
        _, _, cond = self.pairs.get(j, device=device)
        return (self.pairs.states(j, pos[n], device), starts[n].to(device), ends[n].to(device),
                self.pairs.states(j, pos_end[n], device), cond)


__all__ = ["TrajectoryLinks"]

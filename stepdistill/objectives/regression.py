"""DMD's regression loss on teacher noise -> image pairs (Yin et al., 2024, eq. 9) and the
regression warm-up that DMD2's one-step recipe starts with (tianweiy/DMD2 experiments/sdxl: a short
ODE-regression pretraining on 10K teacher pairs before DMD2).

The pairs come from a teacher-output ``cache`` folder (``stepdistill.cache``), built on first use.
A K-step student regresses each of its steps onto the teacher's ODE trajectory instead (the cache
then holds trajectories whose grid holds the student's timesteps): per pair a step k, the input the
trajectory's state at t_k (at k = 0 the student's own noise input) and the target the trajectory's
end (x0 of a re-noising student; the ODE maps x_{t_k} to it) or, for a ``sampler="ddim"`` student,
the trajectory at the step's end, reached by the student's DDIM jump.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import UserError
from ..schedules import bcast
from .common import Draws, pseudo_huber

DISTANCES = ("pseudo_huber", "mse", "lpips")


@dataclass
class RegressionConfig:
    """Config fields of the regression loss and its warm-up."""

    regression_loss: str = "pseudo_huber"          # "pseudo_huber" | "mse" | "lpips" (needs local weights)
    huber_c: Optional[float] = None                # per-pixel pseudo-Huber c; None = 0.00054 (iCT's c / sqrt(d))
    cache: Optional[str] = None                    # teacher-output cache folder (stepdistill.cache); None = the
                                                   # run folder's teacher_cache
    cache_num: int = 1000                          # built there if missing: pairs ...
    cache_steps: int = 50                          # ... teacher steps
    cache_sampler: str = "ddim"
    cache_seed: int = 0
    regression_batch: Optional[int] = None         # pairs per step; None = the batch size
    regression_warmup: int = 0                     # first iterations: regression alone, critic waits (DMD2 1-step)
    regression_warmup_fraction: Optional[float] = None  # the warm-up as a share of the run instead (of max_steps,
                                                   # or of max_minutes left after the cache is built, whichever
                                                   # ends it first): sized to the machine


class Regression:
    """The regression term of one run: checks its settings, loads (or builds) the pairs, draws a batch."""

    def __init__(self, cfg, weight: float):
        self.cfg, self.weight = cfg, float(weight)
        frac = cfg.regression_warmup_fraction
        self.on = self.weight > 0 or cfg.regression_warmup > 0 or frac is not None
        if cfg.regression_warmup < 0:
            raise UserError(f"objective.regression_warmup must be >= 0, got {cfg.regression_warmup}")
        if frac is not None and (cfg.regression_warmup or not 0.0 < frac < 1.0):
            raise UserError(f"objective.regression_warmup_fraction must lie in (0, 1) with regression_warmup=0 (one "
                            f"of the two sizes the warm-up), got {frac} and {cfg.regression_warmup}")
        if self.on and cfg.regression_loss not in DISTANCES:
            raise UserError(f"objective.regression_loss {cfg.regression_loss!r} is not supported; use "
                            f"{', '.join(DISTANCES)}")
        self.pairs = self._grid_pos = self._lpips = None

    def check(self, student) -> None:
        """Fail before training if the cache holds pairs made with other settings, its grid misses a
        multi-step student's timesteps, or LPIPS cannot load."""
        from ..cache import check_cache_settings

        c = self.cfg
        if not self.on:
            return
        if not c.cache:  # `stepdistill train` fills in the run folder's teacher_cache
            raise UserError("the regression loss needs teacher noise->image pairs: set objective.cache to a folder "
                            "(built there on first use) or objective.regression_weight=0 and "
                            "objective.regression_warmup=0")
        check_cache_settings(c.cache, num=c.cache_num, steps=c.cache_steps, sampler=c.cache_sampler,
                             guidance=c.guidance, seed=c.cache_seed, trajectory=student.steps > 1,
                             grid=self.grid(student))
        if c.regression_loss == "lpips":
            self._lpips = _load_lpips()

    def prepare(self, teacher, student, context=None) -> None:
        """In ``build``: check the settings, and load the pairs when the trainer's context says so
        (on its main process first), before a LoRA fake score adds adapters to the teacher."""
        self.check(student)
        if context is not None and context.load_caches:
            self.load(teacher, student, context)

    def grid(self, student):
        """A multi-step student's trajectory grid: the teacher's cache_steps-step grid holding the
        student's timesteps (``cache.trajectory_grid``), so each step has its own start state."""
        from ..cache import trajectory_grid

        if student.steps < 2:
            return None  # the first step's input is the student's own noise: only the later times are read
        return trajectory_grid(student.schedule, self.cfg.cache_steps, student.timesteps[1:])

    def load(self, teacher, student, context=None) -> None:
        """Load the pairs, building them first if the cache is missing (with the context's prompts)."""
        from ..cache import ensure_cache

        c = self.cfg
        if not self.on:
            return
        self.pairs = ensure_cache(teacher, c.cache, num=c.cache_num, steps=c.cache_steps, sampler=c.cache_sampler,
                                  guidance=c.guidance, seed=c.cache_seed, trajectory=student.steps > 1,
                                  prompts=getattr(context, "prompts", None), log=getattr(context, "log", None),
                                  grid=self.grid(student))
        if student.steps > 1:  # grid positions of the student's timesteps after its first (whose input
            ts = student.timesteps  # is its own noise) and of each step's end
            pos = torch.cat([torch.zeros(1, dtype=torch.long), self.pairs.grid_index(ts[1:])])
            self._grid_pos = (pos, self.pairs.grid_index(student.segment_end(ts)))

    def pair(self, student, idx: torch.Tensor, k: torch.Tensor, device):
        """(student output, target, cond) for cached pairs idx: G(noise) against the teacher's sample
        (eq. 9); for a K-step student step k[i] of pair i on the teacher's trajectory."""
        noise, x_ref, cond = self.pairs.get(idx, device=device)
        ts = student.timesteps
        if len(ts) == 1:
            return student(noise, cond), x_ref, cond
        pos, pos_end = self._grid_pos
        first = bcast(k == 0, noise).to(device).bool()
        x_k = torch.where(first, student.prior(noise, ts[0]), self.pairs.states(idx, pos[k], device))  # EDM: sigma z
        t = ts[k.to(ts.device)]
        if student.sampler == "ddim":
            return student.jump(x_k, t, student.segment_end(t), cond), self.pairs.states(idx, pos_end[k], device), cond
        return student.denoise(x_k, t, cond), x_ref, cond

    def distance(self, out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """Per-sample distance, mean-reduced over pixels like the paper's LPIPS (eq. 9)."""
        c = self.cfg
        if c.regression_loss == "mse":
            return (out - ref).pow(2).flatten(1).mean(1)
        if c.regression_loss == "lpips":
            return self._lpips(out, ref).flatten(1).mean(1)
        return pseudo_huber(out, ref, c.huber_c)

    def term(self, teacher, student, like: torch.Tensor, draws: Draws, weight: float | None = None) -> torch.Tensor:
        """weight * eq. 9 on a random batch of pairs, spread over ``like``'s batch size. Pairs not
        loaded in ``build`` (no trainer context) load here, ``teacher`` building them if missing."""
        if self.pairs is None:
            self.load(teacher, student)
        n = self.cfg.regression_batch or like.shape[0]
        same = n == like.shape[0]  # then per-sample draws come from the trainer's stream
        idx = draws.randint(0, len(self.pairs)) if same else torch.randint(0, len(self.pairs), (n,))
        k = draws.randint(0, student.steps) if same else torch.randint(0, student.steps, (n,))
        out, x_ref, _ = self.pair(student, idx, k, like.device)
        d = self.distance(out, x_ref)
        return (self.weight if weight is None else weight) * (d if same else d.mean().expand(like.shape[0]))


def _load_lpips():
    try:
        import lpips  # noqa: F401
    except ImportError:
        raise UserError("regression_loss 'lpips' needs the lpips package and its weights available offline; "
                        "use regression_loss=pseudo_huber") from None
    try:
        return lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True).eval().requires_grad_(False)
    except Exception as err:  # the package downloads backbone weights on first use
        raise UserError(f"could not load LPIPS weights offline ({err}); use regression_loss=pseudo_huber") from None


__all__ = ["RegressionConfig", "Regression", "DISTANCES"]

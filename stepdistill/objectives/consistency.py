"""Consistency distillation (Song et al., 2023, Alg. 2) in the discrete, skipping-step form of
latent consistency models (Luo et al., 2023, Alg. 1).

Teacher grid. As LCM's ``DDIMSolver``: the teacher steps on an N-step grid (default 50), so one
teacher step from t_{n+k} to t_n skips k = T/N training timesteps (k = 20 for T = 1000, N = 50).
Here the grid is ``schedule.timesteps(N)`` (the diffusers grid; for VP with trailing spacing these
are LCM's times 999, 979, ..., 19) and its last step ends at clean data. The step is one step of
any solver of ``stepdistill.sampling`` (ddim, euler, heun, dpmpp2m), on the teacher with CFG; with
``teacher_substeps`` m > 1 it is m solver steps evenly spaced in the schedule's time, so a long skip
still follows the teacher's ODE closely (CTM, Kim et al., 2024, solves the teacher's part of a jump in
several solver steps). With multistep and teacher_steps = K, each link is a whole segment and its
target the teacher's m-step solution at the segment's end: no target network is asked at all.

Target. f_target(x^_{t_n}, t_n) from a frozen EMA copy of the student (Song et al., 2023, eq. 7,
decay ``target_ema``), or the student itself under stop-gradient when the decay is 0 (iCT,
Song & Dhariwal, 2023, sec. 3.2; LCM-LoRA). Where t_n is clean data the target is x^_{t_n} itself:
the boundary condition f(x, t_clean) = x (Song et al., 2023, eq. 4), so the network is never asked at
a time it was not trained on.

Distance. Pseudo-Huber sqrt(||f - f_target||^2 + c^2) - c with c = 0.00054 sqrt(d) (iCT, sec. 3.3;
d = values per sample), or the mean squared error (LCM's l2). With ``weighting`` "none" it is taken
between the consistency outputs themselves; with "truncated_snr" or "snr_plus_one" between the x0
estimates that one DDIM jump from (x_t, t) carries to the output and to the target, times w(t)
(multistep consistency models, Heek et al., 2024, Alg. 1; w(t) of Salimans & Ho, 2022, sec. 4), which
weights every segment at least 1 where the latent form scales a high-noise segment's x0 error down
(by 0.03 on the digits teacher's first; there the latent form scored better: the digits/consistency preset).

Guidance. With ``w_embedding`` the student is conditioned on a CFG scale w ~ U[w_min, w_max] through
LCM's guidance-scale embedding (sec. 4.2) passed as ``timestep_cond``, while the teacher uses CFG at
that w. w is the usual CFG scale (1 = no guidance); the embedding is of w - 1, as diffusers'
LatentConsistencyModelPipeline computes it from its guidance_scale, so an exported pipeline agrees.

Cached trajectories. With ``cache`` the links come from ``cache_num`` teacher ODE trajectories of
``cache_steps`` ``solver`` steps (``trajectories.TrajectoryLinks``, TBCM): no teacher call in training.

Sampling. As multi-step consistency models (Song et al., 2023, Alg. 1): f, then re-noise to the next time.

Multistep. With ``multistep`` the student's K timesteps cut the time axis into K segments and the
student only has to be consistent within each (multistep consistency models, Heek et al., 2024;
phased consistency models, Wang et al., 2024): on the segment (s, t_i] its consistency function is
the DDIM jump of its x0 estimate to the segment's end s (``Student.jump``; PCM eq. 6), which is x
itself at s, so the boundary condition holds by construction, and at clean s it is the x0 estimate.
A teacher step never crosses a segment's end (it stops there: the target is then x^_s itself), and
the student samples deterministically, one DDIM jump per segment (``student.sampler = "ddim"``, the
exported ``DDIMScheduler``). With teacher_steps a multiple of K the segment ends lie on the teacher's
grid. At initialisation this student is the teacher sampled by K-step DDIM; training makes each
jump agree with the teacher's finer ODE path.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..denoisers import guided
from ..errors import UserError
from ..generator import cond_proj_dim, guidance_embedding
from ..sampling import SAMPLERS, implied_x0, teacher_step
from ..schedules import Schedule, bcast
from .base import Nets, Objective, register
from .common import WEIGHTINGS, Draws, ema_update, snr_weight
from .trajectories import TrajectoryLinks

LOSSES = ("pseudo_huber", "l2")
ICT_HUBER_C = 0.00054  # times sqrt(d) (Song & Dhariwal, 2023, sec. 3.3)


@register
class Consistency(Objective):
    name = "consistency"
    uses_real_data = True  # x_{t_{n+k}} is noised data (Alg. 2)

    @dataclass
    class Config:
        solver: str = "ddim"            # teacher ODE solver for one step t_{n+k} -> t_n: ddim | euler | heun | dpmpp2m
        teacher_steps: int = 50         # N: teacher grid schedule.timesteps(N); skip k = T / N (LCM's DDIMSolver)
        target_ema: float = 0.95        # EMA decay of the target network (LCM's 0.95); 0 = stop-gradient student
        loss: str = "pseudo_huber"      # "pseudo_huber" (iCT) or "l2"
        huber_c: Optional[float] = None  # pseudo-Huber c; None = 0.00054 * sqrt(values per sample) (iCT)
        guidance: float = 1.0           # teacher CFG scale when w_embedding is off; 1 = plain conditional
        w_embedding: bool = False       # condition the student on w ~ U[w_min, w_max] (LCM, sec. 4.2)
        w_min: float = 6.0              # CFG scale range, usual convention: diffusers' train_lcm_distill_sd_wds.py
        w_max: float = 16.0             # draws LCM-form w ~ U[5, 15] (--w_min/--w_max), i.e. CFG scale w + 1
        multistep: bool = False         # consistent within each of the student's K segments only (Heek et al., 2024)
        teacher_substeps: int = 1       # solver steps per teacher step t_{n+k} -> t_n (several, as CTM's teacher)
        weighting: str = "none"         # "none": distance between outputs; "truncated_snr" | "snr_plus_one":
                                        # between implied x0 estimates, times w(t) (Heek et al., 2024, Alg. 1)
        cache: Optional[str] = None     # teacher ODE trajectories (built there on first use): links from their
                                        # states instead of noised data and online teacher steps; None = online
        cache_num: int = 2000           # ... trajectories, each from its own noise and (balanced) class
        cache_steps: int = 32           # ... of `solver` on schedule.timesteps(cache_steps)
        cache_seed: int = 0

    def __init__(self, cfg: Any = None):
        super().__init__(cfg)
        c = self.cfg
        if c.solver not in SAMPLERS:
            raise UserError(f"consistency: solver {c.solver!r} is unknown; use one of {', '.join(SAMPLERS)}")
        if c.teacher_steps < 1:
            raise UserError(f"consistency: teacher_steps must be >= 1, got {c.teacher_steps}; LCM uses 50")
        if c.teacher_substeps < 1:
            raise UserError(f"consistency: teacher_substeps must be >= 1, got {c.teacher_substeps}; 1 = one solver "
                            "step per teacher step (LCM)")
        if not 0.0 <= c.target_ema < 1.0:
            raise UserError(f"consistency: target_ema must be in [0, 1), got {c.target_ema}; 0 = stop-gradient")
        if c.loss not in LOSSES:
            raise UserError(f"consistency: loss {c.loss!r} is unknown; use one of {', '.join(LOSSES)}")
        if c.weighting not in ("none",) + WEIGHTINGS:
            raise UserError(f"consistency: weighting {c.weighting!r} is unknown; use one of none, "
                            f"{', '.join(WEIGHTINGS)}")
        if c.huber_c is not None and c.huber_c <= 0:
            raise UserError(f"consistency: huber_c must be > 0 (or null for iCT's default), got {c.huber_c}")
        if c.w_embedding and not 1.0 <= c.w_min <= c.w_max:
            raise UserError(f"consistency: need 1 <= w_min <= w_max, got w_min={c.w_min}, w_max={c.w_max}")
        if c.cache and c.teacher_substeps != 1:
            raise UserError("consistency: with objective.cache the teacher's path is the cached trajectories' own "
                            f"grid (cache_steps={c.cache_steps}); set teacher_substeps=1 or cache=null")
        if c.cache and c.w_embedding:
            raise UserError("consistency: cached trajectories are made at one CFG scale and cannot train the "
                            "w-embedding; set cache=null or w_embedding=false")
        if c.cache_num < 1 or c.cache_steps < 1:
            raise UserError(f"consistency: cache_num and cache_steps must be >= 1, got {c.cache_num} and "
                            f"{c.cache_steps}")
        self.uses_real_data = not c.cache  # cached links need no data
        self._grids: dict[int, torch.Tensor] = {}
        self._hold: Optional[torch.Tensor] = None  # multistep: the student's timesteps (build)
        self._w_dim: Optional[int] = None
        self.links = TrajectoryLinks(c.cache, num=c.cache_num, steps=c.cache_steps, solver=c.solver,
                                     guidance=c.guidance, seed=c.cache_seed) if c.cache else None

    def student_sampler(self):
        return "ddim" if self.cfg.multistep else None

    def build(self, teacher, student, context=None) -> dict:
        c = self.cfg
        self._hold = student.timesteps.cpu() if c.multistep else None  # segment bounds on the teacher's grid
        self._grids = {}  # a grid made before build lacks them
        if c.multistep and getattr(student, "sampler", None) != "ddim":
            raise UserError("consistency: multistep students sample deterministically; set student.sampler=ddim")
        if (c.w_embedding or c.guidance != 1.0) and not teacher.is_conditional:
            raise UserError("consistency: guidance needs a conditional teacher; set guidance=1 and w_embedding=false")
        if c.w_embedding:
            self._w_dim = cond_proj_dim(student)
            if self._w_dim is None:
                raise UserError("consistency: w_embedding needs a student backbone with a timestep_cond input; set "
                                "student.time_cond_proj_dim=256 (LCM) on a UNet2DConditionModel teacher, or "
                                "w_embedding=false")
        if c.cache:
            self.links.check(student.schedule, *self._link_times(student))
            if context is not None and context.load_caches:  # on the trainer's main process first
                self.links.load(teacher, *self._link_times(student), context)
        if c.target_ema == 0.0 or c.cache:  # cached links end at segment ends: no target network is asked
            return {}
        return {"target": copy.deepcopy(student).requires_grad_(False).eval()}

    def _link_times(self, student) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher-grid start times (without the clean end) and each one's segment end."""
        schedule = student.schedule
        starts = self._grid(schedule, "cpu")[:-1]
        if self.cfg.multistep:
            return starts, student.segment_end(starts).cpu()
        return starts, torch.full_like(starts, float(schedule.t_clean))

    @torch.no_grad()
    def on_step_end(self, nets: Nets, step: int) -> None:
        target = nets.get("target")
        if target is None:
            return
        ema_update(target, nets.student, float(self.cfg.target_ema))  # theta^- <- mu theta^- + (1 - mu) theta
                                                                     # (Song et al., 2023, Alg. 2, last line)

    # -- loss -------------------------------------------------------------------------------------
    def _grid(self, schedule: Schedule, device) -> torch.Tensor:
        """The teacher's teacher_steps grid (``cache.own_grid``); multistep: with the student's timesteps
        added where it lacks them (the flow grid does not nest; VP's trailing grid and EDM's Karras grid
        less sigma_min hold them where K divides teacher_steps), so that every segment bound is a link
        start, where the student samples."""
        from ..cache import trajectory_grid

        key = id(schedule)
        if key not in self._grids:
            self._grids[key] = trajectory_grid(schedule, self.cfg.teacher_steps, self._hold)
        return self._grids[key].to(device)

    def _scales(self, batch: dict, n: int, device):
        """CFG scale per sample: sampled in [w_min, w_max] with the w-embedding, else fixed."""
        c = self.cfg
        if not c.w_embedding:
            return c.guidance
        return (c.w_min + (c.w_max - c.w_min) * Draws(batch).rand()).to(device)

    def distance(self, f: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        sq = (f - target).square().flatten(1)
        if self.cfg.loss == "l2":
            return sq.mean(1)
        c = self.cfg.huber_c if self.cfg.huber_c is not None else ICT_HUBER_C * math.sqrt(sq.shape[1])
        return (sq.sum(1) + c**2).sqrt() - c

    def cached_links(self, nets: Nets, batch: dict):
        """(x_t, t, t_end, target, cond) from the cached trajectories (``TrajectoryLinks``)."""
        if self.links.pairs is None:
            self.links.load(nets.teacher, *self._link_times(nets.student))
        return self.links.draw(Draws(batch), batch["x0"].device)

    def loss(self, schedule: Schedule, f, target, x_t, t, t_end) -> dict[str, torch.Tensor]:
        """The distance between the student's jump f and its target (see Distance)."""
        target = target.to(f.dtype)
        if self.cfg.weighting == "none":
            return {"loss": self.distance(f, target), "_t": t.to(f.dtype)}
        # Heek et al. (2024), Alg. 1: the loss on x0 estimates, weighted by w(t)
        x0_f, x0_target = (implied_x0(schedule, v, x_t, t, t_end) for v in (f, target))
        w_t = snr_weight(schedule, t, self.cfg.weighting).to(f.dtype)
        return {"loss": w_t * self.distance(x0_f, x0_target), "_t": t.to(f.dtype)}

    def generator_loss(self, nets: Nets, batch: dict) -> dict[str, torch.Tensor]:
        schedule = nets.student.schedule
        if self.cfg.cache:
            x_t, t, t_end, target, cond = self.cached_links(nets, batch)
            return self.loss(schedule, nets.student.jump(x_t, t, t_end, cond), target, x_t, t, t_end)
        x = batch["x0"]
        cond = batch.get("cond")
        grid = self._grid(schedule, x.device)
        draws = Draws(batch)
        n = draws.randint(0, len(grid) - 1).to(x.device)
        t, t_prev = grid[n], grid[n + 1]                       # t_{n+k}, t_n
        x_t = draws.noised(schedule, x, t)
        w = self._scales(batch, x.shape[0], x.device)
        s_cond = cond
        if self.cfg.w_embedding:
            s_cond = {**(cond or {}), "timestep_cond": guidance_embedding(w, self._w_dim).to(x.device)}
        if self.cfg.multistep:
            # the segment (t_end, t_i] that t lies in; the teacher step stops at its end
            t_end = nets.student.segment_end(t).to(x.device)
            t_prev = torch.maximum(t_prev, t_end)
        else:
            t_end = torch.full_like(t, float(schedule.t_clean))
        f = nets.student.jump(x_t, t, t_end, s_cond)
        with torch.no_grad():
            x_prev = teacher_step(self.cfg.solver, guided(nets.teacher, w), x_t, t, t_prev, cond,
                                  self.cfg.teacher_substeps)
            # boundary condition f(x_s, s) = x_s at clean data (Song et al., 2023, eq. 4) and at an
            # inner segment's end; a clean end that keeps some noise (set_alpha_to_one false: t = 0)
            # is the network's own x0 there, as in single-segment CD
            _, sigma_prev = schedule.alpha_sigma(t_prev)
            at_end = (sigma_prev == 0) | ((t_prev == t_end) & (t_end != float(schedule.t_clean)))
            if bool(at_end.all()):  # every link ends at a boundary (e.g. one link per segment): no target net
                target = x_prev
            else:
                target_net = nets.get("target")
                target_net = nets.student if target_net is None else target_net
                target = target_net.jump(x_prev, t_prev, t_end, s_cond)
                target = torch.where(bcast(at_end, x).bool(), x_prev.to(target.dtype), target)
        return self.loss(schedule, f, target, x_t, t, t_end)

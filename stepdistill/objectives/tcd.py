"""TCD: trajectory consistency distillation (Zheng et al., 2024, "Trajectory Consistency Distillation",
Alg. 1), latent consistency distillation with the semi-linear trajectory consistency function.

Per iteration, on the teacher's N-step grid t_0 > t_1 > ... > t_N = clean (LCM's skipping-step grid):

    n ~ U{0..N-1}: t = t_n, t_prev = t_{n+1}                        (one teacher step, skip k = T / N)
    m ~ U{n+1..N}: s = t_m                                          (a target time at or below t_prev)
    x_t = alpha_t x0 + sigma_t eps
    x^_{t_prev} = Phi(x_t, t, t_prev; teacher with CFG w)            (DDIM solver, as LCM's DDIMSolver)
    L = d(f_theta(x_t, t, s), f_theta^-(x^_{t_prev}, t_prev, s))

f(x, t, s) is the trajectory consistency function in its semi-linear form (sec. 4.1, eq. 11): the
first-order exponential integrator from (x, t) with the network's x0 estimate to s, i.e. the DDIM
jump ``Student.jump(x, t, s)``, with f(x_s, s, s) = x_s (boundary condition by construction; at clean
s it is the x0 estimate). Where s = t_prev the target is x^_{t_prev} itself. theta^- is an EMA of the
student (decay ``target_ema``; 0 = the student under stop-gradient). d is the mean squared error
(LCM's l2) or the pseudo-Huber distance.

The student samples by TCD's strategic stochastic sampling (sec. 4.3, ``Student`` sampler "tcd" with
gamma, diffusers' TCDScheduler with eta = gamma on export), at timesteps of the training grid: the
scheduler's K-step subset of LCM's 50-step grid (4 steps: 999, 759, 499, 259).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch

from ..denoisers import guided
from ..errors import UserError
from ..export.scheduler import TCD_GRID_STEPS
from ..sampling import SAMPLERS, teacher_step
from ..schedules import bcast
from .base import Nets, Objective, register
from .common import Draws, ema_update, pseudo_huber


@register
class TCD(Objective):
    name = "tcd"
    uses_real_data = True  # x_t is noised data (Alg. 1)

    @dataclass
    class Config:
        solver: str = "ddim"          # the teacher's step t -> t_prev (LCM's DDIMSolver)
        teacher_steps: int = TCD_GRID_STEPS  # N: the teacher grid schedule.timesteps(N), skip k = T / N
        target_ema: float = 0.95      # EMA decay of theta^- (LCM's 0.95); 0 = stop-gradient student
        loss: str = "l2"              # "l2" (LCM's default) or "pseudo_huber"
        huber_c: Optional[float] = None  # pseudo-Huber c per value (default 0.00054, iCT)
        guidance: float = 1.0         # the teacher's CFG scale in the solver step

    def __init__(self, cfg=None):
        super().__init__(cfg)
        c = self.cfg
        if c.solver not in SAMPLERS:
            raise UserError(f"tcd: solver {c.solver!r} is unknown; use one of {', '.join(SAMPLERS)}")
        if c.teacher_steps < 1:
            raise UserError(f"tcd: teacher_steps must be >= 1, got {c.teacher_steps}; LCM and TCD use 50")
        if not 0.0 <= c.target_ema < 1.0:
            raise UserError(f"tcd: target_ema must be in [0, 1), got {c.target_ema}; 0 = stop-gradient")
        if c.loss not in ("l2", "pseudo_huber"):
            raise UserError(f"tcd: loss {c.loss!r} is unknown; use 'l2' or 'pseudo_huber'")

    def student_sampler(self):
        return "tcd"

    def build(self, teacher, student, context=None):
        if getattr(student, "sampler", None) != "tcd":
            raise UserError("tcd: the student samples by TCD's strategic stochastic sampling; set student.sampler=tcd")
        grid = teacher.schedule.timesteps(self.cfg.teacher_steps).to(torch.float64)
        off = [float(t) for t in student.timesteps.to(torch.float64) if not torch.isclose(grid, t).any()]
        if off:
            raise UserError(f"tcd: the student samples at timesteps {off} that its training grid of teacher_steps="
                            f"{self.cfg.teacher_steps} never holds; use objective.teacher_steps={TCD_GRID_STEPS} (the "
                            "exported TCDScheduler's original_inference_steps)")
        if self.cfg.guidance != 1.0 and not teacher.is_conditional:
            raise UserError("tcd: guidance needs a conditional teacher; set objective.guidance=1")
        if self.cfg.target_ema == 0.0:
            return {}
        return {"target": copy.deepcopy(student).requires_grad_(False).eval()}

    @torch.no_grad()
    def on_step_end(self, nets: Nets, step: int) -> None:
        target = nets.get("target")
        if target is not None:
            ema_update(target, nets.student, float(self.cfg.target_ema))  # theta^- <- mu theta^- + (1 - mu) theta

    def distance(self, f: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.cfg.loss == "l2":
            return (f - target).square().flatten(1).mean(1)
        return pseudo_huber(f, target, self.cfg.huber_c)

    def times(self, schedule, draws: Draws, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(t_n, t_{n+1}, s = t_m) with n ~ U{0..N-1} and m ~ U{n+1..N} on the teacher grid (Alg. 1)."""
        grid = schedule.timesteps(self.cfg.teacher_steps).to(device)
        big_n = self.cfg.teacher_steps
        n = draws.randint(0, big_n).to(device)
        m = n + 1 + torch.floor(draws.rand() * (big_n - n)).long().clamp_max(big_n - 1 - n)
        return grid[n], grid[n + 1], grid[m]

    def generator_loss(self, nets: Nets, batch: dict) -> dict[str, torch.Tensor]:
        student, x, cond = nets.student, batch["x0"], batch.get("cond")
        draws = Draws(batch)
        t, t_prev, s = self.times(student.schedule, draws, x.device)
        x_t = draws.noised(student.schedule, x, t)
        f = student.jump(x_t, t, s, cond)                                         # f_theta(x_t, t, s)
        with torch.no_grad():
            x_prev = teacher_step(self.cfg.solver, guided(nets.teacher, self.cfg.guidance), x_t, t, t_prev, cond)
            target_net = nets.get("target")
            target_net = student if target_net is None else target_net
            target = target_net.jump(x_prev, t_prev, s, cond)                     # f_theta^-(x^_{t_prev}, t_prev, s)
            target = torch.where(bcast(s == t_prev, x).bool(), x_prev.to(target.dtype), target)
        return {"loss": self.distance(f, target.to(f.dtype)), "_t": t.to(f.dtype)}


__all__ = ["TCD"]

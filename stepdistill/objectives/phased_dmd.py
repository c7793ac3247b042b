"""Phased DMD (Fan et al., 2025, "Phased DMD: Few-step Distribution Matching Distillation via Score
Matching within Subintervals"; ModelTC/LightX2V lightx2v_train/trainers/phased_dmd, math.py and rollout.py).

The student's steps 1 = t_0 > ... > t_K (then clean data) are split into phases, one expert per
phase (``experts`` = steps per phase, noisiest first; ``experts.py``). Phases train one after
another, each for its share of the run; earlier experts stay frozen (sec. 3.2, progressive
distribution matching). Sampling is deterministic (Euler on the probability-flow ODE, DDIM).
Per outer iteration of phase k, whose expert maps x_{t_{k-1}} to x_s, s = t_k (clean for the last):

  critic    x_s = sg(pipeline_k(z)) (the earlier experts, then expert k's steps, no re-noising);
            t ~ U over the grid above s (the nested interval (s, 1], App. E.2, at least ``margin``
            grid steps above s, LightX2V's score_timestep_margin); x_t = a_{t|s} x_s + sigma_{t|s} eps with
            a_{t|s} = a_t / a_s, sigma_{t|s}^2 = sigma_t^2 - a_{t|s}^2 sigma_s^2 (the forward kernel from s to t);
            the fake score F_k regresses, in the teacher's parameterisation, on the x0 whose implied
            score is the kernel's, x0* = (x_t - sigma_t^2 eps / sigma_{t|s}) / a_t: score matching within
            the subinterval (sec. 3.3; its flow form is the paper's velocity target
            -x_s / a_s + (a_s^2 sigma_t + a_t sigma_s^2) / (a_s^2 sigma_{t|s}) eps). At s = 0 it is x0.
            ``critic_repeats`` updates per generator update (paper: 5).
  generator a step j of phase k drawn uniformly (stochastic gradient truncation within the phase), the
            earlier steps without gradient; x0 = G_k(x_j, t_j), x_s its DDIM jump to s; x_t as above;
            g = (F_k x0(x_t) - T x0(x_t)) / mean|x0 - T x0(x_t)|   (DMD eq. 7-8, on x0 as LightX2V's
            dmd math); L = 0.5 mean((x0 - sg(x0 - g))^2). x_s is affine in x0 with a positive factor,
            so the gradient through x0 differs from the paper's through x_s by a per-sample scale.
Each phase's fake score starts from the teacher (full weights). Each later expert's learning rate
warms up again from its phase's first iteration, linearly over ``expert_warmup`` updates (1/W of the
rate at its first, the full rate from its W-th), as a phase trained on its own would: its weights start
from the teacher and its Adam moments from zero, as the first expert's did at the run's start, whose
warm-up is the optimizer's own schedule (``optim.student.warmup_steps``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import partial
from typing import List, Optional

import torch

from ..denoisers import guided
from ..errors import UserError
from ..experts import first_steps
from ..fake_score import FakeScore, dsm_error, noise_grid, time_indices
from ..schedules import bcast
from .base import Nets, Objective, Phase, register
from .common import Draws, mean_abs, per_sample, target_loss

_PHASE_LOSS = re.compile(r"^(critic|generator)_(\d+)_loss$")


@register
class PhasedDMD(Objective):
    name = "phased_dmd"

    @dataclass
    class Config:
        experts: List[int] = field(default_factory=lambda: [2, 2])  # student steps per phase/expert (paper: 4 = 2 + 2)
        shares: Optional[List[float]] = None   # share of the run each phase trains; None = equal shares
        guidance: float = 1.0                  # teacher CFG scale in the real score
        t_range: List[float] = field(default_factory=lambda: [0.02, 0.98])  # DM and fake times (grid fractions)
        margin: int = 20                       # grid steps kept above a phase's end time s (sigma_{t|s} > 0)
        critic_repeats: int = 5                # fake-score updates per generator update (paper: 5)
        fake_loss: str = "raw"                 # "raw" (teacher's parameterisation) | "x0"
        expert_warmup: int = 20                # iterations of linear LR warm-up at each later expert's start
                                               # (set it to optim.student.warmup_steps; 0 = none)

    def __init__(self, cfg=None):
        super().__init__(cfg)
        c = self.cfg
        if not c.experts or any(int(n) < 1 for n in c.experts):
            raise UserError(f"objective.experts {list(c.experts)} must list each phase's step count (e.g. [2, 2])")
        if c.shares is not None and (len(c.shares) != len(c.experts) or any(float(f) <= 0 for f in c.shares)):
            raise UserError(f"objective.shares {list(c.shares)} must give one positive share per phase "
                            f"({len(c.experts)} phases)")
        if c.critic_repeats < 1 or c.margin < 1 or c.expert_warmup < 0:
            raise UserError("objective.critic_repeats and objective.margin must be >= 1, objective.expert_warmup "
                            ">= 0")
        if len(c.t_range) != 2 or not 0.0 <= float(c.t_range[0]) < float(c.t_range[1]) <= 1.0:
            raise UserError(f"objective.t_range {list(c.t_range)} must satisfy 0 <= lo < hi <= 1")
        self.iteration = 0
        self.expert_start: dict[int, int] = {}  # phase -> the iteration its generator first trained at

    # -- contract -------------------------------------------------------------------------------
    def student_steps(self) -> int:
        return sum(int(n) for n in self.cfg.experts)

    def student_experts(self) -> list[int]:
        return [int(n) for n in self.cfg.experts]

    def student_sampler(self) -> str:
        return "ddim"  # the paper's Euler solver, no re-noising between steps

    @property
    def n_phases(self) -> int:
        return len(self.cfg.experts)

    def phases(self):
        shares = [float(f) for f in (self.cfg.shares or [1.0] * self.n_phases)]
        edges = [sum(shares[:k]) / sum(shares) for k in range(self.n_phases + 1)]
        out = []
        for k in range(self.n_phases):
            start = edges[k] if k > 0 else None
            stop = edges[k + 1] if k + 1 < self.n_phases else None
            out += [Phase(f"critic_{k + 1}", (f"fake_score_{k + 1}",), repeats=self.cfg.critic_repeats,
                          start_fraction=start, stop_fraction=stop),
                    Phase(f"generator_{k + 1}", ("student",), start_fraction=start, stop_fraction=stop)]
        return out

    # -- each expert's own LR warm-up ------------------------------------------------------------------
    def on_step_end(self, nets: Nets, step: int) -> None:
        self.iteration = step

    def lr_factor(self, net: str) -> float:
        """Linear warm-up over ``expert_warmup`` iterations from the start of the expert in training
        (1 for the first expert, whose warm-up is the optimizer's schedule, and for the fake scores)."""
        if net != "student" or not self.expert_start or not self.cfg.expert_warmup:
            return 1.0
        k = max(self.expert_start)
        if k == 0:
            return 1.0
        return min(1.0, (self.iteration - self.expert_start[k] + 1) / self.cfg.expert_warmup)

    def state_dict(self):
        return {"iteration": self.iteration, "expert_start": {str(k): v for k, v in self.expert_start.items()}}

    def load_state_dict(self, state):
        self.iteration = int(state.get("iteration", 0))
        self.expert_start = {int(k): int(v) for k, v in (state.get("expert_start") or {}).items()}

    def build(self, teacher, student, context=None):
        for k in range(self.n_phases):
            lo, hi = self._index_range(teacher.schedule, self._end(student, k))
            if lo >= hi:
                raise UserError(f"phase {k + 1} ends at t = {float(self._end(student, k)):g}, which leaves no times "
                                f"above it (+ margin {self.cfg.margin}) inside t_range {list(self.cfg.t_range)}; "
                                "lower objective.margin or raise t_range's upper end")
        return {f"fake_score_{k + 1}": FakeScore(teacher) for k in range(self.n_phases)}

    def __getattr__(self, name: str):
        m = _PHASE_LOSS.match(name)
        cfg = self.__dict__.get("cfg")
        if m and cfg is not None and 1 <= int(m.group(2)) <= len(cfg.experts):
            fn = self._critic if m.group(1) == "critic" else self._generator
            return partial(fn, int(m.group(2)) - 1)
        raise AttributeError(name)

    # -- the subinterval of phase k ----------------------------------------------------------------
    def _steps(self, k: int) -> tuple[int, int]:
        """[first, last] step indices of phase k."""
        first = first_steps(self.cfg.experts)[k]
        return first, first + int(self.cfg.experts[k]) - 1

    def _end(self, student, k: int):
        """s: the time phase k's expert lands on (the next phase's first timestep), None = clean data."""
        _, last = self._steps(k)
        return student.timesteps[last + 1] if last + 1 < student.steps else None

    def _index_range(self, schedule, s) -> tuple[int, int]:
        """[lo, hi) of the 1000-step grid for t: t_range, and at least ``margin`` steps above s."""
        lo, hi = time_indices(schedule, self.cfg.t_range)
        if s is not None:
            above = int(torch.searchsorted(noise_grid(schedule), torch.as_tensor(float(s), dtype=torch.float64)))
            lo = max(lo, above + int(self.cfg.margin))
        return lo, hi

    def _diffuse(self, schedule, x_s, s, draws: Draws):
        """(x_t, t, x0*): x_s carried forward to t > s by the kernel q(x_t | x_s), and the fake score's
        regression target x0* = (x_t - sigma_t^2 eps / sigma_{t|s}) / a_t (sec. 3.3)."""
        lo, hi = self._index_range(schedule, s)
        t = noise_grid(schedule)[draws.randint(lo, hi)].to(x_s.device)
        a_t, s_t = schedule.alpha_sigma(t)
        a_s, s_s = (1.0, 0.0) if s is None else (float(v) for v in schedule.alpha_sigma(torch.as_tensor(s)))
        r = a_t / a_s
        sig = (s_t**2 - r**2 * s_s**2).clamp_min(1e-12).sqrt()
        eps = draws.randn_like(x_s)
        x_t = (bcast(r, x_s) * x_s + bcast(sig, x_s) * eps).to(x_s.dtype)
        # the same x0* with x_t substituted, finite where a_t = 0 (flow's t = 1, a zero-terminal-SNR VP end)
        x0_star = (x_s / a_s - bcast(a_t * s_s**2 / (a_s**2 * sig), x_s) * eps).to(x_s.dtype)
        return x_t, t, x0_star

    def _rollout(self, student, cond, draws: Draws, j: torch.Tensor, k: int):
        """(x0 at step j with gradient, x_s: its DDIM jump to the phase's end s (x0 where s is clean), no graph)."""
        x0, x_j = student.sample(draws.noise(), cond, grad_at=j, renoise=draws.randn_like, with_input=True)
        s = self._end(student, k)
        if s is None:
            return x0, x0.detach()
        with torch.no_grad():
            return x0, student.ddim_to(x_j, x0.detach(), student.timesteps[j.to(student.timesteps.device)], s)

    # -- phases ----------------------------------------------------------------------------------
    def _critic(self, k: int, nets: Nets, batch: dict) -> dict:
        cond, draws, student = batch.get("cond"), Draws(batch), nets.student
        _, last = self._steps(k)
        with torch.no_grad():
            _, x_s = self._rollout(student, cond, draws, torch.full((draws.n,), last), k)
        fake = getattr(nets, f"fake_score_{k + 1}")
        x_t, t, x0_star = self._diffuse(fake.schedule, x_s, self._end(student, k), draws)
        return {"fake_dsm": dsm_error(fake.schedule, fake(x_t, t, cond), x0_star, x_t, t, self.cfg.fake_loss)}

    def _generator(self, k: int, nets: Nets, batch: dict) -> dict:
        c, cond, draws, student = self.cfg, batch.get("cond"), Draws(batch), nets.student
        self.expert_start.setdefault(k, self.iteration)  # this expert's first iteration (its LR warm-up)
        first, last = self._steps(k)
        j = first + draws.randint(0, last - first + 1)
        x0, x_s = self._rollout(student, cond, draws, j, k)
        teacher, fake = nets.teacher, getattr(nets, f"fake_score_{k + 1}")
        with torch.no_grad():
            x_t, t, _ = self._diffuse(teacher.schedule, x_s, self._end(student, k), draws)
            real_x0 = (guided(teacher, c.guidance) if cond is not None else teacher)(x_t, t, cond)
            g = torch.nan_to_num((fake(x_t, t, cond) - real_x0) / per_sample(mean_abs(x0 - real_x0), x0))
        return {"dmd": target_loss(x0, g), "_dmd_grad_norm": g.flatten(1).norm(dim=1)}


__all__ = ["PhasedDMD"]

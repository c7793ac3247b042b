"""Hyper-SD's trajectory segmented consistency distillation (Ren et al., 2024, "Hyper-SD: Trajectory
Segmented Consistency Model for Efficient Image Synthesis", sec. 3.1, TSCD), without its human-feedback
rewards (their models are downloaded); its one-step score distillation (sec. 3.3) as an option.

Stages: the time axis is cut into k segments, k = 8, 4, 2, 1 in turn (``segments``), each stage
``iterations_per_stage`` iterations long (the last running on), or each its share of the run
(``stage_shares``, ``stages.py``), the student carried from one stage to the next. In a stage
the student is trained to be consistent within each segment only, mapping x_t to the segment's lower
end s along the teacher's ODE, as multistep / phased consistency models do:

    n ~ U{0..N-1} on the teacher's N-step grid, t = t_n;  s = the lower end of t's segment
    x_t = alpha_t x0 + sigma_t eps
    t' = max(t_{n+1}, s);  x^_{t'} = Phi(x_t, t, t'; teacher)                 (one solver step, CFG w)
    L = d(f_theta(x_t, t, s), f_theta^-(x^_{t'}, t', s)),  the target x^_s itself where t' = s

f(x, t, s) is the DDIM jump of the student's x0 estimate to s (``Student.jump``; the x0 estimate
at a clean s), so f(x_s, s, s) = x_s. theta^- is an EMA of the student (decay ``target_ema``; 0 = the
student under stop-gradient). The k segments of a stage are the k-step index-uniform grid (k = 4:
999, 749, 499, 249, clean); the student samples deterministically on its own K steps (``ddim``),
K = the last stage's k by default.

``dmd_weight`` > 0 adds, in the last stage only, the distribution-matching term of DMD (Yin et al.,
2024, eq. 7-8; Hyper-SD sec. 3.3 for one-step generation) on the student's own samples x = G(z):
g = (fake_x0(x_t) - real_x0(x_t)) / mean|x - real_x0(x_t)|, weight * 0.5 mean((x - sg(x - g))^2), with
a fake score (a copy of the teacher) trained by denoising score matching in a critic phase that starts
with the last stage (``critic.py``).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from ..denoisers import guided
from ..errors import UserError
from ..fake_score import real_score
from ..sampling import SAMPLERS, teacher_step
from ..schedules import bcast
from .base import Nets, Objective, Phase, register
from .common import Draws, ema_update, mean_abs, per_sample, pseudo_huber, sample_student, target_loss
from .critic import CriticConfig, build_critic, check_critic, dsm_loss
from .stages import share_bounds, stage_at


@register
class HyperSD(Objective):
    name = "hyper_sd"
    uses_real_data = True  # x_t is noised data

    @dataclass
    class Config(CriticConfig):
        segments: List[int] = field(default_factory=lambda: [8, 4, 2, 1])  # k per stage (Hyper-SD: 8 -> 4 -> 2 -> 1)
        iterations_per_stage: int = 500
        stage_shares: Optional[List[float]] = None  # the stages as shares of the run instead (e.g. [1, 1, 1, 3]):
                                        # each ends where the run's progress reaches its cumulative share
                                        # (stages.py), so every stage runs on a slower machine too
        solver: str = "ddim"
        teacher_steps: int = 32         # N: the teacher grid, a multiple of every k so segment ends lie on it
        target_ema: float = 0.0         # 0 = stop-gradient student; > 0 an EMA target (LCM: 0.95)
        loss: str = "l2"                # "l2" or "pseudo_huber"
        guidance: float = 1.0
        dmd_weight: float = 0.0         # > 0: the last stage adds DMD's distribution-matching term (sec. 3.3)
        dmd_t_range: List[float] = field(default_factory=lambda: [0.02, 0.98])  # its times (grid fractions)

    def __init__(self, cfg=None):
        super().__init__(cfg)
        c = self.cfg
        if not c.segments or any(k < 1 for k in c.segments) or list(c.segments) != sorted(c.segments, reverse=True):
            raise UserError(f"hyper_sd: segments must be a non-increasing list of counts >= 1 (e.g. [8, 4, 2, 1]), "
                            f"got {list(c.segments)}")
        if any(c.teacher_steps % k for k in c.segments):
            raise UserError(f"hyper_sd: teacher_steps={c.teacher_steps} must be a multiple of every segment count "
                            f"{list(c.segments)} (segment ends on the teacher grid), e.g. 32")
        if c.solver not in SAMPLERS:
            raise UserError(f"hyper_sd: solver {c.solver!r} is unknown; use one of {', '.join(SAMPLERS)}")
        if c.iterations_per_stage < 1 or not 0.0 <= c.target_ema < 1.0 or c.loss not in ("l2", "pseudo_huber"):
            raise UserError("hyper_sd: need iterations_per_stage >= 1, target_ema in [0, 1) and loss 'l2' or "
                            "'pseudo_huber'")
        if c.dmd_weight < 0:
            raise UserError(f"hyper_sd: dmd_weight must be >= 0, got {c.dmd_weight}")
        check_critic(c)
        if c.gan_weight > 0:
            raise UserError("hyper_sd: the score-distillation stage has no GAN term; set gan_weight=0")
        self.bounds = share_bounds(c.stage_shares, len(c.segments), "stage_shares", "stage (one per entry of segments)")
        self.iteration = 0
        self.shared_stage = 0  # the stage reached, with stage_shares

    @property
    def last_stage_start(self) -> int:
        return self.cfg.iterations_per_stage * (len(self.cfg.segments) - 1)

    def phases(self):
        if self.cfg.dmd_weight == 0:
            return [Phase("generator", ("student",))]
        # the critic joins with the last stage: at its share of the run, or its first iteration (0 with one stage)
        start = {"start_fraction": self.bounds[-1]} if self.bounds else {"start": self.last_stage_start}
        return [Phase("critic", ("fake_score",), repeats=self.cfg.critic_repeats, **start),
                Phase("generator", ("student",))]

    def set_progress(self, progress: float) -> None:
        """With stage_shares: the stage moves on when the run's progress, told before each iteration (the
        value the trainer starts the critic's phase by), reaches the stage's cumulative share."""
        if self.bounds is not None:
            self.shared_stage = stage_at(self.bounds, progress, self.shared_stage)

    def student_steps(self):
        return int(self.cfg.segments[-1])

    def student_sampler(self):
        return "ddim"

    @property
    def stage(self) -> int:
        if self.bounds is not None:
            return self.shared_stage
        return min(self.iteration // self.cfg.iterations_per_stage, len(self.cfg.segments) - 1)

    def build(self, teacher, student, context=None):
        if getattr(student, "sampler", None) != "ddim":
            raise UserError("hyper_sd: the student samples deterministically; set student.sampler=ddim")
        nets = build_critic(self.cfg, teacher) if self.cfg.dmd_weight > 0 else {}
        if self.cfg.target_ema > 0.0:
            nets["target"] = copy.deepcopy(student).requires_grad_(False).eval()
        return nets

    def on_step_end(self, nets: Nets, step: int) -> None:
        target = nets.get("target") if nets is not None else None
        if target is not None:
            with torch.no_grad():
                ema_update(target, nets.student, float(self.cfg.target_ema))
        self.iteration = step  # iterations done (the trainer passes its step count)

    def state_dict(self):
        return {"iteration": self.iteration, "stage": self.shared_stage, "bounds": self.bounds}

    def load_state_dict(self, state):
        """Refuses a resume whose stage_shares moved the stages (``--allow-changes``): the stage reached is
        kept, but the trainer keys the critic's start by its fraction, so the critic would wait for the new
        last share while the student already trains the last stage without it."""
        saved = state.get("bounds", self.bounds)
        if saved != self.bounds and int(state.get("iteration", 0)) > 0:
            raise UserError(f"hyper_sd: objective.stage_shares moves the stages of a run that has begun (its stages "
                            f"ended at progress {saved}, now {self.bounds}); keep the run's stage_shares, or "
                            "start a new run in another output_dir")
        self.iteration = int(state.get("iteration", 0))
        self.shared_stage = int(state.get("stage", 0))

    def segment_end(self, schedule, t: torch.Tensor, k: int) -> torch.Tensor:
        """The lower end of t's segment when the axis is cut into k index-uniform segments."""
        from ..export.scheduler import student_timesteps

        starts = student_timesteps(schedule, k, sampler="ddim").to(t.device)
        ends = torch.cat([starts[1:], starts.new_tensor([float(schedule.t_clean)])])
        i = ((starts[None, :] >= t.reshape(-1, 1)).sum(1) - 1).clamp_min(0)
        return ends[i]

    def generator_loss(self, nets: Nets, batch: dict) -> dict[str, torch.Tensor]:
        student, x, cond = nets.student, batch["x0"], batch.get("cond")
        sched, draws = student.schedule, Draws(batch)
        grid = sched.timesteps(self.cfg.teacher_steps).to(x.device)
        n = draws.randint(0, self.cfg.teacher_steps).to(x.device)
        t = grid[n]
        s = self.segment_end(sched, t, int(self.cfg.segments[self.stage]))
        t_prev = torch.maximum(grid[n + 1], s)
        x_t = draws.noised(sched, x, t)
        f = student.jump(x_t, t, s, cond)
        with torch.no_grad():
            x_prev = teacher_step(self.cfg.solver, guided(nets.teacher, self.cfg.guidance), x_t, t, t_prev, cond)
            target_net = nets.get("target")
            target_net = student if target_net is None else target_net
            target = target_net.jump(x_prev, t_prev, s, cond)
            target = torch.where(bcast(t_prev == s, x).bool(), x_prev.to(target.dtype), target)
        d = (f - target).square().flatten(1).mean(1) if self.cfg.loss == "l2" else pseudo_huber(f, target)
        out = {"loss": d, "_segments": torch.full_like(d, float(self.cfg.segments[self.stage]))}
        if self.cfg.dmd_weight > 0 and self.stage == len(self.cfg.segments) - 1:
            out["dmd"] = self.cfg.dmd_weight * self._dmd(nets, cond, draws)
        return out

    def _dmd(self, nets: Nets, cond, draws: Draws) -> torch.Tensor:
        """DMD eq. 7-8 on the student's own samples (Hyper-SD sec. 3.3)."""
        x = sample_student(nets.student, cond, draws)
        real = real_score(nets)
        with torch.no_grad():
            t = draws.times(real.schedule, self.cfg.dmd_t_range)
            x_t = draws.noised(real.schedule, x, t)
            real_x0 = guided(real, self.cfg.guidance)(x_t, t, cond)
            g = torch.nan_to_num((nets.fake_score(x_t, t, cond) - real_x0) / per_sample(mean_abs(x - real_x0), x))
        return target_loss(x, g)

    def critic_loss(self, nets: Nets, batch: dict) -> dict[str, torch.Tensor]:
        """The fake score's denoising score matching on the student's detached samples (DMD sec. 3.2)."""
        cond, draws = batch.get("cond"), Draws(batch)
        x = sample_student(nets.student, cond, draws, grad=False)
        return {"fake_dsm": dsm_loss(self.cfg, nets.fake_score, x, cond, draws)[0]}


__all__ = ["HyperSD"]

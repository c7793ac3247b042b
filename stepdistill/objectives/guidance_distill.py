"""Guidance distillation (Meng et al., 2023, "On Distillation of Guided Diffusion Models", sec. 3):
a student that takes the CFG scale w as an input does in one pass what the teacher does in two, then
halves its step count by progressive distillation with w passed in every round.

Stage 1 (sec. 3.1, eq. 6): for w ~ U[w_min, w_max], t uniform over the teacher's 1000-step grid and
z_t noised data, the student's x0 estimate x^_eta(z_t, w) regresses onto the guided teacher's
x^_w(z_t) = x^_u + w (x^_c - x^_u) (the usual CFG scale w; the paper's (1 + w) x^_c - w x^_u is
w_paper = w - 1), the x0 error weighted by max(SNR, 1) (Salimans & Ho, 2022, sec. 4), for
``stage1_iterations`` iterations.

Stage 2 (sec. 3.2): progressive distillation (Salimans & Ho, 2022, Alg. 2) from ``start_steps``
DDIM steps down to ``final_steps``, ``iterations_per_round`` each: per iteration a fresh w ~ U[w_min,
w_max] for both the round's teacher (stage 1's student, then the previous round's) and the student,
whose one DDIM step must land on the teacher's two (``pd_target``). The student samples by DDIM.

The w input is diffusers' guidance-scale embedding of w - 1 (``student.time_cond_proj_dim``): the
``timestep_cond`` of a UNet2DConditionModel with ``time_cond_proj_dim``, the one StableDiffusionPipeline
feeds from its ``guidance_scale`` and then runs a single pass; for a class-conditional UNet2DModel, an
MLP of the same features added to its class embedding (``guided_unet``), which the exported
StepDistillPipeline feeds from its ``guidance_scale``. Either way the exported student takes the CFG
scale at call time.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from ..denoisers import guided
from ..errors import UserError
from ..generator import cond_proj_dim, guidance_embedding
from .base import Nets, Objective, register
from .common import Draws, copy_into, grid_with_midpoints, pd_target, snr_weight, student_grid


@register
class GuidanceDistill(Objective):
    name = "guidance_distill"
    uses_real_data = True  # z_t is noised data

    @dataclass
    class Config:
        w_min: float = 1.0                # CFG scale range (Meng et al.'s w in [0, 4] is a scale of 1 to 5)
        w_max: float = 5.0
        stage1_iterations: int = 1000
        start_steps: int = 16             # stage 2: DDIM steps of its first teacher (stage 1's student)
        final_steps: int = 4
        iterations_per_round: int = 500
        weighting: str = "truncated_snr"  # max(SNR, 1) on the x0 error, or "snr_plus_one"

    def __init__(self, cfg=None):
        super().__init__(cfg)
        c = self.cfg
        ratio = c.start_steps // max(c.final_steps, 1)
        if c.final_steps < 1 or c.start_steps < c.final_steps or c.start_steps % c.final_steps or ratio & (ratio - 1):
            raise UserError(f"guidance_distill: start_steps / final_steps must be a power of two >= 1, got "
                            f"{c.start_steps} / {c.final_steps}; e.g. start_steps=16 final_steps=4")
        if not 1.0 <= c.w_min <= c.w_max:
            raise UserError(f"guidance_distill: need 1 <= w_min <= w_max, got w_min={c.w_min}, w_max={c.w_max}")
        if c.stage1_iterations < 0 or c.iterations_per_round < 1 or c.weighting not in ("truncated_snr", "snr_plus_one"):
            raise UserError("guidance_distill: need stage1_iterations >= 0, iterations_per_round >= 1 and weighting "
                            "'truncated_snr' or 'snr_plus_one'")
        self.rounds = [c.start_steps >> r for r in range(1, ratio.bit_length())]  # stage 2's student step counts
        self.iteration = 0  # outer iterations done in all
        self._w_dim = None

    def student_steps(self):
        return int(self.cfg.final_steps)

    def student_sampler(self):
        return "ddim"

    def stage(self) -> tuple[int, int]:
        """(round, iteration within it): round -1 is stage 1; rounds 0.. are stage 2's halvings."""
        c = self.cfg
        if self.iteration < c.stage1_iterations:
            return -1, self.iteration
        r, i = divmod(self.iteration - c.stage1_iterations, c.iterations_per_round)
        return (r, i) if r < len(self.rounds) else (len(self.rounds) - 1, c.iterations_per_round + i)

    def build(self, teacher, student, context=None):
        if not teacher.is_conditional:
            raise UserError("guidance_distill: classifier-free guidance needs a conditional teacher")
        self._w_dim = cond_proj_dim(student)
        if self._w_dim is None:
            raise UserError("guidance_distill: the student needs a w input; set student.time_cond_proj_dim=256 (a "
                            "UNet2DConditionModel teacher such as SD or SDXL, or a class-conditional UNet2DModel)")
        if not torch.equal(student.timesteps.cpu(), student_grid(student.schedule, self.cfg.final_steps)[:-1]):
            raise UserError(f"guidance_distill: build the student with steps={self.cfg.final_steps} and sampler ddim")
        return {"gd_teacher": copy.deepcopy(student).requires_grad_(False).eval()}  # stage 2's round teacher

    def on_step_end(self, nets: Nets, step: int) -> None:
        self.iteration += 1
        c = self.cfg
        done = self.iteration - c.stage1_iterations
        if done >= 0 and done % c.iterations_per_round == 0 and done // c.iterations_per_round < len(self.rounds):
            copy_into(nets.gd_teacher, nets.student)  # stage 1's end, then each round's: the next round's teacher

    def state_dict(self):
        return {"iteration": self.iteration}

    def load_state_dict(self, state):
        self.iteration = int(state.get("iteration", 0))

    def with_w(self, cond, w: torch.Tensor) -> dict:
        return {**(cond or {}), "timestep_cond": guidance_embedding(w, self._w_dim).to(w.device)}

    def generator_loss(self, nets: Nets, batch: dict) -> dict[str, torch.Tensor]:
        c, x, cond = self.cfg, batch["x0"], batch.get("cond")
        schedule, draws = nets.student.schedule, Draws(batch)
        w = (c.w_min + (c.w_max - c.w_min) * draws.rand()).to(x.device)
        r, _ = self.stage()
        if r < 0:  # stage 1: match the guided teacher at w in one pass
            t = draws.times(schedule, (0.0, 1.0))
            z = draws.noised(schedule, x, t)
            with torch.no_grad():
                target = guided(nets.teacher, w)(z, t, cond)
        else:      # stage 2: one student DDIM step onto two of the round's teacher, both at w
            grid, mid = (v.to(x.device) for v in grid_with_midpoints(schedule, self.rounds[r]))
            i = draws.randint(0, self.rounds[r]).to(x.device)
            t = grid[i]
            z = draws.noised(schedule, x, t)
            with torch.no_grad():
                target = pd_target(nets.gd_teacher.denoise, schedule, z, t, mid[i], grid[i + 1], self.with_w(cond, w))
        x_hat = nets.student.denoise(z, t, self.with_w(cond, w))
        err = (x_hat - target.to(x_hat.dtype)).square().flatten(1).mean(1)
        weight = snr_weight(schedule, t, c.weighting).to(err.dtype)
        return {"loss": weight * err, "_x0_mse": err.detach(),
                "_student_steps": torch.full_like(err, float(self.rounds[r]) if r >= 0 else 0.0)}


__all__ = ["GuidanceDistill"]

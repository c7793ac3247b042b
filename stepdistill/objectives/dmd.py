"""Distribution Matching Distillation: DMD (Yin et al., 2024) and DMD2 (Yin et al., 2024b).

Per outer iteration (DMD2 Alg. 1; tianweiy/DMD2 main/guidance.py):
  critic    x = sg(G(z)); the fake score learns p_fake by denoising score matching on x, DMD2's
            ``critic_repeats`` times per generator update (two time-scale rule, sec. 4.2), with
            optional GAN classifier on its bottleneck against real images (sec. 4.3)  [critic.py]
  generator x = G(z); x_t = alpha_t x + sigma_t eps, t ~ U[t_range];
            g = (fake_x0(x_t) - real_x0(x_t)) / mean|x - real_x0(x_t)|   (eq. 7-8)
            L = 0.5 mean((x - sg(x - g))^2)                 (gradient g / (C H W) per sample, the
            mean-reduced form of the authors' code, so their learning rates carry over)
            + regression_weight * d(G(z_ref), x_ref)         (DMD eq. 9; off in DMD2) [regression.py]
            + gan_weight * softplus(-D(x))                    (DMD2 eq. 4)
Multi-step students train with backward simulation (DMD2 sec. 4.5). ``regression_warmup`` first
runs a phase that trains the generator on the regression loss alone (DMD2's one-step SDXL recipe);
the generator phase then starts with fresh optimizer moments, as the authors' DMD2 run starts from the
pretrained weights alone (tianweiy/DMD2 --ckpt_only_path: checkpoints without optimizer states).

Guidance (all on the real score): a fixed CFG scale; a per-sample scale uniform in
``guidance_range`` (SNOOPI's random-scale guidance, Nguyen et al., 2024); and Decoupled DMD (Liu
et al., 2025): the CFG-augmentation term (w - 1)(real_c - real_u) and the distribution-matching
term (real_c - fake) evaluated at independent times drawn from their own ranges.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch

from ..denoisers import GuidedDenoiser
from ..errors import UserError
from ..fake_score import real_score
from .base import Nets, Objective, Phase, register
from .common import Draws, guidance_scales, guides, mean_abs, per_sample, sample_student, target_loss
from .critic import (CriticConfig, build_critic, check_critic, critic_trains, dsm_loss, gan_critic_terms,
                     gan_generator_term)
from .regression import Regression, RegressionConfig


def dmd_gradient(x: torch.Tensor, real_x0: torch.Tensor, fake_x0: torch.Tensor) -> torch.Tensor:
    """DMD eq. 7-8: (fake - real) normalised per sample by mean|x - real| (the paper's
    sigma^2/alpha * CS / ||mu_real - x||_1 weight times the score difference alpha(real - fake)/sigma^2);
    non-finite entries become 0, as DMD2's nan_to_num (sd_guidance.py compute_distribution_matching_loss)."""
    return torch.nan_to_num((fake_x0 - real_x0) / per_sample(mean_abs(x - real_x0), x))


@register
class DMD(Objective):
    name = "dmd"

    @dataclass
    class Config(CriticConfig, RegressionConfig):
        guidance: float = 1.0                          # teacher CFG scale in the real score
        guidance_range: Optional[List[float]] = None   # [w_min, w_max]: a scale per sample (SNOOPI); None = fixed
        t_range: List[float] = field(default_factory=lambda: [0.02, 0.98])  # DM term times (fractions of noise range)
        cfg_t_range: Optional[List[float]] = None      # Decoupled DMD: the CFG-augmentation term's own range
        backward_simulation: bool = True               # multi-step students (DMD2 sec. 4.5)
        regression_weight: float = 0.25                # DMD eq. 9, lambda_reg; 0 = off (DMD2)

    def __init__(self, cfg=None):
        super().__init__(cfg)
        c = self.cfg
        check_critic(c)
        if c.gan_form != "dmd2":
            raise UserError(f"objective {self.name}: gan_form {c.gan_form!r} is SiD's; DMD's GAN term is 'dmd2'")
        if c.guidance_range is not None and (len(c.guidance_range) != 2 or c.guidance_range[0] > c.guidance_range[1]):
            raise UserError(f"objective.guidance_range must be [w_min, w_max] with w_min <= w_max, got "
                            f"{list(c.guidance_range)}")
        self.regression = Regression(c, c.regression_weight)
        self.uses_real_data = c.gan_weight > 0

    # -- contract -------------------------------------------------------------------------------
    def needs_cache(self) -> bool:
        return self.regression.on

    def phases(self):
        # the warm-up hands the generator on with fresh optimizer moments (Phase.fresh_moments_after):
        # DMD2's authors pretrain the regression in a run of its own and load only its weights
        w, f = self.cfg.regression_warmup, self.cfg.regression_warmup_fraction
        if f is not None:  # the warm-up as a share of the run (Phase.stop_fraction)
            return [Phase("warmup", ("student",), stop_fraction=f, fresh_moments_after=True),
                    Phase("critic", critic_trains(self.cfg), repeats=self.cfg.critic_repeats, start_fraction=f),
                    Phase("generator", ("student",), start_fraction=f)]
        warm = [Phase("warmup", ("student",), stop=w, fresh_moments_after=True)] if w else []
        return warm + [Phase("critic", critic_trains(self.cfg), repeats=self.cfg.critic_repeats, start=w),
                       Phase("generator", ("student",), start=w)]

    def build(self, teacher, student, context=None):
        self.regression.prepare(teacher, student, context)
        return build_critic(self.cfg, teacher)

    # -- the distribution-matching gradient ------------------------------------------------------
    def dm_terms(self, nets: Nets, x: torch.Tensor, cond, draws: Draws | None = None) -> tuple[torch.Tensor, dict]:
        """The DMD gradient g w.r.t. the student's samples x (no graph), and what to log."""
        c, draws = self.cfg, draws or Draws({"x0": x})
        real, fake = real_score(nets), nets.fake_score
        w = guidance_scales(c.guidance, c.guidance_range, draws) if cond is not None else 1.0
        with torch.no_grad():
            t = draws.times(real.schedule, c.t_range)
            x_t = draws.noised(real.schedule, x, t)
            fake_x0 = fake(x_t, t, cond)
            if c.cfg_t_range is None:
                real_x0 = GuidedDenoiser(real, w)(x_t, t, cond) if guides(w) else real(x_t, t, cond)
                return dmd_gradient(x, real_x0, fake_x0), {}
            # Decoupled DMD: DM term (fake - real_c) at t, CA term -(w-1)(real_c - real_u) at its own t'
            real_c = real(x_t, t, cond)
            g_dm = dmd_gradient(x, real_c, fake_x0)
            t2 = draws.times(real.schedule, c.cfg_t_range)
            x_t2 = draws.noised(real.schedule, x, t2)
            d_u, d_c = real(x_t2, t2, real.null_cond(cond)), real(x_t2, t2, cond)
            g_ca = -(per_sample(w, x) - 1.0) * (d_c - d_u) / per_sample(mean_abs(x - d_c), x)
            return g_dm + g_ca, {"_ca_norm": g_ca.flatten(1).norm(dim=1), "_dm_norm": g_dm.flatten(1).norm(dim=1)}

    # -- phases ----------------------------------------------------------------------------------
    def warmup_loss(self, nets: Nets, batch: dict) -> dict:
        """``regression_warmup`` iterations: the regression loss alone, weight 1 (DMD2's one-step
        regression pretraining), the critic waiting."""
        return {"regression": self.regression.term(real_score(nets), nets.student, batch["x0"], Draws(batch), 1.0)}

    def critic_loss(self, nets: Nets, batch: dict) -> dict:
        c, cond, draws = self.cfg, batch.get("cond"), Draws(batch)
        x = sample_student(nets.student, cond, draws, backward_simulation=c.backward_simulation, grad=False)
        out = {"fake_dsm": dsm_loss(c, nets.fake_score, x, cond, draws)[0]}
        if c.gan_weight > 0:
            out.update(gan_critic_terms(c, nets, x, batch.get("x0"), cond, draws))
        return out

    def generator_loss(self, nets: Nets, batch: dict) -> dict:
        c, cond, draws = self.cfg, batch.get("cond"), Draws(batch)
        x = sample_student(nets.student, cond, draws, backward_simulation=c.backward_simulation)
        g, logs = self.dm_terms(nets, x, cond, draws)
        out = {"dmd": target_loss(x, g), "_dmd_grad_norm": g.flatten(1).norm(dim=1), **logs}
        if c.regression_weight > 0:
            out["regression"] = self.regression.term(real_score(nets), nets.student, x, draws)
        if c.gan_weight > 0:
            out["gan_g"] = gan_generator_term(c, nets, x, cond, draws)
        return out


@register
class DMD2(DMD):
    """DMD2 (Yin et al., 2024b): no regression loss, critic updated 5 times per generator update,
    optional GAN term through the fake score's bottleneck."""

    name = "dmd2"

    @dataclass
    class Config(DMD.Config):
        critic_repeats: int = 5
        regression_weight: float = 0.0
        gan_weight: float = 3e-3


__all__ = ["DMD", "DMD2", "dmd_gradient"]

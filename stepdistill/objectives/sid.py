"""Score identity Distillation: SiD (Zhou et al., 2024) and its few-step and guided variants.

Generator loss (SiD, eq. for L_theta with alpha; the official training/sid_loss.py):
    (1 - alpha) ||f_phi - f_psi||^2 + (f_phi - f_psi)^T (f_psi - x_g),
with f_phi the teacher's and f_psi the fake score's x0-predictions at x_t = a x_g + sigma eps, both
differentiated through x_g (unlike DMD, the networks' Jacobians are part of the gradient), divided
per sample by sg(mean|x_g - f_phi|) and summed over pixels (mean over the batch).
Fake-score loss: denoising score matching on detached generator samples (EDM's weighted loss in
the original; here the teacher's own parameterisation, ``fake_loss``).
Few-step (Zhou et al., 2025): the generator's outputs at all K steps form a uniform mixture that is
matched to the data; each sample takes one of the K steps at random (``student_sample``).
Guidance (SiD-LSG, Zhou et al., 2025, sec. on guidance): "cfg" -- teacher with CFG scale
``guidance``; "zero_cfg" -- teacher without CFG and the fake score trained and evaluated without
the condition; "anti_cfg" -- teacher without CFG and the fake score evaluated with CFG scale
``fake_guidance`` (< 1, i.e. pushed away from the condition).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch

from ..denoisers import GuidedDenoiser
from ..errors import UserError
from ..fake_score import DEFAULT_LORA_TARGETS, frozen, real_score, sample_times
from ..schedules import bcast
from .base import Nets, register
from .dmd import DMD, RegressionPairs, cfg_scales, mean_abs, noise_like_batch, student_sample

GUIDANCE_MODES = ("cfg", "zero_cfg", "anti_cfg")


def sid_generator_loss(x_g: torch.Tensor, f_phi: torch.Tensor, f_psi: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-sample SiD generator loss: sum over pixels of (f_phi - f_psi) * ((f_phi - x_g) - alpha (f_phi - f_psi))
    / sg(mean|x_g - f_phi|), which expands to the (1 - alpha)||.||^2 + (.)^T(f_psi - x_g) form."""
    weight = bcast(mean_abs((x_g - f_phi).detach()), x_g)
    d = f_phi - f_psi
    return (d * ((f_phi - x_g) - alpha * d) / weight).flatten(1).sum(1)


@register
class SiD(DMD):
    """SiD reuses DMD's critic phase (fake-score DSM, optional GAN classifier) and fake score."""

    name = "sid"

    @dataclass
    class Config(RegressionPairs):  # the pairs serve only ``regression_warmup`` (DMD2's one-step initialisation)
        alpha: float = 1.2                             # SiD's alpha (1.2 in the paper's experiments)
        t_range: List[float] = field(default_factory=lambda: [0.0, 0.8])  # SiD's tmax = 800 of 1000
        guidance: float = 1.0                          # teacher CFG scale ("cfg" mode)
        guidance_range: Optional[List[float]] = None   # per-sample scale range (SNOOPI); None = fixed
        guidance_mode: str = "cfg"                     # "cfg" | "zero_cfg" | "anti_cfg" (SiD-LSG)
        fake_guidance: float = -1.0                    # fake score's CFG scale under "anti_cfg"
        fake_lora_rank: int = 0
        fake_lora_alpha: Optional[float] = None
        fake_target_modules: List[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
        fake_loss: str = "raw"
        critic_repeats: int = 1                        # SiD alternates one fake and one generator update
        backward_simulation: bool = True               # few-step: uniform mixture over the K steps
        gan_weight: float = 0.0                        # SiDA-style GAN add-on through the fake score; 0 = off
        gan_critic_weight: float = 1e-2
        gan_loss: str = "ns"
        r1_weight: float = 0.0
        r1_noise: float = 0.01
        feature_module: str = "auto"
        disc_t_range: List[float] = field(default_factory=lambda: [0.02, 0.98])

    def __init__(self, cfg=None):
        super().__init__(cfg)
        if self.cfg.guidance_mode not in GUIDANCE_MODES:
            raise UserError(f"objective.guidance_mode {self.cfg.guidance_mode!r} is not supported; use one of "
                            f"{', '.join(GUIDANCE_MODES)}")

    def fake_cond(self, nets, cond):
        # Zero-CFG: the fake score never sees the condition (trained and evaluated unconditionally)
        if self.cfg.guidance_mode == "zero_cfg" and cond is not None:
            return nets.fake_score.null_cond(cond)
        return cond

    def scores(self, nets: Nets, x_t, t, cond):
        """(f_phi, f_psi) at x_t, with gradients to x_t."""
        c = self.cfg
        real, fake = real_score(nets), nets.fake_score
        if cond is None or c.guidance_mode != "cfg":
            f_phi = real(x_t, t, cond)
        else:
            w = cfg_scales(c, x_t.shape[0], x_t.device)
            f_phi = GuidedDenoiser(real, w)(x_t, t, cond) if (torch.is_tensor(w) or w != 1.0) else real(x_t, t, cond)
        if c.guidance_mode == "anti_cfg" and cond is not None:
            f_psi = GuidedDenoiser(fake, c.fake_guidance)(x_t, t, cond)
        else:
            f_psi = fake(x_t, t, self.fake_cond(nets, cond))
        return f_phi, f_psi

    def generator_loss(self, nets: Nets, batch: dict) -> dict:
        c = self.cfg
        cond = batch.get("cond")
        if (warm := self.warmup_loss(nets, batch)) is not None:  # optional; not in SiD (DMD2's recipe)
            return warm
        x_g = student_sample(nets.student, noise_like_batch(batch), cond, backward_simulation=c.backward_simulation)
        t = sample_times(nets.fake_score.schedule, x_g.shape[0], c.t_range, device=x_g.device)
        x_t = nets.fake_score.schedule.add_noise(x_g, torch.randn_like(x_g), t)
        with frozen(nets.fake_score):
            f_phi, f_psi = self.scores(nets, x_t, t, cond)
        out = {"sid": sid_generator_loss(x_g, f_phi, f_psi, c.alpha),
               "_score_gap": (f_phi - f_psi).detach().flatten(1).norm(dim=1)}
        if c.gan_weight > 0:
            out["gan_g"] = self.gan_generator_term(nets, x_g, cond)
        return out


__all__ = ["SiD", "sid_generator_loss"]

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
GAN add-on (``gan_weight`` > 0), in one of two forms. "dmd2": a classifier on the fake score's
features with passes of its own at times from ``disc_t_range`` (DMD2, sec. 4.3). "sida": SiDA
(Zhou et al., 2025, "Adversarial Score identity Distillation"): the classifier shares the fake
score's evaluations. In the critic phase it reads the features of the DSM's own noisy fake samples
and of real images noised with the same noise and time, its BCE weighted like one pixel of the DSM
loss (the DSM's x0 weight lambda(t) over the pixel count); in the generator phase it reads the features
of SiD's own x_t and its non-saturating loss joins the SiD loss per sample, times the pixel count and
over the same sg(mean|x_g - f_phi|), at weight ``gan_weight`` (SiDA: 1, the official 0.5/0.5 mix).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch

from ..denoisers import GuidedDenoiser
from ..errors import UserError
from ..fake_score import (DEFAULT_LORA_TARGETS, dsm_error, dsm_weight, find_module, forward_with_features, frozen,
                          real_score, sample_times)
from ..schedules import bcast
from . import gan
from .base import Nets, register
from .dmd import DMD, RegressionPairs, cfg_scales, mean_abs, noise_like_batch, student_sample

GUIDANCE_MODES = ("cfg", "zero_cfg", "anti_cfg")
GAN_FORMS = ("dmd2", "sida")


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
        fake_t: str = "train"                          # fake-score DSM times: the teacher's training distribution
                                                       # (SiD's sid_loss.py: EDM's log-normal); "dm" = t_range
        critic_repeats: int = 1                        # SiD alternates one fake and one generator update
        backward_simulation: bool = True               # few-step: uniform mixture over the K steps
        gan_weight: float = 0.0                        # GAN add-on through the fake score's features; 0 = off
        gan_form: str = "dmd2"                         # "dmd2": passes of its own; "sida": shares SiD's and the DSM's
        gan_critic_weight: float = 1e-2                # "dmd2": classifier term in the critic phase ("sida": 1 = SiDA's)
        gan_loss: str = "ns"
        r1_weight: float = 0.0                         # "dmd2" form only
        r1_noise: float = 0.01
        feature_module: str = "auto"
        disc_t_range: List[float] = field(default_factory=lambda: [0.02, 0.98])  # "dmd2" form only

    def __init__(self, cfg=None):
        super().__init__(cfg)
        c = self.cfg
        if c.guidance_mode not in GUIDANCE_MODES:
            raise UserError(f"objective.guidance_mode {c.guidance_mode!r} is not supported; use one of "
                            f"{', '.join(GUIDANCE_MODES)}")
        if c.gan_form not in GAN_FORMS:
            raise UserError(f"objective.gan_form {c.gan_form!r} is not supported; use one of {', '.join(GAN_FORMS)}")
        if self.sida and c.guidance_mode == "anti_cfg":
            raise UserError("objective.gan_form=sida reads the fake score's features on SiD's own evaluation, which "
                            "anti_cfg splits in two; use guidance_mode cfg or zero_cfg, or gan_form=dmd2")
        if self.sida and c.r1_weight > 0:
            raise UserError("objective.r1_weight applies to gan_form=dmd2; set r1_weight=0 with gan_form=sida")

    @property
    def sida(self) -> bool:
        """SiDA's GAN form is on."""
        return self.cfg.gan_weight > 0 and self.cfg.gan_form == "sida"

    def fake_cond(self, nets, cond):
        # Zero-CFG: the fake score never sees the condition (trained and evaluated unconditionally)
        if self.cfg.guidance_mode == "zero_cfg" and cond is not None:
            return nets.fake_score.null_cond(cond)
        return cond

    def scores(self, nets: Nets, x_t, t, cond):
        """(f_phi, f_psi, features) at x_t, with gradients to x_t; the features of the fake score's
        ``feature_module`` with the SiDA GAN form, else None."""
        c = self.cfg
        real, fake = real_score(nets), nets.fake_score
        if cond is None or c.guidance_mode != "cfg":
            f_phi = real(x_t, t, cond)
        else:
            w = cfg_scales(c, x_t.shape[0], x_t.device)
            f_phi = GuidedDenoiser(real, w)(x_t, t, cond) if (torch.is_tensor(w) or w != 1.0) else real(x_t, t, cond)
        if c.guidance_mode == "anti_cfg" and cond is not None:
            return f_phi, GuidedDenoiser(fake, c.fake_guidance)(x_t, t, cond), None
        if self.sida:
            return (f_phi, *forward_with_features(fake, find_module(fake, c.feature_module), x_t, t,
                                                  self.fake_cond(nets, cond)))
        return f_phi, fake(x_t, t, self.fake_cond(nets, cond)), None

    def critic_loss(self, nets: Nets, batch: dict) -> dict:
        if not self.sida:
            return super().critic_loss(nets, batch)
        # SiDA (Zhou et al., 2025): the classifier reads the fake score's features on the DSM's own noisy
        # fake samples and on real images noised with the same noise and time
        c, fs = self.cfg, nets.fake_score
        cond = batch.get("cond")
        fc = self.fake_cond(nets, cond)
        with torch.no_grad():
            x = student_sample(nets.student, noise_like_batch(batch), cond, backward_simulation=c.backward_simulation)
        sched = fs.schedule
        t = self.fake_times(sched, x.shape[0], x.device)
        eps = torch.randn_like(x)
        x_t = sched.add_noise(x, eps, t)
        mod = find_module(fs, c.feature_module)
        pred, f_fake = forward_with_features(fs, mod, x_t, t, fc)
        _, f_real = forward_with_features(fs, mod, sched.add_noise(batch["x0"], eps, t), t, fc, need_x0=False)
        real_logits, fake_logits = nets.disc(f_real, fc), nets.disc(f_fake, fc)
        # one pixel's worth of the DSM loss: its x0 weight lambda(t) over the pixel count
        w = dsm_weight(sched, t, x, c.fake_loss).to(x.dtype) / x[0].numel()
        return {"fake_dsm": dsm_error(sched, pred, x, x_t, t, c.fake_loss),
                "gan_d": c.gan_critic_weight * w * 0.5 * gan.d_loss(real_logits, fake_logits, c.gan_loss),
                "_d_real": real_logits.detach(), "_d_fake": fake_logits.detach()}

    def generator_loss(self, nets: Nets, batch: dict) -> dict:
        c = self.cfg
        cond = batch.get("cond")
        if (warm := self.warmup_loss(nets, batch)) is not None:  # optional; not in SiD (DMD2's recipe)
            return warm
        x_g = student_sample(nets.student, noise_like_batch(batch), cond, backward_simulation=c.backward_simulation)
        t = sample_times(nets.fake_score.schedule, x_g.shape[0], c.t_range, device=x_g.device)
        x_t = nets.fake_score.schedule.add_noise(x_g, torch.randn_like(x_g), t)
        with frozen(nets.fake_score, nets.get("disc")):
            f_phi, f_psi, feats = self.scores(nets, x_t, t, cond)
            out = {"sid": sid_generator_loss(x_g, f_phi, f_psi, c.alpha),
                   "_score_gap": (f_phi - f_psi).detach().flatten(1).norm(dim=1)}
            if self.sida:  # SiDA: on SiD's own x_t, per pixel like the SiD loss, over its normaliser
                logits = nets.disc(feats, self.fake_cond(nets, cond))
                scale = x_g[0].numel() / mean_abs((x_g - f_phi).detach())
                out["gan_g"] = c.gan_weight * scale * gan.g_loss(logits, c.gan_loss)
            elif c.gan_weight > 0:
                out["gan_g"] = self.gan_generator_term(nets, x_g, cond)
        return out


__all__ = ["SiD", "sid_generator_loss", "GAN_FORMS"]

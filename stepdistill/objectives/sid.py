"""Score identity Distillation: SiD (Zhou et al., 2024), its guided (SiD-LSG, Zhou et al., 2024b),
few-step (Zhou et al., 2025) and adversarial (SiDA, Zhou et al., 2025b) variants.

Per outer iteration (SiD Alg. 1; mingyuanzhou/SiD training/sid_loss.py, sid_training_loop.py):
  critic    x = sg(G(z)); the fake score f_psi learns p_G by denoising score matching at the
            teacher's training times (EDM SiD's log-normal; ``fake_t="dm"``: t ~ U[t_range], where the
            generator loss reads it, as SiD-LSG draws both from randint(tmin, tmax))         [critic.py]
  generator x_g = G(z); x_t = x_g + sigma eps, t ~ U[t_range] (tmax = 800 of the Karras grid);
            L = sum_pixels (f_phi - f_psi) ((f_phi - x_g) - alpha (f_phi - f_psi)) / sg(mean|x_g - f_phi|)
            i.e. (1 - alpha) ||f_phi - f_psi||^2 + (f_phi - f_psi)^T (f_psi - x_g), both scores
            differentiated through x_g (unlike DMD, their Jacobians are part of the gradient).
Few-step: each sample takes one of the K steps at random (a uniform mixture matched to the data).

Guidance: "cfg" is SiD-LSG's long and short guidance (SiD-LSG sid_training_loop.py): the teacher
evaluated with CFG scale ``guidance`` (kappa_4, cfg_eval_real), the fake score evaluated with
``fake_guidance`` (kappa_2 = kappa_3, cfg_eval_fake) and trained through its own CFG combination at
``fake_train_guidance`` (kappa_1, cfg_train_fake); with a guided fake score ``lsg_dropout`` (10 %) of
the conditions become the null one. "zero_cfg" and "anti_cfg" are from few-step SiD (Zhou et al.,
2025): the teacher without CFG and the fake score trained and evaluated without the condition, or
evaluated with a negative CFG scale ``fake_guidance``.

SiDA's GAN term (``gan_form="sida"``; sida branch, sida_loss.py and sida_training_loop.py): the
classifier is the fake score's own encoder, its output averaged over channels to a logit per location
(sida_networks.py; ``disc_head=learned`` puts a trained head on ``feature_module`` instead), read
from SiD's own evaluation at x_t; its non-saturating loss
on logits clamped to [-10, 10] is scaled per sample by C*H*W times the batch mean of
1 / mean|x_g - f_phi|, and joins the SiD loss as 0.5 * SiD + 0.5 * gan_weight * GAN. gan_weight =
lsg_gan / lsg = 0.01 / 100 = 1e-4 is the authors' ratio of the two loss scalings. The generator
waits ``generator_start`` iterations (SiDA: 100k images) while the critic trains, and the GAN
term joins at ``gan_start`` (SiDA: 200k images); SiDA runs alpha = 1.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch

from ..denoisers import guided
from ..errors import UserError
from ..fake_score import find_module, forward_with_features, frozen, real_score
from ..schedules import bcast
from . import gan
from .base import Nets, Objective, Phase, register
from .common import Draws, guidance_scales, mean_abs, sample_student
from .critic import (CriticConfig, build_critic, check_critic, classifier, critic_trains, dsm_loss, feature_name,
                     gan_critic_terms, gan_generator_term, sida_critic_terms)
from .regression import Regression, RegressionConfig

GUIDANCE_MODES = ("cfg", "zero_cfg", "anti_cfg")


def sid_generator_loss(x_g: torch.Tensor, f_phi: torch.Tensor, f_psi: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-sample SiD generator loss (sid_loss.py): sum over pixels of
    (f_phi - f_psi) * ((f_phi - x_g) - alpha (f_phi - f_psi)) / sg(mean|x_g - f_phi|)."""
    weight = bcast(mean_abs((x_g - f_phi).detach()), x_g)
    d = f_phi - f_psi
    return (d * ((f_phi - x_g) - alpha * d) / weight).flatten(1).sum(1)


@register
class SiD(Objective):
    name = "sid"

    @dataclass
    class Config(CriticConfig, RegressionConfig):  # the pairs serve only ``regression_warmup`` (not in SiD)
        alpha: float = 1.2                             # SiD's alpha (1.2; SiDA: 1)
        t_range: List[float] = field(default_factory=lambda: [0.0, 0.8])  # SiD's tmax = 800 of 1000
        guidance: float = 1.0                          # teacher's CFG scale (LSG kappa_4, cfg_eval_real)
        guidance_range: Optional[List[float]] = None   # per-sample teacher scale range (SNOOPI); None = fixed
        guidance_mode: str = "cfg"                     # "cfg" (SiD-LSG) | "zero_cfg" | "anti_cfg" (few-step SiD)
        fake_guidance: float = 1.0                     # fake score's CFG scale when evaluated (kappa_2; < 0: anti)
        fake_train_guidance: float = 1.0               # ... when trained (kappa_1, cfg_train_fake)
        lsg_dropout: float = 0.1                       # null-condition share when the fake score is guided
        fake_t: str = "train"                          # the teacher's training times (EDM SiD's sid_loss.py);
                                                       # "dm": uniform over t_range, where the generator loss
                                                       # reads the fake score (SiD-LSG); on EDM 25.1 vs 22.5
        backward_simulation: bool = True               # few-step: uniform mixture over the K steps
        gan_form: str = "sida"                         # "sida" (SiDA) | "dmd2" (a head with passes of its own)
        gan_critic_weight: float = 1.0                 # SiDA's lsd = 1 ("dmd2" form: DMD2's 1e-2)
        generator_start: int = 0                       # iterations the critic trains alone (SiDA: 100k images)
        gan_start: int = 0                             # iteration the GAN term joins (SiDA: 200k images)

    def __init__(self, cfg=None):
        super().__init__(cfg)
        c = self.cfg
        check_critic(c)
        if c.guidance_mode not in GUIDANCE_MODES:
            raise UserError(f"objective.guidance_mode {c.guidance_mode!r} is not supported; use one of "
                            f"{', '.join(GUIDANCE_MODES)}")
        if c.guidance_mode == "anti_cfg" and c.fake_guidance >= 0:
            raise UserError("guidance_mode anti_cfg evaluates the fake score with a negative CFG scale; set "
                            "objective.fake_guidance below 0 (e.g. -1)")
        if c.guidance_mode == "zero_cfg" and (c.fake_guidance != 1 or c.fake_train_guidance != 1):
            raise UserError("guidance_mode zero_cfg runs the fake score without the condition; set "
                            "objective.fake_guidance=1 and objective.fake_train_guidance=1")
        if self.sida and (c.fake_guidance != 1 or c.fake_train_guidance != 1):
            raise UserError("gan_form=sida reads the fake score's features on SiD's own evaluation, which a guided "
                            "fake score splits in two; set fake_guidance=1 and fake_train_guidance=1, or gan_form=dmd2")
        if not 0 <= c.lsg_dropout < 1:
            raise UserError(f"objective.lsg_dropout must be in [0, 1), got {c.lsg_dropout}")
        if min(c.generator_start, c.gan_start) < 0:
            raise UserError("objective.generator_start and objective.gan_start must be >= 0")
        self.regression = Regression(c, 0.0)
        self.uses_real_data = c.gan_weight > 0

    @property
    def sida(self) -> bool:
        return self.cfg.gan_weight > 0 and self.cfg.gan_form == "sida"

    def needs_cache(self) -> bool:
        return self.regression.on

    def phases(self):
        c = self.cfg
        f = c.regression_warmup_fraction
        if f is not None:  # the warm-up as a share of the run (Phase.stop_fraction), as DMD2's
            if c.generator_start or c.gan_start:
                raise UserError("sid: generator_start and gan_start count iterations; with them size the warm-up in "
                                "iterations too (objective.regression_warmup) and set regression_warmup_fraction=null")
            # the warm-up hands the student on with fresh optimizer moments, as DMD2's
            gan = [Phase("generator_gan", ("student",), start_fraction=f)] if c.gan_weight > 0 else []
            return [Phase("warmup", ("student",), stop_fraction=f, fresh_moments_after=True),
                    Phase("critic", critic_trains(c), repeats=c.critic_repeats, start_fraction=f),
                    *(gan or [Phase("generator", ("student",), start_fraction=f)])]
        w = c.regression_warmup
        g0 = max(w, c.generator_start)
        out = [Phase("warmup", ("student",), stop=w, fresh_moments_after=True)] if w else []
        out.append(Phase("critic", critic_trains(c), repeats=c.critic_repeats, start=w))
        if c.gan_weight <= 0:
            return out + [Phase("generator", ("student",), start=g0)]
        g1 = max(g0, c.gan_start)
        return out + [Phase("generator", ("student",), start=g0, stop=g1),
                      Phase("generator_gan", ("student",), start=g1)]

    def build(self, teacher, student, context=None):
        self.regression.prepare(teacher, student, context)
        return build_critic(self.cfg, teacher)

    # -- conditions and scores ----------------------------------------------------------------------
    def conds(self, nets: Nets, batch: dict, draws: Draws):
        """(the generator's and the teacher's condition, the fake score's): SiD-LSG drops
        ``lsg_dropout`` of the conditions to the null one when the fake score is guided; Zero-CFG
        gives the fake score only the null condition."""
        c, cond = self.cfg, batch.get("cond")
        if cond is None:
            return None, None
        if c.lsg_dropout > 0 and (c.fake_guidance != 1 or c.fake_train_guidance != 1):
            null, drop = nets.fake_score.null_cond(cond), draws.rand() < c.lsg_dropout
            cond = {k: torch.where(bcast(drop, v).bool(), null[k], v) for k, v in cond.items()}
        return cond, (nets.fake_score.null_cond(cond) if c.guidance_mode == "zero_cfg" else cond)

    def scores(self, nets: Nets, x_t, t, cond, fake_cond, draws: Draws):
        """(f_phi, f_psi, features) at x_t, with gradients to x_t; the fake score's ``feature_module``
        output with SiDA's GAN form, else None."""
        c = self.cfg
        real, fake = real_score(nets), nets.fake_score
        w = guidance_scales(c.guidance, c.guidance_range, draws) if c.guidance_mode == "cfg" else 1.0
        f_phi = guided(real, w)(x_t, t, cond) if cond is not None else real(x_t, t, None)
        if self.sida:
            return (f_phi, *forward_with_features(fake, find_module(fake, feature_name(c)), x_t, t, fake_cond))
        f_psi = guided(fake, c.fake_guidance)(x_t, t, fake_cond) if fake_cond is not None else fake(x_t, t, None)
        return f_phi, f_psi, None

    # -- phases ----------------------------------------------------------------------------------
    def warmup_loss(self, nets: Nets, batch: dict) -> dict:
        """``regression_warmup`` iterations of DMD's regression loss alone (DMD2's one-step
        initialisation; not part of SiD)."""
        return {"regression": self.regression.term(real_score(nets), nets.student, batch["x0"], Draws(batch), 1.0)}

    def critic_loss(self, nets: Nets, batch: dict) -> dict:
        c, draws = self.cfg, Draws(batch)
        cond, fc = self.conds(nets, batch, draws)
        x = sample_student(nets.student, cond, draws, backward_simulation=c.backward_simulation, grad=False)
        if self.sida:
            return sida_critic_terms(c, nets, x, batch.get("x0"), fc, draws)
        out = {"fake_dsm": dsm_loss(c, nets.fake_score, x, fc, draws, guidance=c.fake_train_guidance)[0]}
        if c.gan_weight > 0:
            out.update(gan_critic_terms(c, nets, x, batch.get("x0"), fc, draws))
        return out

    def generator_loss(self, nets: Nets, batch: dict, with_gan: bool = False) -> dict:
        c, draws = self.cfg, Draws(batch)
        cond, fc = self.conds(nets, batch, draws)
        x_g = sample_student(nets.student, cond, draws, backward_simulation=c.backward_simulation)
        t = draws.times(nets.fake_score.schedule, c.t_range)
        x_t = draws.noised(nets.fake_score.schedule, x_g, t)
        with frozen(nets.fake_score, nets.get("disc")):
            f_phi, f_psi, feats = self.scores(nets, x_t, t, cond, fc, draws)
            out = {"sid": sid_generator_loss(x_g, f_phi, f_psi, c.alpha),
                   "_score_gap": (f_phi - f_psi).detach().flatten(1).norm(dim=1)}
            if with_gan and self.sida:  # sida_training_loop.py: 0.5 * SiD + 0.5 * GAN, both over 1 / wf
                logits = classifier(c, nets)(feats, fc).clamp(-10.0, 10.0)
                scale = x_g[0].numel() * (1.0 / mean_abs((x_g - f_phi).detach())).mean()
                out = {"sid": 0.5 * out["sid"], "_score_gap": out["_score_gap"],
                       "gan_g": 0.5 * c.gan_weight * scale * gan.g_loss(logits, c.gan_loss)}
            elif with_gan:
                out["gan_g"] = gan_generator_term(c, nets, x_g, fc, draws)
        return out

    def generator_gan_loss(self, nets: Nets, batch: dict) -> dict:
        """The generator once the GAN term has joined (``gan_start``)."""
        return self.generator_loss(nets, batch, with_gan=True)


__all__ = ["SiD", "sid_generator_loss", "GUIDANCE_MODES"]

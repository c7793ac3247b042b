"""Adversarial distillation: ADD (Sauer et al., 2023) and LADD (Sauer et al., 2024).

The student is trained against a discriminator on clean real images (``batch["x0"]``) and its own
samples, plus an optional score-distillation term towards the teacher:
* disc="teacher" (LADD, sec. 3): the frozen teacher backbone at a noised input x_t supplies
  features (a forward hook on ``feature_module``) to a small trainable head; the generator's
  gradient flows through the frozen teacher to x.
* disc="pixels": the head reads the clean images directly (a small conv discriminator).
Losses come from ``gan`` (hinge by default, as ADD/LADD; non-saturating on request) with the
approximate R1 penalty of APT (Lin et al., 2025).
SANA-Sprint's LADD (Chen et al., 2025, sec. 3.3; NVlabs/Sana train_scm_ladd.py) is
``student_input="proposal"`` with ``disc_proposal``: the student denoises real images noised to TrigFlow
times from sCM's log-normal proposal, ``largest_prob`` of them replaced by pure noise at its noisiest
time (``train_largest_timestep``), and the discriminator noises both sides at times from its own
log-normal (``logit_mean_discriminator`` -0.6, ``logit_std_discriminator`` 1.0).
distill="sds" adds ADD's distillation loss (eq. 4-5): d(x, sg(teacher_x0(x_t))) with the
exponential weighting c(t) = alpha_t and d the per-pixel squared error.

DMD2 and SiD take the same GAN terms as an add-on through their fake score (``gan_weight``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import List, Optional

import torch

from ..denoisers import guided
from ..errors import UserError
from ..fake_score import DISC_ARCHS, DiscHead, build_disc_head, evaluating, frozen, sample_shape
from ..schedules import bcast
from ..trigflow import TrigFlow
from . import gan
from .base import Nets, Objective, Phase, register
from .common import Draws, sample_student
from .critic import gan_critic_terms, gan_generator_term

DISCS = ("teacher", "pixels")


@register
class Adversarial(Objective):
    name = "adversarial"
    uses_real_data = True

    @dataclass
    class Config:
        disc: str = "teacher"               # "teacher" (LADD: frozen teacher features + head) | "pixels"
        feature_module: str = "auto"   # teacher module whose output the head reads (disc="teacher"); comma-separated
                                       # names: a head on each (SANA-Sprint's heads on several blocks)
        per_location: bool = False     # a logit per feature location, unpooled (SANA-Sprint: one per token)
        disc_arch: str = "conv"             # head form: "conv" (two 3x3 convs, class projection) | "stylegan_t"
                                            # (SANA-Sprint's: spectral-norm 1-D convs over tokens at full width,
                                            # local batch norm, a logit per token, no projection; token_head.py)
        disc_hidden: int = 64               # head width ("conv")
        gan_loss: str = "hinge"             # "hinge" (ADD/LADD) | "ns"
        gan_weight: float = 1.0             # generator adversarial term
        disc_weight: float = 1.0            # factor on the discriminator's loss (SANA-Sprint's 0.5: loss_D =
                                            # (loss_real + loss_gen) / 2, train_scm_ladd.py)
        r1_weight: float = 0.0              # approximate R1 on real inputs; 0 = off
        r1_noise: float = 0.01              # its input perturbation std
        t_range: List[float] = field(default_factory=lambda: [0.02, 0.98])  # disc noise levels (teacher disc)
        disc_proposal: Optional[List[float]] = None  # [p_mean, p_std]: disc noise times from TrigFlow's log-normal
                                            # instead (SANA-Sprint: [-0.6, 1.0]); None = uniform over t_range
        sigma_d: float = 0.5                # TrigFlow's data standard deviation (the log-normals' units)
        distill: str = "sds"                # "sds" (ADD's distillation term) | "none"
        distill_weight: float = 2.5         # ADD's lambda
        distill_t_range: List[float] = field(default_factory=lambda: [0.02, 0.98])
        guidance: float = 1.0               # teacher CFG scale in the distillation term
        student_input: str = "data"         # "data": real images noised to one of the student's timesteps (ADD
                                            # sec. 3.1, x_s = alpha_s x0 + sigma_s eps); "noise": the student's own
                                            # sampling chain from pure noise; "proposal": SANA-Sprint's, real
                                            # images at TrigFlow times from student_proposal, largest_prob of them
                                            # pure noise at the student's first time
        student_proposal: List[float] = field(default_factory=lambda: [0.2, 1.6])  # [p_mean, p_std] (Sana's sCM)
        largest_prob: float = 0.5           # SANA-Sprint's largest_timestep_prob
        misaligned_pairs: bool = False      # the discriminator also sees real images under another sample's
                                            # condition as fake (SANA-Sprint's misaligned_pairs_D; critic.py)
        backward_simulation: bool = True    # multi-step students with student_input "noise"

    def __init__(self, cfg=None):
        super().__init__(cfg)
        if self.cfg.disc not in DISCS:
            raise UserError(f"objective.disc {self.cfg.disc!r} is not supported; use one of {', '.join(DISCS)}")
        if self.cfg.student_input not in ("data", "noise", "proposal"):
            raise UserError(f"objective.student_input {self.cfg.student_input!r} is not supported; use 'data' (ADD: "
                            "noised real images), 'noise' (the student's own chain) or 'proposal' (SANA-Sprint)")
        for key in ("disc_proposal", "student_proposal"):
            value = getattr(self.cfg, key)
            if value is not None and (isinstance(value, (str, int, float)) or len(value) != 2 or float(value[1]) <= 0):
                raise UserError(f"objective.{key} is [p_mean, p_std] with p_std > 0, got {value!r}")
        if self.cfg.sigma_d <= 0:
            raise UserError(f"objective.sigma_d must be > 0, got {self.cfg.sigma_d}")
        if self.cfg.disc == "pixels" and (self.cfg.per_location or self.cfg.misaligned_pairs or self.cfg.disc_proposal is not None
                                          or "," in str(self.cfg.feature_module)):
            raise UserError("disc=pixels reads clean images: per_location, misaligned_pairs, disc_proposal and several "
                            "feature modules apply to disc=teacher")
        if self.cfg.disc_arch not in DISC_ARCHS:
            raise UserError(f"objective.disc_arch {self.cfg.disc_arch!r} is not supported; use one of "
                            f"{', '.join(DISC_ARCHS)}")
        if self.cfg.disc == "pixels" and self.cfg.disc_arch != "conv":
            raise UserError("disc=pixels has a conv head of its own; disc_arch applies to disc=teacher")
        if self.cfg.disc_arch == "stylegan_t" and not self.cfg.per_location:
            raise UserError("disc_arch=stylegan_t gives a logit per token (SANA-Sprint's heads); set "
                            "objective.per_location=true, or disc_arch=conv for pooled logits")
        if self.cfg.disc_arch == "stylegan_t" and self.cfg.r1_weight > 0:
            raise UserError("disc_arch=stylegan_t with r1_weight > 0: approximate R1's two passes would each move "
                            "the heads' spectral norms; set objective.r1_weight=0 (SANA-Sprint trains without R1)")
        if self.cfg.disc_weight <= 0:
            raise UserError(f"objective.disc_weight must be > 0, got {self.cfg.disc_weight}")
        if not 0.0 <= self.cfg.largest_prob <= 1.0:
            raise UserError(f"objective.largest_prob is a probability in [0, 1], got {self.cfg.largest_prob}")
        if self.cfg.distill not in ("sds", "none"):
            raise UserError(f"objective.distill {self.cfg.distill!r} is not supported; use 'sds' or 'none'")
        gan._check(self.cfg.gan_loss)

    def phases(self):
        return [Phase("disc", ("disc",)), Phase("generator", ("student",))]

    def build(self, teacher, student, context=None):
        c = self.cfg
        if c.disc == "teacher":
            return {"disc": build_disc_head(teacher, c.feature_module, teacher, c.disc_hidden, c.per_location,
                                            c.disc_arch)}
        null = getattr(teacher, "null_class", None)
        return {"disc": DiscHead(sample_shape(teacher), c.disc_hidden, None if null is None else int(null) + 1)}

    # -- the discriminator --------------------------------------------------------------------------
    @property
    def critic_view(self) -> SimpleNamespace:
        """This objective's discriminator settings as the shared critic reads them (critic.py): a head on
        the frozen teacher's features at x_t, real and fake noised alike at t from t_range (LADD sec. 3)."""
        c = self.cfg
        return SimpleNamespace(feature_module=c.feature_module, disc_t_range=c.t_range, disc_proposal=c.disc_proposal,
                               sigma_d=c.sigma_d, gan_critic_weight=c.disc_weight,
                               gan_loss=c.gan_loss, gan_weight=c.gan_weight, r1_weight=c.r1_weight,
                               r1_noise=c.r1_noise, misaligned_pairs=c.misaligned_pairs)

    def pixel_terms(self, nets: Nets, real_x, fake_x, cond) -> dict:
        """disc="pixels": the head reads the clean images (ADD's discriminator without a feature network)."""
        c = self.cfg
        real_logits, fake_logits = nets.disc(real_x, cond), nets.disc(fake_x, cond)
        out = {"gan_d": c.disc_weight * gan.d_loss(real_logits, fake_logits, c.gan_loss),
               "_d_real": real_logits.detach(), "_d_fake": fake_logits.detach()}
        if c.r1_weight > 0:
            out["r1"] = c.r1_weight * gan.approx_r1(lambda xx: nets.disc(xx, cond), real_x, real_logits, c.r1_noise)
        return out

    def student_output(self, nets: Nets, batch: dict, draws: Draws, grad: bool = True) -> torch.Tensor:
        """ADD (Sauer et al., 2023, sec. 3.1): x^_theta(x_s, s) with x_s a real image noised to s ~ U(T_student);
        with student_input "noise" the student's own samples (backward simulation for K steps)."""
        c, student, cond = self.cfg, nets.student, batch.get("cond")
        if c.student_input == "noise":
            return sample_student(student, cond, draws, backward_simulation=c.backward_simulation, grad=grad)
        if c.student_input == "proposal":
            return self.proposal_output(nets, batch, draws, grad)
        s = student.timesteps[draws.randint(0, student.steps).to(student.timesteps.device)]
        x_s = draws.noised(student.schedule, batch["x0"], s)
        with torch.set_grad_enabled(grad):
            return student.denoise(x_s, s, cond)

    def proposal_output(self, nets: Nets, batch: dict, draws: Draws, grad: bool) -> torch.Tensor:
        """SANA-Sprint (train_scm_ladd.py, train_largest_timestep): x_t = cos t x0 + sin t z of real images at
        TrigFlow times t from the sCM proposal, with probability ``largest_prob`` pure noise at the
        student's first time instead (the input it samples from), and the student's x0 estimate at each."""
        c, student, x0, cond = self.cfg, nets.student, batch["x0"], batch.get("cond")
        trig = TrigFlow(student.schedule, c.sigma_d)
        u = trig.native_time(trig.lognormal(draws.rand(), *map(float, c.student_proposal))).to(x0.device)
        first = student.timesteps[0].to(device=x0.device, dtype=u.dtype)
        top = draws.rand() < c.largest_prob
        x_data = draws.noised(student.schedule, x0, u)
        x_noise = student.prior(draws.randn_like(x0), first)
        x_s = torch.where(bcast(top, x0).bool(), x_noise.to(x0.dtype), x_data.to(x0.dtype))
        with torch.set_grad_enabled(grad):
            return student.denoise(x_s, torch.where(top, first, u), cond)

    # -- phases ---------------------------------------------------------------------------------------
    def disc_loss(self, nets: Nets, batch: dict) -> dict:
        draws = Draws(batch)
        real_x, cond = batch["x0"], batch.get("cond")
        fake_x = self.student_output(nets, batch, draws, grad=False)
        if self.cfg.disc == "pixels":
            return self.pixel_terms(nets, real_x, fake_x, cond)
        return gan_critic_terms(self.critic_view, nets, fake_x, real_x, cond, draws, net=nets.teacher)

    def generator_loss(self, nets: Nets, batch: dict) -> dict:
        c, draws = self.cfg, Draws(batch)
        cond = batch.get("cond")
        x = self.student_output(nets, batch, draws)
        if c.disc == "pixels":
            with frozen(nets.disc), evaluating(nets.disc):
                out = {"gan_g": c.gan_weight * gan.g_loss(nets.disc(x, cond), c.gan_loss)}
        else:
            out = {"gan_g": gan_generator_term(self.critic_view, nets, x, cond, draws, net=nets.teacher)}
        if c.distill == "sds":
            out["distill"] = c.distill_weight * sds_loss(nets.teacher, x, cond, c.distill_t_range, c.guidance, draws)
        return out


def sds_loss(teacher, x: torch.Tensor, cond, t_range, guidance: float = 1.0, draws: Draws | None = None):
    """ADD's distillation loss (Sauer et al., 2023, eq. 5): c(t) * mean((x - sg(x0_teacher(x_t)))^2),
    c(t) = alpha_t; its gradient w.r.t. x is 2 c(t) (x - x0_teacher) / numel(x[0]) (score distillation
    sampling, mean-reduced over pixels)."""
    sched, draws = teacher.schedule, draws or Draws({"x0": x})
    t = draws.times(sched, t_range)
    with torch.no_grad():
        x_t = draws.noised(sched, x, t)
        target = guided(teacher, guidance)(x_t, t, cond) if cond is not None else teacher(x_t, t, None)
    a, _ = sched.alpha_sigma(t)
    return bcast(a, x).flatten(1)[:, 0] * (x - target).pow(2).flatten(1).mean(1)


__all__ = ["Adversarial", "sds_loss"]

"""The fake-score critic shared by DMD, DMD2 and SiD: the fake score (a trainable copy or LoRA of
the teacher) learnt by denoising score matching on the student's samples, and an optional GAN
classifier on its features, in one of two forms:

* "dmd2" (Yin et al., 2024b, sec. 4.3; tianweiy/DMD2 sd_guidance.py compute_cls_logits): a head
  on the fake score's bottleneck, with passes of its own on real and fake images noised to times
  from ``disc_t_range`` (DMD2: 0..999); non-saturating (or hinge) loss, optional approximate R1
  (APT, Lin et al., 2025). The head is a small conv net with a class projection (DMD2's is strided
  convs to 1x1), and it is trained on fresh student samples (DMD2 reuses the generator step's).
* "sida" (Zhou et al., 2025, "Adversarial Score identity Distillation"; mingyuanzhou/SiD, branch
  sida, sida_loss.py): the head reads the features of the DSM's own evaluation on the noisy fake
  samples, and of real images noised with the same noise and time; its BCE is weighted by EDM's
  lambda(sigma), one pixel's worth of the DSM loss.

The networks are built here (``build_critic``) and trained in the objective's "critic" phase.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch

from ..denoisers import guided
from ..errors import UserError
from ..fake_score import (DEFAULT_LORA_TARGETS, ChannelMean, FakeScore, build_disc_head, dsm_error, dsm_weight, evaluating,
                          find_module, feature_modules, forward_with_features, frozen)
from . import gan
from ..trigflow import TrigFlow
from .common import Draws

#: where the fake score's DSM times come from ("grid": the DM term's grid; "dm": the DM term's own t_range;
#: "train": the teacher's training times)
FAKE_TIMES = ("grid", "dm", "train")
GAN_FORMS = ("dmd2", "sida")
#: the classifier on the fake score's features: a trained head, or SiDA's channel mean of the encoder output
DISC_HEADS = ("auto", "learned", "channel_mean")


@dataclass
class CriticConfig:
    """Config fields of the fake score and its GAN head."""

    fake_lora_rank: int = 0                        # 0 = full copy of the teacher; > 0 = LoRA on its backbone
    fake_lora_alpha: Optional[float] = None
    fake_target_modules: List[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    fake_loss: str = "raw"                         # "raw" (teacher's parameterisation) | "x0" (unweighted)
    fake_t: str = "grid"                           # fake-score DSM times: "grid" = uniform over the 1000-step
                                                   # grid the DM term draws from (DMD2); "dm" = uniform over the
                                                   # DM term's own t_range (SiD-LSG); "train" = the teacher's
                                                   # training distribution (EDM's log-normal; SiD's sid_loss.py)
    critic_repeats: int = 1                        # fake-score updates per generator update (DMD2: 5)
    gan_weight: float = 0.0                        # generator GAN term; 0 = off
    gan_form: str = "dmd2"                         # "dmd2": passes of its own; "sida": shares the DSM's evaluations
    gan_critic_weight: float = 1e-2                # classifier term in the critic phase (SiDA: 1)
    gan_loss: str = "ns"                           # "ns" (DMD2, SiDA) | "hinge"
    r1_weight: float = 0.0                         # approximate R1 on real logits ("dmd2" form); 0 = off
    r1_noise: float = 0.01
    feature_module: str = "auto"                   # the fake score's module the classifier reads ("auto": the
                                                   # mid block; "encoder": the last down block; with
                                                   # disc_head=channel_mean "auto" is "encoder", as SiDA's)
    disc_head: str = "auto"                        # "learned" (DiscHead) | "channel_mean" (SiDA's, no weights);
                                                   # "auto": channel_mean with gan_form=sida, else learned
    disc_t_range: List[float] = field(default_factory=lambda: [0.0, 1.0])  # "dmd2" form's times (DMD2: 0..999)


def check_critic(c) -> None:
    """Refuse a critic config that cannot run (UserError, before any compute)."""
    if c.critic_repeats < 1:
        raise UserError(f"objective.critic_repeats must be >= 1, got {c.critic_repeats}")
    if c.fake_t not in FAKE_TIMES:
        raise UserError(f"objective.fake_t {c.fake_t!r} is not supported; use 'grid' (uniform over the DM term's "
                        "1000-step grid), 'dm' (uniform over its t_range) or 'train' (the teacher's training "
                        "distribution)")
    if c.fake_t == "dm" and getattr(c, "t_range", None) is None:
        raise UserError("objective.fake_t='dm' draws from the objective's t_range, which this objective has not; "
                        "use fake_t='grid' or 'train'")
    if c.gan_form not in GAN_FORMS:
        raise UserError(f"objective.gan_form {c.gan_form!r} is not supported; use one of {', '.join(GAN_FORMS)}")
    if c.disc_head not in DISC_HEADS:
        raise UserError(f"objective.disc_head {c.disc_head!r} is not supported; use one of {', '.join(DISC_HEADS)}")
    if c.disc_head == "channel_mean" and c.gan_form != "sida":
        raise UserError("objective.disc_head=channel_mean is SiDA's classifier; use it with gan_form=sida, or "
                        "disc_head=learned")
    if c.gan_form == "sida" and c.gan_weight > 0 and "," in str(c.feature_module):
        raise UserError("gan_form=sida reads one feature module of SiD's own evaluation; name one in "
                        "objective.feature_module, or use gan_form=dmd2 for heads on several")
    if c.gan_form == "sida" and c.gan_weight > 0 and c.r1_weight > 0:
        raise UserError("objective.r1_weight applies to gan_form=dmd2; set r1_weight=0 with gan_form=sida")
    gan._check(c.gan_loss)


def channel_mean(c) -> bool:
    """Whether the classifier is SiDA's channel mean of the fake score's encoder (no network of its own)."""
    return c.disc_head == "channel_mean" or (c.disc_head == "auto" and c.gan_form == "sida")


def feature_name(c) -> str:
    """The fake score's module the classifier reads: SiDA's encoder output for its channel-mean head."""
    return "encoder" if c.feature_module == "auto" and channel_mean(c) else c.feature_module


def learned_head(c) -> bool:
    return c.gan_weight > 0 and not channel_mean(c)


def build_critic(c, teacher) -> dict:
    nets = {"fake_score": FakeScore(teacher, lora_rank=c.fake_lora_rank, lora_alpha=c.fake_lora_alpha,
                                    target_modules=c.fake_target_modules)}
    if learned_head(c):
        nets["disc"] = build_disc_head(nets["fake_score"], feature_name(c), teacher)
    return nets


def critic_trains(c) -> tuple[str, ...]:
    return ("fake_score", "disc") if learned_head(c) else ("fake_score",)


def classifier(c, nets):
    """Features -> logits: the trained head (``nets.disc``) or SiDA's channel mean."""
    return ChannelMean() if channel_mean(c) else nets.disc


def fake_times(c, schedule, draws: Draws) -> torch.Tensor:
    """Times of the fake score's DSM updates. "grid": uniform over the 1000-step grid whose
    [min_step, max_step] part the DM term draws from, so the fake score is trained where it is read
    (DMD2 compute_loss_fake: randint(0, 1000) on SD, a uniform index of the 1000-point Karras grid on
    EDM, sd_guidance.py / edm_guidance.py). "train": the teacher's training distribution (SiD's
    sid_loss.py: EDM's log-normal, which puts ~4 % of updates above sigma 2.5 where the DM term
    draws ~50 %). "dm": uniform over the DM term's own ``t_range``, so the fake score is trained exactly
    where the generator loss reads it (SiD-LSG sid_training_loop.py draws both the fake-score and the
    generator times from randint(tmin, tmax))."""
    if c.fake_t == "train":
        return draws.train_times(schedule)
    return draws.times(schedule, c.t_range if c.fake_t == "dm" else (0.0, 1.0))


def dsm_loss(c, fake, x: torch.Tensor, cond, draws: Draws, *, guidance: float = 1.0):
    """(per-sample DSM loss, x_t, t) of the fake score on detached student samples x, in the
    teacher's parameterisation (``fake_loss``). ``guidance`` != 1: the fake score is trained through
    its own CFG combination u + k (c - u) (SiD-LSG's cfg_train_fake, Zhou et al., 2024; SiD-LSG
    sid_training_loop.py regresses the guided output on the target)."""
    sched = fake.schedule
    t = fake_times(c, sched, draws)
    x_t = draws.noised(sched, x, t)
    pred = guided(fake, guidance)(x_t, t, cond) if cond is not None else fake(x_t, t, None)
    return dsm_error(sched, pred, x, x_t, t, c.fake_loss), x_t, t


# -- "dmd2" form ------------------------------------------------------------------------------------
def disc_logits(c, nets, x: torch.Tensor, t: torch.Tensor, cond, draws: Draws, net=None) -> torch.Tensor:
    """The classifier's logits for clean images x seen through a denoiser's features at x_t (diffusion
    GAN: real and fake noised alike): the fake score's (DMD2 sec. 4.3) or, as ``net``, the frozen
    teacher's (LADD, Sauer et al., 2024, sec. 3)."""
    fs = net if net is not None else nets.fake_score
    _, feats = forward_with_features(fs, feature_modules(fs, c.feature_module), draws.noised(fs.schedule, x, t), t,
                                     cond, need_x0=False)
    return nets.disc(feats, cond)


def disc_times(c, schedule, draws: Draws) -> torch.Tensor:
    """The classifier's noise times: uniform over ``disc_t_range`` of the noise grid (DMD2), or with
    ``disc_proposal = [p_mean, p_std]`` the TrigFlow log-normal (SANA-Sprint's discriminator times,
    ``logit_normal_trigflow`` with ``logit_mean_discriminator`` / ``logit_std_discriminator``) in the
    schedule's own time."""
    proposal = getattr(c, "disc_proposal", None)
    if proposal is None:
        return draws.times(schedule, c.disc_t_range)
    trig = TrigFlow(schedule, getattr(c, "sigma_d", 0.5))
    return trig.native_time(trig.lognormal(draws.rand(), *map(float, proposal))).to(draws.device)


def gan_critic_terms(c, nets, x_fake: torch.Tensor, real_x: torch.Tensor | None, cond, draws: Draws,
                     net=None) -> dict:
    """The classifier's loss on real images against the student's (DMD2 sec. 4.3, eq. 4; LADD with the
    teacher as ``net``), with approximate R1."""
    if real_x is None:
        raise UserError("the GAN term needs real images in the batch; set data to an image set or gan_weight=0")
    fs = net if net is not None else nets.fake_score
    t_r, t_f = disc_times(c, fs.schedule, draws), disc_times(c, fs.schedule, draws)
    real_logits = disc_logits(c, nets, real_x, t_r, cond, draws, fs)
    fake_logits = disc_logits(c, nets, x_fake, t_f, cond, draws, fs)
    loss = gan.d_loss(real_logits, fake_logits, c.gan_loss)
    if getattr(c, "misaligned_pairs", False) and cond is not None and real_x.shape[0] > 1:
        loss = misaligned_d_loss(c, nets, loss, real_logits, real_x, cond, draws, fs)
    out = {"gan_d": c.gan_critic_weight * loss,
           "_d_real": gan.per_sample(real_logits).detach(), "_d_fake": gan.per_sample(fake_logits).detach()}
    if c.r1_weight > 0:
        x_t = draws.noised(fs.schedule, real_x, t_r)
        mod = feature_modules(fs, c.feature_module)

        def d_of(xt):
            return nets.disc(forward_with_features(fs, mod, xt, t_r, cond, need_x0=False)[1], cond)

        out["r1"] = c.r1_weight * gan.approx_r1(d_of, x_t, d_of(x_t), c.r1_noise)
    return out


def same_condition(cond: dict, shift: int = 1) -> torch.Tensor:
    """[B] bool: sample i's conditioning equals sample i - shift's (the batch rolled by ``shift``) in every
    tensor of ``cond`` (a class label, a prompt's embeddings)."""
    same = None
    for v in cond.values():
        if torch.is_tensor(v) and v.ndim >= 1:
            eq = (v == v.roll(shift, 0)).reshape(v.shape[0], -1).all(1)
            same = eq if same is None else same & eq
    return same


def misaligned_d_loss(c, nets, loss: torch.Tensor, real_logits, real_x: torch.Tensor, cond, draws: Draws,
                      fs) -> torch.Tensor:
    """The discriminator loss with SANA-Sprint's misaligned pairs (``misaligned_pairs_D``, NVlabs/Sana
    train_scm_ladd.py): real images rolled by one along the batch, kept with the original conditioning and
    noised at fresh discriminator times, join the fake side, so the fake term averages over the student's
    B samples and these B pairs (a real image under another sample's condition is fake: the only signal
    that ties the image to its class or prompt). A pair whose rolled condition is the same (two samples of
    one class) is a real pair, not a negative: its fake term stays the student's alone."""
    mis_x = real_x.roll(1, 0)
    mis_logits = disc_logits(c, nets, mis_x, disc_times(c, fs.schedule, draws), cond, draws, fs)
    with_mis = 0.5 * (loss + gan.d_loss(real_logits, mis_logits, c.gan_loss))
    same = same_condition(cond) if isinstance(cond, dict) else None
    return with_mis if same is None else torch.where(same, loss, with_mis)


def gan_generator_term(c, nets, x: torch.Tensor, cond, draws: Draws, net=None) -> torch.Tensor:
    """The generator's GAN term: gan_weight * g_loss(D(x)) at times from disc_t_range (DMD2: softplus(-D))."""
    fs = net if net is not None else nets.fake_score
    t = disc_times(c, fs.schedule, draws)
    with frozen(fs, nets.disc), evaluating(nets.disc):
        logits = disc_logits(c, nets, x, t, cond, draws, fs)
    return c.gan_weight * gan.g_loss(logits, c.gan_loss)


# -- "sida" form ------------------------------------------------------------------------------------
def sida_critic_terms(c, nets, x: torch.Tensor, real_x: torch.Tensor | None, cond, draws: Draws) -> dict:
    """SiDA's critic update (sida_loss.py, the discriminator loss): the DSM loss on the fake samples
    and lambda(sigma) (BCE(D(real), 1) + BCE(D(fake), 0)) / 2 from the same evaluation's features,
    real images noised with the same noise and time. The BCE is a batch mean there, weighted per
    sample by lambda: here each sample's BCE is weighted by the batch mean of lambda (the same sum),
    over the pixel count (the DSM loss is a pixel mean here, a pixel sum there)."""
    if real_x is None:
        raise UserError("the GAN term needs real images in the batch; set data to an image set or gan_weight=0")
    fs = nets.fake_score
    sched = fs.schedule
    t = fake_times(c, sched, draws)
    eps = draws.randn_like(x)
    x_t = sched.add_noise(x, eps, t)
    mod, head = find_module(fs, feature_name(c)), classifier(c, nets)
    pred, f_fake = forward_with_features(fs, mod, x_t, t, cond)
    _, f_real = forward_with_features(fs, mod, sched.add_noise(real_x, eps, t), t, cond, need_x0=False)
    real_logits, fake_logits = head(f_real, cond), head(f_fake, cond)
    lam = dsm_weight(sched, t, x, c.fake_loss).to(x.dtype).mean() / x[0].numel()
    return {"fake_dsm": dsm_error(sched, pred, x, x_t, t, c.fake_loss),
            "gan_d": c.gan_critic_weight * lam * 0.5 * gan.d_loss(real_logits, fake_logits, c.gan_loss),
            "_d_real": gan.per_sample(real_logits).detach(), "_d_fake": gan.per_sample(fake_logits).detach()}


__all__ = ["CriticConfig", "check_critic", "build_critic", "critic_trains", "classifier", "feature_name", "fake_times", "dsm_loss",
           "gan_critic_terms", "gan_generator_term", "sida_critic_terms", "FAKE_TIMES", "GAN_FORMS", "DISC_HEADS"]

"""SwiftBrush (Nguyen & Tran, 2024, "SwiftBrush: One-Step Text-to-Image Diffusion Model with
Variational Score Distillation"): image-free one-step distillation by variational score distillation
(ProlificDreamer's VSD, Wang et al., 2023), the fake score a LoRA on the teacher trained 1:1 with the
student. Per iteration (VinAIResearch/SwiftBrush train_swiftbrush.py, the training loop):

    generator:  x = G(z);  t ~ U[0.02 T, 0.981 T);  x_t = alpha_t x + sigma_t eps
                g = w(t) (eps_teacher(x_t) - eps_lora(x_t)),  w(t) = sigma_t^2 (= 1 - alpha-bar_t)
                L = 0.5 mean((x - sg(x - g))^2)                  (d/dx = g / d)
    critic:     x = sg(G(z'));  t ~ U[0, T);  the condition dropped with probability 0.1
                L = mean(alpha_t^2 (eps_lora(x_t) - eps)^2)

Both scores take classifier-free guidance at the same scale (``guidance``). Unlike DMD, the gradient
is VSD's w(t)-weighted epsilon difference, not normalised by the mean |x - real x0|, and there is no
regression loss and no real data. In x0 terms, g = alpha_t sigma_t (x0_lora - x0_teacher) on any
schedule (eps = (x_t - alpha x0) / sigma).

SwiftBrush v2 (Dao et al., 2024): ``clip_model`` (a local CLIP folder) adds its clamped CLIP loss to the
generator, lambda(k) max(0, tau - cos(E_image(D(x)), E_text(y))) (eq. 5, ``clip_loss.py``) on
text-to-image teachers, D the teacher's VAE decoder or a TinyVAE (``clip_decoder``, sec. 4.4), lambda
from 0.1 to 0 over the run (steps or time budget, whichever ends it); its weight-space merging of two students is ``stepdistill merge``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch

from ..denoisers import guided
from ..errors import UserError
from ..fake_score import DEFAULT_LORA_TARGETS, FakeScore, real_score
from ..schedules import bcast
from .base import Nets, Objective, Phase, register
from .common import Draws, sample_student, target_loss


def vsd_gradient(x_t, alpha, sigma, real_x0, fake_x0) -> torch.Tensor:
    """sigma^2 (eps_real - eps_fake) from x0 predictions: eps = (x_t - alpha x0) / sigma, so it is
    alpha sigma (fake_x0 - real_x0); non-finite entries become 0 (the authors' nan_to_num)."""
    a, s = bcast(alpha, x_t), bcast(sigma, x_t)
    return torch.nan_to_num(a * s * (fake_x0 - real_x0))


def with_null(cond, null, drop: torch.Tensor):
    """Per sample, the null condition where ``drop`` is true (CFG training's condition dropout)."""
    if cond is None:
        return None
    return {k: torch.where(drop.reshape(-1, *([1] * (v.ndim - 1))).to(v.device), null[k].to(v.device), v)
            for k, v in cond.items()}


@register
class SwiftBrush(Objective):
    name = "swiftbrush"

    @dataclass
    class Config:
        guidance: float = 1.0                  # CFG scale of both scores (SD: 7.5)
        t_range: List[float] = field(default_factory=lambda: [0.02, 0.98])  # VSD times: randint(20, 981) on T = 1000
        fake_lora_rank: int = 8                # the LoRA teacher (authors' defaults: rank 8, alpha 32)
        fake_lora_alpha: Optional[float] = 32.0
        fake_target_modules: List[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
        cond_drop: float = 0.1                 # condition dropout in the LoRA's update
        clip_model: Optional[str] = None       # SwiftBrush v2's clamped CLIP loss: a local CLIP folder (the paper:
                                               # ViT-B/32); None = off
        clip_decoder: Optional[str] = None     # the latents' decoder for it: an AutoencoderTiny folder (TAESD, the
                                               # paper's TinyVAE); None = the teacher's VAE
        clip_weight: float = 0.1               # lambda at the run's start, falling linearly to 0 at its end
        clip_margin: float = 0.35              # tau (sec. 5.1)

    def __init__(self, cfg=None):
        super().__init__(cfg)
        c = self.cfg
        if c.fake_lora_rank < 1:
            raise UserError(f"swiftbrush: the fake score is a LoRA on the teacher; set fake_lora_rank >= 1, got "
                            f"{c.fake_lora_rank}")
        if not 0.0 <= c.cond_drop < 1.0:
            raise UserError(f"swiftbrush: cond_drop must be in [0, 1), got {c.cond_drop}")
        if c.clip_weight < 0 or not -1.0 <= c.clip_margin <= 1.0:
            raise UserError(f"swiftbrush: clip_weight must be >= 0 and clip_margin a cosine in [-1, 1], got "
                            f"{c.clip_weight} and {c.clip_margin}")
        self.clip = self.decoder = self.clip_text = None
        self.progress = 0.0

    def phases(self):
        return [Phase("generator", ("student",)), Phase("critic", ("fake_score",))]  # student first, then the LoRA

    def build(self, teacher, student, context=None):
        if self.cfg.clip_model:
            self._build_clip(teacher, context)
        return {"fake_score": FakeScore(teacher, lora_rank=self.cfg.fake_lora_rank, lora_alpha=self.cfg.fake_lora_alpha,
                                        target_modules=self.cfg.fake_target_modules)}

    # -- SwiftBrush v2's clamped CLIP loss -----------------------------------------------------------
    def _build_clip(self, teacher, context) -> None:
        """CLIP, its text embedding of every training prompt, and the decoder from latents to images."""
        from .clip_loss import CLIPScorer

        info = getattr(teacher, "info", None)
        texts = getattr(context, "texts", None)
        if info is None or not texts:
            raise UserError("swiftbrush: the CLIP loss (objective.clip_model) scores images against their prompts; it "
                            "needs a text-to-image teacher and prompts, so set objective.clip_model=null here")
        self.clip = CLIPScorer(self.cfg.clip_model)
        self.clip_text = self.clip.text_features(list(texts))           # one row per training prompt
        if self.cfg.clip_decoder:
            from diffusers import AutoencoderTiny

            try:
                self.decoder = AutoencoderTiny.from_pretrained(self.cfg.clip_decoder, local_files_only=True)
            except (OSError, ValueError) as err:
                raise UserError(f"cannot load objective.clip_decoder {self.cfg.clip_decoder!r} "
                                f"({str(err).splitlines()[0]}); pass an AutoencoderTiny folder (TAESD) or null for "
                                "the teacher's VAE") from None
        else:
            from ..t2i.pipeline import load_vae

            self.decoder = load_vae(info, device="cpu", dtype=torch.float32)
        self.decoder.requires_grad_(False).eval()

    def set_progress(self, progress: float) -> None:
        self.progress = float(progress)  # the CLIP weight falls to 0 at the run's end

    def clip_term(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """lambda max(0, tau - cos(E_image(D(x)), E_text(y))) per sample, with gradient to the latents x."""
        from ..t2i.pipeline import _factors
        from .clip_loss import clamped_clip_loss, clip_weight

        for m in (self.clip, self.decoder):
            if next(m.parameters()).device != x.device:
                m.to(x.device)
        scale, shift = _factors(self.decoder)
        p = next(self.decoder.parameters())
        with torch.autocast(x.device.type, enabled=False):  # fp16 VAE decodes overflow: run in the weights' dtype
            images = self.decoder.decode((x.float() / scale + shift).to(p.dtype)).sample      # D, differentiable
            feats = self.clip.image_features(images)
        loss = clamped_clip_loss(feats, self.clip_text.to(x.device)[rows.to(x.device)], self.cfg.clip_margin)
        return clip_weight(self.cfg.clip_weight, self.progress) * loss

    def generator_loss(self, nets: Nets, batch: dict) -> dict:
        c, cond, draws = self.cfg, batch.get("cond"), Draws(batch)
        x = sample_student(nets.student, cond, draws)
        sched = nets.teacher.schedule
        with torch.no_grad():
            t = draws.times(sched, c.t_range)
            x_t = draws.noised(sched, x, t)
            w = c.guidance if cond is not None else 1.0
            real_x0 = guided(real_score(nets), w)(x_t, t, cond)       # the teacher: the LoRA's adapters off
            fake_x0 = guided(nets.fake_score, w)(x_t, t, cond)
            alpha, sigma = sched.alpha_sigma(t)
            g = vsd_gradient(x_t, alpha, sigma, real_x0, fake_x0)
        out = {"vsd": target_loss(x, g), "_vsd_grad_norm": g.flatten(1).norm(dim=1)}
        if self.clip is not None:
            out["clip"] = self.clip_term(x, batch["rows"])                   # SwiftBrush v2, eq. 5
        return out

    def critic_loss(self, nets: Nets, batch: dict) -> dict:
        cond, draws = batch.get("cond"), Draws(batch)
        x = sample_student(nets.student, cond, draws, grad=False)
        fake = nets.fake_score
        sched = fake.schedule
        t = draws.times(sched, (0.0, 1.0))                                   # randint(0, T)
        eps = draws.randn_like(x)
        x_t = sched.add_noise(x, eps, t)
        drop = draws.rand() < self.cfg.cond_drop
        pred_x0 = fake(x_t, t, with_null(cond, fake.null_cond(cond), drop) if cond is not None else None)
        alpha, sigma = (bcast(v, x) for v in sched.alpha_sigma(t))
        eps_hat = (x_t - alpha * pred_x0) / sigma
        return {"fake_eps": (alpha * (eps_hat - eps)).pow(2).flatten(1).mean(1)}   # alpha_t-weighted eps loss


__all__ = ["SwiftBrush", "vsd_gradient", "with_null"]

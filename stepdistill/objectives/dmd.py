"""Distribution Matching Distillation: DMD (Yin et al., 2024) and DMD2 (Yin et al., 2024b).

Generator: push student samples x along the difference of the fake and the real (teacher, with
CFG) x0-predictions at a noised copy x_t, the gradient of KL(p_fake,t || p_real,t) (DMD eq. 7),
normalised per sample by mean|x - real_x0| (eq. 8). It is written as 0.5 * mean((x - sg(x - g))^2)
so that its gradient w.r.t. x is g / (C*H*W) per sample (the mean-reduced form of the DMD/DMD2
code bases, so their learning rates carry over).
Critic: the fake score learns the student's distribution by denoising score matching; DMD2 runs
it `critic_repeats` times per generator update (two time-scale rule, sec. 4.2) and may add a GAN
classifier on its bottleneck features trained against real images (sec. 4.3).
DMD adds a regression loss on teacher noise -> image pairs (eq. 9) from a ``cache`` folder. A
K-step student regresses each of its steps onto the teacher's ODE trajectory instead (the cache then
holds trajectories whose grid holds the student's timesteps): per pair a step k, the input the
trajectory's state at t_k (at k = 0 the student's own noise input) and the target the trajectory's
end (x0 of a re-noising student; the ODE maps x_{t_k} to it) or, for a ``sampler="ddim"`` student, the
trajectory at the step's end, reached by the student's DDIM jump.
``regression_warmup`` first trains the generator on that loss alone for as many iterations, with
the critic waiting (DMD2's one-step SDXL recipe: a short ODE-regression pretraining on 10K teacher
pairs before DMD2 starts, tianweiy/DMD2 experiments/sdxl); the fake score then starts from the teacher.
Multi-step students train with backward simulation (DMD2 sec. 4.5).

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
from ..fake_score import (DEFAULT_LORA_TARGETS, FakeScore, build_disc_head, denoising_loss, disc_logits, frozen,
                          real_score, sample_times)
from ..schedules import bcast
from . import gan
from .base import Nets, Objective, Phase, register

#: where the fake score's DSM times come from ("dm": the DM term's; "train": the teacher's training times)
FAKE_TIMES = ("dm", "train")


# -- shared pieces (also used by SiD and the adversarial objective) ------------------------------
def student_sample(student, noise: torch.Tensor, cond, *, backward_simulation: bool = True) -> torch.Tensor:
    """Student samples with gradient through one student evaluation.

    One step: x = G(noise). K steps with backward simulation (DMD2 sec. 4.5; SiD's uniform mixture
    over steps): per sample pick k ~ U{0..K-1}, run the student's own chain without gradient from
    noise to its k-th timestep (re-noising between steps, or the deterministic DDIM step of a
    ``sampler="ddim"`` student: the inputs it meets when sampling), then take one step with
    gradient. Without backward simulation the whole chain runs with gradient."""
    ts = student.timesteps
    if len(ts) == 1 or not backward_simulation:
        return student(noise, cond)
    b = noise.shape[0]
    k = torch.randint(0, len(ts), (b,))
    sched = student.schedule
    x = sched.prior(noise, ts[0])
    x_at = x.clone()
    with torch.no_grad():
        for i in range(int(k.max())):
            x0 = student.denoise(x, ts[i], cond)
            if student.sampler == "ddim":
                x = student.ddim_to(x, x0, ts[i], ts[i + 1])
            else:
                x = sched.add_noise(x0, torch.randn_like(noise), ts[i + 1])
            x_at = torch.where(bcast(k == i + 1, x).bool(), x, x_at)
    return student.denoise(x_at, ts[k.to(ts.device)], cond)


def noise_like_batch(batch: dict) -> torch.Tensor:
    """Generator input noise shaped like the batch, from the trainer's per-sample stream if any."""
    x0, rng = batch["x0"], batch.get("rng")
    return rng.randn_like(x0).to(x0.device) if rng is not None else torch.randn_like(x0)


def cfg_scales(cfg, n: int, device) -> torch.Tensor | float:
    """The teacher's CFG scale(s): fixed, or one per sample uniform in guidance_range (SNOOPI)."""
    if cfg.guidance_range is not None:
        lo, hi = map(float, cfg.guidance_range)
        return lo + (hi - lo) * torch.rand(n, dtype=torch.float64, device=device)
    return float(cfg.guidance)


def mean_abs(x: torch.Tensor) -> torch.Tensor:
    return x.abs().flatten(1).mean(1).clamp_min(1e-5)


def dmd_gradient(x: torch.Tensor, real_x0: torch.Tensor, fake_x0: torch.Tensor) -> torch.Tensor:
    """DMD eq. 7-8: (fake - real) normalised per sample by mean|x - real| (the paper's
    sigma^2/alpha * CS / ||mu_real - x||_1 weight times the score difference alpha(real - fake)/sigma^2)."""
    return (fake_x0 - real_x0) / bcast(mean_abs(x - real_x0), x)


def target_loss(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """0.5 * mean((x - sg(x - grad))^2) per sample: d/dx = grad / numel(x[0])."""
    target = (x - grad).detach()
    return 0.5 * (x - target).pow(2).flatten(1).mean(1)


#: iCT's pseudo-Huber constant per value (Song & Dhariwal, 2023, sec. 3.3: c = 0.00054 sqrt(d))
HUBER_C = 0.00054


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float | None = None) -> torch.Tensor:
    """Per-pixel pseudo-Huber distance, the stand-in for LPIPS (whose weights are downloaded at run
    time): sqrt(mean((a-b)^2) + c^2) - c with c = 0.00054 by default. It is iCT's sum form
    sqrt(||a-b||^2 + c'^2) - c' (Song & Dhariwal, 2023, sec. 3.3; c' = 0.00054 sqrt(d)) divided by
    sqrt(d), so that, like DMD's mean-reduced LPIPS (Yin et al., 2024, eq. 9) and the mean-reduced
    DM term, its gradient per pixel scales as 1/d: the regression/DM balance does not change with
    resolution (the sum form's gradient is a unit vector, sqrt(d) times larger at every size)."""
    c = HUBER_C if c is None else c
    return ((a - b).pow(2).flatten(1).mean(1) + c * c).sqrt() - c


@dataclass
class RegressionPairs:
    """Config fields of the regression loss on teacher noise -> image pairs (DMD eq. 9) and its warm-up."""

    regression_loss: str = "pseudo_huber"          # "pseudo_huber" | "mse" | "lpips" (needs local weights)
    huber_c: Optional[float] = None                # per-pixel pseudo-Huber c; None = 0.00054 (iCT's c / sqrt(d))
    cache: Optional[str] = None                    # teacher-output cache folder (stepdistill.cache)
    cache_num: int = 1000                          # built there if missing: pairs ...
    cache_steps: int = 50                          # ... teacher steps
    cache_sampler: str = "ddim"
    cache_seed: int = 0
    regression_batch: Optional[int] = None         # pairs per step; None = the batch size
    regression_warmup: int = 0                     # first iterations: regression alone, critic waits (DMD2 1-step)


@register
class DMD(Objective):
    name = "dmd"

    @dataclass
    class Config(RegressionPairs):
        guidance: float = 1.0                          # teacher CFG scale in the real score
        guidance_range: Optional[List[float]] = None   # [w_min, w_max]: a scale per sample (SNOOPI); None = fixed
        t_range: List[float] = field(default_factory=lambda: [0.02, 0.98])  # DM term times (fractions of noise range)
        cfg_t_range: Optional[List[float]] = None      # Decoupled DMD: CFG-augmentation term's own range; None = coupled
        fake_lora_rank: int = 0                        # 0 = full copy of the teacher; > 0 = LoRA on its backbone
        fake_lora_alpha: Optional[float] = None
        fake_target_modules: List[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
        fake_loss: str = "raw"                         # "raw" (teacher's parameterisation) | "x0" (unweighted)
        fake_t: str = "dm"                             # fake-score DSM times: "dm" = t_range, as the DM term
                                                       # queries it (DMD2); "train" = the teacher's training
                                                       # distribution (EDM's log-normal)
        critic_repeats: int = 1                        # fake-score updates per generator update (DMD2: 5)
        backward_simulation: bool = True               # multi-step students (DMD2 sec. 4.5)
        regression_weight: float = 0.25                # DMD eq. 9, lambda_reg; 0 = off (DMD2)
        gan_weight: float = 0.0                        # generator GAN term (DMD2 ImageNet: 3e-3); 0 = off
        gan_critic_weight: float = 1e-2                # discriminator term in the critic phase
        gan_loss: str = "ns"                           # "ns" (DMD2) | "hinge"
        r1_weight: float = 0.0                         # approximate R1 on real logits; 0 = off
        r1_noise: float = 0.01
        feature_module: str = "auto"              # bottleneck the discriminator head reads
        disc_t_range: List[float] = field(default_factory=lambda: [0.02, 0.98])

    def __init__(self, cfg=None):
        super().__init__(cfg)
        c = self.cfg
        if c.critic_repeats < 1:
            raise UserError(f"objective.critic_repeats must be >= 1, got {c.critic_repeats}")
        if c.guidance_range is not None and (len(c.guidance_range) != 2 or c.guidance_range[0] > c.guidance_range[1]):
            raise UserError(f"objective.guidance_range must be [w_min, w_max] with w_min <= w_max, got "
                            f"{list(c.guidance_range)}")
        reg = getattr(c, "regression_weight", 0.0)  # SiD shares this class without a regression term
        warm = c.regression_warmup
        if warm < 0:
            raise UserError(f"objective.regression_warmup must be >= 0, got {warm}")
        if (reg or warm) and c.regression_loss not in ("pseudo_huber", "mse", "lpips"):
            raise UserError(f"objective.regression_loss {c.regression_loss!r} is not supported; use pseudo_huber, "
                            "mse or lpips")
        if (reg > 0 or warm > 0) and not c.cache:
            raise UserError("DMD's regression loss needs teacher noise->image pairs: set objective.cache to a folder "
                            "(built there on first use) or objective.regression_weight=0 and "
                            "objective.regression_warmup=0")
        gan._check(c.gan_loss)
        if c.fake_t not in FAKE_TIMES:
            raise UserError(f"objective.fake_t {c.fake_t!r} is not supported; use 'dm' (the DM term's t_range) or "
                            "'train' (the teacher's training distribution)")
        self.uses_real_data = c.gan_weight > 0
        self._pairs = None
        self._grid_pos = None
        self._lpips = None
        self.iteration = 0  # outer iterations done (the regression warm-up's clock)

    # -- contract -------------------------------------------------------------------------------
    def phases(self):
        trains = ("fake_score", "disc") if self.cfg.gan_weight > 0 else ("fake_score",)
        return [Phase("critic", trains, repeats=self.cfg.critic_repeats, start=self.cfg.regression_warmup),
                Phase("generator", ("student",))]
    def on_step_end(self, nets: Nets, step: int) -> None:
        self.iteration = step

    def state_dict(self):
        return {"iteration": self.iteration}

    def load_state_dict(self, state) -> None:
        self.iteration = int(state.get("iteration", 0))

    def build(self, teacher, student):
        c = self.cfg
        if getattr(c, "regression_weight", 0.0) > 0 or c.regression_warmup > 0:
            self._check_cache(student)
        nets = {"fake_score": FakeScore(teacher, lora_rank=c.fake_lora_rank, lora_alpha=c.fake_lora_alpha,
                                        target_modules=c.fake_target_modules)}
        if c.gan_weight > 0:
            nets["disc"] = build_disc_head(nets["fake_score"], c.feature_module, teacher)
        return nets

    def _check_cache(self, student):
        """Fail before training if the cache folder holds pairs made with other settings, its grid
        misses a multi-step student's timesteps, or LPIPS cannot load; the pairs themselves are
        loaded (or built) at the first generator step."""
        from ..cache import check_cache_settings, check_grid_holds

        c = self.cfg
        if student.steps > 1:
            check_grid_holds(student.schedule, c.cache_steps, student.timesteps[1:],
                             f"a {student.steps}-step student regresses each step onto teacher trajectories; set "
                             f"objective.cache_steps to a multiple of {student.steps} whose grid holds its timesteps "
                             f"(e.g. {8 * student.steps})")
        check_cache_settings(c.cache, num=c.cache_num, steps=c.cache_steps, sampler=c.cache_sampler,
                             guidance=c.guidance, seed=c.cache_seed, trajectory=student.steps > 1)
        if c.regression_loss == "lpips":
            self._lpips = _load_lpips()

    def _load_pairs(self, teacher, student):
        from ..cache import ensure_cache

        c = self.cfg
        pairs = ensure_cache(teacher, c.cache, num=c.cache_num, steps=c.cache_steps, sampler=c.cache_sampler,
                             guidance=c.guidance, seed=c.cache_seed, trajectory=student.steps > 1)
        if student.steps > 1:  # grid positions of the student's timesteps after its first (whose input
            ts = student.timesteps  # is its own noise, at first_timestep too) and of each step's end
            pos = torch.cat([torch.zeros(1, dtype=torch.long), pairs.grid_index(ts[1:])])
            self._grid_pos = (pos, pairs.grid_index(student.segment_end(ts)))
        return pairs

    def regression_pair(self, student, pairs, idx: torch.Tensor, device):
        """(student output, target, cond) for cached pairs idx: G(noise) against the teacher's sample
        (DMD eq. 9); for a K-step student one step per pair on the teacher's trajectory."""
        noise, x_ref, cond = pairs.get(idx, device=device)
        ts = student.timesteps
        if len(ts) == 1:
            return student(noise, cond), x_ref, cond
        pos, pos_end = self._grid_pos
        k = torch.randint(0, len(ts), (len(idx),))
        first = bcast(k == 0, noise).to(device).bool()
        x_k = torch.where(first, student.schedule.prior(noise, ts[0]), pairs.states(idx, pos[k], device))
        t = ts[k.to(ts.device)]
        if student.sampler == "ddim":
            return student.jump(x_k, t, student.segment_end(t), cond), pairs.states(idx, pos_end[k], device), cond
        return student.denoise(x_k, t, cond), x_ref, cond

    # -- pieces -----------------------------------------------------------------------------------
    def fake_cond(self, nets, cond):
        return cond

    def fake_times(self, schedule, n: int, device) -> torch.Tensor:
        """Times of the fake score's DSM updates: by default those the generator phase queries it at
        (t_range on the 1000-step grid; DMD2 trains its fake score on the DM term's own
        U[min_step, max_step]), so it is accurate where it is read; "train" = the teacher's training
        distribution (on EDM its log-normal puts ~4 % of updates above sigma 2.5, DM ~50 %)."""
        if self.cfg.fake_t == "train":
            return schedule.sample_t(n).to(device)
        return sample_times(schedule, n, self.cfg.t_range, device=device)

    def dm_terms(self, nets: Nets, x: torch.Tensor, cond) -> tuple[torch.Tensor, dict]:
        """The DMD gradient g w.r.t. the student's samples x (no graph), and what to log."""
        c = self.cfg
        real = real_score(nets)
        fake = nets.fake_score
        b = x.shape[0]
        w = cfg_scales(c, b, x.device) if cond is not None else 1.0
        with torch.no_grad():
            t = sample_times(real.schedule, b, c.t_range, device=x.device)
            x_t = real.schedule.add_noise(x, torch.randn_like(x), t)
            fake_x0 = fake(x_t, t, self.fake_cond(nets, cond))
            if c.cfg_t_range is None:
                real_x0 = GuidedDenoiser(real, w)(x_t, t, cond) if _guides(w) else real(x_t, t, cond)
                g = dmd_gradient(x, real_x0, fake_x0)
                logs = {}
            else:
                # Decoupled DMD: DM term (fake - real_c) at t, CA term -(w-1)(real_c - real_u) at its own t'
                real_c = real(x_t, t, cond)
                g_dm = dmd_gradient(x, real_c, fake_x0)
                t2 = sample_times(real.schedule, b, c.cfg_t_range, device=x.device)
                x_t2 = real.schedule.add_noise(x, torch.randn_like(x), t2)
                d_u, d_c = real(x_t2, t2, real.null_cond(cond)), real(x_t2, t2, cond)
                wm1 = bcast(torch.as_tensor(w, dtype=torch.float64, device=x.device), x) - 1.0
                g_ca = -wm1 * (d_c - d_u) / bcast(mean_abs(x - d_c), x)
                g = g_dm + g_ca
                logs = {"_ca_norm": g_ca.flatten(1).norm(dim=1), "_dm_norm": g_dm.flatten(1).norm(dim=1)}
        return g, logs

    def gan_generator_term(self, nets, x, cond):
        c = self.cfg
        t = sample_times(nets.fake_score.schedule, x.shape[0], c.disc_t_range, device=x.device)
        with frozen(nets.fake_score, nets.disc):
            logits = disc_logits(nets.fake_score, c.feature_module, nets.disc, x, t, self.fake_cond(nets, cond))
        return c.gan_weight * gan.g_loss(logits, c.gan_loss)

    def gan_critic_terms(self, nets, x_fake, batch) -> dict:
        c = self.cfg
        real_x = batch.get("x0")
        if real_x is None:
            raise UserError("the GAN term needs real images in the batch; set data to an image set or gan_weight=0")
        cond = batch.get("cond")
        fs = nets.fake_score
        b = x_fake.shape[0]
        t_r = sample_times(fs.schedule, b, c.disc_t_range, device=x_fake.device)
        t_f = sample_times(fs.schedule, b, c.disc_t_range, device=x_fake.device)
        fc = self.fake_cond(nets, cond)
        real_logits = disc_logits(fs, c.feature_module, nets.disc, real_x, t_r, fc)
        fake_logits = disc_logits(fs, c.feature_module, nets.disc, x_fake, t_f, fc)
        out = {"gan_d": c.gan_critic_weight * gan.d_loss(real_logits, fake_logits, c.gan_loss),
               "_d_real": real_logits.detach(), "_d_fake": fake_logits.detach()}
        if c.r1_weight > 0:
            x_t = fs.schedule.add_noise(real_x, torch.randn_like(real_x), t_r)
            from ..fake_score import find_module, forward_with_features

            mod = find_module(fs, c.feature_module)

            def d_of(xt):
                return nets.disc(forward_with_features(fs, mod, xt, t_r, fc, need_x0=False)[1], fc)

            out["r1"] = c.r1_weight * gan.approx_r1(d_of, x_t, d_of(x_t), c.r1_noise)
        return out

    def regression_term(self, nets, like: torch.Tensor, weight: float | None = None) -> torch.Tensor:
        """DMD eq. 9 on a random batch of cached pairs, times ``weight`` (default regression_weight),
        spread over ``like``'s batch size."""
        c = self.cfg
        weight = c.regression_weight if weight is None else weight
        if self._pairs is None:  # the teacher without any fake-score adapters
            self._pairs = self._load_pairs(real_score(nets), nets.student)
        pairs = self._pairs
        n = c.regression_batch or like.shape[0]
        idx = torch.randint(0, len(pairs), (n,))
        out, x_ref, cond = self.regression_pair(nets.student, pairs, idx, like.device)
        d = self.regression_distance(out, x_ref)
        # the regression batch may differ in size from the DM batch: spread its mean over [B]
        return weight * d.mean().expand(like.shape[0])

    def regression_distance(self, out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """Per-sample regression distance, mean-reduced over pixels like the paper's LPIPS (eq. 9)."""
        c = self.cfg
        if c.regression_loss == "mse":
            return (out - ref).pow(2).flatten(1).mean(1)
        if c.regression_loss == "lpips":
            return self._lpips(out, ref).flatten(1).mean(1)
        return pseudo_huber(out, ref, c.huber_c)

    # -- phases ----------------------------------------------------------------------------------
    def critic_loss(self, nets: Nets, batch: dict) -> dict:
        cond = batch.get("cond")
        with torch.no_grad():
            x = student_sample(nets.student, noise_like_batch(batch), cond,
                               backward_simulation=self.cfg.backward_simulation)
        t = self.fake_times(nets.fake_score.schedule, x.shape[0], x.device)
        out = {"fake_dsm": denoising_loss(nets.fake_score, x, self.fake_cond(nets, cond), space=self.cfg.fake_loss,
                                          t=t)}
        if self.cfg.gan_weight > 0:
            out.update(self.gan_critic_terms(nets, x, batch))
        return out

    def warmup_loss(self, nets: Nets, batch: dict) -> dict | None:
        """During ``regression_warmup``: the regression loss alone, weight 1 (DMD2's one-step
        regression pretraining); afterwards None."""
        if self.iteration < self.cfg.regression_warmup:
            return {"regression": self.regression_term(nets, batch["x0"], weight=1.0)}
        return None

    def generator_loss(self, nets: Nets, batch: dict) -> dict:
        if (warm := self.warmup_loss(nets, batch)) is not None:
            return warm
        cond = batch.get("cond")
        x = student_sample(nets.student, noise_like_batch(batch), cond, backward_simulation=self.cfg.backward_simulation)
        g, logs = self.dm_terms(nets, x, cond)
        out = {"dmd": target_loss(x, g), "_dmd_grad_norm": g.flatten(1).norm(dim=1), **logs}
        if self.cfg.regression_weight > 0:
            out["regression"] = self.regression_term(nets, x)
        if self.cfg.gan_weight > 0:
            out["gan_g"] = self.gan_generator_term(nets, x, cond)
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


def _guides(w) -> bool:
    return torch.is_tensor(w) or float(w) != 1.0


def _load_lpips():
    try:
        import lpips  # noqa: F401
    except ImportError:
        raise UserError("regression_loss 'lpips' needs the lpips package and its weights available offline; "
                        "use regression_loss=pseudo_huber") from None
    try:
        return lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True).eval().requires_grad_(False)
    except Exception as err:  # the package downloads backbone weights on first use
        raise UserError(f"could not load LPIPS weights offline ({err}); use regression_loss=pseudo_huber") from None


__all__ = ["DMD", "DMD2", "RegressionPairs", "student_sample", "dmd_gradient", "target_loss", "pseudo_huber",
           "cfg_scales"]

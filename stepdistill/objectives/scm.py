"""sCM: continuous-time consistency distillation in TrigFlow (Lu & Song, 2024, "Simplifying,
Stabilizing and Scaling Continuous-Time Consistency Models", Alg. 1, consistency distillation).

Per iteration, on real data x0 (``TrigFlow`` maps every teacher kind onto x_t = cos t x0 + sin t z):

    tau ~ N(P_mean, P_std^2),  t = arctan(e^tau / sigma_d),  z ~ N(0, sigma_d^2 I),  x_t = cos t x0 + sin t z
    dx_t/dt = sigma_d F_teacher(x_t / sigma_d, t)                               (the teacher's PF-ODE)
    r = min(1, iteration / H)                                                   (tangent warm-up, sec. 4.2)
    g = -cos^2 t (sigma_d F_- - dx_t/dt) - r cos t sin t (x_t + sigma_d dF_-/dt) (eq. 8, the "JVP rearrangement")
    g = g / (||g|| + c)                                                         (tangent normalisation, sec. 4.2)
    L = lambda(t) e^{w(t)} / D ||F_theta - F_- - g||^2 - w(t)                   (adaptive weighting, sec. 4.3)

F_- is the student with stopped gradient (theta^- = sg(theta), no target network) and dF_-/dt its
total derivative along the ODE, a forward-mode JVP with tangents (dx_t/dt, 1) (``torch.func.jvp``,
attention through SDPA's math kernel and group norm in elementary ops, ``jvp.forward_mode_safe``), or the central
difference along the same tangent (``tangent="finite_difference"``, FastGen's ``use_jvp_finite_diff``),
which keeps the fused kernels and costs a third forward pass. ``tangent="split"`` takes the two parts
of the total derivative apart: the JVP along x (tangent (dx_t/dt, 0)) plus a central difference in t
alone over ``fd_t_eps`` (relative): a teacher trained at integer timesteps wiggles between them, and
a step in t that spans several of them gives the smooth time derivative while x keeps the exact one.
w(t) is a small learned network (``AdaptiveWeight``; ``adaptive_weighting=False``: w = 0, as in rCM's
loss). lambda(t) = 1 / (sigma_d tan t) is the prior
weighting of the reference implementation (FastGen ``sCM.py``, ``prior_weighting_enabled``: 1/sigma_t),
and the norm in the normalisation is Alg. 1's plain L2 norm over the sample (SANA-Sprint's
``train_scm_ladd.py`` likewise), or with ``tangent_norm="rms"`` FastGen's size-invariant RMS
(``g_norm_spatial_invariance``), where c = 0.1 weighs sqrt(D) times more.

The student is sampled by the paper's multistep consistency sampler: f at the first time, then the
x0 estimate re-noised to the next time (the student's "renoise" step). A 2-step student's second step
starts at the paper's intermediate TrigFlow time t = 1.1 (``intermediate_t``; sec. 5.2, App. G.2), mapped to the teacher's
units by equal SNR (a VP teacher's nearest training timestep); its export passes those times to the
scheduler. ``intermediate_t=null`` uses the teacher schedule's own 2-step grid instead.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..jvp import forward_mode_safe
from ..schedules import bcast
from ..trigflow import TrigFlow
from .base import BuildContext, Nets, Objective, Phase, register
from .common import Draws, guidance_scales


class AdaptiveWeight(nn.Module):
    """w_phi(t) (sCM sec. 4.3, after EDM2's learned uncertainty, Karras et al., 2024, eq. 15): a linear
    layer on fixed random Fourier features of c_noise = log(sigma_d tan t) / 4, zero at the start."""

    def __init__(self, sigma_d: float = 0.5, features: int = 128, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.sigma_d = sigma_d
        self.register_buffer("freqs", 2 * math.pi * torch.randn(features, generator=g))
        self.register_buffer("phases", 2 * math.pi * torch.rand(features, generator=g))
        self.linear = nn.Linear(features, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        c_noise = (self.sigma_d * torch.tan(t.double())).log().float() / 4
        feats = torch.cos(c_noise[:, None] * self.freqs + self.phases) * math.sqrt(2)
        return self.linear(feats).squeeze(1)


@register
class SCM(Objective):
    name = "scm"
    uses_real_data = True

    @dataclass
    class Config:
        sigma_d: float = 0.5             # TrigFlow's data standard deviation
        p_mean: float = -1.0             # proposal log-normal over sigma_d tan t (sCM sec. 4.4, CIFAR-10 / ImageNet)
        p_std: float = 1.4
        tangent_warmup: int = 10000      # H: iterations over which r rises from 0 to 1
        tangent_c: float = 0.1           # c in g / (||g|| + c)
        tangent_norm: str = "l2"         # "l2" (Alg. 1; SANA-Sprint's vector_norm over C, H, W) or "rms"
                                         # (||g|| / sqrt(D), FastGen's g_norm_spatial_invariance)
        prior_weighting: bool = True     # lambda(t) = 1 / (sigma_d tan t) (FastGen's prior weighting)
        tangent: str = "jvp"             # "jvp" (torch.func.jvp), "finite_difference" or "split" (JVP in x,
                                         # a difference over fd_t_eps in t)
        fd_eps: float = 1.0e-4           # finite-difference step, relative to t: diffusers' sinusoidal time
                                         # embeddings oscillate down to a period of 2 pi training steps, and
                                         # at 1e-3 (FastGen's default) the difference misses them by 5-40 %;
                                         # that is the JVP's value, but a teacher trained at integer timesteps
                                         # wiggles between them, and a step spanning several timesteps (1e-2
                                         # on the digits VP teacher) gives the smooth tangent (which did not
                                         # score better there: README, digits benchmark)
        fd_t_eps: float = 1.0e-2         # "split": the difference step in t, relative to t (1e-2 spans several
                                         # training timesteps of the digits VP teacher at the sampler's times)
        guidance: float = 1.0            # CFG scale of the teacher's velocity (1 = none)
        guidance_range: list | None = None
        weight_features: int = 128
        adaptive_weighting: bool = True  # the learned w(t) of sec. 4.3; rCM's sCM loss has none (NVlabs/rcm)
        intermediate_t: Optional[float] = 1.1  # 2-step sampler: the second step's TrigFlow time (the paper's
                                         # 1.1, App. G.2; SANA-Sprint's SCMScheduler: 1.3); None = the
                                         # teacher schedule's own 2-step grid

    def __init__(self, cfg=None):
        super().__init__(cfg)
        if self.cfg.tangent not in ("jvp", "finite_difference", "split"):
            from ..errors import UserError
            raise UserError(f"scm: tangent {self.cfg.tangent!r} is not supported; use 'jvp', 'finite_difference' or "
                            "'split'")
        if self.cfg.intermediate_t is not None and not 0.0 < float(self.cfg.intermediate_t) < math.pi / 2:
            from ..errors import UserError
            raise UserError(f"scm: intermediate_t is a TrigFlow time in (0, pi/2), got {self.cfg.intermediate_t}; "
                            "the paper's is 1.1")
        if self.cfg.tangent_norm not in ("rms", "l2"):
            from ..errors import UserError
            raise UserError(f"scm: tangent_norm {self.cfg.tangent_norm!r} is not supported; use 'rms' or 'l2'")
        self.iteration = 0

    def phases(self):
        return [Phase("generator", ("student", "weighting") if self.cfg.adaptive_weighting else ("student",))]

    def build(self, teacher, student, context: BuildContext | None = None):
        self.trig = TrigFlow(teacher.schedule, self.cfg.sigma_d)
        return {"weighting": AdaptiveWeight(self.cfg.sigma_d, self.cfg.weight_features)} if self.cfg.adaptive_weighting \
            else {}

    def student_sampler(self):
        return "renoise"  # the multistep consistency sampler (Song et al., 2023, Alg. 1)

    def student_timesteps(self, teacher, steps: int):
        """[the noisiest time, the teacher time of TrigFlow t = intermediate_t] for a 2-step student
        (None otherwise: the scheduler's grid): the scheduler's own first time, the second at equal
        signal-to-noise ratio (``TrigFlow.native_time``), rounded to a training timestep on VP. Pixel-space
        (UNet2DModel) students only: their shipped pipeline passes the times to its scheduler, while a
        text-to-image student's export is its teacher's own pipeline, which runs the scheduler's grid."""
        if steps != 2 or self.cfg.intermediate_t is None or type(teacher.backbone).__name__ != "UNet2DModel":
            return None
        schedule = teacher.schedule
        from ..export.scheduler import student_timesteps
        from ..schedules import VPSchedule

        first = float(student_timesteps(schedule, 2)[0])
        t_mid = torch.tensor(float(self.cfg.intermediate_t), dtype=torch.float64)
        mid = float(TrigFlow(schedule, self.cfg.sigma_d).native_time(t_mid))
        mid = float(round(mid)) if isinstance(schedule, VPSchedule) else mid
        if not mid < first:
            from ..errors import UserError
            raise UserError(f"scm: intermediate_t={self.cfg.intermediate_t} maps to time {mid:g}, not below the "
                            f"student's first time {first:g}; lower objective.intermediate_t (the paper's is 1.1)")
        return [first, mid]

    def on_step_end(self, nets: Nets, step: int) -> None:
        self.iteration = step  # iterations done (the trainer passes its step count)

    def state_dict(self):
        return {"iteration": self.iteration}

    def load_state_dict(self, state):
        self.iteration = int(state.get("iteration", 0))

    # -- Alg. 1 -------------------------------------------------------------------------------------
    def times(self, draws: Draws) -> torch.Tensor:
        """t = arctan(e^tau / sigma_d), tau ~ N(P_mean, P_std^2) (inverse-CDF of the per-sample uniform),
        kept inside the times the teacher was trained on."""
        return self.trig.lognormal(draws.rand(), self.cfg.p_mean, self.cfg.p_std)

    def tangent(self, student, x: torch.Tensor, t: torch.Tensor, dxdt: torch.Tensor, cond):
        """(sigma_d F_-, sigma_d dF_-/dt): the student's velocity and its total time derivative along
        the ODE direction (dx_t/dt, 1), without gradient."""
        def velocity(x_, t_):
            return self.trig.velocity(student.denoise, x_, t_, cond)

        with torch.no_grad():
            if self.cfg.tangent in ("jvp", "split"):
                dt = torch.ones_like(t) if self.cfg.tangent == "jvp" else torch.zeros_like(t)
                with forward_mode_safe():  # attention and group norm by rules that exist (``jvp.py``)
                    v, dv = torch.func.jvp(velocity, (x, t), (dxdt, dt))
                if self.cfg.tangent == "jvp":
                    return v, dv
                lo, hi = self._span(t, self.cfg.fd_t_eps)                  # d/dt at fixed x, over a wide step
                return v, dv + (velocity(x, t + hi) - velocity(x, t - lo)) / bcast(hi + lo, x)
            lo, hi = self._span(t, self.cfg.fd_eps)
            ahead = velocity(x + bcast(hi, x) * dxdt, t + hi)
            behind = velocity(x - bcast(lo, x) * dxdt, t - lo)
            return velocity(x, t), (ahead - behind) / bcast(hi + lo, x)

    def _span(self, t: torch.Tensor, rel: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(back, ahead) steps of a central difference of size rel * t, the step ahead cut at the
        largest time the teacher knows (t_max): one-sided there, never past it."""
        h = (rel * t).clamp_min(1e-6)
        return h, torch.minimum(h, (self.trig.t_max - t).clamp_min(0.0))

    def tangent_g(self, student, teacher, x: torch.Tensor, t: torch.Tensor, cond, r: float):
        """Eq. 8 before normalisation: g = cos t df_-/dt along the teacher's ODE (with the warm-up factor
        r on its second part), and sigma_d F_- it was computed at."""
        with torch.no_grad():
            dxdt = self.trig.velocity(teacher, x, t, cond)                     # sigma_d F_teacher
        v_minus, dv_dt = self.tangent(student, x, t, dxdt, cond)               # sigma_d F_-, sigma_d dF_-/dt
        cos, sin = bcast(torch.cos(t), x), bcast(torch.sin(t), x)
        return -cos**2 * (v_minus - dxdt) - r * cos * sin * (x + dv_dt), v_minus

    def generator_loss(self, nets: Nets, batch: dict):
        from ..denoisers import guided

        cfg, trig, draws = self.cfg, self.trig, Draws(batch)
        x0, cond = batch["x0"], batch.get("cond")
        t = self.times(draws)
        x = trig.add_noise(x0, cfg.sigma_d * draws.randn_like(x0), t)
        teacher = guided(nets.teacher, guidance_scales(cfg.guidance, cfg.guidance_range, draws))
        r = min(1.0, self.iteration / max(cfg.tangent_warmup, 1))               # tangent warm-up
        g, v_minus = self.tangent_g(nets.student, teacher, x, t, cond, r)
        norm = g.flatten(1).norm(dim=1)
        if cfg.tangent_norm == "rms":
            norm = norm / math.sqrt(g[0].numel())
        g = g / bcast(norm + cfg.tangent_c, g)                                 # tangent normalisation
        f_theta = trig.velocity(nets.student.denoise, x, t, cond) / cfg.sigma_d
        mse = (f_theta - (v_minus / cfg.sigma_d + g).detach()).pow(2).flatten(1).mean(1)
        w = nets.weighting(t) if cfg.adaptive_weighting else torch.zeros_like(mse)
        prior = 1.0 / (cfg.sigma_d * torch.tan(t)) if cfg.prior_weighting else torch.ones_like(t)
        loss = prior.to(mse.dtype) * torch.exp(w) * mse - w                    # adaptive weighting
        return {"scm": loss, "_mse": mse.detach(), "_logvar": -w.detach(), "_r": torch.full_like(mse, r)}


__all__ = ["SCM", "AdaptiveWeight"]

"""The TrigFlow view of any teacher (Lu & Song, 2024, "Simplifying, Stabilizing and Scaling
Continuous-Time Consistency Models", sec. 2): x_t = cos(t) x0 + sin(t) z, z ~ N(0, sigma_d^2 I),
t in [0, pi/2].

A schedule's x_u = alpha(u) x0 + sigma(u) eps is the same Gaussian path in other units: dividing by
cos(t) gives x0 + sigma_d tan(t) eps, so the TrigFlow time t and the schedule time u with equal
signal-to-noise ratio satisfy sigma(u) / alpha(u) = sigma_d tan(t), and x_u = k(t) x_t with
k(t) = alpha(u) / cos(t) = sqrt(alpha(u)^2 + (sigma(u) / sigma_d)^2). This is SANA-Sprint's
training-free transform of a flow-matching teacher (Chen et al., 2025, sec. 3.1), and with the
schedules' exact inverse of log-SNR (``Schedule.t_from_log_snr``: the VP table's interpolated
log alpha-bar, EDM's sigma, flow's sigmoid) it holds for VP, EDM and flow teachers alike.

Every denoiser D (teacher or student, any parameterisation) then has the TrigFlow velocity
sigma_d F(x_t / sigma_d, t) = (cos(t) x_t - D(k(t) x_t, u(t))) / sin(t) (sCM eq. 3 solved for F with
the x0 prediction D), and the consistency function f = cos(t) x_t - sin(t) sigma_d F is D itself.
Both are differentiable in (x_t, t), so ``torch.func.jvp`` gives the total time derivative
along the probability-flow ODE.
"""
from __future__ import annotations

import math

import torch

from .schedules import Schedule, bcast, log_snr


class TrigFlow:
    """Maps TrigFlow times and states onto ``schedule`` with data standard deviation ``sigma_d``."""

    def __init__(self, schedule: Schedule, sigma_d: float = 0.5):
        self.schedule, self.sigma_d = schedule, float(sigma_d)
        lam_hi = float(log_snr(schedule, torch.tensor(schedule.t_max, dtype=torch.float64)))
        # the noisiest TrigFlow time the teacher covers: arctan(sigma / (alpha sigma_d)) at its t_max
        self.t_max = math.atan2(math.exp(-lam_hi), self.sigma_d) if math.isfinite(lam_hi) else math.pi / 2
        # the least noisy one: the last time of its 1000-step grid before the clean end
        a, s = schedule.alpha_sigma(schedule.timesteps(1000)[-2])
        self.t_min = float(self.time_from_sigma(s / a))

    def lognormal(self, u: torch.Tensor, p_mean: float, p_std: float) -> torch.Tensor:
        """TrigFlow times t = arctan(e^tau / sigma_d), tau ~ N(p_mean, p_std^2), by the inverse CDF of uniforms
        ``u`` (sCM sec. 4.4's proposal; SANA-Sprint's ``logit_normal_trigflow``), kept inside the times the
        teacher covers ([t_min, t_max])."""
        u = u.clamp(1e-12, 1 - 1e-12)
        tau = p_mean + p_std * math.sqrt(2.0) * torch.erfinv(2 * u - 1)
        return self.time_from_sigma(tau.exp()).to(u.device).clamp(self.t_min, self.t_max)

    def time_from_sigma(self, sigma) -> torch.Tensor:
        """t = arctan(sigma / sigma_d) for an EDM-scale noise level sigma = sigma(u) / alpha(u)."""
        return torch.atan2(torch.as_tensor(sigma, dtype=torch.float64), torch.tensor(self.sigma_d, dtype=torch.float64))

    def native(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(u(t), k(t)): the schedule time of equal SNR and the factor with x_u = k x_t."""
        t = torch.as_tensor(t, dtype=torch.float64)
        lam = -(self.sigma_d * torch.tan(t)).log()  # log(alpha / sigma) = -log(sigma_d tan t)
        u = self.schedule.t_from_log_snr(lam)
        a, s = self.schedule.alpha_sigma(u)
        return u, (a**2 + (s / self.sigma_d) ** 2).sqrt()

    def native_time(self, t) -> torch.Tensor:
        return self.native(t)[0]

    def x0(self, denoiser, x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        """The consistency function f(x_t, t) = D(k x_t, u): the denoiser's x0 at the matching time."""
        u, k = self.native(t)
        return denoiser(x * bcast(k, x).to(x.dtype), u, cond)

    def velocity(self, denoiser, x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        """sigma_d F(x_t / sigma_d, t) = (cos t x_t - f(x_t, t)) / sin t: dx_t/dt of the PF-ODE when D is
        the exact denoiser (sCM eq. 3 with F from the x0 prediction)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        c, s = bcast(torch.cos(t), x), bcast(torch.sin(t), x)
        return ((c * x - self.x0(denoiser, x, t, cond)) / s).to(x.dtype)

    def add_noise(self, x0: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = cos(t) x0 + sin(t) z, with z ~ N(0, sigma_d^2)."""
        return bcast(torch.cos(t), x0) * x0 + bcast(torch.sin(t), x0) * z


__all__ = ["TrigFlow"]

"""Pieces the objectives share: per-sample random draws, guidance scales and the losses of more
than one paper. No objective imports another; they all import from here.

Every draw that lands on one sample (generator noise, the noise and time of x_t, a step index, a
per-sample guidance scale) comes from the trainer's per-sample stream ``batch["rng"]`` (see
``train.randomness``): then a sample sees the same numbers whichever process it lands on, so a
2-process run equals a 1-process run with the whole batch. Outside the trainer (no stream) the
draws come from torch's global generator.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..noise_grid import noise_grid, time_indices
from ..sampling import ddim_step, ddim_x0
from ..schedules import Schedule, bcast

#: iCT's pseudo-Huber constant per value (Song & Dhariwal, 2023, sec. 3.3: c = 0.00054 sqrt(d))
HUBER_C = 0.00054


class Draws:
    """Per-sample draws for one batch: its rows of the trainer's global stream, or the global generator."""

    def __init__(self, batch: dict):
        self.rng, self.x0 = batch.get("rng"), batch["x0"]
        self.device, self.n = self.x0.device, self.x0.shape[0]

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        if self.rng is not None and x.shape[0] == self.n:
            return self.rng.randn_like(x).to(x.device)
        return torch.randn_like(x)

    def noise(self) -> torch.Tensor:
        """The generator's input noise, shaped like the batch."""
        return self.randn_like(self.x0)

    def randint(self, low: int, high: int) -> torch.Tensor:
        """[B] integers in [low, high)."""
        if self.rng is not None:
            return self.rng.randint(low, high).cpu()
        return torch.randint(low, high, (self.n,))

    def rand(self) -> torch.Tensor:
        """[B] uniform in [0, 1), float64."""
        if self.rng is not None:
            return self.rng.rand(dtype=torch.float64).to(self.device)
        return torch.rand(self.n, dtype=torch.float64, device=self.device)

    def times(self, schedule, t_range: Sequence[float]) -> torch.Tensor:
        """[B] times uniform over a fraction of the schedule's 1000-step grid (``fake_score.sample_times``)."""
        lo, hi = time_indices(schedule, t_range)
        return noise_grid(schedule)[self.randint(lo, hi)].to(self.device)

    def train_times(self, schedule) -> torch.Tensor:
        """[B] times from the schedule's training distribution (EDM's log-normal, flow's logit-normal)."""
        if self.rng is not None:
            return self.rng.sample_t(schedule).to(self.device)
        return schedule.sample_t(self.n).to(self.device)

    def noised(self, schedule, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = alpha_t x + sigma_t eps with fresh eps."""
        return schedule.add_noise(x, self.randn_like(x), t)


def sample_student(student, cond, draws: Draws, *, backward_simulation: bool = True, grad: bool = True):
    """Student samples with gradient through one student evaluation: one step, or for a K-step
    student backward simulation (DMD2 sec. 4.5; few-step SiD's uniform mixture over steps): per
    sample a step k ~ U{0..K-1} taken with gradient at the end of its own chain (``Student.sample``).
    ``grad=False``: no graph (the critic's detached samples)."""
    noise = draws.noise()
    k = draws.randint(0, student.steps) if student.steps > 1 and backward_simulation else None
    with torch.set_grad_enabled(grad):
        return student.sample(noise, cond, grad_at=k, renoise=draws.randn_like)


def guidance_scales(guidance: float, guidance_range: Sequence[float] | None, draws: Draws) -> torch.Tensor | float:
    """The CFG scale(s): fixed, or one per sample uniform in guidance_range (SNOOPI, Nguyen et al., 2024)."""
    if guidance_range is not None:
        lo, hi = map(float, guidance_range)
        return lo + (hi - lo) * draws.rand()
    return float(guidance)


def guides(w) -> bool:
    """Whether a scale changes the conditional model (per-sample scales always count)."""
    return torch.is_tensor(w) or float(w) != 1.0


def mean_abs(x: torch.Tensor) -> torch.Tensor:
    """Per-sample mean |x|, floored at 1e-5 (DMD eq. 8's and SiD's normaliser)."""
    return x.abs().flatten(1).mean(1).clamp_min(1e-5)


def target_loss(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """0.5 * mean((x - sg(x - grad))^2) per sample: d/dx = grad / numel(x[0])."""
    target = (x - grad).detach()
    return 0.5 * (x - target).pow(2).flatten(1).mean(1)


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float | None = None) -> torch.Tensor:
    """Per-pixel pseudo-Huber distance, the stand-in for LPIPS (whose weights are downloaded at run
    time): sqrt(mean((a-b)^2) + c^2) - c with c = 0.00054 by default. It is iCT's sum form
    sqrt(||a-b||^2 + c'^2) - c' (Song & Dhariwal, 2023, sec. 3.3; c' = 0.00054 sqrt(d)) divided by
    sqrt(d), so that, like DMD's mean-reduced LPIPS (Yin et al., 2024, eq. 9) and the mean-reduced
    DM term, its gradient per pixel scales as 1/d: the regression/DM balance does not change with
    resolution (the sum form's gradient is a unit vector, sqrt(d) times larger at every size)."""
    c = HUBER_C if c is None else c
    return ((a - b).pow(2).flatten(1).mean(1) + c * c).sqrt() - c


def per_sample(w, like: torch.Tensor) -> torch.Tensor:
    """A scalar or [B] weight broadcast against ``like``."""
    return bcast(torch.as_tensor(w, dtype=torch.float64, device=like.device), like)


#: Salimans & Ho (2022), sec. 4: weights on an x0 error
WEIGHTINGS = ("truncated_snr", "snr_plus_one")


def snr_weight(schedule, t: torch.Tensor, weighting: str) -> torch.Tensor:
    """Salimans & Ho (2022), sec. 4, as a weight on the x0 error: "truncated_snr" max(SNR, 1)
    (= max(||x - x^||^2, ||eps - eps^||^2)) or "snr_plus_one" SNR + 1 (the v-loss)."""
    snr = schedule.snr(t)
    return snr.clamp_min(1.0) if weighting == "truncated_snr" else snr + 1.0


@torch.no_grad()
def ema_update(average: torch.nn.Module, model: torch.nn.Module, mu: float) -> None:
    """average <- mu average + (1 - mu) model, parameter by parameter; buffers copied (a consistency
    target network, Song et al., 2023, Alg. 2; a progressive round's average)."""
    for p_a, p_m in zip(average.parameters(), model.parameters(), strict=True):
        p_a.mul_(mu).add_(p_m.detach(), alpha=1.0 - mu)
    for b_a, b_m in zip(average.buffers(), model.buffers(), strict=True):
        b_a.copy_(b_m)


@torch.no_grad()
def copy_into(dst: torch.nn.Module, src: torch.nn.Module) -> None:
    """dst's parameters and buffers := src's (same architecture)."""
    for a, b in zip(dst.parameters(), src.parameters(), strict=True):
        a.copy_(b)
    for a, b in zip(dst.buffers(), src.buffers(), strict=True):
        a.copy_(b)


# -- progressive distillation's step (Salimans & Ho, 2022, Alg. 2), shared with guidance distillation --------
def pd_target(denoise, schedule: Schedule, z: torch.Tensor, t, t_mid, t_next, cond=None) -> torch.Tensor:
    """Salimans & Ho (2022), Alg. 2: two deterministic DDIM teacher steps z -> z' -> z'' and the x0
    that takes one DDIM step from (z, t) to z'' at t_next. `denoise(x, t, cond) -> x0`; the times
    are per-sample float64 tensors (or scalars) with sigma(t) > 0."""
    (a, s), (am, sm), (an, sn) = (schedule.alpha_sigma(torch.as_tensor(u, dtype=torch.float64, device=z.device))
                                  for u in (t, t_mid, t_next))
    c = [bcast(v, z) for v in (a, s, am, sm, an, sn)]
    z_mid = ddim_step(z, denoise(z, t, cond), c[0], c[1], c[2], c[3])
    z_next = ddim_step(z_mid, denoise(z_mid, t_mid, cond), c[2], c[3], c[4], c[5])
    return ddim_x0(z, z_next, a, s, an, sn)


def student_grid(schedule: Schedule, n: int) -> torch.Tensor:
    """The times an n-step student samples at (those its exported scheduler runs) plus clean data."""
    from ..export.scheduler import student_timesteps

    clean = torch.tensor([schedule.t_clean], dtype=torch.float64)
    return torch.cat([student_timesteps(schedule, n), clean])


def grid_with_midpoints(schedule: Schedule, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The n-step grid (n + 1 times) and the teacher's intermediate time in each of its n steps."""
    g, g2 = student_grid(schedule, n), student_grid(schedule, 2 * n)
    if len(g2) == 2 * n + 1 and torch.equal(g2[::2], g):
        return g, g2[1::2]
    return g, 0.5 * (g[:-1] + g[1:])



__all__ = ["pd_target", "student_grid", "grid_with_midpoints", "Draws", "sample_student", "guidance_scales", "guides", "mean_abs", "target_loss", "pseudo_huber",
           "per_sample", "HUBER_C", "WEIGHTINGS", "snr_weight", "ema_update", "copy_into"]

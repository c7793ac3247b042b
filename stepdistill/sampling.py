"""Teacher samplers: plain functions over any denoiser and any time grid.

Every sampler has one signature, ``sampler(denoiser, x, ts, cond=None, *, generator=None,
return_trajectory=False, **options)``: ``x`` is the state at ``ts[0]``, ``ts`` a descending grid
(float64; each entry a scalar or one time per sample), and the result is the state at ``ts[-1]``
(or ``(state, Trajectory)``). One implementation serves baselines, progressive and consistency
targets, DMD regression pairs and eval.

All updates are written with the schedule's alpha(t), sigma(t), so they hold for VP, EDM and flow
schedules alike. Euler and Heun integrate the probability-flow ODE in the schedule's
``ode_space``: "ve" scales by alpha (EDM, Karras et al. 2022, Alg. 1; k-diffusion), "flow" scales by
alpha + sigma (rectified flow; defined where alpha = 0, e.g. at sigma = 1). In either space the
Euler step is algebraically DDIM with eta = 0 (Song et al., 2021), which the tests check.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from .denoisers import Cond, Denoiser, guided
from .errors import UserError
from .schedules import bcast


class Trajectory(NamedTuple):
    ts: list          # the grid, one entry per state
    states: list      # x at each grid time (len(ts))
    x0: list          # the denoiser's x0 prediction at each evaluated time (len(ts) - 1)


def _coef(denoiser: Denoiser, t, x):
    a, s = denoiser.schedule.alpha_sigma(torch.as_tensor(t, dtype=torch.float64, device=x.device))
    return bcast(a, x), bcast(s, x)


def _noise_like(x, generator):
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def ddim_step(x, x0, a, s, a_next, s_next, eta=0.0, noise=None):
    """One DDIM update from (a, s) to (a_next, s_next) given x0 (Song et al., 2021, eq. 12), for a
    general affine path. eta scales the DDPM posterior std sigma_s/sigma_t *
    sqrt(sigma_t^2 - (alpha_t sigma_s / alpha_s)^2); eta = 1 is ancestral DDPM sampling."""
    eps = (x - a * x0) / s
    if eta == 0.0 or noise is None:
        return a_next * x0 + s_next * eps
    var = (s_next / s) ** 2 * (s**2 - (a * s_next / a_next) ** 2)
    std = eta * var.clamp_min(0).sqrt()
    return a_next * x0 + (s_next**2 - std**2).clamp_min(0).sqrt() * eps + std * noise


def ddim_x0(x, x_next, a, s, a_next, s_next):
    """The x0 for which a deterministic DDIM step from x at (a, s) lands on x_next at (a_next, s_next):
    x_next = a_next x0 + s_next (x - a x0) / s solved for x0 (Salimans & Ho, 2022, Alg. 2's target).
    The coefficients are per-sample tensors, kept in their own (float64) precision until they multiply
    data; s > 0 and a_next s > s_next a (the step lowers the noise)."""
    ratio = s_next / s
    return (x_next - bcast(ratio, x) * x) / bcast(a_next - ratio * a, x)


def ddim(denoiser, x, ts, cond: Cond = None, *, eta: float = 0.0, generator=None, return_trajectory=False):
    """DDIM (Song et al., 2021); eta = 0 deterministic, eta = 1 ancestral DDPM."""
    states, x0s = [x], []
    for t, t_next in zip(ts[:-1], ts[1:]):
        x0 = denoiser(x, t, cond)
        (a, s), (an, sn) = _coef(denoiser, t, x), _coef(denoiser, t_next, x)
        x = ddim_step(x, x0, a, s, an, sn, eta, _noise_like(x, generator) if eta else None)
        states.append(x), x0s.append(x0)
    return (x, Trajectory(list(ts), states, x0s)) if return_trajectory else x


def _ode_frame(denoiser, t, x):
    """(c, s_hat, k): the state is y = x / c, the ODE time s_hat = sigma / c, and the velocity
    dy/ds_hat = eps + k * x0 (k = 0 in "ve" space, -1 in "flow" space)."""
    a, s = _coef(denoiser, t, x)
    if denoiser.schedule.ode_space == "flow":
        return a + s, s / (a + s), -1.0
    return a, s / a, 0.0


def _velocity(denoiser, x, t, cond, k):
    a, s = _coef(denoiser, t, x)
    x0 = denoiser(x, t, cond)
    return (x - a * x0) / s + k * x0, x0


def euler(denoiser, x, ts, cond: Cond = None, *, generator=None, return_trajectory=False):
    """Euler's method on the probability-flow ODE (Karras et al., 2022, Alg. 1 without the Heun
    correction); equals DDIM with eta = 0."""
    states, x0s = [x], []
    for t, t_next in zip(ts[:-1], ts[1:]):
        c, sh, k = _ode_frame(denoiser, t, x)
        cn, shn, _ = _ode_frame(denoiser, t_next, x)
        f, x0 = _velocity(denoiser, x, t, cond, k)
        x = cn * (x / c + (shn - sh) * f)
        states.append(x), x0s.append(x0)
    return (x, Trajectory(list(ts), states, x0s)) if return_trajectory else x


def heun(denoiser, x, ts, cond: Cond = None, *, generator=None, return_trajectory=False):
    """Heun's 2nd-order method (Karras et al., 2022, Alg. 1, deterministic); the step into clean
    data is a plain Euler step. NFE = 2 * steps - 1."""
    states, x0s = [x], []
    for t, t_next in zip(ts[:-1], ts[1:]):
        c, sh, k = _ode_frame(denoiser, t, x)
        cn, shn, _ = _ode_frame(denoiser, t_next, x)
        f, x0 = _velocity(denoiser, x, t, cond, k)
        y_euler = x / c + (shn - sh) * f
        x_next = cn * y_euler
        _, sn = _coef(denoiser, t_next, x)
        live = (sn > 0).flatten()
        if bool(live.any()):
            f2, _ = _velocity(denoiser, x_next, t_next, cond, k)
            x_heun = cn * (x / c + (shn - sh) * 0.5 * (f + f2))
            x_next = torch.where(sn > 0, x_heun, x_next)
        x = x_next
        states.append(x), x0s.append(x0)
    return (x, Trajectory(list(ts), states, x0s)) if return_trajectory else x


#: DPM-Solver++(2M) takes a step first order where it is more than 1 / MIN_RATIO = 3 times as long in
#: log-SNR as the step before (r = h_prev / h < MIN_RATIO: Alg. 2 would extrapolate by 1/2r > 1.5); see dpmpp_2m
MIN_RATIO = 1.0 / 3.0


def dpmpp_2m(denoiser, x, ts, cond: Cond = None, *, generator=None, return_trajectory=False,
             min_ratio: float = MIN_RATIO):
    """DPM-Solver++(2M) (Lu et al., 2022b, Alg. 2) in data prediction; the step into clean data is
    first order, as diffusers does with final sigma 0.

    Alg. 2's second-order step extrapolates the data prediction, D = (1 + 1/2r) x0 - (1/2r) x0_prev with
    r = h_prev / h: a step much longer than the one before multiplies the difference of two successive
    network outputs by 1/2r > 1, network error included. Where r < ``min_ratio`` the step is first order
    (the same rule as diffusers' lower_order_final, which takes the final steps first order, applied where
    the grid makes it needed): a flow grid's step into sigma 1/1000 (FlowMatchEulerDiscreteScheduler's
    last time before clean, r ~ 0.2 at 32 steps: its second-order step put pixel noise into every
    sample, tools/solver_check.py) and a trajectory cache's step after a time added to the grid. On the
    VP and EDM schedules' own grids r stays above 0.6 and nothing changes (diffusers'
    DPMSolverMultistepScheduler is matched exactly); as steps grow on any smooth grid r tends to 1.
    min_ratio=0 is Alg. 2 as written."""
    states, x0s = [x], []
    x0_prev, h_prev = None, None
    for t, t_next in zip(ts[:-1], ts[1:]):
        (a, s), (an, sn) = _coef(denoiser, t, x), _coef(denoiser, t_next, x)
        x0 = denoiser(x, t, cond)
        lam, lam_n = a.log() - s.log(), an.log() - sn.log()
        h = lam_n - lam
        d = x0
        if x0_prev is not None:
            r = h_prev / h
            second = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev  # eq. in Alg. 2, line 8
            ok = torch.isfinite(h) & torch.isfinite(r) & (r > 0) & (r >= min_ratio)
            d = torch.where(ok, second, x0)
        # exact exponential-integrator step: x_n = (s_n/s) x - a_n (e^{-h} - 1) D
        ratio = torch.where(sn > 0, sn / s, torch.zeros_like(s))
        x = ratio * x - an * torch.expm1(-h) * d
        x0_prev, h_prev = x0, h
        states.append(x), x0s.append(x0)
    return (x, Trajectory(list(ts), states, x0s)) if return_trajectory else x


SAMPLERS: dict[str, Callable] = {"ddim": ddim, "euler": euler, "heun": heun, "dpmpp2m": dpmpp_2m}


def nfe(sampler: str, steps: int) -> int:
    """Network evaluations of an n-step run (CFG doubles the batch, not the count)."""
    return 2 * steps - 1 if sampler == "heun" else steps


def get_sampler(name: str) -> Callable:
    if name not in SAMPLERS:
        raise UserError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


@torch.no_grad()
def sample(denoiser: Denoiser, noise: torch.Tensor, steps: int, *, sampler: str = "ddim",
           cond: Cond = None, guidance: float = 1.0, generator=None, ts=None, **options):
    """Generate from unit noise in `steps` steps on the schedule's own grid (the diffusers one)."""
    fn = get_sampler(sampler)
    ts = denoiser.schedule.timesteps(steps) if ts is None else ts
    x = denoiser.schedule.prior(noise, ts[0])
    return fn(guided(denoiser, guidance), x, ts, cond, generator=generator, **options)


def teacher_step(solver: str, teacher, x: torch.Tensor, t_from, t_to, cond=None, substeps: int = 1) -> torch.Tensor:
    """The teacher's ODE step from t_{n+k} to t_n (per-sample times): ``substeps`` steps of the named
    solver, evenly spaced in the schedule's time (1 = LCM's single DDIMSolver step)."""
    ts = [t_from] + [t_from + (t_to - t_from) * (j / substeps) for j in range(1, substeps)] + [t_to]
    return get_sampler(solver)(teacher, x, ts, cond)


def implied_x0(schedule, z_end: torch.Tensor, x_t: torch.Tensor, t, t_end) -> torch.Tensor:
    """The x0 whose DDIM jump from (x_t, t) lands on z_end at t_end: z_end = a_e x0 + s_e (x_t - a x0) / s
    solved for x0 (Heek et al., 2024, Alg. 1; the same inversion as progressive distillation's target,
    Salimans & Ho, 2022, Alg. 2). At a clean end (s_e = 0, or the schedule's t_clean, where the
    consistency function is the x0 estimate itself) z_end is returned."""
    (a, s), (a_e, s_e) = (schedule.alpha_sigma(torch.as_tensor(u, dtype=torch.float64, device=x_t.device))
                          for u in (t, t_end))
    clean = schedule.is_clean_end(torch.as_tensor(t_end, dtype=torch.float64, device=x_t.device))
    # at a clean end, (a_e, s_e) = (1, 0) turns the inversion into the identity
    a_e, s_e = torch.where(clean, torch.ones_like(a_e), a_e), torch.where(clean, torch.zeros_like(s_e), s_e)
    return ddim_x0(x_t, z_end, a, s, a_e, s_e)

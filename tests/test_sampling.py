"""Samplers against diffusers' own scheduler loops, and convergence orders on a Gaussian teacher
whose probability-flow ODE has a closed-form solution."""
from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch
from conftest import GaussianTeacher, tiny_sd3, tiny_unet2d

from stepdistill.denoisers import DiffusersDenoiser, guided
from stepdistill.errors import UserError
from stepdistill.sampling import SAMPLERS, ddim, dpmpp_2m, euler, get_sampler, heun, nfe, sample
from stepdistill.schedules import EDMSchedule, FlowSchedule, VPSchedule, log_snr

VP_CFG = dict(beta_schedule="scaled_linear", timestep_spacing="trailing")
LABELS = torch.tensor([0, 3, 10])


@pytest.fixture(scope="module")
def unet():
    return tiny_unet2d()


@pytest.fixture(scope="module")
def sd3():
    return tiny_sd3()


def _noise(seed, shape=(3, 1, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), g


# ---------------------------------------------------------------------------------------------
# (a), (b): equality with diffusers' scheduler loops on a tiny random backbone
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction", "sample"])
def test_ddim_equals_diffusers_ddim_loop(unet, ptype, eta):
    """n = 10 divides T = 1000: diffusers' DDIM steps from t to t - T // n, which is then the next
    grid point (for other n its loop leaves the grid it printed; ours follows the grid)."""
    n = 10
    ref = diffusers.DDIMScheduler(**VP_CFG, prediction_type=ptype, clip_sample=False, set_alpha_to_one=True)
    ref.set_timesteps(n)
    noise, g = _noise(0)
    x = noise * ref.init_noise_sigma
    for t in ref.timesteps:
        out = unet(x, t, class_labels=LABELS).sample
        x = ref.step(out, t, x, eta=eta, generator=g).prev_sample

    sch = VPSchedule(dict(VP_CFG, prediction_type=ptype))
    den = DiffusersDenoiser(unet, sch, null_class=10)
    noise2, g2 = _noise(0)
    ts = sch.timesteps(n)
    ours = ddim(den, sch.prior(noise2, ts[0]), ts, {"class_labels": LABELS}, eta=eta, generator=g2)
    diff = (ours - x).abs().max().item()
    assert diff < 1e-4, diff


@torch.no_grad()
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # inside diffusers' EulerDiscreteScheduler
@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction"])
def test_vp_euler_equals_diffusers_euler_loop_and_ddim(unet, ptype):
    """EulerDiscreteScheduler with trailing spacing and final sigma 0 integrates in VE space
    (x / alpha, sigma / alpha); its grid is ours, so the loops agree; and Euler is DDIM(eta=0).
    With trailing spacing diffusers starts from sigma_max * noise rather than the VP prior
    noise / alpha = sqrt(sigma_max^2 + 1) * noise, so both loops start from the latter."""
    n = 7
    ref = diffusers.EulerDiscreteScheduler(**VP_CFG, prediction_type=ptype, final_sigmas_type="zero")
    ref.set_timesteps(n)
    noise, _ = _noise(1)
    x = noise * (ref.sigmas[0] ** 2 + 1).sqrt()
    for t in ref.timesteps:
        out = unet(ref.scale_model_input(x, t), t, class_labels=LABELS).sample
        x = ref.step(out, t, x).prev_sample

    sch = VPSchedule(dict(VP_CFG, prediction_type=ptype))
    den = DiffusersDenoiser(unet, sch, null_class=10)
    ts = sch.timesteps(n)
    assert torch.equal(ts[:-1], ref.timesteps.to(torch.float64))
    cond = {"class_labels": LABELS}
    ours = euler(den, sch.prior(noise, ts[0]), ts, cond)
    assert (ours - x).abs().max().item() < 1e-4
    torch.testing.assert_close(ours, ddim(den, sch.prior(noise, ts[0]), ts, cond), atol=1e-5, rtol=1e-5)


@torch.no_grad()
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # inside diffusers' DPMSolverMultistepScheduler
@pytest.mark.parametrize("n", [1, 8, 20])
@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction"])
def test_dpmpp2m_equals_diffusers_dpm_solver_loop(unet, ptype, n):
    """DPMSolverMultistepScheduler (dpmsolver++, order 2, final sigma 0): first-order first and
    last steps, second-order multistep in between, as ours."""
    ref = diffusers.DPMSolverMultistepScheduler(**VP_CFG, prediction_type=ptype, algorithm_type="dpmsolver++",
                                                solver_order=2, final_sigmas_type="zero")
    ref.set_timesteps(n)
    noise, _ = _noise(0)
    x = noise * ref.init_noise_sigma
    for t in ref.timesteps:
        x = ref.step(unet(x, t, class_labels=LABELS).sample, t, x).prev_sample

    sch = VPSchedule(dict(VP_CFG, prediction_type=ptype))
    ts = sch.timesteps(n)
    assert torch.equal(ts[:-1], ref.timesteps.to(torch.float64))
    ours = dpmpp_2m(DiffusersDenoiser(unet, sch, null_class=10), sch.prior(noise, ts[0]), ts,
                    {"class_labels": LABELS})
    torch.testing.assert_close(ours, x, atol=1e-4, rtol=1e-5)  # eps outputs reach ~100 here


@torch.no_grad()
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_euler_equals_diffusers_flow_match_loop(sd3, shift):
    n = 6
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(2, 4, 8, 8, generator=g)
    cond = {"encoder_hidden_states": torch.randn(2, 3, 16, generator=g),
            "pooled_projections": torch.randn(2, 8, generator=g)}
    ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    ref.set_timesteps(n)
    x = noise
    for t in ref.timesteps:
        out = sd3(hidden_states=x, timestep=t.expand(2), **cond).sample
        x = ref.step(out, t, x).prev_sample

    sch = FlowSchedule(dict(shift=shift))
    den = DiffusersDenoiser(sd3, sch)
    ts = sch.timesteps(n)
    ours = euler(den, sch.prior(noise, ts[0]), ts, cond)
    assert (ours - x).abs().max().item() < 1e-4
    torch.testing.assert_close(ours, ddim(den, noise, ts, cond), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_flow_heun_equals_diffusers_flow_match_heun_loop(sd3):
    n = 5
    g = torch.Generator().manual_seed(4)
    noise = torch.randn(2, 4, 8, 8, generator=g)
    cond = {"encoder_hidden_states": torch.randn(2, 3, 16, generator=g),
            "pooled_projections": torch.randn(2, 8, generator=g)}
    ref = diffusers.FlowMatchHeunDiscreteScheduler()
    ref.set_timesteps(n)
    x = noise
    for t in ref.timesteps:
        out = sd3(hidden_states=x, timestep=t.expand(2), **cond).sample
        x = ref.step(out, t, x).prev_sample
    assert len(ref.timesteps) == nfe("heun", n)

    sch = FlowSchedule()
    den = DiffusersDenoiser(sd3, sch)
    # diffusers repeats each interior sigma (one entry per evaluation); the grid is every other one
    ts = torch.cat([ref.sigmas[0::2], ref.sigmas[-1:]]).to(torch.float64) * 1000
    assert len(ts) == n + 1 and ts[-1] == 0
    ours = heun(den, noise, ts, cond)
    assert (ours - x).abs().max().item() < 1e-4


# ---------------------------------------------------------------------------------------------
# (c) convergence order on a Gaussian teacher
# ---------------------------------------------------------------------------------------------
def _invert_log_snr(schedule, lam, t_lo, t_hi):
    """t with log_snr(t) = lam (log-SNR decreases in t), by bisection in float64."""
    lo = torch.full_like(lam, t_lo)
    hi = torch.full_like(lam, t_hi)
    for _ in range(100):
        mid = (lo + hi) / 2
        up = log_snr(schedule, mid) > lam  # still too clean: move right
        lo, hi = torch.where(up, mid, lo), torch.where(up, hi, mid)
    return (lo + hi) / 2


def log_snr_grid(schedule, t_hi, t_lo, n):
    """n steps uniform in log-SNR from t_hi down to t_lo > t_clean: every interval shrinks as 1/n."""
    lam = torch.linspace(float(log_snr(schedule, t_hi)), float(log_snr(schedule, t_lo)), n + 1, dtype=torch.float64)
    ts = _invert_log_snr(schedule, lam, t_lo, t_hi)
    ts[0], ts[-1] = t_hi, t_lo
    return ts


def karras_grid(sigma_max, sigma_end, n, rho=7.0):
    """Karras et al. 2022, eq. 5, ending at sigma_end > 0 instead of appending sigma = 0."""
    i = torch.arange(n + 1, dtype=torch.float64) / n
    return (sigma_max ** (1 / rho) + i * (sigma_end ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


CASES = {
    "vp-logsnr": (lambda: VPSchedule(dict(beta_schedule="scaled_linear")),
                  lambda s, n: log_snr_grid(s, 999.0, 20.0, n)),
    "vp-linear-logsnr": (lambda: VPSchedule(dict(beta_schedule="linear")),
                         lambda s, n: log_snr_grid(s, 999.0, 20.0, n)),
    "edm-karras": (lambda: EDMSchedule(), lambda s, n: karras_grid(80.0, 0.02, n)),
    "edm-logsnr": (lambda: EDMSchedule(), lambda s, n: log_snr_grid(s, 80.0, 0.02, n)),
    "flow-logsnr": (lambda: FlowSchedule(dict(shift=3.0)), lambda s, n: log_snr_grid(s, 995.0, 10.0, n)),
    "vp-zero-snr-uniform-from-noise": (
        lambda: VPSchedule(dict(beta_schedule="scaled_linear", rescale_betas_zero_snr=True,
                                prediction_type="v_prediction")),
        lambda s, n: torch.linspace(999.0, 20.0, n + 1, dtype=torch.float64)),
    "flow-uniform-from-noise": (lambda: FlowSchedule(), lambda s, n: torch.linspace(1000.0, 20.0, n + 1,
                                                                                    dtype=torch.float64)),
}
ORDERS = {"ddim": (0.8, 1.3), "euler": (0.8, 1.3), "heun": (1.7, 2.6), "dpmpp2m": (1.7, 2.6)}
STEPS = [16, 32, 64, 128]  # from 8 steps the multistep solver is still pre-asymptotic (order ~1.5)


def fitted_order(sampler, schedule, grid, mu, s):
    teacher = GaussianTeacher(schedule, mu, s)
    g = torch.Generator().manual_seed(0)
    x_start = torch.randn(64, 4, generator=g, dtype=torch.float64) * 2
    errs = []
    for n in STEPS:
        ts = grid(schedule, n)
        out = SAMPLERS[sampler](teacher, x_start, ts)
        errs.append((out - teacher.exact(x_start, ts[0], ts[-1])).abs().max().item())
    slope = np.polyfit(np.log(STEPS), np.log(errs), 1)[0]
    return -slope, errs


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("sampler", list(ORDERS))
def test_convergence_order_on_gaussian_teacher(sampler, case, gaussian_data):
    make, grid = CASES[case]
    order, errs = fitted_order(sampler, make(), grid, *gaussian_data)
    lo, hi = ORDERS[sampler]
    assert lo <= order <= hi, (order, errs)
    assert errs[-1] < errs[0]


def test_samplers_exact_on_a_point_mass():
    """With s = 0 the data is one point: x0-prediction is exact everywhere, and DDIM / Euler /
    DPM-Solver++ land on it exactly in any number of steps (they are exact for constant x0)."""
    mu = torch.tensor([0.3, -0.7], dtype=torch.float64)
    sch = VPSchedule(VP_CFG)
    teacher = GaussianTeacher(sch, mu, torch.zeros(2, dtype=torch.float64))
    x = torch.randn(5, 2, dtype=torch.float64)
    for fn in (ddim, euler, dpmpp_2m, heun):
        torch.testing.assert_close(fn(teacher, x, sch.timesteps(3)), mu.expand(5, 2), atol=1e-10, rtol=0)


# ---------------------------------------------------------------------------------------------
# (d) trajectories, per-sample grids, guidance
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_trajectory_and_per_sample_times(name, gaussian_data):
    sch = VPSchedule(VP_CFG)
    teacher = GaussianTeacher(sch, *gaussian_data)
    fn = get_sampler(name)
    x = torch.randn(2, 4, dtype=torch.float64)
    grid_a = sch.timesteps(6)                     # ends at clean data (t = -1)
    grid_b = log_snr_grid(sch, 900.0, 40.0, 6)    # ends at a positive time
    out, traj = fn(teacher, x, grid_a, return_trajectory=True)
    assert len(traj.states) == len(traj.ts) == len(grid_a) and len(traj.x0) == len(grid_a) - 1
    assert torch.equal(traj.states[-1], out) and torch.equal(traj.states[0], x)
    assert torch.equal(fn(teacher, x, grid_a), out)

    ts = torch.stack([grid_a, grid_b], dim=1)     # [steps + 1, B]: one grid per sample
    both = fn(teacher, x, ts)
    torch.testing.assert_close(both[0], out[0], atol=1e-12, rtol=0)
    torch.testing.assert_close(both[1], fn(teacher, x[1:], grid_b)[0], atol=1e-12, rtol=0)


@torch.no_grad()
def test_per_sample_times_with_a_backbone(unet):
    sch = VPSchedule(dict(VP_CFG, prediction_type="v_prediction"))
    den = DiffusersDenoiser(unet, sch, null_class=10)
    noise, _ = _noise(6)
    cond = {"class_labels": LABELS}
    ts = torch.stack([sch.timesteps(4), sch.timesteps(4), log_snr_grid(sch, 999.0, 100.0, 4)], dim=1)
    both = heun(den, noise, ts, cond)
    single = heun(den, noise[2:], ts[:, 2], {"class_labels": LABELS[2:]})
    torch.testing.assert_close(both[2:], single, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[:1], heun(den, noise[:1], sch.timesteps(4), {"class_labels": LABELS[:1]}),
                               atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_sample_with_guidance_uses_cfg(unet):
    sch = VPSchedule(dict(VP_CFG, prediction_type="v_prediction"))
    den = DiffusersDenoiser(unet, sch, null_class=10)
    noise, _ = _noise(7)
    cond = {"class_labels": LABELS}
    ts = sch.timesteps(4)
    plain = sample(den, noise, 4, sampler="ddim", cond=cond)
    torch.testing.assert_close(plain, ddim(den, noise, ts, cond), atol=1e-6, rtol=1e-6)
    cfg = sample(den, noise, 4, sampler="ddim", cond=cond, guidance=3.0)
    torch.testing.assert_close(cfg, ddim(guided(den, 3.0), noise, ts, cond), atol=1e-6, rtol=1e-6)
    assert (cfg - plain).abs().max() > 1e-3


def test_sampler_names_and_nfe():
    assert nfe("heun", 4) == 7 and nfe("ddim", 4) == 4
    with pytest.raises(UserError, match="unknown sampler 'dpm'.*ddim"):
        get_sampler("dpm")


# ---------------------------------------------------------------------------------------------
# DPM-Solver++(2M): a step much longer than the one before is first order
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [lambda: VPSchedule(VP_CFG), lambda: EDMSchedule()], ids=["vp", "edm"])
@pytest.mark.parametrize("n", [8, 20, 50])
def test_dpmpp2m_on_vp_and_edm_grids_is_alg2_as_written(make, n, gaussian_data):
    """On the VP and EDM schedules' own grids every step ratio r = h_prev / h is above MIN_RATIO, so the
    guard changes nothing: the result is Lu et al.'s Alg. 2 (min_ratio=0) to the last bit."""
    sch = make()
    teacher = GaussianTeacher(sch, *gaussian_data)
    ts = sch.timesteps(n)
    x = sch.prior(torch.randn(16, 4, generator=torch.Generator().manual_seed(n), dtype=torch.float64), ts[0])
    assert torch.equal(dpmpp_2m(teacher, x, ts), dpmpp_2m(teacher, x, ts, min_ratio=0.0))


def test_dpmpp2m_takes_a_step_after_a_much_shorter_one_first_order(gaussian_data):
    """The flow schedule's grid (FlowMatchEulerDiscreteScheduler's) ends 1000/n, 1, 0: the step into
    t = 1 (sigma 1/1000) is ~5 times the previous one in log-SNR, r < MIN_RATIO, and it is the DDIM
    (first-order) step from the state before it; Alg. 2 as written takes it second order."""
    from stepdistill.sampling import MIN_RATIO, ddim_step

    sch = FlowSchedule()
    teacher = GaussianTeacher(sch, *gaussian_data)
    ts = sch.timesteps(32)
    a, s = sch.alpha_sigma(ts)
    lam = a.log() - s.log()
    h = lam[1:] - lam[:-1]
    r = h[:-1] / h[1:]  # r[i] belongs to step i + 1
    (k,) = [i + 1 for i in range(len(r)) if torch.isfinite(r[i]) and 0 < r[i] < MIN_RATIO]
    assert abs(float(ts[k + 1]) - 1.0) < 1e-6  # the step into sigma 1/1000
    x = sch.prior(torch.randn(16, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64), ts[0])
    _, traj = dpmpp_2m(teacher, x, ts, return_trajectory=True)
    want = ddim_step(traj.states[k], traj.x0[k], a[k], s[k], a[k + 1], s[k + 1])
    torch.testing.assert_close(traj.states[k + 1], want, rtol=0, atol=1e-12)
    _, alg2 = dpmpp_2m(teacher, x, ts, return_trajectory=True, min_ratio=0.0)
    torch.testing.assert_close(alg2.states[k], traj.states[k], rtol=0, atol=0)  # the same up to that step
    assert (alg2.states[k + 1] - want).abs().max() > 1e-6  # ... where Alg. 2 extrapolates

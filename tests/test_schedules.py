"""Schedules against closed forms and against diffusers' own schedulers."""
from __future__ import annotations

import diffusers
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stepdistill.errors import UserError
from stepdistill.schedules import (EDMSchedule, FlowSchedule, VPSchedule, convert, from_x0, schedule_from_config,
                                   to_x0)

FAST = settings(max_examples=25, deadline=None)

VP_CONFIGS = [dict(beta_schedule=b, prediction_type=p)
              for b in ("linear", "scaled_linear", "squaredcos_cap_v2")
              for p in ("epsilon", "v_prediction", "sample")]
VP_CONFIGS.append(dict(beta_schedule="scaled_linear", prediction_type="v_prediction", rescale_betas_zero_snr=True))


def _id(cfg):
    return "-".join(f"{v}" for v in cfg.values())


def all_schedules():
    out = [pytest.param(VPSchedule(c), id="vp-" + _id(c)) for c in VP_CONFIGS]
    out += [pytest.param(EDMSchedule(dict(prediction_type=p)), id=f"edm-{p}") for p in ("epsilon", "v_prediction")]
    out += [pytest.param(FlowSchedule(dict(shift=sh)), id=f"flow-shift{sh}") for sh in (1.0, 3.0)]
    return out


SCHEDULES = all_schedules()


def _t_interior(schedule, u: float) -> torch.Tensor:
    """A time strictly inside (t_clean, t_max) from u in [0, 1]; conversions through eps divide by
    alpha and sigma, so the ends, where one of them is 0, are left to separate tests."""
    lo, hi = schedule.t_clean, schedule.t_max
    if isinstance(schedule, EDMSchedule):
        lo = schedule.sigma_min
    t = torch.tensor(lo + (hi - lo) * (0.001 + 0.998 * u), dtype=torch.float64)
    a, s = schedule.alpha_sigma(t)
    return t if bool(a > 0) and bool(s > 0) else None


# ---------------------------------------------------------------------------------------------
# Conversions among x0 / eps / v / flow
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", SCHEDULES)
@FAST
@given(u=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_conversions_match_definitions_and_round_trip(schedule, u, seed):
    """x = a x0 + s eps, v = a eps - s x0 (Salimans & Ho 2022), u = eps - x0 (rectified flow):
    from_x0 yields exactly these, to_x0 inverts each, and every src -> dst -> src round-trips."""
    t = _t_interior(schedule, u)
    if t is None:  # alpha or sigma is 0 here: eps <-> x0 is undefined
        return
    g = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64).unbind(0)
    x0, eps = x0[None], eps[None]
    a, s = schedule.alpha_sigma(t)
    x = a * x0 + s * eps
    defs = {"x0": x0, "eps": eps, "v": a * eps - s * x0, "flow": eps - x0}
    for kind, pred in defs.items():
        torch.testing.assert_close(from_x0(x0, kind, x, a, s), pred, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(to_x0(pred, kind, x, a, s), x0, atol=1e-5, rtol=1e-5)
    for src in defs:
        for dst in defs:
            there = convert(defs[src], src, dst, x, a, s)
            torch.testing.assert_close(there, defs[dst], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(convert(there, dst, src, x, a, s), defs[src], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("schedule", [FlowSchedule(), VPSchedule(VP_CONFIGS[-1])], ids=["flow", "vp-zero-snr"])
def test_conversions_at_pure_noise_where_defined(schedule):
    """At alpha = 0 (flow t = T, zero-terminal-SNR VP t = T - 1) x0 is not identifiable from eps,
    but v and flow velocity still determine it; those round-trips must hold there."""
    t = torch.tensor(schedule.t_max, dtype=torch.float64)
    a, s = schedule.alpha_sigma(t)
    assert float(a) == 0.0 and float(s) == 1.0
    x0, eps = torch.randn(2, 1, 3, 4, 4, dtype=torch.float64).unbind(0)
    x = a * x0 + s * eps
    for kind in ("v", "flow"):
        torch.testing.assert_close(to_x0(from_x0(x0, kind, x, a, s), kind, x, a, s), x0, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("schedule", SCHEDULES)
@FAST
@given(u=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_raw_round_trip(schedule, u, seed):
    """The backbone-output parameterisation (EDM's F included) inverts: raw_to_x0(x0_to_raw(x0)) = x0."""
    t = _t_interior(schedule, u)
    if t is None:
        return
    g = torch.Generator().manual_seed(seed)
    x0, x = torch.randn(2, 2, 3, 4, 4, generator=g, dtype=torch.float64).unbind(0)
    tb = t.expand(2)
    back = schedule.raw_to_x0(schedule.x0_to_raw(x0, x, tb), x, tb)
    torch.testing.assert_close(back, x0, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Agreement with diffusers
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", VP_CONFIGS, ids=_id)
def test_vp_alpha_bar_equals_diffusers_table(cfg):
    ref = diffusers.DDPMScheduler(**cfg).alphas_cumprod
    a, s = VPSchedule(cfg).alpha_sigma(torch.arange(len(ref), dtype=torch.float64))
    assert torch.equal((a**2).float(), ref)
    torch.testing.assert_close(a**2 + s**2, torch.ones_like(a), atol=1e-12, rtol=0)


@pytest.mark.parametrize("spacing,offset", [("trailing", 0), ("leading", 1), ("linspace", 0)])
@pytest.mark.parametrize("n", [1, 4, 7, 50])
def test_vp_timesteps_equal_ddim(spacing, offset, n):
    cfg = dict(beta_schedule="scaled_linear", timestep_spacing=spacing, steps_offset=offset)
    sch = VPSchedule(cfg)
    ref = diffusers.DDIMScheduler(**cfg)
    ref.set_timesteps(n)
    ts = sch.timesteps(n)
    assert len(ts) == n + 1
    assert torch.equal(ts[:-1], ref.timesteps.to(torch.float64))
    assert ts[-1] == sch.t_clean and float(sch.alpha_sigma(ts[-1])[1]) == 0.0
    assert bool((ts[1:] < ts[:-1]).all())


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("n", [1, 4, 18])
def test_edm_timesteps_equal_edm_euler(pred, n):
    sch = EDMSchedule(dict(prediction_type=pred))
    ref = diffusers.EDMEulerScheduler(prediction_type=pred)
    ref.set_timesteps(n)
    ts = sch.timesteps(n)
    assert torch.equal(ts, ref.sigmas.to(torch.float64))
    assert len(ts) == n + 1 and ts[-1] == sch.t_clean == 0.0
    assert float(sch.alpha_sigma(ts[-1])[1]) == 0.0


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("n", [1, 4, 28])
def test_flow_timesteps_equal_flow_match_euler(shift, n):
    sch = FlowSchedule(dict(shift=shift))
    ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    ref.set_timesteps(n)
    ts = sch.timesteps(n)
    torch.testing.assert_close(ts / 1000.0, ref.sigmas.to(torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(ts[:-1], ref.timesteps.to(torch.float64), atol=1e-3, rtol=0)
    assert ts[-1] == sch.t_clean == 0.0 and float(sch.alpha_sigma(ts[-1])[1]) == 0.0


def test_flow_dynamic_shift_needs_mu():
    sch = FlowSchedule(dict(use_dynamic_shifting=True))
    with pytest.raises(UserError, match="mu"):
        sch.timesteps(4)
    ref = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    ref.set_timesteps(4, mu=0.8)
    torch.testing.assert_close(sch.timesteps(4, mu=0.8) / 1000.0, ref.sigmas.to(torch.float64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("cfg", VP_CONFIGS, ids=_id)
def test_vp_add_noise_equals_ddpm(cfg):
    ref = diffusers.DDPMScheduler(**cfg)
    sch = VPSchedule(cfg)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 6, 3, 4, 4, generator=g).unbind(0)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    ours = sch.add_noise(x0, eps, t.to(torch.float64))
    torch.testing.assert_close(ours, ref.add_noise(x0, eps, t), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("schedule,ref", [
    (VPSchedule(dict(beta_schedule="scaled_linear")), diffusers.DDIMScheduler(beta_schedule="scaled_linear")),
    (EDMSchedule(), diffusers.EDMEulerScheduler()),
    (FlowSchedule(dict(shift=3.0)), diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)),
], ids=["vp", "edm", "flow"])
def test_prior_matches_init_noise_sigma(schedule, ref):
    ref.set_timesteps(10)
    noise = torch.randn(3, 1, 4, 4)
    ts = schedule.timesteps(10)
    # FlowMatchEulerDiscreteScheduler has no init_noise_sigma: its pipelines start from unit noise
    scale = float(getattr(ref, "init_noise_sigma", 1.0))
    torch.testing.assert_close(schedule.prior(noise, ts[0]), noise * scale, atol=1e-6, rtol=1e-6)


def test_sample_t_training_distributions():
    """DDPM: uniform integer indices; EDM: ln sigma ~ N(-1.2, 1.2^2) (Karras et al. 2022, sec. 5);
    flow: shifted logit-normal, whose median sigma is shift / (1 + shift) (sigmoid(0) = 1/2)."""
    g = torch.Generator().manual_seed(0)
    t = VPSchedule().sample_t(20000, generator=g)
    assert t.dtype == torch.float64 and t.min() == 0 and t.max() == 999 and torch.equal(t, t.round())
    log_sigma = EDMSchedule().sample_t(20000, generator=g).log()
    assert abs(log_sigma.mean() + 1.2) < 0.03 and abs(log_sigma.std() - 1.2) < 0.03
    t = FlowSchedule(dict(shift=3.0)).sample_t(20000, generator=g)
    assert 0 < t.min() and t.max() < 1000 and abs(t.median() / 1000 - 0.75) < 0.01


def test_schedule_from_config_families_and_unknown_class():
    assert isinstance(schedule_from_config(dict(diffusers.EulerDiscreteScheduler().config,
                                                _class_name="EulerDiscreteScheduler")), VPSchedule)
    assert isinstance(schedule_from_config({"_class_name": "EDMEulerScheduler"}), EDMSchedule)
    assert isinstance(schedule_from_config({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}),
                      FlowSchedule)
    with pytest.raises(UserError, match="KarrasVeScheduler.*supported"):
        schedule_from_config({"_class_name": "KarrasVeScheduler"})


def test_unsupported_prediction_types_are_user_errors():
    with pytest.raises(UserError, match="prediction_type"):
        VPSchedule(dict(prediction_type="flow"))
    with pytest.raises(UserError, match="prediction_type"):
        EDMSchedule(dict(prediction_type="sample"))
    with pytest.raises(UserError, match="v_prediction"):
        VPSchedule(dict(rescale_betas_zero_snr=True, prediction_type="epsilon"))

"""Adapters: every backbone seen as D(x_t, t, cond) -> x0 in float32, checked against a hand
conversion of the raw backbone output; classifier-free guidance against two separate calls."""
from __future__ import annotations

import diffusers
import pytest
import torch
from conftest import tiny_dit, tiny_sd3, tiny_unet2d, tiny_unet2d_condition

from stepdistill.denoisers import DiffusersDenoiser, GuidedDenoiser, guided
from stepdistill.errors import UserError
from stepdistill.schedules import EDMSchedule, FlowSchedule, VPSchedule

B = 3


def _close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def _text_cond(sdxl=False, g=None):
    cond = {"encoder_hidden_states": torch.randn(B, 3, 8, generator=g)}
    if sdxl:
        cond.update(text_embeds=torch.randn(B, 8, generator=g), time_ids=torch.randn(B, 6, generator=g))
    return cond


@pytest.fixture(scope="module")
def unet():
    return tiny_unet2d()


# ---------------------------------------------------------------------------------------------
# x0 from each prediction type, by an independent formula
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction", "sample"])
def test_vp_unet2d_x0_matches_hand_conversion(unet, ptype):
    sch = VPSchedule(dict(beta_schedule="scaled_linear", prediction_type=ptype))
    den = DiffusersDenoiser(unet, sch, null_class=10)
    ab = diffusers.DDPMScheduler(beta_schedule="scaled_linear").alphas_cumprod
    x = torch.randn(B, 1, 8, 8)
    t = torch.tensor([999, 500, 3])
    labels = torch.tensor([0, 4, 10])
    out = den(x, t.double(), {"class_labels": labels})
    assert out.dtype == torch.float32 and out.shape == x.shape
    with torch.no_grad():
        raw = unet(x, t, class_labels=labels).sample
    a, s = ab[t].sqrt().view(-1, 1, 1, 1), (1 - ab[t]).sqrt().view(-1, 1, 1, 1)
    want = {"epsilon": (x - s * raw) / a,          # Ho et al. 2020, eq. 15
            "v_prediction": a * x - s * raw,        # Salimans & Ho 2022, for a^2 + s^2 = 1
            "sample": raw}[ptype]
    _close(out, want, 1e-4)


@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction"])
def test_edm_preconditioning_matches_diffusers(unet, ptype):
    """EDM (Karras et al. 2022, Table 1) through diffusers' own EDMEulerScheduler preconditioning."""
    den = DiffusersDenoiser(unet, EDMSchedule(dict(prediction_type=ptype)), null_class=10)
    ref = diffusers.EDMEulerScheduler(prediction_type=ptype)
    x = torch.randn(B, 1, 8, 8) * 5
    sigma = torch.tensor([80.0, 1.3, 0.01])
    labels = torch.tensor([1, 2, 3])
    out = den(x, sigma.double(), {"class_labels": labels})
    sv = sigma.view(-1, 1, 1, 1)
    with torch.no_grad():
        raw = unet(ref.precondition_inputs(x, sv), ref.precondition_noise(sigma), class_labels=labels).sample
    _close(out, ref.precondition_outputs(x, raw, sv), 1e-4)


def test_flow_sd3_x0_matches_hand_conversion():
    net = tiny_sd3()
    den = DiffusersDenoiser(net, FlowSchedule(dict(shift=3.0)))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, 4, 8, 8, generator=g)
    cond = {"encoder_hidden_states": torch.randn(B, 3, 16, generator=g),
            "pooled_projections": torch.randn(B, 8, generator=g)}
    t = torch.tensor([1000.0, 500.0, 20.0])
    out = den(x, t.double(), cond)
    assert out.dtype == torch.float32 and out.shape == x.shape
    with torch.no_grad():
        raw = net(hidden_states=x, timestep=t, **cond).sample
    s = (t / 1000).view(-1, 1, 1, 1)
    _close(out, x - s * raw, 1e-5)  # x = (1 - s) x0 + s eps, u = eps - x0  =>  x0 = x - s u


def test_dit_learned_sigma_keeps_mean_half():
    net = tiny_dit()
    den = DiffusersDenoiser(net, VPSchedule(dict(beta_schedule="linear")), null_class=10)
    x = torch.randn(B, 4, 8, 8)
    t = torch.tensor([900.0, 400.0, 10.0])
    labels = torch.tensor([3, 10, 7])
    out = den(x, t.double(), {"class_labels": labels})
    assert out.dtype == torch.float32 and out.shape == x.shape
    with torch.no_grad():
        raw = net(x, timestep=t, class_labels=labels).sample
    assert raw.shape[1] == 8
    ab = diffusers.DDPMScheduler(beta_schedule="linear").alphas_cumprod[t.long()].view(-1, 1, 1, 1)
    _close(out, (x - (1 - ab).sqrt() * raw[:, :4]) / ab.sqrt(), 1e-4)


@pytest.mark.parametrize("sdxl", [False, True], ids=["sd", "sdxl"])
def test_unet2d_condition_x0_matches_hand_conversion(sdxl):
    net = tiny_unet2d_condition(sdxl)
    den = DiffusersDenoiser(net, VPSchedule(dict(beta_schedule="scaled_linear", prediction_type="v_prediction")))
    cond = _text_cond(sdxl, torch.Generator().manual_seed(1))
    x = torch.randn(B, 4, 8, 8)
    t = torch.tensor([999.0, 250.0, 0.0])
    out = den(x, t.double(), cond)
    assert out.dtype == torch.float32 and out.shape == x.shape
    added = {k: cond[k] for k in ("text_embeds", "time_ids")} if sdxl else None
    with torch.no_grad():
        raw = net(x, t, encoder_hidden_states=cond["encoder_hidden_states"], added_cond_kwargs=added).sample
    ab = diffusers.DDPMScheduler(beta_schedule="scaled_linear").alphas_cumprod[t.long()].view(-1, 1, 1, 1)
    _close(out, ab.sqrt() * x - (1 - ab).sqrt() * raw, 1e-4)
    if sdxl:  # the added conditions reach the network
        other = dict(cond, time_ids=cond["time_ids"] + 1)
        assert not torch.allclose(den(x, t.double(), other), out)


def test_bf16_backbone_returns_float32():
    net = tiny_unet2d().to(torch.bfloat16)
    den = DiffusersDenoiser(net, VPSchedule(dict(prediction_type="v_prediction")), null_class=10)
    x = torch.randn(B, 1, 8, 8)
    out = den(x, 500.0, {"class_labels": torch.tensor([1, 2, 10])})
    assert out.dtype == torch.float32 and out.shape == x.shape and bool(torch.isfinite(out).all())
    ref = DiffusersDenoiser(tiny_unet2d(), den.schedule, null_class=10)(x, 500.0, {"class_labels": torch.tensor([1, 2, 10])})
    assert (out - ref).abs().max() < 0.1  # bf16 rounding only


def test_scalar_and_per_sample_times_agree(unet):
    den = DiffusersDenoiser(unet, VPSchedule(), null_class=10)
    x = torch.randn(B, 1, 8, 8)
    cond = {"class_labels": torch.tensor([1, 2, 3])}
    _close(den(x, 321.0, cond), den(x, torch.full((B,), 321.0, dtype=torch.float64), cond), 1e-6)


def test_unsupported_backbone_is_user_error():
    with pytest.raises(UserError, match="Linear.*not supported"):
        DiffusersDenoiser(torch.nn.Linear(2, 2), VPSchedule())


# ---------------------------------------------------------------------------------------------
# Classifier-free guidance (Ho & Salimans 2022)
# ---------------------------------------------------------------------------------------------
def _class_setup(unet):
    den = DiffusersDenoiser(unet, VPSchedule(dict(prediction_type="v_prediction")), null_class=10)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([999.0, 600.0, 300.0, 5.0], dtype=torch.float64)
    cond = {"class_labels": torch.tensor([0, 3, 7, 9])}
    return den, x, t, cond


def test_null_cond_for_class_labels(unet):
    den, _, _, cond = _class_setup(unet)
    assert torch.equal(den.null_cond(cond)["class_labels"], torch.full((4,), 10))
    assert torch.equal(cond["class_labels"], torch.tensor([0, 3, 7, 9]))  # input untouched
    with pytest.raises(UserError, match="unconditional"):
        DiffusersDenoiser(unet, den.schedule).null_cond(cond)


def test_cfg_against_separate_calls(unet):
    den, x, t, cond = _class_setup(unet)
    d_c = den(x, t, cond)
    d_u = den(x, t, {"class_labels": torch.full((4,), 10)})
    assert (d_c - d_u).abs().max() > 1e-3  # the class matters, so the checks below can fail
    _close(GuidedDenoiser(den, 1.0)(x, t, cond), d_c)
    assert guided(den, 1.0) is den
    _close(GuidedDenoiser(den, 0.0)(x, t, cond), d_u)
    for w in (2.5, -0.5):
        _close(guided(den, w)(x, t, cond), d_u + w * (d_c - d_u))
    w = torch.tensor([0.0, 1.0, 3.0, 7.5])
    _close(guided(den, w)(x, t, cond), d_u + w.view(-1, 1, 1, 1) * (d_c - d_u))
    _close(GuidedDenoiser(den, 1.0)(x, t, cond, scale=4.0), d_u + 4.0 * (d_c - d_u))


@pytest.mark.parametrize("sdxl", [False, True], ids=["sd", "sdxl"])
def test_null_text_and_cfg_for_text(sdxl):
    net = tiny_unet2d_condition(sdxl)
    g = torch.Generator().manual_seed(5)
    null = {"encoder_hidden_states": torch.randn(1, 3, 8, generator=g)}
    if sdxl:
        null["text_embeds"] = torch.randn(1, 8, generator=g)
    den = DiffusersDenoiser(net, VPSchedule(dict(beta_schedule="scaled_linear")), null_text=null)
    assert den.is_conditional
    cond = _text_cond(sdxl, g)
    nc = den.null_cond(cond)
    for k, v in null.items():
        assert torch.equal(nc[k], v.expand(B, *v.shape[1:]))
    if sdxl:  # micro-conditions are not part of the prompt: kept as given
        assert torch.equal(nc["time_ids"], cond["time_ids"])
    x, t = torch.randn(B, 4, 8, 8, generator=g), torch.tensor([900.0, 450.0, 50.0], dtype=torch.float64)
    d_c, d_u = den(x, t, cond), den(x, t, nc)
    assert (d_c - d_u).abs().max() > 1e-4
    _close(guided(den, 0.0)(x, t, cond), d_u)
    _close(guided(den, 6.0)(x, t, cond), d_u + 6.0 * (d_c - d_u), 1e-4)


def test_unconditional_model_with_guidance_is_user_error():
    den = DiffusersDenoiser(tiny_unet2d(num_class_embeds=None), VPSchedule())
    x = torch.randn(2, 1, 8, 8)
    assert not den.is_conditional
    with pytest.raises(UserError, match="unconditional"):
        guided(den, 3.0)(x, 10.0, {"class_labels": torch.tensor([1, 2])})

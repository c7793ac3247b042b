"""Parity with the authors' code: each objective's per-sample loss, and the gradient it sends into
the student, against an independent transcription of the paper's equation and the official code's
lines (named in each docstring), on fixed small tensors, to 1e-6.

Sources read: tianweiy/DMD2 @8d8fa55 (main/sd_guidance.py, main/edm/edm_guidance.py); mingyuanzhou/SiD
(main: training/sid_loss.py, training/sid_training_loop.py; branch sida: sida_training/sida_loss.py,
sida_training_loop.py); huggingface/diffusers @58eb52c (examples/consistency_distillation/
train_lcm_distill_sd_wds.py); google-research diffusion_distillation/dpm.py (Model.training_losses);
Sauer et al., 2023 (ADD, hinge loss) and Lin et al., 2025 (APT's approximate R1, NVlabs/FastGen ladd.py).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from conftest import tiny_teacher
from stepdistill.fake_score import dsm_error
from stepdistill.generator import StudentConfig, build_student
from stepdistill.objectives import gan
from stepdistill.objectives.base import Nets
from stepdistill.objectives.common import target_loss
from stepdistill.objectives.consistency import Consistency
from stepdistill.objectives.dmd import dmd_gradient
from stepdistill.objectives.progressive import pd_target, snr_weight
from stepdistill.objectives.sid import sid_generator_loss
from stepdistill.schedules import EDMSchedule, VPSchedule
from stepdistill.train.randomness import BatchRandom

G = torch.Generator().manual_seed(0)


def _fixed(*shape, dtype=torch.float64):
    return torch.randn(*shape, generator=G, dtype=dtype)


# -- DMD / DMD2 ----------------------------------------------------------------------------------------
def test_dmd2_distribution_matching_loss_and_its_gradient():
    """sd_guidance.py compute_distribution_matching_loss (edm_guidance.py the same): p_real = x - real_x0,
    p_fake = x - fake_x0; grad = nan_to_num((p_real - p_fake) / |p_real|.mean([1, 2, 3], keepdim)); loss =
    0.5 * F.mse_loss(x, (x - grad).detach(), reduction="mean"), whose gradient is grad / (B C H W)."""
    x = _fixed(3, 4, 8, 8).requires_grad_(True)
    real, fake = _fixed(3, 4, 8, 8), _fixed(3, 4, 8, 8)
    real[1, 0, 0, 0] = float("nan")  # a non-finite entry becomes 0 in the gradient
    p_real, p_fake = x.detach() - real, x.detach() - fake
    want_grad = torch.nan_to_num((p_real - p_fake) / p_real.abs().mean(dim=[1, 2, 3], keepdim=True))
    got_grad = dmd_gradient(x.detach(), real, fake)
    torch.testing.assert_close(got_grad, want_grad, rtol=0, atol=1e-6)
    loss = target_loss(x, got_grad).mean()  # the trainer averages the per-sample losses
    want_loss = 0.5 * F.mse_loss(x.detach(), (x.detach() - want_grad), reduction="mean")
    torch.testing.assert_close(loss.detach(), want_loss, rtol=0, atol=1e-6)
    loss.backward()
    torch.testing.assert_close(x.grad, want_grad / x.numel(), rtol=0, atol=1e-9)


def test_dmd2_fake_score_loss_on_eps_and_edm_teachers():
    """compute_loss_fake: on SD (eps-prediction) mean((eps_hat - eps)^2), unweighted (sd_guidance.py);
    on EDM mean(w(sigma) (x0_hat - x0)^2) with w = 1/sigma^2 + 1/sigma_data^2 (edm_guidance.py). Ours
    is the error in the teacher's own parameterisation (``dsm_error`` space "raw")."""
    vp = VPSchedule({"beta_schedule": "scaled_linear", "prediction_type": "epsilon"})
    x0, eps, x0_hat = _fixed(3, 4, 8, 8), _fixed(3, 4, 8, 8), _fixed(3, 4, 8, 8)
    t = torch.tensor([20.0, 500.0, 980.0], dtype=torch.float64)
    x_t = vp.add_noise(x0, eps, t)
    a, s = (v.view(-1, 1, 1, 1) for v in vp.alpha_sigma(t))
    eps_hat = (x_t - a * x0_hat) / s
    want = (eps_hat - eps).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(dsm_error(vp, x0_hat, x0, x_t, t, "raw"), want, rtol=1e-6, atol=1e-6)
    edm = EDMSchedule()
    sigma = torch.tensor([0.01, 1.0, 60.0], dtype=torch.float64)
    x_t = edm.add_noise(x0, eps, sigma)
    w = (1 / sigma**2 + 1 / 0.5**2).view(-1, 1, 1, 1)
    want = (w * (x0_hat - x0).pow(2)).flatten(1).mean(1)
    torch.testing.assert_close(dsm_error(edm, x0_hat, x0, x_t, sigma, "raw"), want, rtol=1e-6, atol=1e-6)


def test_dmd2_gan_terms():
    """sd_guidance.py: the guidance model's classifier loss softplus(fake).mean() + softplus(-real).mean()
    (compute_guidance_clean_cls_loss) and the generator's softplus(-fake).mean()
    (compute_generator_clean_cls_loss); Yin et al., 2024b, eq. 4."""
    real, fake = _fixed(5), _fixed(5)
    torch.testing.assert_close(gan.d_loss(real, fake, "ns").mean(), F.softplus(fake).mean() + F.softplus(-real).mean())
    torch.testing.assert_close(gan.g_loss(fake, "ns").mean(), F.softplus(-fake).mean())


# -- SiD ----------------------------------------------------------------------------------------------
def test_sid_generator_loss_and_gradient():
    """sid_loss.py (generator_loss): with_grad weight wf = mean_{C,H,W}|y - y_real| (no gradient, floored at
    1e-5); loss = (y_real - y_fake) * ((y_real - y) - alpha (y_real - y_fake)) / wf per pixel, summed over
    pixels (sid_training_loop.py: loss.sum() / batch). The gradient reaches y through y, y_real and y_fake."""
    y = _fixed(3, 4, 8, 8).requires_grad_(True)
    a_r, a_f = _fixed(3, 4, 8, 8), _fixed(3, 4, 8, 8)
    alpha = 1.2

    def scores(v):  # two differentiable "score networks" of y
        return torch.tanh(v + a_r), 0.5 * torch.sin(v) + a_f

    y_real, y_fake = scores(y)
    got = sid_generator_loss(y, y_real, y_fake, alpha)
    (g_got,) = torch.autograd.grad(got.sum(), y)
    y2 = y.detach().clone().requires_grad_(True)
    r2, f2 = scores(y2)
    wf = (y2 - r2).abs().mean(dim=[1, 2, 3], keepdim=True).detach().clamp_min(1e-5)
    want = ((r2 - f2) * ((r2 - y2) - alpha * (r2 - f2)) / wf).sum(dim=[1, 2, 3])
    (g_want,) = torch.autograd.grad(want.sum(), y2)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(g_got, g_want, rtol=0, atol=1e-6)


def test_sid_fake_score_loss_is_edms_weighted_denoising_loss():
    """sid_loss.py (the fake-score loss): lambda = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2, loss =
    lambda (D(y + n) - y)^2 per pixel, at EDM's log-normal sigma (the fake score's ``fake_t="train"``)."""
    edm = EDMSchedule()
    y, n, d = _fixed(3, 4, 8, 8), _fixed(3, 4, 8, 8), _fixed(3, 4, 8, 8)
    sigma = torch.tensor([0.1, 0.7, 9.0], dtype=torch.float64)
    lam = ((sigma**2 + 0.25) / (sigma * 0.5) ** 2).view(-1, 1, 1, 1)
    want = (lam * (d - y) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(dsm_error(edm, d, y, y + sigma.view(-1, 1, 1, 1) * n, sigma, "raw"), want,
                               rtol=1e-6, atol=1e-6)


# -- LCM -----------------------------------------------------------------------------------------------
def test_lcm_target_skipping_step_and_boundary_condition():
    """train_lcm_distill_sd_wds.py: DDIMSolver timesteps (arange(1, 51) * 20) - 1; index ~ randint(0, 50);
    start = timesteps[index], t_n = max(start - 20, 0) (skip k = 20); noisy = add_noise(x0, noise, start);
    scalings c_skip = 0.25 / ((10 t)^2 + 0.25), c_out = 10 t / sqrt((10 t)^2 + 0.25) (get_scalings_for_
    boundary_condition_discrete); model_pred = c_skip(start) noisy + c_out(start) x0_student; teacher
    x0 and eps with CFG cond + w (cond - uncond) (LCM's w; ours is w + 1); x_prev = sqrt(ab_prev) x0 +
    sqrt(1 - ab_prev) eps (DDIMSolver.ddim_step); target = c_skip(t_n) x_prev + c_out(t_n) x0_target(x_prev,
    t_n) from the target unet; loss F.mse_loss (mean)."""
    teacher = tiny_teacher().requires_grad_(False)  # scaled_linear, v-prediction, set_alpha_to_one false
    student = build_student(teacher, StudentConfig(boundary="lcm"))
    w_lcm = 2.0
    obj = Consistency(Consistency.Config(loss="l2", guidance=w_lcm + 1.0, target_ema=0.95, teacher_steps=50))
    nets = Nets(teacher=teacher, student=student, **obj.build(teacher, student))
    with torch.no_grad():  # a target network apart from the student, as after some EMA updates
        for p in nets.target.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=G))
    b = 4
    x0 = _fixed(b, 1, 8, 8, dtype=torch.float32)
    cond = {"class_labels": torch.tensor([0, 1, 1, 0])}
    got = obj.generator_loss(nets, {"x0": x0, "cond": cond, "rng": BatchRandom(7, b, slice(0, b))})["loss"]

    rng = BatchRandom(7, b, slice(0, b))
    index = rng.randint(0, 50)
    noise = rng.randn(1, 8, 8)
    start = ((torch.arange(1, 51) * 20) - 1).flip(0)[index].double()  # the same uniform draw, indexed from 999
    t_n = (start - 20).clamp_min(0)
    ab = teacher.schedule.alphas_cumprod.double()

    def scalings(t):
        st = 10.0 * t
        return (0.25 / (st**2 + 0.25)).view(-1, 1, 1, 1), (st / (st**2 + 0.25).sqrt()).view(-1, 1, 1, 1)

    def sq(v):
        return v.sqrt().view(-1, 1, 1, 1)

    with torch.no_grad():
        noisy = sq(ab[start.long()]) * x0 + sq(1 - ab[start.long()]) * noise
        cs, co = scalings(start)
        pred = cs * noisy + co * student.denoiser(noisy, start, cond)
        null = {"class_labels": torch.full((b,), 2)}
        x0_c, x0_u = teacher(noisy, start, cond), teacher(noisy, start, null)
        x0_g = x0_c + w_lcm * (x0_c - x0_u)
        eps_g = (noisy - sq(ab[start.long()]) * x0_g) / sq(1 - ab[start.long()])
        ab_prev = ab[t_n.long()]
        x_prev = sq(ab_prev) * x0_g + sq(1 - ab_prev) * eps_g
        cs_n, co_n = scalings(t_n)
        target = cs_n * x_prev + co_n * nets.target.denoiser(x_prev, t_n, cond)
        want = (pred.double() - target.double()).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(got.detach().double(), want, rtol=1e-5, atol=1e-6)
    assert math.isclose(float(scalings(torch.zeros(1))[0]), 1.0) and float(scalings(torch.zeros(1))[1]) == 0.0


# -- progressive distillation ---------------------------------------------------------------------------
def test_progressive_target_and_truncated_snr_weight():
    """dpm.py Model.training_losses (Salimans & Ho, 2022, Alg. 2): two DDIM teacher steps z_t -> z_t' ->
    z_t'' (t' = t - 0.5/N, t'' = t - 1/N), then x~ = (z_t'' - (sigma_t''/sigma_t) z_t) / (alpha_t'' -
    (sigma_t''/sigma_t) alpha_t); loss 'snr_trunc' = max(||x - x^||^2, ||eps - eps^||^2) = max(SNR, 1)
    ||x - x^||^2 per pixel (meanflat). Cosine logSNR schedule; a fixed linear denoiser."""
    class Cosine:
        def alpha_sigma(self, u):
            u = torch.as_tensor(u, dtype=torch.float64)
            return torch.cos(0.5 * math.pi * u), torch.sin(0.5 * math.pi * u)

        def snr(self, u):
            a, s = self.alpha_sigma(u)
            return (a / s) ** 2

    sched = Cosine()
    A, B = 0.3 * _fixed(4, 4), _fixed(4)

    def denoise(z, u, cond=None):
        return z @ A + B

    z = _fixed(3, 4)
    n_steps = 8
    t = torch.tensor([3, 5, 8], dtype=torch.float64) / n_steps
    got = pd_target(denoise, sched, z, t, t - 0.5 / n_steps, t - 1.0 / n_steps)

    def ddim(zz, uu, vv):
        (a, s), (a2, s2) = sched.alpha_sigma(uu), sched.alpha_sigma(vv)
        x = denoise(zz, uu)
        eps = (zz - a[:, None] * x) / s[:, None]
        return a2[:, None] * x + s2[:, None] * eps

    z2 = ddim(ddim(z, t, t - 0.5 / n_steps), t - 0.5 / n_steps, t - 1.0 / n_steps)
    (a, s), (a2, s2) = sched.alpha_sigma(t), sched.alpha_sigma(t - 1.0 / n_steps)
    frac = (s2 / s)[:, None]
    want = (z2 - frac * z) / (a2[:, None] - frac * a[:, None])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    x_hat = _fixed(3, 4)
    eps_hat, eps_t = (z - a[:, None] * x_hat) / s[:, None], (z - a[:, None] * want) / s[:, None]
    x_mse, eps_mse = (x_hat - want).pow(2).mean(1), (eps_hat - eps_t).pow(2).mean(1)
    torch.testing.assert_close(snr_weight(sched, t, "truncated_snr") * x_mse, torch.maximum(x_mse, eps_mse),
                               rtol=1e-10, atol=1e-12)


# -- ADD / LADD --------------------------------------------------------------------------------------------
def test_hinge_losses_and_approximate_r1():
    """Hinge GAN (Lim & Ye, 2017; ADD/LADD): D: relu(1 - D(real)) + relu(1 + D(fake)), G: -D(fake).
    Approximate R1 (APT, Lin et al., 2025; FastGen ladd.py): (D(x) - D(x + s n))^2, for a linear D
    exactly (s <w, n>)^2."""
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.3, 1.5])
    torch.testing.assert_close(gan.d_loss(real, fake, "hinge"), torch.tensor([0.0, 1.8, 4.5]))
    torch.testing.assert_close(gan.g_loss(fake, "hinge"), torch.tensor([2.0, -0.3, -1.5]))
    w = _fixed(6)
    x = _fixed(5, 6)

    def disc(v):
        return v @ w

    torch.manual_seed(11)
    got = gan.approx_r1(disc, x, disc(x), 0.01)
    torch.manual_seed(11)
    n = torch.randn_like(x)
    torch.testing.assert_close(got, (0.01 * n @ w) ** 2, rtol=1e-6, atol=1e-12)


def test_several_heads_weigh_the_same_whatever_their_resolution():
    """Logits of several heads ([B, N_h] each, DiscHeads): every loss is each head's mean over its
    locations, then the mean over heads (SANA-Sprint's heads share one token grid, where this equals the
    mean over all logits); a 4x4 head weighs as much as a 16x16 one."""
    coarse = torch.tensor([[2.0, -1.0], [0.5, 0.5]])             # [B=2, 2 locations]
    fine = torch.tensor([[0.0, 0.0, 0.0, 4.0], [-3.0, 1.0, 1.0, 1.0]])  # [B=2, 4 locations]
    # hinge D on real: relu(1 - l); per head: coarse [(0 + 2)/2, (0.5 + 0.5)/2] = [1, 0.5],
    # fine [(1 + 1 + 1 + 0)/4, (4 + 0 + 0 + 0)/4] = [0.75, 1]; heads averaged: [0.875, 0.75]
    zero = [torch.full((2, 2), -1.0), torch.full((2, 4), -1.0)]  # fakes at -1: no hinge loss
    torch.testing.assert_close(gan.d_loss([coarse, fine], zero, "hinge"), torch.tensor([0.875, 0.75]))
    # G hinge: -l; coarse means [0.5, 0.5], fine [1, 0]; -> -[0.75, 0.25]
    torch.testing.assert_close(gan.g_loss([coarse, fine], "hinge"), torch.tensor([-0.75, -0.25]))
    sp = torch.nn.functional.softplus
    want = 0.5 * (sp(-coarse).mean(1) + sp(-fine).mean(1))
    torch.testing.assert_close(gan.g_loss([coarse, fine], "ns"), want)
    # one grid: the list and the side-by-side logits agree
    torch.testing.assert_close(gan.g_loss([fine, 2 * fine], "ns"), gan.g_loss(torch.cat([fine, 2 * fine], 1), "ns"))

    def disc(v):
        return [v[:, :2], v]  # two "heads" of a linear D: 2 and 4 locations

    x = _fixed(2, 4)
    torch.manual_seed(3)
    got = gan.approx_r1(disc, x, disc(x), 0.1)
    torch.manual_seed(3)
    d = (0.1 * torch.randn_like(x)) ** 2
    torch.testing.assert_close(got, 0.5 * (d[:, :2].mean(1) + d.mean(1)))

"""DMD, DMD2 and SiD against an analytic teacher: a 2-D Gaussian mixture whose x0-predictor is
exact, so the only errors are the student's and the fake score's.

* the DMD gradient at initialisation, for a Gaussian generator and a Gaussian teacher, against the
  closed-form KL gradient (direction), and at a fixed t against the closed-form gradient of the
  KL between the noised distributions (magnitude too);
* a one-step MLP generator trained with DMD, DMD2 and SiD (manual loop, own optimizers, MLP fake
  score fitted to the initial generator and then trained online) reaches a sliced-Wasserstein
  distance to exact mixture samples within 2x of that of exact samples at the same sample count
  (and, marked slow, the same bound after longer runs).
"""
from __future__ import annotations

import math
import time

import pytest
import torch
from torch import nn

from stepdistill.denoisers import Denoiser
from stepdistill.fake_score import FakeScore, denoising_loss
from stepdistill.generator import Student
from stepdistill.objectives.base import Nets
from stepdistill.objectives.dmd import DMD, DMD2, dmd_gradient
from stepdistill.objectives.sid import SiD
from stepdistill.schedules import EDMSchedule, VPSchedule, bcast

SHAPE = (2, 1, 1)


def vp_schedule():
    return VPSchedule({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                       "prediction_type": "v_prediction"})


class GMMTeacher(Denoiser):
    """Mixture of isotropic Gaussians N(mu_k, s_k^2 I) with weights pi_k, data [B, 2, 1, 1].
    E[x0 | x_t] = sum_k r_k(x_t) (mu_k + a s_k^2 / v_k (x_t - a mu_k)), v_k = a^2 s_k^2 + sigma^2,
    r_k the posterior component weights under x_t | k ~ N(a mu_k, v_k I)."""

    sample_shape = SHAPE

    def __init__(self, schedule, mu, s, pi):
        super().__init__()
        self.schedule = schedule
        self.register_buffer("mu", torch.as_tensor(mu, dtype=torch.float64))
        self.register_buffer("s", torch.as_tensor(s, dtype=torch.float64))
        self.register_buffer("pi", torch.as_tensor(pi, dtype=torch.float64))

    def forward(self, x, t, cond=None):
        a, sig = self.schedule.alpha_sigma(torch.as_tensor(t, dtype=torch.float64))
        a, sig = a.expand(x.shape[0])[:, None], sig.expand(x.shape[0])[:, None]      # [B, 1]
        xf = x.double().flatten(1)                                                      # [B, 2]
        v = a**2 * self.s**2 + sig**2                                                   # [B, K]
        d2 = ((xf[:, None, :] - a[:, :, None] * self.mu[None]) ** 2).sum(-1)            # [B, K]
        logr = self.pi.log() - d2 / (2 * v) - xf.shape[1] / 2 * v.log()
        r = logr.softmax(dim=1)
        post = self.mu[None] + (a * self.s**2 / v)[..., None] * (xf[:, None, :] - a[:, :, None] * self.mu[None])
        return (r[..., None] * post).sum(1).float().reshape(x.shape)

    def sample(self, n, generator=None):
        k = torch.multinomial(self.pi, n, replacement=True, generator=generator)
        z = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        return (self.mu[k] + self.s[k, None] * z).float().reshape(n, *SHAPE)


class MLPDenoiser(Denoiser):
    """A small time-conditioned x0-denoiser with EDM-style preconditioning generalised to
    x = a x0 + sigma eps (data std sd): c_skip = a sd^2 / (a^2 sd^2 + sigma^2), c_out = sigma sd /
    sqrt(a^2 sd^2 + sigma^2), c_in = 1 / sqrt(a^2 sd^2 + sigma^2)."""

    sample_shape = SHAPE

    def __init__(self, schedule, hidden=64, sd=1.0, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.schedule, self.sd = schedule, sd
        self.net = nn.Sequential(nn.Linear(2 + 8, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, 2))
        self.register_buffer("freqs", torch.arange(4, dtype=torch.float32) + 1.0)

    def forward(self, x, t, cond=None):
        t = torch.as_tensor(t, dtype=torch.float64)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        a, sig = self.schedule.alpha_sigma(t)
        a, sig = bcast(a, x.float()), bcast(sig, x.float())
        norm = (a**2 * self.sd**2 + sig**2).sqrt()
        c_skip, c_out, c_in = a * self.sd**2 / norm**2, sig * self.sd / norm, 1 / norm
        lam = (a / sig).log().float().reshape(-1, 1) / 4                  # log-SNR / 4 as the time input
        emb = torch.cat([torch.sin(lam * self.freqs), torch.cos(lam * self.freqs)], 1)
        f = self.net(torch.cat([(c_in * x.float()).flatten(1), emb], 1)).reshape(x.shape)
        return c_skip * x.float() + c_out * f


class Generator(Denoiser):
    """A one-step generator x = G(z): an MLP of the noise (the time input is the single grid time)."""

    sample_shape = SHAPE

    def __init__(self, schedule, hidden=64, seed=1, init_scale=0.5):
        super().__init__()
        torch.manual_seed(seed)
        self.schedule = schedule
        self.net = nn.Sequential(nn.Linear(2, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, 2))
        self.init_scale = init_scale

    def forward(self, x, t, cond=None):
        z = x.float().flatten(1)
        return (self.init_scale * z + self.net(z)).reshape(x.shape)


def sliced_w1(a, b, n_proj=256, seed=0):
    """Sliced 1-Wasserstein distance between equal-size 2-D point sets (sorted projections)."""
    g = torch.Generator().manual_seed(seed)
    th = torch.rand(n_proj, generator=g, dtype=torch.float64) * math.pi
    d = torch.stack([th.cos(), th.sin()], 1)
    pa, pb = a.double().flatten(1) @ d.T, b.double().flatten(1) @ d.T
    return (pa.sort(0).values - pb.sort(0).values).abs().mean().item()


MIX = dict(mu=[[-1.2, -0.4], [1.0, 0.8], [0.6, -1.2]], s=[0.6, 0.5, 0.55], pi=[0.35, 0.35, 0.3])


def make_nets(schedule, seed=0, fake_hidden=128):
    """Teacher, one-step student and an MLP fake score. The fake score is the accuracy bottleneck
    here: near t_min its x0 error, relative to mean|x - real x0|, is the DMD/SiD gradient that is
    left when the student already matches the teacher. Fitted to exact mixture samples for 1,500
    steps, that residual (rms over t in [0.02, 0.2] of the range) is 0.69 with 64 hidden units
    and 0.56 with 128, so the fake score gets 128 and, below, several updates per student update."""
    teacher = GMMTeacher(schedule, **MIX).requires_grad_(False)
    student = Student(Generator(schedule, seed=seed + 1), schedule.timesteps(1)[:-1])
    fake = FakeScore(MLPDenoiser(schedule, hidden=fake_hidden, seed=seed + 2))
    return teacher, student, fake


def train(obj, teacher, student, fake, *, steps, lr_g, lr_f=2e-3, batch=1024, fit_steps=300, critic=None):
    """A manual loop over objective.losses: fit the fake score to the initial generator, then
    alternate the objective's phases, each with its own Adam optimiser."""
    nets = Nets(teacher=teacher, student=student, fake_score=fake)
    opt = {"student": torch.optim.Adam(student.parameters(), lr=lr_g, betas=(0.0, 0.99)),
           "fake_score": torch.optim.Adam(fake.parameters(), lr=lr_f, betas=(0.0, 0.99))}
    # linear decay of every learning rate to 10 % over the run, to read off a converged state
    sched = [torch.optim.lr_scheduler.LambdaLR(o, lambda i: 1 - 0.9 * min(i / steps, 1)) for o in opt.values()]
    batch_d = {"x0": torch.zeros(batch, *SHAPE), "cond": None}
    for _ in range(fit_steps):
        with torch.no_grad():
            x = student(torch.randn(batch, *SHAPE))
        opt["fake_score"].zero_grad()
        denoising_loss(fake, x, space=obj.cfg.fake_loss).mean().backward()
        opt["fake_score"].step()
    for _ in range(steps):
        for ph in obj.phases():
            for _ in range(ph.repeats):
                for n in ph.trains:
                    opt[n].zero_grad()
                losses = obj.losses(ph.name, nets, batch_d)
                sum(v.mean() for k, v in losses.items() if not k.startswith("_")).backward()
                for n in ph.trains:
                    opt[n].step()
        for sc in sched:
            sc.step()
    return nets


def eval_sw(teacher, student, n=2000, seed=123, draws=5):
    """(student, exact sampler) sliced-W1 to fresh exact samples, n points each, each averaged over
    `draws` independent reference sets: one draw of the exact sampler's distance varies by about
    +-10 %, which would make a 2x bound a coin flip on the baseline rather than a test of the student."""
    g = torch.Generator().manual_seed(seed)
    sw_gen, sw_exact = 0.0, 0.0
    for _ in range(draws):
        ref = teacher.sample(n, g)
        exact = teacher.sample(n, g)
        with torch.no_grad():
            gen = student(torch.randn(n, *SHAPE, generator=g))
        sw_gen, sw_exact = sw_gen + sliced_w1(gen, ref) / draws, sw_exact + sliced_w1(exact, ref) / draws
    return sw_gen, sw_exact


# -- the DMD gradient against closed-form KL gradients ---------------------------------------------
class GaussianGen(nn.Module):
    """x = m + diag(s) z with trainable m, log s: the generator of the KL test."""

    def __init__(self, m, s):
        super().__init__()
        self.m = nn.Parameter(torch.as_tensor(m, dtype=torch.float64))
        self.log_s = nn.Parameter(torch.as_tensor(s, dtype=torch.float64).log())

    def forward(self, z):
        return (self.m + self.log_s.exp() * z.flatten(1)).reshape(z.shape)


class GaussDenoiser(Denoiser):
    """Exact x0-predictor of N(m, diag(s^2)) data (the fake score at the generator's distribution)."""

    def __init__(self, schedule, m, s):
        super().__init__()
        self.schedule, self.m, self.s = schedule, m, s

    def forward(self, x, t, cond=None):
        a, sig = self.schedule.alpha_sigma(torch.as_tensor(t, dtype=torch.float64))
        a, sig = a.expand(x.shape[0])[:, None], sig.expand(x.shape[0])[:, None]
        xf = x.double().flatten(1)
        return (self.m + a * self.s**2 / (a**2 * self.s**2 + sig**2) * (xf - a * self.m)).reshape(x.shape)


def kl_grad(m, s, mu, tau, a=1.0, sig=0.0):
    """d/d(m, log s) of KL(N(a m, a^2 s^2 + sig^2) || N(a mu, a^2 tau^2 + sig^2)), per dimension."""
    vq, vp = a**2 * s**2 + sig**2, a**2 * tau**2 + sig**2
    dm = a**2 * (m - mu) / vp
    dlogs = (a**2 * s**2) * (1 / vp - 1 / vq)   # d/dlog s of 0.5 (vq / vp - log vq)
    return torch.cat([dm, dlogs])


@pytest.mark.parametrize("schedule", [vp_schedule(), EDMSchedule()], ids=["vp", "edm"])
def test_dmd_gradient_matches_kl(schedule):
    mu, tau = torch.tensor([0.5, -1.0], dtype=torch.float64), torch.tensor([0.6, 1.2], dtype=torch.float64)
    m0, s0 = torch.tensor([-0.3, 0.4], dtype=torch.float64), torch.tensor([1.0, 0.5], dtype=torch.float64)
    real, fake = GaussDenoiser(schedule, mu, tau), GaussDenoiser(schedule, m0, s0)
    gen = GaussianGen(m0, s0)
    torch.manual_seed(0)
    n = 200_000
    # (1) at one fixed t, without the eq. 8 normaliser, alpha / sigma^2 (fake - real) is the score
    #     difference; through dx_t/dx = alpha its expectation is exactly the gradient of the KL
    #     between the noised distributions
    t = schedule.timesteps(1000)[600 if schedule.kind == "vp" else 400]
    a, sig = (v.item() for v in schedule.alpha_sigma(t))
    x = gen(torch.randn(n, *SHAPE, dtype=torch.float64))
    x_t = schedule.add_noise(x.detach(), torch.randn_like(x), t)
    score_diff = a / sig**2 * (fake(x_t, t) - real(x_t, t))
    dx_t = a * score_diff  # chain rule through x_t = alpha x + sigma eps
    (x * dx_t.detach()).sum().div(n).backward()
    got = torch.cat([gen.m.grad, gen.log_s.grad])
    want = kl_grad(m0, s0, mu, tau, a, sig)
    assert torch.allclose(got, want, rtol=0.05, atol=0.01 * want.abs().max()), (got, want)
    # (2) the paper's normalised gradient, averaged over DMD's time range, is a descent direction of
    #     the clean-data KL that moves every mean the right way. It is not parallel to it: noise hides
    #     scale errors more than mean errors (the log-s terms shrink as sigma grows; on EDM's grid,
    #     where half the times have sigma > 2.5, one of them is near zero), which reweights the
    #     coordinates; the exact statement is (1).
    gen.zero_grad()
    obj = DMD(DMD.Config(regression_weight=0.0))
    nets = Nets(teacher=real, student=_StudentOf(gen, schedule), fake_score=fake)
    x = gen(torch.randn(n, *SHAPE, dtype=torch.float64))
    g, _ = obj.dm_terms(nets, x, None)
    (x * g).sum().div(n).backward()
    got = torch.cat([gen.m.grad, gen.log_s.grad])
    want = kl_grad(m0, s0, mu, tau)
    cos = torch.nn.functional.cosine_similarity(got, want, dim=0).item()
    assert cos > 0.5, (cos, got, want)
    assert (got[:2].sign() == want[:2].sign()).all(), (got, want)


class _StudentOf(nn.Module):
    def __init__(self, gen, schedule):
        super().__init__()
        self.gen, self.schedule = gen, schedule


def test_dmd_gradient_is_zero_when_fake_equals_real():
    schedule = vp_schedule()
    teacher = GMMTeacher(schedule, **MIX)
    x = teacher.sample(64)
    t = torch.full((64,), 500.0, dtype=torch.float64)
    x_t = schedule.add_noise(x, torch.randn_like(x), t)
    r = teacher(x_t, t)
    assert dmd_gradient(x, r, r).abs().max() == 0


# -- convergence ------------------------------------------------------------------------------------
# objective, learning rates (generator, fake score). DMD and SiD alternate 1:1 in their papers, with
# a fake score initialised from a large teacher; a small MLP fitted from scratch by noisy denoising
# score matching lags the student and leaves its own error in the gradient, so here it gets three
# updates per student update (DMD2's two time-scale rule, which DMD2 itself runs at five).
# Adam betas (0, 0.99) as in DMD2's configs; momentum (0.9, 0.999) measured worse here.
CASES = {
    "dmd": (lambda: DMD(DMD.Config(regression_weight=0.0, critic_repeats=3)), 2e-3, 2e-3),
    "dmd2": (lambda: DMD2(DMD2.Config(gan_weight=0.0)), 3e-3, 2e-3),
    "sid": (lambda: SiD(SiD.Config(critic_repeats=3)), 1e-3, 2e-3),
}
FAST_STEPS = {"dmd": 800, "dmd2": 500, "sid": 800}
FULL_STEPS = {"dmd": 1500, "dmd2": 600, "sid": 1500}


def run_case(name, steps):
    make_obj, lr_g, lr_f = CASES[name]
    torch.manual_seed(0)
    teacher, student, fake = make_nets(vp_schedule())
    sw0, _ = eval_sw(teacher, student)
    t0 = time.time()
    train(make_obj(), teacher, student, fake, steps=steps, lr_g=lr_g, lr_f=lr_f)
    sw, sw_exact = eval_sw(teacher, student)
    print(f"{name} ({steps} steps): SW {sw0:.4f} -> {sw:.4f} (exact sampler {sw_exact:.4f}, ratio "
          f"{sw / sw_exact:.2f}), {time.time() - t0:.1f} s")
    return sw0, sw, sw_exact


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "dmd" else n for n in CASES])
def test_one_step_generator_converges(name):
    """Within 2x of an exact sampler's sliced-Wasserstein distance at 2,000 samples, starting from
    more than 5x (about 14x). DMD (DMD2's distribution matching plus a regression term) under -m slow."""
    sw0, sw, sw_exact = run_case(name, FAST_STEPS[name])
    assert sw0 > 5 * sw_exact, (sw0, sw_exact)  # the starting point is far from the mixture
    assert sw < 2 * sw_exact, (sw0, sw, sw_exact)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_one_step_generator_converges_long(name):
    """Longer runs: the same 2x bound, reached with a wider margin."""
    _, sw, sw_exact = run_case(name, FULL_STEPS[name])
    assert sw < 2 * sw_exact, (sw, sw_exact)

"""sCM (Lu & Song, 2024) and the TrigFlow view of every teacher kind, against closed forms.

Gaussian data N(mu, s^2) per dimension in TrigFlow, x_t = cos t x0 + sin t z, z ~ N(0, sigma_d^2):
the marginal is N(cos t mu, S(t)^2) with S(t)^2 = cos^2 t s^2 + sin^2 t sigma_d^2, the PF-ODE keeps
c = (x_t - cos t mu) / S(t) constant, so

    dx_t/dt = -sin t mu + S'(t) c,  S'(t) = sin t cos t (sigma_d^2 - s^2) / S(t),

the exact consistency function is f*(x_t, t) = mu + s c (constant along the ODE: df*/dt = 0), and
the exact denoiser D(x_t, t) = mu + s^2 cos t / S(t) c has, along the ODE,
dD/dt = s^2 c d/dt(cos t / S(t)) = -s^2 c sin t sigma_d^2 / S(t)^3.
"""
from __future__ import annotations

import math

import pytest
import torch

from conftest import GaussianTeacher
from stepdistill.denoisers import Denoiser
from stepdistill.generator import Student
from stepdistill.objectives.base import Nets
from stepdistill.objectives.scm import SCM
from stepdistill.schedules import EDMSchedule, FlowSchedule, VPSchedule, bcast, log_snr
from stepdistill.trigflow import TrigFlow

SD = 0.5


def schedules():
    return {
        "vp-v": VPSchedule({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                            "prediction_type": "v_prediction"}),
        "vp-eps-linear": VPSchedule({"beta_schedule": "linear", "prediction_type": "epsilon"}),
        "edm": EDMSchedule(),
        "flow": FlowSchedule({"shift": 3.0}),
    }


KINDS = list(schedules())


class ExactConsistency(Denoiser):
    """f*(x, u) = mu + s (x / alpha - mu) / sqrt(s^2 + (sigma / alpha)^2) in the schedule's own units."""

    def __init__(self, schedule, mu, s):
        super().__init__()
        self.schedule, self.mu, self.s = schedule, mu, s

    def forward(self, x, t, cond=None):
        a, sig = self.schedule.alpha_sigma(torch.as_tensor(t, dtype=torch.float64))
        a, sig = bcast(a, x), bcast(sig, x)
        return self.mu + self.s * (x / a - self.mu) / (self.s**2 + (sig / a) ** 2).sqrt()


def _state(mu, s, t, seed=0):
    """A TrigFlow state x_t of the Gaussian at times t, [B, 4] float64."""
    g = torch.Generator().manual_seed(seed)
    x0 = mu + s * torch.randn(len(t), 4, generator=g, dtype=torch.float64)
    z = SD * torch.randn(len(t), 4, generator=g, dtype=torch.float64)
    return bcast(torch.cos(t), x0) * x0 + bcast(torch.sin(t), x0) * z


def _closed(mu, s, x, t):
    cos, sin = bcast(torch.cos(t), x), bcast(torch.sin(t), x)
    S = (cos**2 * s**2 + sin**2 * SD**2).sqrt()
    c = (x - cos * mu) / S
    dxdt = -sin * mu + sin * cos * (SD**2 - s**2) / S * c
    d_denoiser_dt = -(s**2) * c * sin * SD**2 / S**3
    return dxdt, d_denoiser_dt


@pytest.mark.parametrize("kind", KINDS)
def test_log_snr_inverse_and_the_snr_matched_state(kind):
    """t_from_log_snr inverts log_snr on the schedule's range, and k(t) x_t is the schedule's own x_u
    for the same x0 and noise (SNR matching, SANA-Sprint sec. 3.1)."""
    sched = schedules()[kind]
    lo = 0.0 if sched.kind == "vp" else (sched.sigma_min if sched.kind == "edm" else 1.0)
    u = torch.linspace(lo, sched.t_max * (0.999 if sched.kind == "flow" else 1.0), 97, dtype=torch.float64)
    back = sched.t_from_log_snr(log_snr(sched, u))
    assert torch.allclose(back, u, rtol=1e-9, atol=1e-7 * sched.t_max), (back - u).abs().max()
    trig = TrigFlow(sched, SD)
    t = torch.linspace(0.05, trig.t_max - 1e-3, 13, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(13, 4, generator=g, dtype=torch.float64), torch.randn(13, 4, generator=g, dtype=torch.float64)
    x_trig = trig.add_noise(x0, SD * eps, t)
    un, k = trig.native(t)
    assert torch.allclose(bcast(k, x_trig) * x_trig, sched.add_noise(x0, eps, un), atol=1e-10)


@pytest.mark.parametrize("kind", KINDS)
def test_teacher_velocity_is_the_closed_form_ode(kind, gaussian_data):
    """The TrigFlow velocity of the exact Gaussian teacher of any kind is the closed-form dx_t/dt."""
    mu, s = gaussian_data
    sched = schedules()[kind]
    trig = TrigFlow(sched, SD)
    t = torch.linspace(0.05, trig.t_max - 1e-3, 11, dtype=torch.float64)
    x = _state(mu, s, t)
    v = trig.velocity(GaussianTeacher(sched, mu, s), x, t)
    assert torch.allclose(v, _closed(mu, s, x, t)[0], rtol=1e-7, atol=1e-8)


def _objective(sched, tangent):
    obj = SCM(SCM.Config(tangent=tangent))
    obj.trig = TrigFlow(sched, SD)
    return obj


@pytest.mark.parametrize("tangent", ["jvp", "finite_difference", "split"])
@pytest.mark.parametrize("kind", KINDS)
def test_tangent_of_exact_consistency_function_vanishes(kind, tangent, gaussian_data):
    """Eq. 8's g = cos t df/dt along the teacher's ODE: zero for the exact consistency function, and
    cos t dD/dt in closed form for a student that is the exact denoiser (r = 1)."""
    mu, s = gaussian_data
    sched = schedules()[kind]
    obj = _objective(sched, tangent)
    t = torch.linspace(0.1, obj.trig.t_max - 0.02, 9, dtype=torch.float64)
    x = _state(mu, s, t, seed=2)
    teacher = GaussianTeacher(sched, mu, s)
    ts = sched.timesteps(1)[:-1]
    # O(eps^2) truncation: finite_difference's eps = 1e-4 t; split's 1e-2 t step in t only (smooth here)
    tol = {"jvp": dict(rtol=1e-6, atol=1e-7), "finite_difference": dict(rtol=1e-4, atol=1e-5),
           "split": dict(rtol=1e-3, atol=1e-3)}[tangent]
    g, _ = obj.tangent_g(Student(ExactConsistency(sched, mu, s), ts), teacher, x, t, None, r=1.0)
    assert torch.allclose(g, torch.zeros_like(g), **tol), g.abs().max()
    g, _ = obj.tangent_g(Student(GaussianTeacher(sched, mu, s), ts), teacher, x, t, None, r=1.0)
    expected = bcast(torch.cos(t), x) * _closed(mu, s, x, t)[1]
    assert expected.abs().max() > 1e-2  # a derivative to compare, not zero == zero
    assert torch.allclose(g, expected, **tol), (g - expected).abs().max()


def test_jvp_and_finite_difference_agree_through_a_unet():
    """Forward-mode JVP through a diffusers UNet (attention, group norm) against central differences,
    on the objective's own tangent; the loss of both modes agrees."""
    from conftest import tiny_teacher
    from stepdistill.generator import StudentConfig, build_student
    from stepdistill.objectives.common import Draws
    from stepdistill.train.randomness import BatchRandom

    torch.manual_seed(0)
    teacher = tiny_teacher().requires_grad_(False)
    student = build_student(teacher, StudentConfig(steps=1, sampler="renoise"))
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1
    cond = {"class_labels": torch.arange(4) % 2}
    t = torch.tensor([0.3, 0.7, 1.1, 1.4], dtype=torch.float64)
    noise, dxdt = torch.randn(2, *x0.shape, generator=g)
    out = {}
    for tangent in ("jvp", "finite_difference"):
        obj = SCM(SCM.Config(tangent=tangent, tangent_warmup=1))
        obj.iteration = 1
        nets = Nets(teacher=teacher, student=student, **obj.build(teacher, student))
        batch = {"x0": x0, "cond": cond, "rng": BatchRandom(0, 4, slice(0, 4))}
        out[tangent] = obj.generator_loss(nets, batch)["_mse"]
        x = obj.trig.add_noise(x0, SD * noise, t)
        out[tangent + "-dv"] = obj.tangent(student, x, t, dxdt, cond)[1]
        assert Draws(batch).rand().shape == (4,)
    a, b = out["jvp-dv"], out["finite_difference-dv"]
    assert a.norm() > 1e-3 and (a - b).norm() < 2e-2 * a.norm(), ((a - b).norm(), a.norm())
    assert torch.allclose(out["jvp"], out["finite_difference"], rtol=2e-2)


def test_proposal_is_the_papers_log_normal():
    """log(sigma_d tan t) ~ N(P_mean, P_std^2) (sCM sec. 4.4) where the teacher's range does not clip it."""
    from stepdistill.objectives.common import Draws

    obj = _objective(EDMSchedule(), "jvp")
    obj.trig.t_min = 0.0
    torch.manual_seed(0)
    x0 = torch.zeros(20000, 1)
    t = obj.times(Draws({"x0": x0}))
    tau = (SD * torch.tan(t)).log()
    inside = tau < math.log(80.0) - 1e-9
    assert inside.float().mean() > 0.99
    assert abs(float(tau.mean()) - (-1.0)) < 0.03 and abs(float(tau.std()) - 1.4) < 0.03


def test_adaptive_weight_minimises_to_the_log_mse():
    """L = e^w mse - w is minimised at w = -log(mse) (sCM eq. 9): gradient descent on w alone finds it."""
    from stepdistill.objectives.scm import AdaptiveWeight

    weight = AdaptiveWeight(SD)
    t = torch.full((64,), 0.7, dtype=torch.float64)
    mse = torch.full((64,), 0.04)
    opt = torch.optim.Adam(weight.parameters(), lr=5e-2)
    for _ in range(400):
        opt.zero_grad()
        w = weight(t)
        (torch.exp(w) * mse - w).mean().backward()
        opt.step()
    assert abs(float(weight(t)[0]) - (-math.log(0.04))) < 0.05


@pytest.mark.slow
def test_one_step_scm_generator_converges_on_the_mixture():
    """Under -m slow (about 40 s on 2 cores), as the DMD mixture case of ``test_analytic``. The analytic mixture of ``test_analytic`` (exact teacher): a 1-step sCM student (an MLP denoiser
    from scratch, 1,500 Adam steps on exact mixture samples, the paper's proposal and defaults, r
    warmed up over 300 steps) reaches a sliced-Wasserstein distance within 2x of an exact sampler's,
    from about 25x (measured 1.56x; 1.18x after 3,000 steps at half the learning rate)."""
    from test_analytic import MIX, GMMTeacher, MLPDenoiser, eval_sw, vp_schedule

    torch.manual_seed(0)
    sched = vp_schedule()
    teacher = GMMTeacher(sched, **MIX).requires_grad_(False)
    student = Student(MLPDenoiser(sched, hidden=128, seed=1), sched.timesteps(1)[:-1])
    obj = SCM(SCM.Config(tangent_warmup=300))
    nets = Nets(teacher=teacher, student=student, **obj.build(teacher, student))
    sw0, _ = eval_sw(teacher, student)
    steps = 1500
    opt = torch.optim.Adam(list(student.parameters()) + list(nets.weighting.parameters()), lr=2e-3, betas=(0.9, 0.99))
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - 0.9 * min(i / steps, 1))
    g = torch.Generator().manual_seed(5)
    for i in range(steps):
        loss = obj.generator_loss(nets, {"x0": teacher.sample(1024, g), "cond": None})["scm"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        decay.step()
        obj.on_step_end(nets, i + 1)
    sw, sw_exact = eval_sw(teacher, student)
    assert sw0 > 10 * sw_exact, (sw0, sw_exact)
    assert sw < 2 * sw_exact, (sw0, sw, sw_exact)


@pytest.mark.parametrize("tangent", ["finite_difference", "split"])
def test_differences_stop_at_the_teachers_noisiest_time(tangent, gaussian_data):
    """At t = t_max (where the proposal's times are clamped) the step ahead would leave the teacher's
    range (VP: past its last training timestep): the difference turns one-sided there and still
    matches the closed-form derivative of the exact denoiser, to first order in the step."""
    mu, s = gaussian_data
    sched = schedules()["vp-v"]
    obj = SCM(SCM.Config(tangent=tangent, fd_eps=1e-3, fd_t_eps=1e-3))
    obj.trig = TrigFlow(sched, SD)
    t = torch.full((3,), obj.trig.t_max, dtype=torch.float64)
    x = _state(mu, s, t, seed=3)
    teacher = GaussianTeacher(sched, mu, s)
    g, _ = obj.tangent_g(Student(GaussianTeacher(sched, mu, s), sched.timesteps(1)[:-1]), teacher, x, t, None, r=1.0)
    expected = bcast(torch.cos(t), x) * _closed(mu, s, x, t)[1]
    assert torch.isfinite(g).all()
    assert torch.allclose(g, expected, rtol=2e-2, atol=2e-3), (g - expected).abs().max()


@pytest.mark.parametrize("kind", KINDS)
def test_two_step_sampler_starts_its_second_step_at_trigflow_time_1_1(kind):
    """sCM's 2-step sampler (sec. 5.2, App. G.2: "an intermediate t = 1.1 for all the experiments"): the
    second time has the SNR of TrigFlow t = 1.1, sigma / alpha = sigma_d tan(1.1) (a VP teacher: the
    nearest training timestep); the first is the scheduler's own; other step counts keep the grid."""
    from stepdistill.errors import UserError
    from stepdistill.export.scheduler import student_timesteps

    from conftest import tiny_unet2d
    from stepdistill.denoisers import DiffusersDenoiser

    sched = schedules()[kind]
    teacher = DiffusersDenoiser(tiny_unet2d(num_class_embeds=3), sched, null_class=2)
    times = SCM().student_timesteps(teacher, 2)
    assert times[0] == float(student_timesteps(sched, 2)[0])
    a, s = sched.alpha_sigma(torch.tensor(times[1], dtype=torch.float64))
    target = 0.5 * math.tan(1.1)
    if kind.startswith("vp"):
        assert times[1] == round(times[1])
        lo, hi = (float(v[1] / v[0]) for v in (sched.alpha_sigma(torch.tensor(times[1] + d, dtype=torch.float64))
                                                for d in (-1.0, 1.0)))
        assert lo < target < hi  # between the neighbouring training timesteps
    else:
        assert float(s / a) == pytest.approx(target, rel=1e-9)
    assert SCM().student_timesteps(teacher, 1) is None and SCM().student_timesteps(teacher, 4) is None
    assert SCM(SCM.Config(intermediate_t=None)).student_timesteps(teacher, 2) is None
    teacher.backbone = torch.nn.Linear(1, 1)  # not a UNet2DModel: a text-to-image export keeps the grid
    assert SCM().student_timesteps(teacher, 2) is None
    with pytest.raises(UserError, match="intermediate_t"):
        SCM(SCM.Config(intermediate_t=2.0))


def test_a_trained_two_step_run_samples_loads_and_exports_at_its_own_times(tiny_teacher_dir, tiny_data_npz,
                                                                           tmp_path):
    """The run's student (objective's times, student.timesteps unset), ``load_run`` and the export all sample
    at [999, the VP timestep of TrigFlow 1.1]; student.timesteps in the config overrides the objective."""
    from accelerate.state import AcceleratorState

    from stepdistill.export import export_run
    from stepdistill.loaders import load_for_sampling, load_run
    from stepdistill.train import resolve
    from stepdistill.train.trainer import Trainer

    def run(out, **kw):
        over = dict(teacher=tiny_teacher_dir, data=tiny_data_npz, output_dir=out, cpu="true", batch_size=2,
                    checkpoint_every=1, preview_every="null", progress="false", **{"student.steps": 2,
                    "objective.name": "scm", "objective.tangent": "finite_difference"})
        over.update({"max_steps": 1, **kw})
        try:
            trainer = Trainer(*resolve(None, [f"{k}={v}" for k, v in over.items()]))
            trainer.train()
        finally:
            AcceleratorState._reset_state(True)
        return trainer

    trainer = run(tmp_path / "run")
    want = SCM().student_timesteps(trainer.teacher, 2)
    assert trainer.student.timesteps.tolist() == want and want[1] != 499.0  # not the scheduler's 2-step grid
    student, _ = load_run(tmp_path / "run")
    assert student.timesteps.tolist() == want and student.custom_times
    export_run(tmp_path / "run", tmp_path / "export")
    assert load_for_sampling(tmp_path / "export").student.timesteps.tolist() == want
    trainer = run(tmp_path / "own", **{"student.timesteps": "[999,600]"})
    assert trainer.student.timesteps.tolist() == [999.0, 600.0]
    # a checkpoint from before the sampler's times were recorded trained on the scheduler's grid: loaded
    # there, and not resumed at other times
    import json

    import pytest

    from stepdistill.errors import UserError

    state = tmp_path / "run" / "checkpoints" / "step-00000001" / "trainer.json"
    old = {k: v for k, v in json.loads(state.read_text()).items() if not k.startswith("student_timesteps")
           and k != "student_custom_times"}
    state.write_text(json.dumps(old))
    assert load_run(tmp_path / "run")[0].timesteps.tolist() == [999.0, 499.0]
    with pytest.raises(UserError, match="intermediate_t=null"):
        run(tmp_path / "run", max_steps=2)


@pytest.mark.parametrize("norm", [None, "rms"])
def test_rcm_form_of_the_loss_without_learned_or_prior_weighting(gaussian_data, norm):
    """rCM's sCM loss (NVlabs/rcm t2v_model_distill_rcm.py): g / (||g||_2 + 0.1) over all elements,
    sum (F_theta - F_- - g)^2 with no learned w and no prior weighting; here the per-element mean of
    the same, i.e. the reference divided by D, and no weighting network is built or trained. The
    default norm is Alg. 1's L2 norm (sCM, Lu & Song, 2024); "rms" divides it by sqrt(D) (FastGen)."""
    mu, s = gaussian_data
    sched = schedules()["vp-v"]
    teacher = GaussianTeacher(sched, mu, s)
    student = Student(GaussianTeacher(sched, mu * 0.9, s * 1.1), sched.timesteps(1)[:-1])
    obj = SCM(SCM.Config(**({"tangent_norm": norm} if norm else {}), prior_weighting=False,
                         adaptive_weighting=False, tangent_warmup=1))
    extra = obj.build(teacher, student)
    assert extra == {} and obj.phases()[0].trains == ("student",)
    obj.iteration = 1  # r = 1
    nets = Nets(teacher=teacher, student=student, **extra)
    g = torch.Generator().manual_seed(2)
    x0 = mu + s * torch.randn(6, *mu.shape, generator=g)
    torch.manual_seed(4)
    out = obj.generator_loss(nets, {"x0": x0, "cond": None})
    # the reference, transcribed: same draws (the objective reads torch's global stream when no rng is given)
    from stepdistill.objectives.common import Draws

    torch.manual_seed(4)
    draws = Draws({"x0": x0})
    t = obj.times(draws)
    x = obj.trig.add_noise(x0, SD * draws.randn_like(x0), t)
    raw, v_minus = obj.tangent_g(student, teacher, x, t, None, 1.0)
    size = raw.flatten(1).norm(dim=1) / (math.sqrt(raw[0].numel()) if norm == "rms" else 1.0)
    g_hat = raw / bcast(size + 0.1, raw)
    f = obj.trig.velocity(student.denoise, x, t, None) / SD
    reference = (f - v_minus / SD - g_hat).pow(2).flatten(1).sum(1)          # rCM: summed, before loss_scale
    torch.testing.assert_close(out["scm"] * x0[0].numel(), reference, rtol=1e-5, atol=1e-7)
    assert torch.all(out["_logvar"] == 0)

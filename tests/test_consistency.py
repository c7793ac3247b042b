"""Consistency distillation against closed forms on a Gaussian teacher (whose consistency function
is known exactly), diffusers' DDIM step and LCM pipeline embedding, and a tiny end-to-end run."""
from __future__ import annotations

import pytest
import torch
from conftest import GaussianTeacher, tiny_unet2d, tiny_unet2d_condition
from test_progressive import VP, Affine, FixedRng, distill

from stepdistill.denoisers import Denoiser, DiffusersDenoiser, guided
from stepdistill.errors import UserError
from stepdistill.generator import Student
from stepdistill.objectives import Nets, get_objective
from stepdistill.objectives.consistency import ICT_HUBER_C, guidance_embedding, teacher_step
from stepdistill.sampling import SAMPLERS
from stepdistill.schedules import VPSchedule

CD = get_objective("consistency")


class ExactConsistency(Denoiser):
    """The Gaussian teacher's consistency function: the PF-ODE keeps (x - a mu)/sqrt(a^2 s^2 + sigma^2)
    constant, so f(x, t) = mu + s (x - a mu) / sqrt(a^2 s^2 + sigma^2); `shift` makes it wrong on purpose."""

    def __init__(self, schedule, mu, sd, shift=0.0):
        super().__init__()
        self.schedule, self.mu, self.sd, self.shift = schedule, mu, sd, shift

    def forward(self, x, t, cond=None):
        t = torch.as_tensor(t, dtype=torch.float64)
        a, s = (v.expand(x.shape[0])[:, None] for v in self.schedule.alpha_sigma(t))
        return self.mu + self.sd * (x - a * self.mu) / (a**2 * self.sd**2 + s**2).sqrt() + self.shift


class Identity(Denoiser):
    def __init__(self, schedule):
        super().__init__()
        self.schedule = schedule

    def forward(self, x, t, cond=None):
        return x


class Zero(Identity):
    def forward(self, x, t, cond=None):
        return torch.zeros_like(x)


@pytest.fixture
def setup(gaussian_data):
    mu, sd = gaussian_data
    sched = VPSchedule(VP)
    return sched, mu, sd, GaussianTeacher(sched, mu, sd)


def _batch(mu, sd, n, idx, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = mu + sd * torch.randn(n, 4, generator=g, dtype=torch.float64)
    return {"x0": x0, "cond": None, "rng": FixedRng(idx, torch.randn(n, 4, generator=g, dtype=torch.float64))}


def test_ddim_teacher_step_matches_diffusers_and_lcm_grid(setup):
    from diffusers import DDIMScheduler

    sched, mu, sd, teacher = setup
    obj = CD(CD.Config(teacher_steps=50))
    grid = obj._grid(sched, "cpu")
    assert grid[:-1].tolist() == [999.0 - 20 * i for i in range(50)] and grid[-1] == sched.t_clean  # skip k = 20
    ref = DDIMScheduler.from_config({**VP, "prediction_type": "epsilon", "set_alpha_to_one": True,
                                        "clip_sample": False})
    ref.set_timesteps(50)
    x = torch.randn(16, 4, dtype=torch.float64)
    for t, t_prev in ((999, 979), (19, -1)):  # diffusers' prev_timestep = t - 1000 // 50; -1 = alpha-bar 1
        a, s = (float(v) for v in sched.alpha_sigma(torch.tensor(float(t), dtype=torch.float64)))
        eps = (x - a * teacher(x, float(t))) / s
        want = ref.step(eps, t, x).prev_sample
        got = teacher_step("ddim", teacher, x, torch.full((16,), float(t), dtype=torch.float64),
                           torch.full((16,), float(t_prev), dtype=torch.float64))
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("solver", list(SAMPLERS))
def test_loss_uses_one_solver_step_and_the_target_at_t_n(solver, setup):
    """Student 0, target f(x) = x: the L2 loss is then mean(x^_{t_n}^2), x^_{t_n} one solver step."""
    sched, mu, sd, teacher = setup
    obj = CD(CD.Config(solver=solver, teacher_steps=10, target_ema=0.0, loss="l2"))
    idx = torch.arange(12) % 10
    batch = _batch(mu, sd, 12, idx)
    target = Student(Identity(sched), [999.0])
    nets = Nets(teacher=teacher, student=Student(Zero(sched), [999.0]), target=target)
    loss = obj.losses("generator", nets, batch)["loss"]
    grid = sched.timesteps(10)
    x_t = sched.add_noise(batch["x0"], batch["rng"].noise, grid[idx])
    step = SAMPLERS[solver](teacher, x_t, [grid[idx], grid[idx + 1]])
    torch.testing.assert_close(loss, step.square().mean(1))


@pytest.mark.parametrize("solver", ["ddim", "heun"])
def test_exact_consistency_function_has_zero_loss_up_to_the_solver_error(solver, setup):
    sched, mu, sd, teacher = setup
    n_steps = 200
    obj = CD(CD.Config(solver=solver, teacher_steps=n_steps, target_ema=0.0, loss="l2"))
    idx = torch.arange(400) % n_steps
    batch = _batch(mu, sd, 400, idx)
    exact = Student(ExactConsistency(sched, mu, sd), [999.0])
    loss = obj.losses("generator", Nets(teacher=teacher, student=exact), batch)["loss"]
    # independent reference: the exact ODE step (closed form) vs the solver's, seen through f's slope
    grid = sched.timesteps(n_steps)
    t, t_n = grid[idx], grid[idx + 1]
    x_t = sched.add_noise(batch["x0"], batch["rng"].noise, t)
    err = SAMPLERS[solver](teacher, x_t, [t, t_n]) - teacher.exact(x_t, t, t_n)
    a, s = (v[:, None] for v in sched.alpha_sigma(t_n))
    slope = torch.where(s > 0, sd / (a**2 * sd**2 + s**2).sqrt(), torch.ones_like(s))
    torch.testing.assert_close(loss, (slope * err).square().mean(1), rtol=1e-6, atol=1e-20)
    # the same student against a target off by 0.01 (a separate target net) sees that offset
    off = Student(ExactConsistency(sched, mu, sd, shift=0.01), [999.0])
    with_target = CD(CD.Config(solver=solver, teacher_steps=n_steps, target_ema=0.5, loss="l2"))
    wrong = with_target.losses("generator", Nets(teacher=teacher, student=exact, target=off), batch)["loss"]
    assert loss.mean() < 1e-3 * wrong.mean()
    if solver == "heun":  # a converged solve: second order leaves far less than DDIM's first order
        ddim = CD(CD.Config(solver="ddim", teacher_steps=n_steps, target_ema=0.0, loss="l2"))
        ddim_loss = ddim.losses("generator", Nets(teacher=teacher, student=exact), batch)["loss"]
        inner = idx < n_steps - 1  # Heun's step into clean data is an Euler step, as in EDM
        assert loss[inner].mean() < 1e-2 * ddim_loss[inner].mean()


def test_pseudo_huber_is_icts(setup):
    sched, mu, sd, teacher = setup
    f, g = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4)
    c = ICT_HUBER_C * 48**0.5
    want = ((f - g).square().flatten(1).sum(1) + c**2).sqrt() - c
    torch.testing.assert_close(CD().distance(f, g), want)
    torch.testing.assert_close(CD(CD.Config(huber_c=0.1)).distance(f, g),
                               ((f - g).square().flatten(1).sum(1) + 0.01).sqrt() - 0.1)
    torch.testing.assert_close(CD(CD.Config(loss="l2")).distance(f, g), (f - g).square().flatten(1).mean(1))


def test_lcm_boundary_condition_and_multistep_sampling_is_song_alg1(setup):
    sched, mu, sd, teacher = setup
    ts = sched.timesteps(4)[:-1]
    student = Student(ExactConsistency(sched, mu, sd, shift=0.3), ts, boundary="lcm")
    x = torch.randn(8, 4, dtype=torch.float64)
    torch.testing.assert_close(student.denoise(x, 0.0), x, rtol=0, atol=0)  # f(x, 0) = x exactly (LCM eq. 8)
    gaps = [float((student.denoise(x, t) - x).abs().max()) for t in (1e-2, 1e-4)]
    assert gaps[1] < 2e-2 * gaps[0]  # and continuously so: c_out = O(t) as t -> 0
    far = student.denoise(x, 999.0)  # c_skip ~ 2.5e-7: the network's output
    torch.testing.assert_close(far, student.denoiser(x, 999.0), rtol=0, atol=1e-5)
    # Song et al. (2023), Alg. 1 on the student's K times: x <- f(x_T, T); x_tau = a x + s z; x <- f(x_tau, tau)
    plain = Student(ExactConsistency(sched, mu, sd), ts)
    noise = torch.randn(8, 4, dtype=torch.float64)
    got = plain(noise, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    x = plain.denoiser(noise, ts[0])
    for tau in ts[1:]:
        a, s = (float(v) for v in sched.alpha_sigma(tau))
        x = plain.denoiser(a * x + s * torch.randn(8, 4, generator=g, dtype=torch.float64), tau)
    torch.testing.assert_close(got, x)


def test_guidance_embedding_matches_lcm_pipeline_and_changes_the_output():
    from diffusers import UNet2DConditionModel

    w = torch.tensor([1.0, 2.5, 8.0])
    emb = guidance_embedding(w, 16)
    assert emb.shape == (3, 16)
    # LCM (Luo et al., 2023, sec. 4.2): sinusoids of 1000 (w - 1) at frequencies 10000^(-j / (dim/2 - 1)),
    # in float64 here; float32 arguments near 7000 rad carry ~5e-4 of rounding
    arg = 1000 * (w.double() - 1)[:, None] * 10000.0 ** (-torch.arange(8, dtype=torch.float64) / 7)
    torch.testing.assert_close(emb.double(), torch.cat([arg.sin(), arg.cos()], 1), rtol=0, atol=2e-3)
    torch.manual_seed(0)
    base = tiny_unet2d_condition()
    keep = {k: v for k, v in base.config.items() if not k.startswith("_")}
    net = UNet2DConditionModel.from_config({**keep, "time_cond_proj_dim": 16})
    net.load_state_dict(base.state_dict(), strict=False)
    torch.nn.init.normal_(net.time_embedding.cond_proj.weight, std=0.1)
    sched = VPSchedule(VP)
    null = {"encoder_hidden_states": torch.zeros(1, 3, 8)}
    teacher = DiffusersDenoiser(base, sched, null_text=null).requires_grad_(False)
    student = Student(DiffusersDenoiser(net, sched, null_text=null), sched.timesteps(4)[:-1])
    x = torch.randn(2, 4, 8, 8)
    text = {"encoder_hidden_states": torch.randn(2, 3, 8)}
    outs = [student.denoise(x, 500.0, {**text, "timestep_cond": guidance_embedding(torch.full((2,), v), 16)})
            for v in (2.0, 8.0)]
    assert (outs[0] - outs[1]).abs().max() > 1e-4
    # in the loss: w ~ U[w_min, w_max] reaches the teacher's CFG and the student's cond_proj
    obj = CD(CD.Config(w_embedding=True, w_min=2.0, w_max=6.0, teacher_steps=10))
    nets = Nets(teacher=teacher, student=student, **obj.build(teacher, student))
    u = torch.tensor([0.0, 1.0])
    rng = FixedRng(torch.tensor([3, 9]), torch.randn(2, 4, 8, 8), u)
    batch = {"x0": torch.randn(2, 4, 8, 8), "cond": text, "rng": rng}
    loss = obj.losses("generator", nets, batch)["loss"]
    loss.sum().backward()
    assert torch.isfinite(loss).all() and net.time_embedding.cond_proj.weight.grad.abs().sum() > 0
    grid = sched.timesteps(10)
    x_t = sched.add_noise(batch["x0"], batch["rng"].noise, grid[torch.tensor([3, 9])])
    with torch.no_grad():
        step = teacher_step("ddim", guided(teacher, torch.tensor([2.0, 6.0], dtype=torch.float64)), x_t,
                            grid[torch.tensor([3, 9])], grid[torch.tensor([4, 10])], text)
        plain_cfg = teacher_step("ddim", teacher, x_t, grid[torch.tensor([3, 9])], grid[torch.tensor([4, 10])], text)
        emb = guidance_embedding(torch.tensor([2.0, 6.0]), 16)
        f_t = nets.target.denoise(step, grid[torch.tensor([4, 10])], {**text, "timestep_cond": emb})
        f_s = student.denoise(x_t, grid[torch.tensor([3, 9])], {**text, "timestep_cond": emb})
    assert (step - plain_cfg).abs().max() > 1e-4
    target = torch.where(torch.tensor([True, False])[:, None, None, None], f_t, step)  # index 9 -> clean: x itself
    torch.testing.assert_close(loss.detach(), CD().distance(f_s, target))
    with pytest.raises(UserError, match="time_cond_proj_dim"):
        CD(CD.Config(w_embedding=True)).build(teacher, Student(DiffusersDenoiser(tiny_unet2d(), sched, null_class=10),
                                                               sched.timesteps(4)[:-1]))


def test_target_is_an_exact_ema_or_the_stop_gradient_student(setup):
    sched, mu, sd, teacher = setup
    obj = CD(CD.Config(target_ema=0.9))
    student = Student(Affine(sched), [999.0])
    nets = Nets(teacher=teacher, student=student, **obj.build(teacher, student))
    assert not any(p.requires_grad for p in nets.target.parameters())
    history = []
    for k in range(3):
        with torch.no_grad():
            student.denoiser.w.add_(0.5 + k), student.denoiser.b.mul_(-2.0)
        history.append((student.denoiser.w.detach().clone(), student.denoiser.b.detach().clone()))
        obj.on_step_end(nets, k + 1)
    w0, b0 = Affine(sched).w.detach(), Affine(sched).b.detach()  # the initial student (same seed)
    for w, b in history:
        w0, b0 = 0.9 * w0 + 0.1 * w, 0.9 * b0 + 0.1 * b
    torch.testing.assert_close(nets.target.denoiser.w, w0, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(nets.target.denoiser.b, b0, rtol=1e-14, atol=1e-15)
    # decay 0: no copy; the target is the student under stop-gradient
    sg = CD(CD.Config(target_ema=0.0, loss="l2", teacher_steps=10))
    student = Student(Affine(sched), [999.0])
    assert sg.build(teacher, student) == {}
    idx = torch.arange(8) % 9  # keep t_n noisy, so the target is the network's
    batch = _batch(mu, sd, 8, idx)
    sg.losses("generator", Nets(teacher=teacher, student=student), batch)["loss"].sum().backward()
    grid = sched.timesteps(10)
    x_t = sched.add_noise(batch["x0"], batch["rng"].noise, grid[idx])
    x_n = SAMPLERS["ddim"](teacher, x_t, [grid[idx], grid[idx + 1]])
    w, b = student.denoiser.w.detach().requires_grad_(), student.denoiser.b.detach().requires_grad_()
    ((w * x_t + b - (w * x_n + b).detach()).square().mean(1)).sum().backward()
    torch.testing.assert_close(student.denoiser.w.grad, w.grad)
    torch.testing.assert_close(student.denoiser.b.grad, b.grad)


def test_bad_configs_are_refused(setup):
    for kw in (dict(solver="rk4"), dict(teacher_steps=0), dict(target_ema=1.0), dict(loss="l1"),
               dict(huber_c=0.0), dict(w_embedding=True, w_min=5.0, w_max=2.0)):
        with pytest.raises(UserError):
            CD(CD.Config(**kw))
    sched, mu, sd, teacher = setup
    with pytest.raises(UserError, match="conditional teacher"):
        CD(CD.Config(guidance=2.0)).build(teacher, Student(Affine(sched), [999.0]))


def test_end_to_end_one_step_student_approaches_exact_samples():
    obj = CD(CD.Config(teacher_steps=20, solver="heun", target_ema=0.9, loss="l2"))
    before, after, *_ = distill(obj, 600, lr=3e-3)
    print(f"consistency 1-step RMS to exact samples: init {before:.4f} -> trained {after:.4f}")
    assert after < 0.25 * before

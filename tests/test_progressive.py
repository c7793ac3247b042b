"""Progressive distillation against closed forms on a Gaussian teacher: the Alg. 2 target, a student
that is the exact two-step map, the round schedule, and a tiny end-to-end distillation."""
from __future__ import annotations

import pytest
import torch
from conftest import GaussianTeacher

from stepdistill.denoisers import Denoiser
from stepdistill.errors import UserError
from stepdistill.generator import Student
from stepdistill.objectives import Nets, get_objective
from stepdistill.objectives.progressive import grid_with_midpoints, student_grid, pd_target
from stepdistill.schedules import EDMSchedule, FlowSchedule, VPSchedule

VP = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction",
          timestep_spacing="trailing")
SCHEDULES = {"vp": lambda: VPSchedule(VP), "edm": lambda: EDMSchedule(), "flow": lambda: FlowSchedule()}
PD = get_objective("progressive")


class FixedRng:
    """Stands in for the trainer's per-batch generator with chosen draws."""

    def __init__(self, idx, noise, u=None):
        self.idx, self.noise, self.u = idx, noise, u

    def randint(self, low, high):
        return self.idx

    def randn_like(self, x):
        return self.noise.to(x.dtype)

    def rand(self, dtype=None):
        return self.u if dtype is None else self.u.to(dtype)


def coefs(schedule, t):
    a, s = schedule.alpha_sigma(torch.as_tensor(t, dtype=torch.float64))
    return float(a), float(s)


def ddim_affine(schedule, mu, sd, t, t_next):
    """The DDIM step of the Gaussian teacher as x' = P x + Q, derived by hand: D(x) = g x + mu (1 - g a)
    with g = a s^2 / (a^2 s^2 + sigma^2), and x' = a' D + (sigma'/sigma)(x - a D)."""
    (a, s), (an, sn) = coefs(schedule, t), coefs(schedule, t_next)
    g = a * sd**2 / (a**2 * sd**2 + s**2)
    k = an - sn * a / s
    return k * g + sn / s, k * mu * (1 - g * a)


class ExactTwoStep(Denoiser):
    """The x0-predictor whose single DDIM step from a grid time t reproduces two teacher DDIM steps
    t -> t' -> t'' exactly, composed in closed form from `ddim_affine` (no sampler code)."""

    def __init__(self, schedule, mu, sd, grid, mid):
        super().__init__()
        self.schedule, self.grid = schedule, grid
        rows = []
        for i in range(len(grid) - 1):
            p1, q1 = ddim_affine(schedule, mu, sd, grid[i], mid[i])
            p2, q2 = ddim_affine(schedule, mu, sd, mid[i], grid[i + 1])
            (a, s), (an, sn) = coefs(schedule, grid[i]), coefs(schedule, grid[i + 1])
            r = sn / s
            rows.append(((p2 * p1 - r) / (an - r * a), (p2 * q1 + q2) / (an - r * a)))
        self.rows = rows

    def forward(self, x, t, cond=None):
        t = torch.as_tensor(t, dtype=torch.float64).expand(x.shape[0])
        idx = (self.grid[:-1][None, :] == t[:, None]).double().argmax(1)
        slope = torch.stack([self.rows[i][0] for i in idx.tolist()])
        shift = torch.stack([self.rows[i][1] for i in idx.tolist()])
        return slope * x + shift


@pytest.fixture
def gauss(gaussian_data):
    mu, sd = gaussian_data
    return mu, sd


@pytest.mark.parametrize("kind", list(SCHEDULES))
def test_target_makes_one_student_step_land_on_two_teacher_steps(kind, gauss):
    mu, sd = gauss
    sched = SCHEDULES[kind]()
    teacher = GaussianTeacher(sched, mu, sd)
    grid, mid = grid_with_midpoints(sched, 4)
    torch.manual_seed(0)
    for i in range(4):  # every step, including the first (flow: alpha = 0) and the one into clean data
        t, tm, tn = grid[i], mid[i], grid[i + 1]
        assert tn < tm < t
        x0, eps = mu + sd * torch.randn(64, 4, dtype=torch.float64), torch.randn(64, 4, dtype=torch.float64)
        z = sched.add_noise(x0, eps, t)
        x_tilde = pd_target(teacher, sched, z, t, tm, tn)
        p1, q1 = ddim_affine(sched, mu, sd, t, tm)
        p2, q2 = ddim_affine(sched, mu, sd, tm, tn)
        two_steps = p2 * (p1 * z + q1) + q2
        (a, s), (an, sn) = coefs(sched, t), coefs(sched, tn)
        one_step = an * x_tilde + sn * (z - a * x_tilde) / s  # DDIM with the target as x0
        torch.testing.assert_close(one_step, two_steps, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", list(SCHEDULES))
@pytest.mark.parametrize("k", [2, 4])
def test_the_student_samples_with_ddim_and_lands_on_the_teachers_2k_step_chain(kind, k, gauss):
    """Alg. 2 trains one deterministic DDIM student step to land on two teacher DDIM steps, and the
    paper samples the student with DDIM (Salimans & Ho, 2022, sec. 3). The K-step student that is the
    exact two-step map (``ExactTwoStep``), sampled as the trainer resolves its sampler for this
    objective, must end where the teacher's 2K-step DDIM chain ends: the composition of the
    hand-derived affine steps ``ddim_affine`` over t_0, t'_0, t_1, ..., t'_{K-1}, clean. A student that
    re-noises between its steps (fresh noise) does not."""
    from stepdistill.generator import StudentConfig
    from stepdistill.train.setup import resolve_sampler

    schedule, (mu, sd) = SCHEDULES[kind](), gauss
    obj = PD(PD.Config(start_steps=2 * k, final_steps=k))
    sampler = resolve_sampler(StudentConfig(steps=k), obj)
    assert sampler == "ddim"
    grid, mid = grid_with_midpoints(schedule, k)
    student = Student(ExactTwoStep(schedule, mu, sd, grid, mid), grid[:-1], sampler=sampler)
    noise = torch.randn(64, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # the student's input: sigma z on EDM (Karras et al., 2022, Alg. 1), the schedule's prior elsewhere
    x = noise * grid[0] if kind == "edm" else schedule.prior(noise, grid[0])
    chain = [t for i in range(k) for t in (grid[i], mid[i])] + [grid[-1]]
    for t, t_next in zip(chain[:-1], chain[1:]):
        p_, q_ = ddim_affine(schedule, mu, sd, t, t_next)
        x = p_ * x + q_
    torch.testing.assert_close(student(noise), x, rtol=0, atol=1e-9)
    renoised = Student(ExactTwoStep(schedule, mu, sd, grid, mid), grid[:-1], sampler="renoise")
    assert float((renoised(noise, generator=torch.Generator().manual_seed(1)) - x).abs().max()) > 1e-3


def test_vp_student_grids_nest_and_others_use_the_time_midpoint():
    # VP students run the exported LCMScheduler grid t = T-1 - floor(i T / n), which nests at every
    # halving (even where T / n is not an integer, unlike DDIM's rounded trailing grid)
    vp = VPSchedule(VP)
    for n in (1, 2, 4, 8, 16, 32):
        g, mid = grid_with_midpoints(vp, n)
        fine = student_grid(vp, 2 * n)
        assert torch.equal(mid, fine[1::2]) and torch.equal(g, fine[::2])
        assert torch.equal(g[:-1], torch.tensor([vp.t_max - (i * 1000) // n for i in range(n)], dtype=torch.float64))
    # EDM students' grids (the first n of n + 1 Karras points) nest too: the teacher's 8-step grid holds
    # the 4-step student's sigmas and its midpoints in sigma^(1/rho)
    edm = EDMSchedule()
    g, mid = grid_with_midpoints(edm, 4)
    torch.testing.assert_close(g, student_grid(edm, 8)[::2], rtol=1e-6, atol=0)
    torch.testing.assert_close(mid, student_grid(edm, 8)[1::2], rtol=1e-6, atol=0)
    # grids that do not nest (flow's: each ends at the shifted 1/n) use the time midpoint
    flow = FlowSchedule({"shift": 3.0})
    g, mid = grid_with_midpoints(flow, 4)
    assert not torch.equal(student_grid(flow, 8)[::2], g)
    torch.testing.assert_close(mid, 0.5 * (g[:-1] + g[1:]))


def _nets(obj, teacher, student):
    return Nets(teacher=teacher, student=student, **obj.build(teacher, student))


def test_loss_vanishes_for_the_exact_two_step_student_and_is_truncated_snr_weighted(gauss):
    mu, sd = gauss
    sched = VPSchedule(VP)
    teacher = GaussianTeacher(sched, mu, sd)
    obj = PD(PD.Config(start_steps=8, final_steps=2, iterations_per_round=10))
    assert obj.steps == 4
    grid, mid = grid_with_midpoints(sched, 4)
    exact = Student(ExactTwoStep(sched, mu, sd, grid, mid), sched.timesteps(2)[:-1])
    plain = Student(GaussianTeacher(sched, mu, sd), sched.timesteps(2)[:-1])  # the teacher's own x0: not the map
    torch.manual_seed(1)
    x0 = mu + sd * torch.randn(256, 4, dtype=torch.float64)
    idx, noise = torch.arange(256) % 4, torch.randn(256, 4, dtype=torch.float64)
    batch = {"x0": x0, "cond": None, "rng": FixedRng(idx, noise)}
    exact_loss = obj.losses("generator", _nets(obj, teacher, exact), batch)["loss"]
    out = obj.losses("generator", _nets(obj, teacher, plain), batch)
    assert exact_loss.abs().max() < 1e-18 and out["loss"].mean() > 1e-4
    # weighting: max(||x - x^||^2, ||eps - eps^||^2) (Salimans & Ho, 2022, sec. 4), computed from eps
    t = grid[idx]
    z = sched.add_noise(x0, noise, t)
    a, s = (v[:, None] for v in sched.alpha_sigma(t))
    x_tilde = exact.denoise(z, t)
    x_hat = plain.denoise(z, t)
    eps_err = (((z - a * x_hat) / s - (z - a * x_tilde) / s) ** 2).mean(1)
    x_err = ((x_hat - x_tilde) ** 2).mean(1)
    torch.testing.assert_close(out["loss"], torch.maximum(x_err, eps_err).to(out["loss"].dtype), rtol=1e-6, atol=0)


class Affine(Denoiser):
    """A trainable toy x0-predictor (x0 = w x + b) to watch weights move between rounds."""

    def __init__(self, schedule, seed=0):
        super().__init__()
        self.schedule = schedule
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.rand(4, generator=g, dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.randn(4, generator=g, dtype=torch.float64))

    def forward(self, x, t, cond=None):
        return self.w * x + self.b


def test_rounds_halve_and_the_previous_student_becomes_the_teacher(gauss):
    mu, sd = gauss
    sched = VPSchedule(VP)
    teacher = GaussianTeacher(sched, mu, sd)
    obj = PD(PD.Config(start_steps=64, final_steps=4, iterations_per_round=3))
    student = Student(Affine(sched), sched.timesteps(4)[:-1])
    nets = _nets(obj, teacher, student)
    assert obj.student_steps() == 4 and obj.total_iterations == 12
    x0 = mu + sd * torch.randn(8, 4, dtype=torch.float64)
    seen, copies = [], []
    for step in range(15):
        seen.append(obj.steps)
        if step in (2, 5, 8):  # last iteration of a round: the student at round end must be copied
            with torch.no_grad():
                student.denoiser.w.add_(0.1 * (step + 1))
            copies.append(student.denoiser.w.detach().clone())
        r_before = obj.round
        obj.on_step_end(nets, step + 1)
        if obj.round != r_before:
            assert torch.equal(nets.pd_teacher.denoiser.w, copies[-1])
            assert nets.pd_teacher.denoiser.w.data_ptr() != student.denoiser.w.data_ptr()
            assert not nets.pd_teacher.denoiser.w.requires_grad
    assert seen == [32] * 3 + [16] * 3 + [8] * 3 + [4] * 6
    # after round 1 the target comes from the frozen copy, not the real teacher
    with torch.no_grad():
        student.denoiser.w.add_(5.0)  # the live student moves on; the target must not
    grid, mid = grid_with_midpoints(sched, 4)
    assert torch.equal(grid[:-1], student.timesteps)  # the last round trains on the exported grid
    idx, noise = torch.tensor([0, 1, 2, 3] * 2), torch.randn(8, 4, dtype=torch.float64)
    out = obj.losses("generator", nets, {"x0": x0, "cond": None, "rng": FixedRng(idx, noise)})
    t = grid[idx]
    z = sched.add_noise(x0, noise, t)
    prev = Student(Affine(sched), sched.timesteps(4)[:-1])
    with torch.no_grad():
        prev.denoiser.w.copy_(copies[-1]), prev.denoiser.b.copy_(student.denoiser.b)
    ref = pd_target(prev.denoise, sched, z, t, mid[idx], grid[idx + 1])
    torch.testing.assert_close(out["_x0_mse"], ((student.denoise(z, t) - ref) ** 2).mean(1).detach())
    # objective state round-trips; a state from other rounds is refused
    again = PD(PD.Config(start_steps=64, final_steps=4, iterations_per_round=3))
    again.load_state_dict(obj.state_dict())
    assert (again.steps, again.iteration) == (4, obj.iteration)
    with pytest.raises(UserError, match="start_steps"):
        PD(PD.Config(start_steps=16, final_steps=4)).load_state_dict({"round": 3, "iteration": 0, "steps": 4})


def test_round_ema_teaches_the_next_round_and_restarts_its_student(gauss):
    """round_ema: the round's running average w <- mu w + (1 - mu) w_student (checked against the same
    recursion by hand) becomes the next round's frozen teacher and its student's starting point."""
    mu_, sd = gauss
    sched = VPSchedule(VP)
    obj = PD(PD.Config(start_steps=16, final_steps=4, iterations_per_round=3, round_ema=0.5))
    student = Student(Affine(sched), sched.timesteps(4)[:-1])
    nets = _nets(obj, GaussianTeacher(sched, mu_, sd), student)
    w0 = student.denoiser.w.detach().clone()
    avg = w0.clone()
    for step, delta in enumerate([0.4, -0.2, 0.6]):
        with torch.no_grad():
            student.denoiser.w.add_(delta)
        avg = 0.5 * avg + 0.5 * student.denoiser.w.detach()
        obj.on_step_end(nets, step + 1)
    assert obj.round == 1
    assert torch.allclose(nets.pd_teacher.denoiser.w, avg) and torch.allclose(student.denoiser.w, avg)
    assert not torch.allclose(avg, w0 + 0.8)  # the average, not the last weights
    assert student.denoiser.w.requires_grad and not nets.pd_teacher.denoiser.w.requires_grad
    with pytest.raises(UserError, match="round_ema must be in"):
        PD(PD.Config(round_ema=1.0))


@pytest.mark.parametrize("rate", [1 / 20, 1 / 40])
def test_round_shares_reach_the_last_round_at_any_speed(gauss, rate):
    """round_shares [1, 1, 2]: a round ends after the iteration that began with the run's progress at its
    cumulative share (1/4, 1/2), however many iterations the run gets (a machine half as fast: half the
    progress per iteration), so the last round, the exported student's, always runs its half of the run."""
    mu, sd = gauss
    sched = VPSchedule(VP)
    obj = PD(PD.Config(start_steps=32, final_steps=4, round_shares=[1, 1, 2], lr_anneal="none",
                       iterations_per_round=10**6))
    nets = _nets(obj, GaussianTeacher(sched, mu, sd), Student(Affine(sched), sched.timesteps(4)[:-1]))
    n = round(1 / rate)
    seen = []
    for k in range(n):  # the trainer tells the progress before each iteration, then ends it
        obj.set_progress(k * rate)
        seen.append(obj.steps)
        obj.on_step_end(nets, k + 1)
    q = n // 4
    assert seen == [16] * (q + 1) + [8] * q + [4] * (n - 2 * q - 1)
    again = PD(PD.Config(start_steps=32, final_steps=4, round_shares=[1, 1, 2], lr_anneal="none"))
    again.load_state_dict(obj.state_dict())
    assert again.steps == 4
    with pytest.raises(UserError, match="lr_anneal=none"):
        PD(PD.Config(round_shares=[1, 1, 1, 1], lr_anneal="linear"))
    with pytest.raises(UserError, match=r"one positive share per round \(start_steps 32 halved to final_steps 4\)"):
        PD(PD.Config(start_steps=32, final_steps=4, round_shares=[1, 1], lr_anneal="none"))


def test_bad_configs_and_students_are_refused(gauss):
    mu, sd = gauss
    sched = VPSchedule(VP)
    for kw in (dict(start_steps=48, final_steps=4), dict(start_steps=4, final_steps=4),
               dict(iterations_per_round=0), dict(weighting="snr")):
        with pytest.raises(UserError):
            PD(PD.Config(**kw))
    with pytest.raises(UserError, match="steps=4"):
        PD().build(GaussianTeacher(sched, mu, sd), Student(Affine(sched), sched.timesteps(2)[:-1]))
    with pytest.raises(UserError, match="first_timestep=null"):  # rounds halve the teacher's own grid
        PD().build(GaussianTeacher(sched, mu, sd), Student(Affine(sched), [600.0, 300.0], first_timestep=600))


# -- a tiny end-to-end distillation ---------------------------------------------------------------
class MLPDenoiser(Denoiser):
    """x0 = MLP(x, Fourier features of t) on [B, 2, 1, 1] data."""

    def __init__(self, schedule, width=64, seed=0):
        super().__init__()
        self.schedule = schedule
        torch.manual_seed(seed)
        self.freqs = torch.arange(1, 5, dtype=torch.float32) * torch.pi
        self.net = torch.nn.Sequential(torch.nn.Linear(2 + 8, width), torch.nn.SiLU(), torch.nn.Linear(width, width),
                                       torch.nn.SiLU(), torch.nn.Linear(width, 2))

    def forward(self, x, t, cond=None):
        t = torch.as_tensor(t, dtype=torch.float32).expand(x.shape[0])[:, None] / 1000.0
        h = torch.cat([x.float().flatten(1), (t * self.freqs).sin(), (t * self.freqs).cos()], 1)
        return self.net(h).reshape(x.shape)


def distill(objective, steps, lr, seed=0):
    """Train a 1-step MLP student on a 2-d Gaussian teacher. Returns the RMS distance to the exact ODE
    samples (same noise) before and after, and the teacher's DDIM samples at `ref_steps` (or None)."""
    sched = VPSchedule(VP)
    mu, sd = torch.tensor([0.5, -0.3]).view(2, 1, 1), torch.tensor([0.2, 0.5]).view(2, 1, 1)
    teacher = GaussianTeacher(sched, mu, sd)
    student = Student(MLPDenoiser(sched, seed=seed), sched.timesteps(1)[:-1])
    nets = Nets(teacher=teacher, student=student, **objective.build(teacher, student))
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    noise = torch.randn(2000, 2, 1, 1, generator=torch.Generator().manual_seed(123))
    x_T = sched.prior(noise, student.timesteps[0])
    exact = teacher.exact(x_T, student.timesteps[0], sched.t_clean).float()

    def rms():
        with torch.no_grad():
            return float((student(noise) - exact).square().mean().sqrt())

    before = rms()
    torch.manual_seed(seed)
    for step in range(steps):
        x0 = (mu + sd * torch.randn(256, 2, 1, 1, dtype=torch.float64)).float()
        loss = objective.losses("generator", nets, {"x0": x0, "cond": None})["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        objective.on_step_end(nets, step + 1)
    return before, rms(), teacher, x_T, exact


def test_end_to_end_one_step_student_approaches_exact_samples():
    from stepdistill.sampling import ddim

    obj = PD(PD.Config(start_steps=16, final_steps=1, iterations_per_round=150))
    before, after, teacher, x_T, exact = distill(obj, obj.total_iterations, lr=3e-3)
    assert obj.steps == 1
    # PD distils the teacher's 16-step DDIM sampler; its own distance to the exact ODE is the floor
    floor = float((ddim(teacher, x_T.double(), teacher.schedule.timesteps(16)).float() - exact).square().mean().sqrt())
    print(f"progressive 1-step RMS to exact samples: init {before:.4f} -> trained {after:.4f} "
          f"(teacher DDIM-16: {floor:.4f})")
    assert after < 0.25 * before and after < 1.25 * floor

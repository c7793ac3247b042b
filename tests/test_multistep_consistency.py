"""Multistep (phased) consistency distillation and the deterministic "ddim" student: the sampler
against diffusers' DDIMScheduler loop, the segment ends, and the loss against the Gaussian teacher's
closed-form probability-flow ODE."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import GaussianTeacher
from test_consistency import _batch
from test_progressive import VP

from stepdistill.denoisers import Denoiser
from stepdistill.errors import UserError
from stepdistill.export import student_timesteps
from stepdistill.generator import Student
from stepdistill.objectives import Nets, get_objective
from stepdistill.objectives.consistency import teacher_step
from stepdistill.sampling import SAMPLERS
from stepdistill.schedules import VPSchedule

CD = get_objective("consistency")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def setup(gaussian_data):
    mu, sd = gaussian_data
    sched = VPSchedule(VP)
    return sched, mu, sd, GaussianTeacher(sched, mu, sd)


def _ends_by_hand(ts, t, t_clean):
    """The segment end of each t: the largest student timestep below t, clean data below the last."""
    out = []
    for v in t.tolist():
        below = [s for s in ts.tolist() if s < v]
        out.append(max(below) if below else t_clean)
    return torch.tensor(out, dtype=torch.float64)


class ExactJump(Denoiser):
    """An x0 estimate whose DDIM jump to the segment end is the exact PF-ODE solution there (the
    Gaussian teacher's closed form): the exact multistep consistency function; `shift` moves its
    jumps off by that much."""

    def __init__(self, teacher, ts, shift=0.0):
        super().__init__()
        self.teacher, self.schedule, self.ts, self.shift = teacher, teacher.schedule, ts, shift

    def forward(self, x, t, cond=None):
        t = torch.as_tensor(t, dtype=torch.float64).expand(x.shape[0])
        end = _ends_by_hand(self.ts, t, self.schedule.t_clean)
        a, s = (v[:, None] for v in self.schedule.alpha_sigma(t))
        ae, se = (v[:, None] for v in self.schedule.alpha_sigma(end))
        target = self.teacher.exact(x, t, end)
        # DDIM: ae x0 + se (x - a x0) / s = target  =>  x0 = (target - se x / s) / (ae - se a / s)
        return (target + self.shift - se / s * x) / (ae - se * a / s)


def test_ddim_student_samples_as_diffusers_ddim_scheduler(setup):
    from diffusers import DDIMScheduler

    sched, mu, sd, teacher = setup
    ts = student_timesteps(sched, 4, sampler="ddim")
    assert ts.tolist() == [999.0, 749.0, 499.0, 249.0]
    student = Student(teacher, ts, sampler="ddim")
    noise = torch.randn(6, 4, dtype=torch.float64)
    got = student(noise, generator=torch.Generator().manual_seed(0))
    ref = DDIMScheduler.from_config({**VP, "prediction_type": "sample", "set_alpha_to_one": True,
                                        "clip_sample": False})
    ref.set_timesteps(4)
    x = noise
    for t in ref.timesteps:
        x = ref.step(teacher(x, float(t)), t, x).prev_sample
    torch.testing.assert_close(got, x, rtol=0, atol=1e-6)  # diffusers keeps its alpha-bar table in float32
    # no randomness: the generator is never drawn from
    torch.testing.assert_close(student(noise, generator=torch.Generator().manual_seed(1)), got, rtol=0, atol=0)


def test_segment_ends(setup):
    sched, _, _, teacher = setup
    ts = torch.tensor([999.0, 749.0, 499.0, 249.0], dtype=torch.float64)
    student = Student(teacher, ts, sampler="ddim")
    t = torch.tensor([999.0, 800.0, 750.0, 749.0, 500.0, 250.0, 249.0, 10.0, 0.0], dtype=torch.float64)
    want = [749.0, 749.0, 749.0, 499.0, 499.0, 249.0, -1.0, -1.0, -1.0]
    assert student.segment_end(t).tolist() == want == _ends_by_hand(ts, t, sched.t_clean).tolist()


@pytest.mark.parametrize("teacher_steps", [6, 200])
def test_multistep_loss_of_the_exact_jump_is_the_solver_error(teacher_steps, setup):
    """With the exact multistep consistency function as student and target, the loss is what the
    teacher's solver step gets wrong, carried to the segment end by the exact flow. The student's
    timesteps join a grid that lacks them (6 steps: 999, 832, 666, 499, 333, 166 gains 749 and 249),
    so every segment bound is a link start and no teacher step crosses a segment end."""
    sched, mu, sd, teacher = setup
    ts = student_timesteps(sched, 4, sampler="ddim")
    obj = CD(CD.Config(solver="heun", teacher_steps=teacher_steps, target_ema=0.0, loss="l2", multistep=True))
    own = sched.timesteps(teacher_steps)
    grid = torch.cat([own, torch.tensor([749.0, 249.0], dtype=torch.float64)]).unique().flip(0) \
        if teacher_steps == 6 else own  # 200 steps hold the student's times already
    idx = torch.arange(400) % (len(grid) - 1)
    batch = _batch(mu, sd, 400, idx)
    student = Student(ExactJump(teacher, ts), ts, sampler="ddim")
    obj.build(teacher, student)  # the grid learns the student's timesteps here
    loss = obj.losses("generator", Nets(teacher=teacher, student=student), batch)["loss"]
    t = grid[idx]
    end = _ends_by_hand(ts, t, sched.t_clean)
    t_prev = grid[idx + 1]
    assert bool((t_prev >= end).all())  # no link crosses a segment end
    x_t = sched.add_noise(batch["x0"], batch["rng"].noise, t)
    x_prev = SAMPLERS["heun"](teacher, x_t, [t, t_prev])
    want = (teacher.exact(x_t, t, end) - teacher.exact(x_prev, t_prev, end)).square().mean(1)
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-18)
    if teacher_steps == 200:  # a fine teacher grid: near zero, against a target whose jumps are off by 0.01
        off = Student(ExactJump(teacher, ts, shift=0.01), ts, sampler="ddim")
        with_target = CD(CD.Config(solver="heun", teacher_steps=teacher_steps, target_ema=0.5, loss="l2",
                                   multistep=True))
        bad = with_target.losses("generator", Nets(teacher=teacher, student=student, target=off), batch)["loss"]
        inner = idx < len(grid) - 2  # Heun's step into clean data is an Euler step, as in EDM
        assert loss[inner].mean() < 1e-3 * bad[inner].mean()


def test_teacher_substeps_follow_diffusers_ddim_on_the_finer_grid(setup):
    """One teacher step 999 -> 749 in 5 DDIM substeps is diffusers' 20-step DDIMScheduler loop over
    999, 949, ..., 799 (trailing spacing), from the same start."""
    from diffusers import DDIMScheduler

    sched, mu, sd, teacher = setup
    x = torch.randn(6, 4, dtype=torch.float64)
    t0, t1 = (torch.full((6,), v, dtype=torch.float64) for v in (999.0, 749.0))
    got = teacher_step("ddim", teacher, x, t0, t1, substeps=5)
    ref = DDIMScheduler.from_config({**VP, "prediction_type": "sample", "set_alpha_to_one": True,
                                        "clip_sample": False})
    ref.set_timesteps(20)
    y = x
    for t in ref.timesteps[:5]:
        y = ref.step(teacher(y, float(t)), t, y).prev_sample
    assert ref.timesteps[:5].tolist() == [999, 949, 899, 849, 799]
    torch.testing.assert_close(got, y, rtol=0, atol=1e-6)
    assert float((got - teacher_step("ddim", teacher, x, t0, t1)).abs().max()) > 1e-3  # one step differs


def test_one_link_per_segment_with_substeps_converges_to_the_exact_jump(setup):
    """teacher_steps = K with m substeps: each link's target is the teacher's m-step solution at the
    segment's end (no target network is asked), so the loss of the exact consistency function is the
    solver's error over a whole segment and falls as m grows (Heun, second order)."""
    sched, mu, sd, teacher = setup
    ts = student_timesteps(sched, 4, sampler="ddim")
    idx = torch.arange(400) % 4
    batch = _batch(mu, sd, 400, idx)
    student = Student(ExactJump(teacher, ts), ts, sampler="ddim")
    inner = idx < 3  # Heun's step into clean data is an Euler step
    means = []
    for m in (1, 4, 16):
        obj = CD(CD.Config(solver="heun", teacher_steps=4, teacher_substeps=m, target_ema=0.0, loss="l2",
                           multistep=True))
        # the target network is never needed: a student-shaped target that is wrong changes nothing
        wrong = Student(ExactJump(teacher, ts, shift=1.0), ts, sampler="ddim")
        loss = obj.losses("generator", Nets(teacher=teacher, student=student, target=wrong), batch)["loss"]
        grid = sched.timesteps(4)
        t, t_prev = grid[idx], grid[idx + 1]
        x_t = sched.add_noise(batch["x0"], batch["rng"].noise, t)
        x_prev = SAMPLERS["heun"](teacher, x_t, [t + (t_prev - t) * (j / m) for j in range(m)] + [t_prev])
        torch.testing.assert_close(loss, (teacher.exact(x_t, t, t_prev) - x_prev).square().mean(1),
                                   rtol=1e-6, atol=1e-18)
        means.append(float(loss[inner].mean()))
    assert means[0] > 10 * means[1] > 100 * means[2] > 0


def test_teacher_as_student_with_one_link_per_segment_has_zero_loss(setup):
    """teacher_steps = K: every link is a whole segment, its target is the teacher's DDIM step itself,
    and a student that is the teacher jumps there by the same DDIM step."""
    sched, mu, sd, teacher = setup
    ts = student_timesteps(sched, 4, sampler="ddim")
    obj = CD(CD.Config(solver="ddim", teacher_steps=4, target_ema=0.0, loss="l2", multistep=True))
    idx = torch.arange(40) % 4
    loss = obj.losses("generator", Nets(teacher=teacher, student=Student(teacher, ts, sampler="ddim")),
                      _batch(mu, sd, 40, idx))["loss"]
    assert float(loss.max()) < 1e-24
    # the single-segment (standard) objective on the same student is not consistent: 4 DDIM steps != 1
    plain = CD(CD.Config(solver="ddim", teacher_steps=4, target_ema=0.0, loss="l2"))
    one = plain.losses("generator", Nets(teacher=teacher, student=Student(teacher, ts)), _batch(mu, sd, 40, idx))
    assert float(one["loss"].mean()) > 1e-4


def test_multistep_configs_are_checked():
    from stepdistill.train import resolve

    preset = "digits/consistency"  # multistep, no boundary condition
    cfg, obj = resolve(preset, [])
    assert cfg.student.sampler == "ddim" and obj.student_sampler() == "ddim"
    with pytest.raises(UserError, match="boundary"):
        resolve(preset, ["student.boundary=lcm"])
    with pytest.raises(UserError, match="sampler"):
        resolve(preset, ["student.sampler=renoise"])
    cfg, obj = resolve(preset, ["objective.multistep=false", "student.boundary=lcm"])  # LCM's single segment
    assert cfg.student.sampler == "renoise" and obj.student_sampler() is None
    with pytest.raises(UserError, match="first_timestep"):
        resolve(preset, ["student.first_timestep=625"])
    with pytest.raises(UserError, match="sampler"):
        resolve(preset, ["objective.multistep=false", "student.sampler=euler"])
    with pytest.raises(UserError, match="teacher_substeps must be >= 1"):
        resolve(preset, ["objective.teacher_substeps=0"])
    with pytest.raises(UserError, match="weighting 'snr' is unknown"):
        resolve(preset, ["objective.weighting=snr"])


def test_multistep_refuses_a_renoising_student(setup):
    sched, mu, sd, teacher = setup
    with pytest.raises(UserError, match="sampler=ddim"):
        CD(CD.Config(multistep=True)).build(teacher, Student(teacher, [999.0, 499.0]))


class Zero(Denoiser):
    def __init__(self, schedule):
        super().__init__()
        self.schedule = schedule

    def forward(self, x, t, cond=None):
        return torch.zeros_like(x)


@pytest.mark.parametrize("multistep", [False, True])
def test_a_noisy_clean_end_asks_the_target_network(multistep, gaussian_data):
    """set_alpha_to_one false (SD's own config): the grid's clean end t = 0 keeps some noise. Links
    into it take the target network's x0 there, as single-segment CD always did, and only inner
    segment ends take the teacher's x^ itself. With x0 estimates of 0 the DDIM jump of x from t to
    s is (sigma_s / sigma_t) x, and the jump to the clean end is the x0 estimate, 0."""
    mu, sd = gaussian_data
    sched = VPSchedule({**VP, "set_alpha_to_one": False})
    assert sched.t_clean == 0.0 and float(sched.alpha_sigma(torch.tensor(0.0))[1]) > 0
    teacher = GaussianTeacher(sched, mu, sd)
    ts = student_timesteps(sched, 4, sampler="ddim" if multistep else "renoise")
    kw = {"sampler": "ddim"} if multistep else {}
    obj = CD(CD.Config(teacher_steps=20, target_ema=0.5, loss="l2", multistep=multistep))
    idx = torch.arange(60) % 20
    batch = _batch(mu, sd, 60, idx)
    nets = Nets(teacher=teacher, student=Student(Zero(sched), ts, **kw), target=Student(Zero(sched), ts, **kw))
    loss = obj.losses("generator", nets, batch)["loss"]
    grid = sched.timesteps(20)
    t, t_prev = grid[idx], grid[idx + 1]
    end = _ends_by_hand(ts, t, 0.0) if multistep else torch.zeros_like(t)
    x_t = sched.add_noise(batch["x0"], batch["rng"].noise, t)
    x_prev = SAMPLERS["ddim"](teacher, x_t, [t, t_prev])
    sig = lambda v: sched.alpha_sigma(v)[1][:, None]  # noqa: E731
    clean_end = (end == 0.0)[:, None]
    f = torch.where(clean_end, torch.zeros_like(x_t), sig(end) / sig(t) * x_t)
    target = torch.where(clean_end, torch.zeros_like(x_t), sig(end) / sig(t_prev) * x_prev)
    inner_end = ((t_prev == end) & (end != 0.0))[:, None]
    target = torch.where(inner_end, x_prev, target)
    assert bool((idx == 19).any()) and (bool(inner_end.any()) or not multistep)
    torch.testing.assert_close(loss, (f - target).square().mean(1), rtol=1e-10, atol=1e-14)
    if not multistep:
        assert float(loss.abs().max()) == 0.0  # 0 against 0 everywhere, t = 0 included


@pytest.mark.parametrize("weighting", ["truncated_snr", "snr_plus_one"])
def test_x0_weighted_one_link_per_segment_is_progressive_distillations_loss(weighting, setup):
    """Heek et al. (2024), Alg. 1 measure the loss on x0 estimates: with one link per segment and two
    DDIM substeps, the target is then progressive distillation's (Salimans & Ho, 2022, Alg. 2: the x0
    whose one DDIM step lands on the teacher's two-step result), computed here by pd_target, and the
    weight is the same w(t)."""
    from stepdistill.objectives.progressive import pd_target

    sched, mu, sd, teacher = setup
    ts = student_timesteps(sched, 4, sampler="ddim")
    idx = torch.arange(80) % 4
    batch = _batch(mu, sd, 80, idx)
    student = Student(ExactJump(teacher, ts, shift=0.3), ts, sampler="ddim")
    obj = CD(CD.Config(solver="ddim", teacher_steps=4, teacher_substeps=2, target_ema=0.0, loss="l2",
                       multistep=True, weighting=weighting))
    loss = obj.losses("generator", Nets(teacher=teacher, student=student), batch)["loss"]
    grid = sched.timesteps(4)
    t, t_end = grid[idx], grid[idx + 1]
    x_t = sched.add_noise(batch["x0"], batch["rng"].noise, t)
    x_tilde = pd_target(teacher, sched, x_t, t, 0.5 * (t + t_end), t_end)
    snr = sched.snr(t)
    w = snr.clamp_min(1.0) if weighting == "truncated_snr" else snr + 1.0
    torch.testing.assert_close(loss, w * (student.denoise(x_t, t) - x_tilde).square().mean(1), rtol=1e-9, atol=0)


def test_latent_distance_scales_a_segments_x0_error(setup):
    """weighting=none measures latents at the segment's end: the x0 error times
    (alpha_s - sigma_s alpha_t / sigma_t)^2, small on high-noise segments and 1 on the last."""
    sched, mu, sd, teacher = setup
    ts = student_timesteps(sched, 4, sampler="ddim")
    idx = torch.arange(80) % 4
    batch = _batch(mu, sd, 80, idx)
    student = Student(ExactJump(teacher, ts, shift=0.3), ts, sampler="ddim")
    nets = Nets(teacher=teacher, student=student)
    losses = {wt: CD(CD.Config(solver="ddim", teacher_steps=4, teacher_substeps=2, target_ema=0.0, loss="l2",
                               multistep=True, weighting=wt)).losses("generator", nets, batch)["loss"]
              for wt in ("none", "snr_plus_one")}
    grid = sched.timesteps(4)
    t, t_end = grid[idx], grid[idx + 1]
    (a, s), (ae, se) = sched.alpha_sigma(t), sched.alpha_sigma(t_end)
    scale = (ae - se * a / s).square()
    torch.testing.assert_close(losses["none"], scale * losses["snr_plus_one"] / (sched.snr(t) + 1.0),
                               rtol=1e-9, atol=0)
    assert float(scale[idx == 0][0]) < 0.1 and float(scale[idx == 3][0]) == 1.0


class QueuedRng:
    """Per-sample draws in the order they are asked for (a trajectory, then a start)."""

    def __init__(self, *draws):
        self.draws = list(draws)

    def randint(self, low, high):
        d = self.draws.pop(0)
        assert int(d.max()) < high
        return d


def _cached(teacher, tmp_path, steps, **kw):
    teacher.sample_shape = (4,)  # the Gaussian teacher's data are 4-vectors
    cfg = dict(solver="heun", teacher_steps=4, target_ema=0.0, loss="l2", multistep=True,
               cache=str(tmp_path / f"c{steps}"), cache_num=40, cache_steps=steps)
    return CD(CD.Config(**{**cfg, **kw}))


def test_cached_links_lie_on_the_teachers_ode_and_score_the_exact_consistency_function(setup, tmp_path):
    """With a trajectory cache each link starts on a cached teacher trajectory at a student time and
    its target is that trajectory at the segment's end: both the closed-form PF-ODE solution up to the
    cache solver's error. So the exact multistep consistency function (ExactJump) scores that error,
    which falls with the cache's step count (at least first order: Heun's last step into clean data
    is an Euler step), and one shifted by 0.1 scores about 0.01."""
    sched, mu, sd, teacher = setup
    ts = student_timesteps(sched, 4, sampler="ddim")
    j, n = torch.arange(40), torch.arange(40) % 4
    scores, errors, shifted_scores = {}, {}, {}
    for steps in (8, 32):
        obj = _cached(teacher, tmp_path, steps)
        exact = Student(ExactJump(teacher, ts), ts, sampler="ddim")
        assert obj.build(teacher, exact) == {}  # no target network
        nets = Nets(teacher=teacher, student=exact)
        batch = {"x0": torch.zeros(40, 4, dtype=torch.float64), "cond": None, "rng": QueuedRng(j, n)}
        x_t, t, t_end, target, cond = obj.cached_links(nets, batch)
        assert torch.equal(t, ts[n]) and cond is None
        assert torch.equal(t_end, torch.cat([ts[1:], ts.new_tensor([sched.t_clean])])[n])
        noise = obj.links.pairs.noise[j].double()
        errors[steps] = max(float((x_t.double() - teacher.exact(noise, 999.0, t)).abs().max()),
                            float((target.double() - teacher.exact(x_t.double(), t, t_end)).abs().max()))
        batch["rng"] = QueuedRng(j, n)
        scores[steps] = float(obj.losses("generator", nets, batch)["loss"].mean())
        batch["rng"] = QueuedRng(j, n)
        shifted = Nets(teacher=teacher, student=Student(ExactJump(teacher, ts, shift=0.1), ts, sampler="ddim"))
        shifted_scores[steps] = float(obj.losses("generator", shifted, batch)["loss"].mean())
    assert shifted_scores[32] == pytest.approx(0.01, rel=0.1) and shifted_scores[8] > scores[8]
    assert errors[32] < 0.07 and errors[32] < errors[8] / 3
    assert scores[32] < scores[8] / 10 and scores[32] < 2e-4


def test_cached_links_are_checked_before_any_compute(setup, tmp_path):
    sched, mu, sd, teacher = setup
    ts = student_timesteps(sched, 4, sampler="ddim")
    student = Student(teacher, ts, sampler="ddim")
    obj30 = _cached(teacher, tmp_path, 30)
    obj30.build(teacher, student)  # the 30-step grid lacks 749 and 249: the cache's grid gains them
    grid = obj30.links.grid(sched, *obj30._link_times(student))
    assert set(grid.tolist()) == set(sched.timesteps(30).tolist()) | {749.0, 249.0}
    assert not (tmp_path / "c30").exists()  # nothing is sampled before training
    with pytest.raises(UserError, match="teacher_substeps=1"):
        _cached(teacher, tmp_path, 8, teacher_substeps=2)
    with pytest.raises(UserError, match="w_embedding=false"):
        _cached(teacher, tmp_path, 8, w_embedding=True)
    from stepdistill.cache import build_cache

    build_cache(teacher, tmp_path / "pairs", num=40, steps=8, sampler="heun")  # pairs without trajectories
    with pytest.raises(UserError, match="trajectory: cache False vs config True"):
        _cached(teacher, tmp_path, 8, cache=str(tmp_path / "pairs")).build(teacher, student)


@pytest.mark.parametrize("kind", ["edm", "flow"])
def test_cached_links_start_at_the_students_times_where_grids_do_not_nest(kind, gaussian_data, tmp_path):
    """A 62-step grid does not hold a 4-step student's times, nor does the flow grid (ending at sigma
    1/1000) at any step count: a 4-step student's timesteps join the teacher's 4-step grid (as link
    starts; EDM's already is the student's) and the cache's grid where they lack them, and each
    cached link's target is the Gaussian teacher's exact ODE solution at the segment end (Heun on 62
    steps plus the added times)."""
    from stepdistill.schedules import EDMSchedule, FlowSchedule

    mu, sd = gaussian_data
    sched = EDMSchedule() if kind == "edm" else FlowSchedule({})
    teacher = GaussianTeacher(sched, mu, sd)
    ts = student_timesteps(sched, 4, sampler="ddim")
    obj = _cached(teacher, tmp_path, 62)
    student = Student(teacher, ts, sampler="ddim")
    obj.build(teacher, student)
    starts, ends = obj._link_times(student)
    assert set(ts.tolist()) <= set(starts.tolist())
    if kind == "edm":  # EDM's 4-step grid less sigma_min is the student's (cache.own_grid): one link per segment
        assert starts.tolist() == ts.tolist()
    assert not set(ts.tolist()) <= set(sched.timesteps(62).tolist())  # the cache's own grid lacks them
    nets = Nets(teacher=teacher, student=student)
    j = torch.arange(40)
    for n in range(len(starts)):
        batch = {"x0": torch.zeros(40, 4, dtype=torch.float64), "cond": None, "rng": QueuedRng(j, torch.full((40,), n))}
        x_t, t, t_end, target, _ = obj.cached_links(nets, batch)
        assert bool((t == starts[n]).all()) and bool((t_end == student.segment_end(t)).all())
        want = teacher.exact(x_t.double(), t, t_end)
        torch.testing.assert_close(target.double(), want, rtol=0, atol=5e-3 * float(want.abs().max()))

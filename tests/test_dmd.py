"""DMD / DMD2 pieces on a tiny teacher: the stop-gradient target has the DMD gradient, backward
simulation runs the student's chain, guidance options, phases, and the regression term's cache."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_teacher
from stepdistill.errors import UserError
from stepdistill.generator import build_student
from stepdistill.objectives.base import Nets
from stepdistill.objectives.common import Draws, pseudo_huber, sample_student, target_loss
from stepdistill.objectives.dmd import DMD, DMD2, dmd_gradient

COND = {"class_labels": torch.tensor([0, 1, 0, 1])}


def _nets(obj, steps=1):
    teacher = tiny_teacher().requires_grad_(False)
    student = build_student(teacher, steps=steps)
    return Nets(teacher=teacher, student=student, **obj.build(teacher, student))


def test_target_loss_gradient_is_the_dmd_gradient():
    x = torch.randn(3, 1, 8, 8, requires_grad=True)
    real, fake = torch.randn(3, 1, 8, 8), torch.randn(3, 1, 8, 8)
    g = dmd_gradient(x.detach(), real, fake)
    target_loss(x, g).sum().backward()
    assert torch.allclose(x.grad * 64, g, atol=1e-6)
    # eq. 8's normaliser: per sample, mean |x - real| of the normalised difference's scale
    assert torch.allclose(g[0], (fake[0] - real[0]) / (x[0] - real[0]).abs().mean(), atol=1e-6)


def test_phases_and_defaults():
    assert [(p.name, p.trains, p.repeats) for p in DMD2().phases()] == [
        ("critic", ("fake_score", "disc"), 5), ("generator", ("student",), 1)]
    assert DMD(DMD.Config(regression_weight=0.0)).phases()[0].repeats == 1
    assert DMD().needs_cache() and not DMD(DMD.Config(regression_weight=0.0)).needs_cache()
    with pytest.raises(UserError, match="objective.cache"):  # no folder (`train` fills in the run folder's)
        DMD().regression.check(None)
    with pytest.raises(UserError, match="guidance_range"):
        DMD2(DMD2.Config(guidance_range=[3.0, 1.0]))


def test_gradient_vanishes_at_initialisation():
    """Fake == teacher at init: the DM gradient is exactly zero (why Adam's first step is full size)."""
    obj = DMD2(DMD2.Config(gan_weight=0.0))
    nets = _nets(obj)
    out = obj.generator_loss(nets, {"x0": torch.zeros(4, 1, 8, 8), "cond": COND})
    assert out["_dmd_grad_norm"].abs().max() == 0


def test_backward_simulation_runs_the_chain():
    teacher = tiny_teacher()
    student = build_student(teacher, steps=4)
    calls = []
    student.denoiser.register_forward_hook(lambda m, a, o: calls.append(torch.is_grad_enabled()))
    torch.manual_seed(0)
    x = sample_student(student, {"class_labels": torch.arange(16) % 2}, Draws({"x0": torch.zeros(16, 1, 8, 8)}))
    assert x.requires_grad and calls[-1] is True and not any(calls[:-1]) and len(calls) >= 2


def test_backward_simulation_follows_a_ddim_students_own_steps():
    """A deterministic ("ddim") student's chain is simulated with its own DDIM steps, not re-noised:
    every sample is the x0 estimate at one of its K steps along the sampling chain from its noise."""
    from stepdistill.generator import StudentConfig

    student = build_student(tiny_teacher(), StudentConfig(steps=4, sampler="ddim"))
    g = torch.Generator().manual_seed(3)
    noise, cond = torch.randn(32, 1, 8, 8, generator=g), {"class_labels": torch.arange(32) % 2}
    torch.manual_seed(0)
    with torch.no_grad():
        out = student.sample(noise, cond, grad_at=torch.randint(0, 4, (32,)))
        ts, x, chain = student.timesteps, student.schedule.prior(noise, student.timesteps[0]), []
        for i, t in enumerate(ts):  # the sampling chain by hand
            chain.append(student.denoise(x, t, cond))
            if i + 1 < len(ts):
                x = student.ddim_to(x, chain[-1], t, ts[i + 1])
        assert torch.allclose(chain[-1], student(noise, cond), atol=1e-6)
    gap = torch.stack([(out - c).flatten(1).abs().amax(1) for c in chain], 1)  # [B, K]
    assert bool((gap.min(1).values < 1e-5).all()) and len(set(gap.argmin(1).tolist())) > 2


def test_snoopi_and_decoupled_guidance():
    obj = DMD2(DMD2.Config(gan_weight=0.0, guidance_range=[1.0, 3.0]))
    nets = _nets(obj)
    with torch.no_grad():
        for p in nets.fake_score.parameters():
            p.add_(0.01 * torch.randn_like(p))
    x = torch.randn(4, 1, 8, 8)
    torch.manual_seed(0)
    g, _ = obj.dm_terms(nets, x, COND)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    # Decoupled DMD with w = 1: the CFG-augmentation term is zero, only the DM term is left
    dec = DMD2(DMD2.Config(gan_weight=0.0, guidance=1.0, cfg_t_range=[0.5, 0.98]))
    torch.manual_seed(0)
    g1, logs = dec.dm_terms(nets, x, COND)
    assert logs["_ca_norm"].abs().max() == 0
    coupled = DMD2(DMD2.Config(gan_weight=0.0, guidance=1.0))
    torch.manual_seed(0)
    g2, _ = coupled.dm_terms(nets, x, COND)
    assert torch.allclose(g1, g2)
    # with w = 2 the CA term is (w - 1)(real_c - real_u), nonzero
    dec2 = DMD2(DMD2.Config(gan_weight=0.0, guidance=2.0, cfg_t_range=[0.5, 0.98]))
    assert dec2.dm_terms(nets, x, COND)[1]["_ca_norm"].min() > 0


def test_regression_term_uses_the_cache(tmp_path):
    obj = DMD(DMD.Config(cache=str(tmp_path / "pairs"), cache_num=8, cache_steps=2, regression_batch=4))
    nets = _nets(obj)
    nets.teacher.meta = {"num_classes": 2, "in_channels": 1, "sample_size": 8}
    out = obj.generator_loss(nets, {"x0": torch.zeros(4, 1, 8, 8), "cond": COND})
    assert (tmp_path / "pairs" / "manifest.json").is_file()
    assert out["regression"].shape == (4,) and out["regression"].requires_grad
    p = obj.regression.pairs
    want = 0.25 * pseudo_huber(nets.student(p.noise, p.cond), p.x0).mean()
    assert 0 < out["regression"].mean() < 3 * want  # a random half of the pairs vs all of them


def test_regression_warmup_trains_the_generator_alone_first(tmp_path):
    """DMD2's one-step recipe: regression pretraining on teacher pairs, the critic waiting, then DMD2;
    the clock survives a checkpoint."""
    assert DMD2(DMD2.Config(regression_warmup=3)).needs_cache() and not DMD2().needs_cache()
    with pytest.raises(UserError, match="regression_warmup must be >= 0"):
        DMD2(DMD2.Config(regression_warmup=-1, cache=str(tmp_path / "pairs")))
    obj = DMD2(DMD2.Config(regression_warmup=2, gan_weight=0.0, cache=str(tmp_path / "pairs"), cache_num=8,
                           cache_steps=2, regression_batch=4))
    assert [(p.name, p.start, p.stop) for p in obj.phases()] == [("warmup", 0, 2), ("critic", 2, None),
                                                                  ("generator", 2, None)]
    nets = _nets(obj)
    nets.teacher.meta = {"num_classes": 2, "in_channels": 1, "sample_size": 8}
    batch = {"x0": torch.zeros(4, 1, 8, 8), "cond": COND}
    out = obj.warmup_loss(nets, batch)
    assert set(out) == {"regression"} and out["regression"].shape == (4,) and out["regression"].requires_grad
    torch.manual_seed(0)
    idx = torch.randint(0, 8, (4,))
    p = obj.regression.pairs
    noise, x_ref, cond = p.get(idx)
    torch.manual_seed(0)
    want = pseudo_huber(nets.student(noise, cond), x_ref).mean()  # weight 1, not regression_weight (0)
    torch.testing.assert_close(obj.warmup_loss(nets, batch)["regression"].mean(), want)
    assert "regression" not in obj.generator_loss(nets, batch) and "dmd" in obj.generator_loss(nets, batch)


class OdeEnd(torch.nn.Module):
    """x0 'estimate' = the exact PF-ODE solution at clean data from (x, t) (the Gaussian teacher's
    closed form), plus `shift`: the exact target of a re-noising student's trajectory regression."""

    def __init__(self, teacher, shift=0.0):
        super().__init__()
        self.teacher, self.schedule, self.shift = teacher, teacher.schedule, shift

    def forward(self, x, t, cond=None):
        t = torch.as_tensor(t, dtype=torch.float64).expand(x.shape[0])
        return self.teacher.exact(x, t, torch.full_like(t, self.schedule.t_clean)) + self.shift


@pytest.mark.parametrize("sampler", ["renoise", "ddim"])
def test_multistep_regression_follows_the_teachers_trajectory(sampler, tmp_path, gaussian_data):
    """A K-step student regresses each step onto cached teacher trajectories: the exact student (the
    ODE's end for a re-noising student, the exact segment jump for a DDIM one) scores only the cache
    solver's error, and one shifted by 0.1 scores regression_weight * 0.01 (mse)."""
    from conftest import GaussianTeacher
    from test_multistep_consistency import ExactJump
    from test_progressive import VP

    from stepdistill.export import student_timesteps
    from stepdistill.generator import Student
    from stepdistill.schedules import VPSchedule

    mu, sd = gaussian_data
    sched = VPSchedule(VP)
    teacher = GaussianTeacher(sched, mu, sd)
    teacher.sample_shape = (4,)
    ts = student_timesteps(sched, 4, sampler=sampler)
    obj = DMD(DMD.Config(cache=str(tmp_path / "c"), cache_num=64, cache_steps=32, cache_sampler="heun",
                         regression_loss="mse", regression_weight=0.5))
    like = torch.zeros(64, 4, dtype=torch.float64)
    scores = []
    for shift in (0.0, 0.1):
        net = OdeEnd(teacher, shift) if sampler == "renoise" else ExactJump(teacher, ts, shift)
        student = Student(net, ts, sampler=sampler)
        obj.regression.check(student)
        torch.manual_seed(0)
        scores.append(float(obj.regression.term(teacher, student, like, Draws({"x0": like})).mean()))
    # the exact student's score is the 32-step Heun cache's own error (its last step into clean data is Euler)
    assert scores[0] < 0.1 * 0.5 * 0.01 and scores[1] == pytest.approx(0.5 * 0.01 + scores[0], rel=0.15)


@pytest.mark.parametrize("kind", ["vp", "edm", "flow"])
def test_multistep_regression_trajectories_hold_the_students_times_on_every_kind(kind, gaussian_data, tmp_path):
    """A 4-step student's regression cache samples on the teacher's own grid (here 128 steps) with the student's
    timesteps added where that grid lacks them (the flow grid does not nest; VP's trailing grid and EDM's
    129-point Karras grid less sigma_min already hold them, and gain nothing). On the Gaussian teacher each
    cached state at a student time is the probability-flow ODE's exact solution from the trajectory's start."""
    from stepdistill.cache import own_grid, trajectory_grid
    from stepdistill.export.scheduler import student_timesteps
    from stepdistill.generator import Student
    from stepdistill.schedules import EDMSchedule, FlowSchedule, VPSchedule

    from conftest import GaussianTeacher

    vp = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
          "prediction_type": "v_prediction", "timestep_spacing": "trailing"}
    sched = {"vp": lambda: VPSchedule(vp), "edm": EDMSchedule, "flow": lambda: FlowSchedule({})}[kind]()
    mu, sd = gaussian_data
    teacher = GaussianTeacher(sched, mu, sd)
    teacher.sample_shape = (4,)
    ts = student_timesteps(sched, 4, sampler="renoise")
    grid = trajectory_grid(sched, 128, ts)
    own = own_grid(sched, 128)
    added = sorted(set(grid.tolist()) - set(own.tolist()))
    assert set(own.tolist()) <= set(grid.tolist()) and set(added) <= set(ts.tolist())  # only student times added
    assert (added == []) == (kind != "flow")  # VP's trailing grids and EDM's Karras grids nest; flow's do not
    if kind == "edm":  # Karras et al., 2022, eq. 5 over 129 points, sigma_min dropped, then 0
        ramp = torch.linspace(0, 1, 129, dtype=torch.float64)
        karras = (80.0 ** (1 / 7) + ramp * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7
        torch.testing.assert_close(grid[:-1], karras[:-1], rtol=1e-6, atol=0)
        assert float(grid[-1]) == 0.0
    assert bool((grid[1:] < grid[:-1]).all())
    obj = DMD(DMD.Config(cache=str(tmp_path / "c"), cache_num=16, cache_steps=128, cache_sampler="heun",
                         regression_loss="mse"))
    student = Student(teacher, ts, sampler="renoise")
    obj.regression.check(student)
    obj.regression.load(teacher, student)
    pairs = obj.regression.pairs
    pos = pairs.grid_index(ts[1:])
    start = pairs.trajectory[:, 0].double()
    for j, t in enumerate(ts[1:]):
        got = pairs.trajectory[:, int(pos[j])].double()
        want = teacher.exact(start, ts[0], t)
        torch.testing.assert_close(got, want, rtol=0, atol=1.5e-3 * float(want.abs().max()))  # Heun's error at 128
    # the first step regresses from the input the student meets when sampling (EDM: sigma_max z, Karras Alg. 1)
    seen = []
    student.denoise = lambda x, t, cond: seen.append(x) or x
    idx = torch.arange(4)
    obj.regression.pair(student, idx, torch.zeros(4, dtype=torch.long), "cpu")
    assert torch.equal(seen[0], student.prior(pairs.get(idx, device="cpu")[0], ts[0]))
    two = Student(teacher, student_timesteps(sched, 2, sampler="renoise"), sampler="renoise")
    if kind == "flow":  # a cache built on another grid is refused, not misread
        with pytest.raises(UserError, match="other settings.*grid"):
            obj.regression.check(two)
    else:  # nested grids: the 4-step student's cache holds the 2-step student's times too
        obj.regression.check(two)


def _tiled(pattern: torch.Tensor, shape) -> torch.Tensor:
    """A [1, 1, 4, 4] per-pixel pattern repeated over channels and space to [1, *shape]."""
    c, h, w = shape
    return pattern.repeat(1, c, h // 4, w // 4)


def test_regression_to_dm_gradient_ratio_does_not_change_with_resolution():
    """DMD's regression term (eq. 9, mean-reduced LPIPS in the paper) and its DM term (mean-reduced,
    gradient g / d per pixel) must keep their balance at every resolution. With the same per-pixel
    errors at 16x16x1 (the digits) and 4x64x64 (SD1.5 latents), the ratio of the two gradient norms
    on the student's output is the same; the sum-form pseudo-Huber made it grow as sqrt(d) (about 9
    at d = 256, 128 at d = 16384)."""
    obj = DMD(DMD.Config(cache="unused-here"))
    g = torch.Generator().manual_seed(0)
    err, real, fake = (torch.randn(1, 1, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    ratios = []
    for shape in [(1, 16, 16), (4, 64, 64)]:
        ref = torch.zeros(1, *shape, dtype=torch.float64)
        x = (ref + _tiled(err, shape)).requires_grad_(True)
        obj.regression.distance(x, ref).sum().backward()
        reg = x.grad.norm()
        x.grad = None
        dm = dmd_gradient(x.detach(), _tiled(real, shape), _tiled(fake, shape))
        target_loss(x, dm).sum().backward()
        ratios.append(float(reg / x.grad.norm()))
    assert ratios[0] == pytest.approx(ratios[1], rel=1e-6)


def test_pseudo_huber_is_icts_sum_form_over_sqrt_d():
    """sqrt(mean((a-b)^2) + c^2) - c = (sqrt(||a-b||^2 + c'^2) - c') / sqrt(d), c' = 0.00054 sqrt(d)
    (Song & Dhariwal, 2023, sec. 3.3)."""
    a, b = torch.randn(3, 4, 8, 8, dtype=torch.float64), torch.randn(3, 4, 8, 8, dtype=torch.float64)
    d = 4 * 8 * 8
    c = 0.00054 * d**0.5
    want = (((a - b) ** 2).flatten(1).sum(1) + c * c).sqrt() - c
    torch.testing.assert_close(pseudo_huber(a, b), want / d**0.5)


def _ks(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic."""
    grid = torch.cat([a, b]).sort().values
    fa = torch.searchsorted(a.sort().values, grid, right=True) / len(a)
    fb = torch.searchsorted(b.sort().values, grid, right=True) / len(b)
    return float((fa - fb).abs().max())


@pytest.mark.parametrize("kind", ["vp", "edm", "flow"])
def test_fake_score_trains_at_the_times_the_dm_term_reads_it(kind):
    """DMD2 trains its fake score uniformly over the 1000-step grid whose [min_step, max_step] part
    the DM term draws from (tianweiy/DMD2 sd_guidance.py compute_loss_fake: randint(0, 1000);
    edm_guidance.py: a uniform index of the Karras grid), so the fake score is accurate where the
    generator reads it. On EDM the teacher's log-normal training times put ~4 % of updates above
    sigma 2.5 where the DM term draws ~50 %; here the times seen by the fake score in the critic
    phase and in the generator phase agree (KS statistic below the 0.1 % critical value for 512 +
    512 draws; the two differ only on the 4 % of the grid outside [0.02, 0.98])."""
    from conftest import tiny_unet2d
    from stepdistill.denoisers import DiffusersDenoiser
    from stepdistill.schedules import EDMSchedule, FlowSchedule, VPSchedule

    sched = {"vp": VPSchedule({"beta_schedule": "scaled_linear", "prediction_type": "v_prediction",
                               "timestep_spacing": "trailing"}),
             "edm": EDMSchedule(), "flow": FlowSchedule({"shift": 3.0})}[kind]
    teacher = DiffusersDenoiser(tiny_unet2d(num_class_embeds=3, channels=1), sched, null_class=2).requires_grad_(False)
    student = build_student(teacher, steps=1)
    obj = DMD2(DMD2.Config(gan_weight=0.0))
    nets = Nets(teacher=teacher, student=student, **obj.build(teacher, student))
    seen = []
    nets.fake_score.register_forward_pre_hook(lambda m, args: seen.append(torch.as_tensor(args[1]).flatten()))
    batch = {"x0": torch.zeros(512, 1, 8, 8), "cond": {"class_labels": torch.arange(512) % 2}}
    torch.manual_seed(0)
    obj.critic_loss(nets, batch)
    critic_t = torch.cat(seen)
    seen.clear()
    obj.generator_loss(nets, batch)
    dm_t = torch.cat(seen)
    assert len(critic_t) == len(dm_t) == 512
    assert _ks(critic_t.double(), dm_t.double()) < 1.95 * (2 / 512) ** 0.5

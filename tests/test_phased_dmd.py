"""Phased DMD (Fan et al., 2025): score matching within a subinterval has the marginal score of x_t as
its minimiser (closed form on a Gaussian, VP / EDM / flow), its flow form is the paper's velocity
target; the mixture-of-experts student answers each time with its expert, trains one expert per
phase, and exports to a pipeline that switches experts by timestep."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import GaussianTeacher, tiny_teacher
from stepdistill.errors import UserError
from stepdistill.export import export_student
from stepdistill.generator import StudentConfig, build_student
from stepdistill.objectives.base import Nets
from stepdistill.objectives.phased_dmd import PhasedDMD
from stepdistill.schedules import EDMSchedule, FlowSchedule, VPSchedule
from stepdistill.train.randomness import BatchRandom

LABELS = torch.tensor([0, 1, 0, 1])


class _Draws:
    """Draws with a fixed time index (the objective's t) and seeded noise."""

    def __init__(self, n, index, seed=0):
        self.n, self.index, self.g = n, index, torch.Generator().manual_seed(seed)

    def randint(self, low, high):
        assert low <= self.index < high, (low, self.index, high)
        return torch.full((self.n,), self.index)

    def randn_like(self, x):
        return torch.randn(x.shape, generator=self.g, dtype=x.dtype)


SCHEDULES = {"vp": lambda: VPSchedule({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                                       "prediction_type": "v_prediction", "timestep_spacing": "trailing"}),
             "edm": lambda: EDMSchedule(), "flow": lambda: FlowSchedule({"shift": 3.0})}


@pytest.mark.parametrize("kind", sorted(SCHEDULES))
def test_subinterval_target_regresses_to_the_marginal_denoiser(kind, gaussian_data):
    """x0 ~ N(mu, c^2), x_s = a_s x0 + sigma_s z, x_t from the kernel q(x_t | x_s): the least-squares
    fit of the fake score's target x0* on x_t (linear: everything is Gaussian) is the exact posterior
    mean E[x0 | x_t] of the marginal at t (conftest.GaussianTeacher), so the fake score's minimiser
    is the score of p_fake(x_t) (sec. 3.3). The naive target x_s is not."""
    from stepdistill.fake_score import noise_grid

    sched = SCHEDULES[kind]()
    mu, c = gaussian_data
    grid = noise_grid(sched)
    s, i_t = grid[400], 700
    obj = PhasedDMD(PhasedDMD.Config(t_range=[0.0, 1.0], margin=1))
    n = 200_000
    g = torch.Generator().manual_seed(1)
    x0 = mu + c * torch.randn(n, 4, generator=g, dtype=torch.float64)
    a_s, sig_s = sched.alpha_sigma(torch.as_tensor(s))
    x_s = a_s * x0 + sig_s * torch.randn(n, 4, generator=g, dtype=torch.float64)
    x_t, t, target = obj._diffuse(sched, x_s, s, _Draws(n, i_t, seed=2))
    assert torch.all(t == grid[i_t])
    exact = GaussianTeacher(sched, mu, c)
    for d in range(4):  # per dimension: target = alpha + beta x_t + noise
        X = torch.stack([torch.ones(n, dtype=torch.float64), x_t[:, d]], 1)
        coef = torch.linalg.lstsq(X, target[:, d:d + 1]).solution.reshape(-1)
        probe = torch.linspace(-2, 2, 5, dtype=torch.float64) * float(x_t[:, d].std()) + float(x_t[:, d].mean())
        fit = coef[0] + coef[1] * probe
        want = exact(probe.reshape(-1, 1).expand(-1, 4), grid[i_t])[:, d]
        assert torch.allclose(fit, want, atol=0.03 * float(c[d]) + 0.01), (kind, d, fit, want)
        naive = torch.linalg.lstsq(X, (x_s[:, d:d + 1] / a_s)).solution.reshape(-1)
        assert not torch.allclose(naive[0] + naive[1] * probe, want, atol=0.03 * float(c[d]) + 0.01)


def test_flow_form_is_the_papers_velocity_target():
    """On a flow schedule (a = 1 - t, sigma = t) the target in the teacher's parameterisation is
    the paper's velocity (sec. 3.3; LightX2V phased_dmd math.py):
    v* = -x_s / a_s + (a_s^2 sigma_t + a_t sigma_s^2) / (a_s^2 sigma_{t|s}) eps."""
    from stepdistill.fake_score import noise_grid

    sched = SCHEDULES["flow"]()
    grid = noise_grid(sched)
    s, i_t = grid[300], 650
    obj = PhasedDMD(PhasedDMD.Config(t_range=[0.0, 1.0], margin=1))
    x_s = torch.randn(6, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    x_t, t, target = obj._diffuse(sched, x_s, s, _Draws(6, i_t, seed=4))
    eps = _Draws(6, i_t, seed=4).randn_like(x_s)
    sig_t, sig_s = float(grid[i_t]) / 1000, float(s) / 1000
    a_t, a_s = 1 - sig_t, 1 - sig_s
    sig_ts = (sig_t**2 - (a_t / a_s) ** 2 * sig_s**2) ** 0.5
    torch.testing.assert_close(x_t, a_t / a_s * x_s + sig_ts * eps)
    v_star = -x_s / a_s + (a_s**2 * sig_t + a_t * sig_s**2) / (a_s**2 * sig_ts) * eps
    torch.testing.assert_close(sched.x0_to_raw(target, x_t, t), v_star, rtol=1e-9, atol=1e-9)


def _phased(experts=(1, 1), seed=0):
    torch.manual_seed(seed)
    teacher = tiny_teacher().requires_grad_(False)
    obj = PhasedDMD(PhasedDMD.Config(experts=list(experts), critic_repeats=1))
    student = build_student(teacher, StudentConfig(steps=obj.student_steps(), sampler="ddim",
                                                   experts=obj.student_experts()))
    with torch.no_grad():  # the second expert away from the first
        for p in student.experts[1].parameters():
            p.add_(0.05 * torch.randn_like(p))
    nets = Nets(teacher=teacher, student=student, **obj.build(teacher, student))
    with torch.no_grad():  # the fake scores away from the teacher (the DM gradient vanishes where they agree)
        for k in range(1, len(experts) + 1):
            for p in getattr(nets, f"fake_score_{k}").parameters():
                p.add_(0.02 * torch.randn_like(p))
    return obj, nets


def test_each_time_is_answered_by_its_expert():
    obj, nets = _phased((1, 1))
    st = nets.student
    ts = st.timesteps
    assert len(st.experts) == 2 and st.expert_bounds.tolist() == [float(ts[1])]
    x = torch.randn(4, 1, 8, 8)
    cond = {"class_labels": LABELS}
    with torch.no_grad():
        e0, e1 = (e(x, t, cond) for e, t in zip(st.experts, ts))
        torch.testing.assert_close(st.denoise(x, ts[0], cond), e0)
        torch.testing.assert_close(st.denoise(x, ts[1], cond), e1)
        mixed = st.denoise(x, torch.tensor([ts[0], ts[1], ts[1], ts[0]]), cond)
        torch.testing.assert_close(mixed[[0, 3]], e0[[0, 3]])
        torch.testing.assert_close(mixed[[1, 2]], e1[[1, 2]])
        assert not torch.allclose(e0, st.experts[1](x, ts[0], cond))  # the experts differ


@pytest.mark.parametrize("phase", [1, 2])
def test_a_phase_trains_its_own_expert_and_fake_score(phase):
    obj, nets = _phased((1, 1))
    batch = {"x0": torch.zeros(4, 1, 8, 8), "cond": {"class_labels": LABELS}, "rng": BatchRandom(0, 4, slice(0, 4))}
    for kind in ("generator", "critic"):
        nets.zero_grad(set_to_none=True)
        out = obj.losses(f"{kind}_{phase}", nets, batch)
        sum(v.mean() for k, v in out.items() if not k.startswith("_")).backward()
        grads = [any(p.grad is not None and p.grad.abs().sum() > 0 for p in e.parameters())
                 for e in nets.student.experts]
        fakes = [any(p.grad is not None for p in getattr(nets, f"fake_score_{k}").parameters()) for k in (1, 2)]
        if kind == "generator":
            assert grads == [phase == 1, phase == 2] and fakes == [False, False]
        else:
            assert grads == [False, False] and fakes == [phase == 1, phase == 2]


def test_generator_gradient_is_dmds_at_nested_times_above_the_phase_end():
    """Phase 1 of a 2 + 2-step student on fixed draws (steps j in {0, 1} mixed over the batch): the
    gradient that reaches expert 1's weights is that of 0.5 mean((x0 - sg(x0 - g))^2) with DMD's
    g = (F(x_t) - T(x_t)) / mean|x0 - T(x_t)| (eq. 7-8), x0 = G_1(x_j, t_j), x_s = DDIM(x_j, x0 -> s),
    x_t = a_{t|s} x_s + sigma_{t|s} eps at a grid time above s + margin: sign and scale included."""
    from stepdistill.fake_score import noise_grid

    obj, nets = _phased((2, 2))
    st, teacher, fake = nets.student, nets.teacher, nets.fake_score_1
    ts, x0 = st.timesteps, torch.zeros(4, 1, 8, 8)
    cond = {"class_labels": LABELS}
    rng = BatchRandom(11, 4, slice(0, 4))
    j = rng.randint(0, 2)  # the step within the phase, then the generator's noise
    assert set(j.tolist()) == {0, 1}, j
    z = rng.randn_like(x0)
    grid, s = noise_grid(teacher.schedule), ts[2]
    lo = int(torch.searchsorted(grid, s.to(torch.float64))) + obj.cfg.margin
    t = grid[rng.randint(lo, 981)]
    eps = rng.randn_like(x0)
    e0 = st.experts[0]
    with torch.no_grad():  # x_j: the prior for j = 0, one DDIM step of expert 1 for j = 1
        x1 = st.ddim_to(z, e0(z, ts[0], cond), ts[0], ts[1])
        x_j = torch.where((j == 1).reshape(-1, 1, 1, 1), x1, z)
    x_hat = e0(x_j, ts[j], cond)  # with gradient
    with torch.no_grad():
        x_s = st.ddim_to(x_j, x_hat, ts[j], s)
        (a_t, s_t), (a_s, s_s) = teacher.schedule.alpha_sigma(t), teacher.schedule.alpha_sigma(s)
        sig = (s_t**2 - (a_t / a_s) ** 2 * s_s**2).sqrt().reshape(-1, 1, 1, 1)
        x_t = ((a_t / a_s).reshape(-1, 1, 1, 1) * x_s + sig * eps).float()
        real = teacher(x_t, t, cond)
        g = (fake(x_t, t, cond) - real) / (x_hat - real).abs().flatten(1).mean(1).reshape(-1, 1, 1, 1)
    want = torch.autograd.grad((0.5 * (x_hat - (x_hat - g).detach()).pow(2).flatten(1).mean(1)).sum(),
                               list(e0.parameters()))
    out = obj.losses("generator_1", nets, {"x0": x0, "cond": cond, "rng": BatchRandom(11, 4, slice(0, 4))})
    got = torch.autograd.grad(out["dmd"].sum(), list(e0.parameters()))
    assert bool((t > s).all()) and float(g.abs().max()) > 1e-4
    torch.testing.assert_close(out["_dmd_grad_norm"], g.flatten(1).norm(dim=1), rtol=1e-4, atol=1e-6)
    got, want = torch.cat([a.flatten() for a in got]), torch.cat([b.flatten() for b in want])
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4 * float(want.abs().max()))
    assert float((got * want).sum()) > 0.99 * float(want.norm() ** 2)  # the same direction: the sign included


def test_critic_learns_on_the_phase_end_state_of_the_full_rollout():
    """The critic's x_s is the deterministic chain's state at s (both steps of phase 1), and its
    target is finite where a_t = 0 (a flow teacher's t = 1)."""
    obj, nets = _phased((2, 2))
    st, cond = nets.student, {"class_labels": LABELS}
    rng = BatchRandom(5, 4, slice(0, 4))
    with torch.no_grad():
        _, x_s = obj._rollout(st, cond, _Seq(rng), torch.full((4,), 1), 0)
        z = BatchRandom(5, 4, slice(0, 4)).randn_like(torch.zeros(4, 1, 8, 8))
        ts = st.timesteps
        chain = st.ddim_to(z, st.denoise(z, ts[0], cond), ts[0], ts[1])
        chain = st.ddim_to(chain, st.denoise(chain, ts[1], cond), ts[1], ts[2])
    torch.testing.assert_close(x_s, chain, rtol=1e-5, atol=1e-6)
    flow = SCHEDULES["flow"]()
    from stepdistill.fake_score import noise_grid

    top = len(noise_grid(flow)) - 1
    o = PhasedDMD(PhasedDMD.Config(t_range=[0.0, 1.0]))
    _, t, target = o._diffuse(flow, torch.randn(3, 1, 4, 4), None, _Draws(3, top))
    assert float(t[0]) == 1000.0 and torch.isfinite(target).all()


class _Seq:
    """Draws over a BatchRandom stream (the objective's ``Draws`` interface, as the trainer's)."""

    def __init__(self, rng):
        self.rng, self.n = rng, 4

    def noise(self):
        return self.rng.randn_like(torch.zeros(4, 1, 8, 8))

    def randn_like(self, x):
        return self.rng.randn_like(x)


def test_phases_take_shares_of_the_run_and_bad_configs_are_refused():
    obj = PhasedDMD(PhasedDMD.Config(experts=[2, 1, 1], shares=[2, 1, 1]))
    ph = obj.phases()
    assert [p.name for p in ph] == ["critic_1", "generator_1", "critic_2", "generator_2", "critic_3", "generator_3"]
    assert [(p.start_fraction, p.stop_fraction) for p in ph[::2]] == [(None, 0.5), (0.5, 0.75), (0.75, None)]
    assert obj.student_steps() == 4 and obj.student_experts() == [2, 1, 1] and obj.student_sampler() == "ddim"
    assert callable(obj.generator_3_loss) and not hasattr(obj, "generator_4_loss")
    with pytest.raises(UserError, match="shares"):
        PhasedDMD(PhasedDMD.Config(experts=[2, 2], shares=[1.0]))
    with pytest.raises(UserError, match="experts"):
        build_student(tiny_teacher(), StudentConfig(steps=4, sampler="ddim", experts=[2, 1]))
    with pytest.raises(UserError, match="no times"):  # the last phase's start leaves nothing above it
        o = PhasedDMD(PhasedDMD.Config(experts=[1, 1], t_range=[0.0, 0.5]))
        teacher = tiny_teacher()
        o.build(teacher, build_student(teacher, StudentConfig(steps=2, sampler="ddim", experts=[1, 1])))


SNIPPET = textwrap.dedent("""
    import sys
    import torch
    from diffusers import DiffusionPipeline
    from safetensors.torch import save_file

    pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(class_labels=[0, 1, 0, 1], generator=torch.Generator().manual_seed(5), output_type="latent").images
    assert "stepdistill" not in sys.modules
    save_file({"x": out.contiguous()}, sys.argv[2])
""")


@pytest.mark.parametrize("kind", ["vp", pytest.param("edm", marks=pytest.mark.slow), pytest.param("flow", marks=pytest.mark.slow)])
def test_export_switches_experts_by_timestep_in_plain_diffusers(kind, tmp_path):
    """A 4-step student with experts [2, 2] exported: diffusers loads the folder (no stepdistill) and
    reproduces the student's samples; stepdistill loads it back with both experts."""
    from safetensors.torch import load_file

    from stepdistill.denoisers import DiffusersDenoiser
    from stepdistill.loaders import load_for_sampling
    from conftest import tiny_unet2d

    teacher = tiny_teacher() if kind == "vp" else DiffusersDenoiser(tiny_unet2d(num_class_embeds=3), SCHEDULES[kind](),
                                                                    null_class=2)
    student = build_student(teacher, StudentConfig(steps=4, sampler="ddim", experts=[2, 2])).eval()
    with torch.no_grad():
        for p in student.experts[1].parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = export_student(student, {"num_classes": 2, "null_class": 2}, tmp_path / "moe")
    index = json.loads((out / "model_index.json").read_text())
    assert index["unet_2"] == ["diffusers", "UNet2DModel"] and index["expert_bounds"] == [float(student.timesteps[2])]
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-I", "-c", SNIPPET, str(out), str(tmp_path / "x.safetensors")], env=env,
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    got = load_file(tmp_path / "x.safetensors")["x"]
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(4, 1, 8, 8, generator=g)
    with torch.no_grad():
        ours = student(noise, {"class_labels": LABELS}, generator=g)
        single = build_student(teacher, StudentConfig(steps=4, sampler="ddim")).eval()
        single.denoiser.load_state_dict(student.denoiser.state_dict())
        assert not torch.allclose(single(noise, {"class_labels": LABELS}), ours, atol=1e-4)  # expert 2 matters
    torch.testing.assert_close(got, ours, rtol=0, atol=1e-4)
    assert "| experts | 2 networks" in (out / "README.md").read_text()
    back = load_for_sampling(out).student
    assert back.steps_per_expert == [2, 2]
    with torch.no_grad():
        torch.testing.assert_close(back(noise, {"class_labels": LABELS}), ours, rtol=0, atol=1e-5)
    with pytest.raises(UserError, match="experts"):
        export_student(student, {"num_classes": 2, "null_class": 2}, tmp_path / "lora", lora=True)


def test_learning_rate_schedules_count_the_updates_of_one_iteration():
    """A net's schedule is sized by the updates it gets in one outer iteration: phases that follow one
    another (Phased DMD's experts, a warm-up and its successor) count once, concurrent ones add up."""
    from stepdistill.objectives.base import Phase
    from stepdistill.objectives.dmd import DMD2
    from stepdistill.train.setup import updates_per_iteration

    obj = PhasedDMD(PhasedDMD.Config(experts=[2, 1, 1], critic_repeats=3))
    assert updates_per_iteration(obj.phases(), "student") == 1
    assert updates_per_iteration(obj.phases(), "fake_score_2") == 3
    warm = DMD2(DMD2.Config(regression_warmup=10, critic_repeats=2)).phases()
    assert updates_per_iteration(warm, "student") == 1 and updates_per_iteration(warm, "fake_score") == 2
    both = [Phase("a", ("student",), repeats=2), Phase("b", ("student",), stop_fraction=0.5)]
    assert updates_per_iteration(both, "student") == 3  # b runs alongside a
    mixed = [Phase("a", ("student",), stop=5), Phase("b", ("student",), start_fraction=0.5)]
    assert updates_per_iteration(mixed, "student") == 2  # spans in different units: taken to overlap


def test_each_later_expert_warms_its_learning_rate_up_from_its_phase_start(tiny_teacher_dir, tiny_data_npz,
                                                                          tmp_path):
    """Expert 2 starts mid-run from the teacher's weights with fresh Adam moments, as expert 1 did at the
    run's start: its updates get a linear warm-up of expert_warmup iterations (1/4, 2/4, 3/4, 1 of the
    configured LR), the fake scores none; resumed mid-warm-up, the warm-up continues where it was."""
    from accelerate.state import AcceleratorState

    from stepdistill.train import resolve
    from stepdistill.train.trainer import Trainer

    def run(max_steps):
        over = dict(teacher=tiny_teacher_dir, data=tiny_data_npz, output_dir=tmp_path / "run", cpu="true",
                    batch_size=2, max_steps=max_steps, checkpoint_every=6, log_every=1, preview_every="null",
                    progress="false", **{"objective.name": "phased_dmd", "objective.experts": "[1,1]",
                                         "objective.critic_repeats": 1, "objective.expert_warmup": 4,
                                         "objective.margin": 2, "student.steps": 2, "optim.student.lr": 1e-3,
                                         "optim.student.warmup_steps": 0, "optim.student.lr_schedule": "constant",
                                         "optim.fake_score_1.lr": 1e-3, "optim.fake_score_2.lr": 1e-3,
                                         "optim.fake_score_2.lr_schedule": "constant"})
        try:
            Trainer(*resolve(None, [f"{k}={v}" for k, v in over.items()])).train()
        finally:
            AcceleratorState._reset_state(True)
        lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        return {x["step"]: x["lr"] for x in lines if "lr" in x}

    lr = run(6)  # shares [1, 1] of 8 iterations would switch at 4; a 6-iteration first start switches at 3
    assert [round(lr[s]["student"] / 1e-3, 6) for s in range(1, 7)] == [1.0, 1.0, 1.0, 0.25, 0.5, 0.75]
    assert all(lr[s]["fake_score_2"] == 1e-3 for s in range(4, 7))
    lr = run(8)  # resumed at iteration 6: the warm-up's fourth iteration (a restart would give 0.25), then 1
    assert [round(lr[s]["student"] / 1e-3, 6) for s in (7, 8)] == [1.0, 1.0]

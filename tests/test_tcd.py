"""TCD (Zheng et al., 2024): the student's strategic stochastic sampling against diffusers' own
TCDScheduler loop, the export round trip through the shipped pipeline (eta = the trained gamma),
and the loss of Alg. 1 against a transcription on fixed tensors."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_teacher
from stepdistill.errors import UserError
from stepdistill.export import export_student, student_scheduler_config
from stepdistill.export.scheduler import make_scheduler
from stepdistill.generator import Student, StudentConfig, build_student
from stepdistill.objectives.tcd import TCD
from stepdistill.objectives.base import Nets
from stepdistill.train.randomness import BatchRandom

LABELS = torch.tensor([0, 1, 1])


def _student(k, gamma):
    torch.manual_seed(0)
    teacher = tiny_teacher()
    return teacher, build_student(teacher, StudentConfig(steps=k, sampler="tcd", gamma=gamma)).eval()


@pytest.mark.parametrize("gamma", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_student_sampling_is_the_tcd_scheduler_loop(k, gamma):
    """Noise from one generator, initial first (as pipelines draw it): the student's K steps equal
    diffusers' TCDScheduler.step(eta=gamma) loop on the same backbone, step noise included."""
    _, student = _student(k, gamma)
    sched = make_scheduler(student_scheduler_config(student.schedule, None, k, sampler="tcd"))
    assert type(sched).__name__ == "TCDScheduler"
    sched.set_timesteps(k)
    assert sched.timesteps.double().tolist() == student.timesteps.tolist()
    g = torch.Generator().manual_seed(4)
    noise = torch.randn(3, 1, 8, 8, generator=g)
    with torch.no_grad():
        ours = student(noise, {"class_labels": LABELS}, generator=g)
        g = torch.Generator().manual_seed(4)
        x = torch.randn(3, 1, 8, 8, generator=g)
        for t in sched.timesteps:
            out = student.denoiser.backbone(x, t, class_labels=LABELS).sample
            x = sched.step(out, t, x, eta=gamma, generator=g).prev_sample
    torch.testing.assert_close(ours, x, rtol=0, atol=2e-5)


def test_export_runs_in_the_shipped_pipeline_with_the_trained_gamma(tmp_path):
    from diffusers import TCDScheduler, UNet2DModel

    from stepdistill.export.pipeline import StepDistillPipeline
    from stepdistill.loaders import load_for_sampling

    _, student = _student(4, 0.5)
    out = export_student(student, {"num_classes": 2, "null_class": 2}, tmp_path / "tcd")
    index = json.loads((out / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "TCDScheduler"] and index["gamma"] == 0.5
    pipe = StepDistillPipeline(unet=UNet2DModel.from_pretrained(out / "unet"),
                               scheduler=TCDScheduler.from_pretrained(out / "scheduler"), trained_steps=4, gamma=0.5)
    got = pipe(class_labels=LABELS.tolist(), generator=torch.Generator().manual_seed(5), output_type="latent").images
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(3, 1, 8, 8, generator=g)
    with torch.no_grad():
        ours = student(noise, {"class_labels": LABELS}, generator=g)
    torch.testing.assert_close(got, ours, rtol=0, atol=1e-4)
    model = load_for_sampling(out)
    assert model.student.sampler == "tcd" and model.student.gamma == 0.5
    assert "strategic stochastic" in (out / "README.md").read_text()


def test_tcd_sampler_is_refused_off_vp_and_with_a_boundary():
    from stepdistill.schedules import EDMSchedule

    teacher = tiny_teacher()
    with pytest.raises(UserError, match="VP teacher"):
        Student(teacher.__class__(teacher.backbone, EDMSchedule(), null_class=2), [80.0], sampler="tcd")
    with pytest.raises(UserError, match="boundary"):
        build_student(teacher, StudentConfig(steps=2, sampler="tcd", boundary="lcm"))
    with pytest.raises(UserError, match="gamma"):
        build_student(teacher, StudentConfig(steps=2, sampler="tcd", gamma=1.5))


def test_loss_is_alg1_on_fixed_tensors():
    """Alg. 1 transcribed with the schedule's alphas-cumprod table: n, m from the same draws, DDIM teacher
    step (eq. 12 of Song et al., 2021), f = DDIM jump of the x0 estimate to s (TCD eq. 11), l2."""
    teacher, student = _student(2, 0.3)
    teacher.requires_grad_(False)
    obj = TCD(TCD.Config(teacher_steps=10, target_ema=0.0))
    nets = Nets(teacher=teacher, student=student, **obj.build(teacher, student))
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1
    cond = {"class_labels": torch.tensor([0, 1, 0, 1])}
    batch = {"x0": x0, "cond": cond, "rng": BatchRandom(11, 4, slice(0, 4))}
    with torch.no_grad():
        got = obj.generator_loss(nets, batch)["loss"]
    # the same draws, in the objective's order: n, m, then eps
    rng = BatchRandom(11, 4, slice(0, 4))
    n = rng.randint(0, 10)
    m = n + 1 + torch.floor(rng.rand(dtype=torch.float64) * (10 - n)).long()
    eps = rng.randn_like(x0)
    ab = torch.cat([student.schedule.alphas_cumprod.double(), torch.ones(1, dtype=torch.float64)])  # index -1: clean
    grid = torch.tensor([999, 899, 799, 699, 599, 499, 399, 299, 199, 99, -1]).long()

    def a_s(t):
        v = ab[t].reshape(-1, 1, 1, 1)
        return v.sqrt(), (1 - v).sqrt()

    def x0_of(net, x, t):
        return net(x, grid[t].double(), cond).double()

    def ddim(x, x0_hat, t_from, t_to):
        (a, s), (a2, s2) = a_s(grid[t_from]), a_s(grid[t_to])
        eps_hat = (x - a * x0_hat) / s
        return a2 * x0_hat + s2 * eps_hat

    a, s = a_s(grid[n])
    x_t = (a * x0 + s * eps).float()
    with torch.no_grad():
        f = ddim(x_t.double(), x0_of(student.denoise, x_t, n), n, m)
        x_prev = ddim(x_t.double(), x0_of(teacher, x_t, n), n, n + 1).float()
        target = ddim(x_prev.double(), x0_of(student.denoise, x_prev, n + 1), n + 1, m)
        clean = (grid[m] == -1).reshape(-1, 1, 1, 1)
        f = torch.where(clean, x0_of(student.denoise, x_t, n), f)
        target = torch.where(clean, x0_of(student.denoise, x_prev, n + 1), target)
        target = torch.where((m == n + 1).reshape(-1, 1, 1, 1), x_prev.double(), target)
    expected = (f - target).square().flatten(1).mean(1)
    assert (m > n + 1).any()  # a target inside the trajectory, not only the one-step boundary
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-7)


def test_the_student_samples_on_its_training_grid():
    """TCD trains f(x_t, t, s) only at t on LCM's 50-step grid (999, 979, ..., 19): the 4-step student
    samples at the TCDScheduler grid drawn from it (original_inference_steps = 50: skip 12.5 grid points,
    indices 0, 12, 25, 37), every time one the objective trains; a grid that cannot hold them is refused."""
    teacher, student = _student(4, 0.3)
    assert student.timesteps.tolist() == [999.0, 759.0, 499.0, 259.0]
    grid = teacher.schedule.timesteps(50).tolist()
    assert all(t in grid for t in student.timesteps.tolist())
    TCD(TCD.Config()).build(teacher, student)
    with pytest.raises(UserError, match="teacher_steps"):
        TCD(TCD.Config(teacher_steps=8)).build(teacher, student)  # 999, 874, ...: no 759
